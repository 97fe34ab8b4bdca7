"""The training losses of the global methods: next-token cross-entropy, distillation (KL to a teacher) and
SquareHead (the blocks' outputs against the teacher's)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
