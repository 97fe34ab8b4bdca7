"""The training losses of the global methods: next-token cross-entropy and distillation (KL to a teacher)."""
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
