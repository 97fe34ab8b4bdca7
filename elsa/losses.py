"""The training losses of the global methods: next-token cross-entropy, distillation (KL to a teacher) and
SquareHead (the blocks' outputs against the teacher's), and :class:`LossTerms`, the weighted sum a method trains on."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossTerms:
    """A training method's loss, term by term: ``ntp`` x next-token cross-entropy + ``kl`` x KL(teacher || student)
    + ``rem`` x MSE of the final hidden states against the teacher's (ELSA's loss=rem) + ``squarehead`` x SquareHead
    (every block's output against the teacher's: AST). A term at 0 is not computed; the teacher is needed iff kl,
    rem or squarehead is set (without a teacher the loss is the next-token loss)."""

    ntp: float = 1.0
    kl: float = 0.0
    rem: float = 0.0
    squarehead: float = 0.0

    @property
    def needs_teacher(self) -> bool:
        return bool(self.kl or self.squarehead or self.rem)

    @property
    def hidden(self) -> bool:
        """The forwards return hidden states: rem reads the last, SquareHead every block's."""
        return bool(self.squarehead or self.rem)

    def combine(self, out, teacher_out, ids, ce, kl, temperature: float):
        """The weighted sum of the student's ``out`` against ``teacher_out`` (model outputs), with the cross-entropy
        ``ce`` and the KL ``kl`` given (plain or token-chunked), summed in a fixed order: kl, ntp, rem, squarehead."""
        logits = out.logits
        loss = self.kl * kl(logits, teacher_out.logits, temperature) if self.kl else 0.0
        if self.ntp:
            loss = loss + self.ntp * ce(logits, ids)
        if self.rem:
            loss = loss + self.rem * F.mse_loss(out.hidden_states[-1].float(), teacher_out.hidden_states[-1].float())
        if self.squarehead:
            loss = loss + self.squarehead * squarehead_loss(out.hidden_states[1:], teacher_out.hidden_states[1:])
        return loss


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def kl_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean per-token KL(teacher || student) on the logits, scaled by T^2."""
    t = temperature
    s = F.log_softmax(logits[:, :-1].float() / t, dim=-1).flatten(0, 1)
    q = F.log_softmax(teacher_logits[:, :-1].float() / t, dim=-1).flatten(0, 1)
    return F.kl_div(s, q, log_target=True, reduction="batchmean") * t * t


def squarehead_loss(hidden, teacher_hidden) -> torch.Tensor:
    """SquareHead (Kurtic et al. 2023; AST's layer-wise term): the sum over blocks of the mean squared difference
    of the student's block output from the teacher's, each normalised by the mean square of the teacher's."""
    eps = torch.finfo(torch.bfloat16).eps
    total = 0.0
    for h, t in zip(hidden, teacher_hidden):
        total = total + (h.float() - t.float()).pow(2).mean() / (t.float().pow(2).mean() + eps)
    return total


class _ChunkedKL(torch.autograd.Function):
    """sum over rows of KL(softmax(t / T) || softmax(s / T)), computed ``chunk`` rows at a time in fp32 without
    keeping the vocabulary-wide log-softmaxes for the backward pass (it recomputes them per chunk)."""

    @staticmethod
    def forward(ctx, s, t, temperature, chunk):
        total = torch.zeros((), dtype=torch.float32, device=s.device)
        for i in range(0, s.shape[0], chunk):
            ls = torch.log_softmax(s[i:i + chunk].float() / temperature, -1)
            lt = torch.log_softmax(t[i:i + chunk].float() / temperature, -1)
            total += (lt.exp() * (lt - ls)).sum()
        ctx.save_for_backward(s, t)
        ctx.temperature, ctx.chunk = temperature, chunk
        return total

    @staticmethod
    def backward(ctx, grad):
        s, t = ctx.saved_tensors
        temp, chunk = ctx.temperature, ctx.chunk
        out = torch.empty_like(s)
        for i in range(0, s.shape[0], chunk):
            ps = torch.softmax(s[i:i + chunk].float() / temp, -1)
            ps -= torch.softmax(t[i:i + chunk].float() / temp, -1)
            out[i:i + chunk] = ps.mul_(grad / temp)
        return out, None, None, None


class _ChunkedCE(torch.autograd.Function):
    """sum over rows of -log softmax(s)[target], ``chunk`` rows at a time in fp32 (recomputed in the backward)."""

    @staticmethod
    def forward(ctx, s, target, chunk):
        total = torch.zeros((), dtype=torch.float32, device=s.device)
        for i in range(0, s.shape[0], chunk):
            x = s[i:i + chunk].float()
            total += (torch.logsumexp(x, -1) - x.gather(1, target[i:i + chunk, None]).squeeze(1)).sum()
        ctx.save_for_backward(s, target)
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, grad):
        s, target = ctx.saved_tensors
        out = torch.empty_like(s)
        for i in range(0, s.shape[0], ctx.chunk):
            p = torch.softmax(s[i:i + ctx.chunk].float(), -1)
            p.scatter_add_(1, target[i:i + ctx.chunk, None], torch.full_like(p[:, :1], -1.0))
            out[i:i + ctx.chunk] = p.mul_(grad)
        return out, None, None


def lm_loss_chunked(logits: torch.Tensor, ids: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """:func:`lm_loss` in vocabulary chunks of ``chunk`` tokens: equal up to float summation order, without the
    fp32 copy and the log-softmax of every logit held for the backward pass."""
    s = logits[:, :-1].flatten(0, 1)
    return _ChunkedCE.apply(s, ids[:, 1:].flatten(), chunk) / s.shape[0]


def kl_loss_chunked(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                    chunk: int = 256) -> torch.Tensor:
    """:func:`kl_loss` in chunks of ``chunk`` tokens (equal up to float summation order)."""
    s = logits[:, :-1].flatten(0, 1)
    t = teacher_logits[:, :-1].flatten(0, 1)
    return _ChunkedKL.apply(s, t.detach(), float(temperature), chunk) / s.shape[0] * temperature * temperature
