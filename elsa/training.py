"""Shared machinery of the training-based (global) methods: data, schedules, losses, checkpoints."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from elsa.errors import ElsaError

log = logging.getLogger(__name__)


class TrainWindows:
    """Non-overlapping ``seqlen`` windows of a token stream, visited in a seeded random order per epoch.

    Stateless in the step: micro-batch ``i`` is a pure function of (seed, i), so resuming needs only the
    step counter and the data position is exact.
    """

    def __init__(self, tokens: torch.Tensor, seqlen: int, batch_size: int, seed: int, bos: int | None):
        self.body = seqlen - (bos is not None)
        self.n = (len(tokens) - 1) // self.body
        if self.n < batch_size:
            raise ElsaError(f"seqlen={seqlen} is not allowed: the training split holds only {self.n} windows, "
                            f"fewer than method.batch_size={batch_size}")
        self.tokens, self.seqlen, self.batch_size, self.seed, self.bos = tokens, seqlen, batch_size, seed, bos
        self._perm_epoch, self._perm = -1, None

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm

    def batch(self, index: int) -> torch.Tensor:
        """Micro-batch ``index`` (0, 1, 2, ...): (batch_size, seqlen) input ids."""
        rows = []
        for j in range(index * self.batch_size, (index + 1) * self.batch_size):
            w = int(self._order(j // self.n)[j % self.n])
            rows.append(self.tokens[w * self.body:(w + 1) * self.body].long())
        ids = torch.stack(rows)
        if self.bos is not None:
            ids = torch.cat([torch.full((len(rows), 1), self.bos, dtype=torch.long), ids], dim=1)
        return ids


def linear_schedule(warmup: int, total: int, final_ratio: float = 0.0):
    """LR multiplier: linear warmup over ``warmup`` steps, then linear decay to ``final_ratio`` at ``total``."""
    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        frac = (step - warmup) / max(total - warmup, 1)
        return max(final_ratio, 1.0 - (1.0 - final_ratio) * frac)
    return fn


def cosine_schedule(warmup: int, total: int, final_ratio: float = 0.0):
    """LR multiplier: linear warmup over ``warmup`` steps, then a half cosine down to ``final_ratio`` at ``total``."""
    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        frac = min(max((step - warmup) / max(total - warmup, 1), 0.0), 1.0)
        return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * frac))
    return fn


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def kl_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean per-token KL(teacher || student) on the logits, scaled by T^2."""
    t = temperature
    s = F.log_softmax(logits[:, :-1].float() / t, dim=-1).flatten(0, 1)
    q = F.log_softmax(teacher_logits[:, :-1].float() / t, dim=-1).flatten(0, 1)
    return F.kl_div(s, q, log_target=True, reduction="batchmean") * t * t


# ---------------------------------------------------------------------------------------------------
# checkpoints


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def signature_hash(signature: dict) -> str:
    return hashlib.md5(json.dumps(signature, sort_keys=True, default=str).encode()).hexdigest()


class Checkpointer:
    """One checkpoint file per run, written atomically (temp file + fsync + rename): a crash or SIGKILL
    mid-write leaves the previous checkpoint intact."""

    def __init__(self, directory: Path | None, name: str, signature: dict):
        self.path = Path(directory) / "checkpoints" / f"{name}.pt" if directory else None
        self.signature = signature

    def save(self, state: dict) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "wb") as fh:
            torch.save({"signature": self.signature, **state}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        log.info("checkpoint saved at step %s: %s", state.get("step"), self.path)

    def load(self) -> dict | None:
        """The saved state, or None. Refuses a checkpoint written under a different configuration."""
        if self.path is None or not self.path.exists():
            return None
        state = torch.load(self.path, weights_only=False)
        old = state.pop("signature", {})
        if old != self.signature:
            keys = sorted(k for k in set(old) | set(self.signature) if old.get(k) != self.signature.get(k))
            diffs = ", ".join(f"{k}: {old.get(k)!r} -> {self.signature.get(k)!r}" for k in keys)
            raise ElsaError(f"resume refused: the checkpoint {self.path} was written with a different config "
                            f"({diffs}); use another output dir or delete the checkpoint")
        return state

    def remove(self) -> None:
        if self.path is not None and self.path.exists():
            self.path.unlink()
