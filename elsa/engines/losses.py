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


def _row_chunks(logits: torch.Tensor, chunk: int):
    """(batch row, first position, count) of the shifted positions 0..L-2 of every sequence, ``chunk`` at a time:
    slices of the logits themselves, so the shifted [B, L-1, V] copy is never made."""
    batch, length = logits.shape[:2]
    for b in range(batch):
        for i in range(0, length - 1, chunk):
            yield b, i, min(chunk, length - 1 - i)


class _Buffers:
    """fp32 work buffers of ``chunk`` vocabulary-wide rows, allocated once per loss call and reused by every
    chunk: a fresh 50 MB tensor per operation costs more in page faults than the operation itself on a CPU."""

    def __init__(self, n: int, rows: int, vocab: int, device):
        self.bufs = [torch.empty(rows, vocab, dtype=torch.float32, device=device) for _ in range(n)]

    def take(self, rows: int):
        return [b[:rows] for b in self.bufs]


def _log_softmax_into(out: torch.Tensor, x: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(x / T) in fp32 into ``out`` (x copied and converted in place; no temporaries)."""
    out.copy_(x)
    if temperature != 1.0:
        out.div_(temperature)
    return torch.log_softmax(out, -1, out=out)


class _ChunkedKL(torch.autograd.Function):
    """sum over shifted positions of KL(softmax(t / T) || softmax(s / T)) for [B, L, V] logits, ``chunk`` rows at a
    time in fp32 work buffers, without keeping the vocabulary-wide log-softmaxes for the backward pass (it
    recomputes them per chunk)."""

    @staticmethod
    def forward(ctx, s, t, temperature, chunk):
        total = torch.zeros((), dtype=torch.float64, device=s.device)
        buf = _Buffers(2, chunk, s.shape[-1], s.device)
        for b, i, n in _row_chunks(s, chunk):
            ls, lt = buf.take(n)
            _log_softmax_into(ls, s[b, i:i + n], temperature)
            _log_softmax_into(lt, t[b, i:i + n], temperature)
            ls.sub_(lt).neg_()                      # lt - ls
            total += torch.dot(lt.exp_().view(-1), ls.view(-1))
        ctx.save_for_backward(s, t)
        ctx.temperature, ctx.chunk = temperature, chunk
        return total.float()

    @staticmethod
    def backward(ctx, grad):
        s, t = ctx.saved_tensors
        temp, chunk = ctx.temperature, ctx.chunk
        out = torch.empty_like(s)
        out[:, -1].zero_()                          # the last position predicts nothing
        buf = _Buffers(2, chunk, s.shape[-1], s.device)
        scale = grad / temp
        for b, i, n in _row_chunks(s, chunk):
            ps, pt = buf.take(n)
            _log_softmax_into(ps, s[b, i:i + n], temp).exp_()
            _log_softmax_into(pt, t[b, i:i + n], temp).exp_()
            out[b, i:i + n] = ps.sub_(pt).mul_(scale)
        return out, None, None, None


class _ChunkedCE(torch.autograd.Function):
    """sum over shifted positions of -log softmax(s)[next id] for [B, L, V] logits, ``chunk`` rows at a time in
    fp32 work buffers (recomputed in the backward)."""

    @staticmethod
    def forward(ctx, s, ids, chunk):
        total = torch.zeros((), dtype=torch.float64, device=s.device)
        buf = _Buffers(1, chunk, s.shape[-1], s.device)
        for b, i, n in _row_chunks(s, chunk):
            x, = buf.take(n)
            ls = _log_softmax_into(x, s[b, i:i + n], 1.0)
            total -= ls.gather(1, ids[b, i + 1:i + 1 + n, None]).sum()
        ctx.save_for_backward(s, ids)
        ctx.chunk = chunk
        return total.float()

    @staticmethod
    def backward(ctx, grad):
        s, ids = ctx.saved_tensors
        out = torch.empty_like(s)
        out[:, -1].zero_()
        buf = _Buffers(1, ctx.chunk, s.shape[-1], s.device)
        for b, i, n in _row_chunks(s, ctx.chunk):
            p, = buf.take(n)
            _log_softmax_into(p, s[b, i:i + n], 1.0).exp_()
            p.scatter_add_(1, ids[b, i + 1:i + 1 + n, None], torch.full_like(p[:, :1], -1.0))
            out[b, i:i + n] = p.mul_(grad)
        return out, None, None


def lm_loss_chunked(logits: torch.Tensor, ids: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """:func:`lm_loss` in chunks of ``chunk`` positions: equal up to float summation order, without the fp32
    copy, the shifted copy and the log-softmax of every logit held for the backward pass."""
    return _ChunkedCE.apply(logits, ids, chunk) / (logits.shape[0] * (logits.shape[1] - 1))


def kl_loss_chunked(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                    chunk: int = 256) -> torch.Tensor:
    """:func:`kl_loss` in chunks of ``chunk`` positions (equal up to float summation order)."""
    rows = logits.shape[0] * (logits.shape[1] - 1)
    return _ChunkedKL.apply(logits, teacher_logits.detach(), float(temperature), chunk) / rows \
        * temperature * temperature
