"""ADMM state and machinery for the global methods (ELSA, ELSA-L).

Scaled-form ADMM for  min_w f(w)  s.t. w in S (the sparsity set), split as w = z:
    primal:  a few optimiser steps on f(w) + (lam/2)||w - z + u||^2
    every `interval` steps:  z <- Proj_S(w + u);  u <- u + w - z
All state is kept per parameter (local to the parameter, so it shards with it); global statistics are
all-reduced when a process group exists.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

from elsa.engines.distributed import gather, local, scatter
from elsa.errors import config_error
from elsa.sparsity.plan import mask_of
from elsa.sparsity.patterns import Sparsity

SCHEDULES = ("constant", "linear", "cosine", "exponential", "adaptive")


# ---------------------------------------------------------------------------------------------------
# bit-packed masks: 8 weights to a byte, little bit order (bit j of byte i is element 8 i + j)

_BITS = torch.arange(8, dtype=torch.uint8)


def _numpy(t: torch.Tensor, use_numpy: bool | None) -> bool:
    return t.device.type == "cpu" if use_numpy is None else use_numpy


def pack_bits(mask: torch.Tensor, use_numpy: bool | None = None) -> torch.Tensor:
    """A bool tensor's elements, flat, 8 to a byte (uint8, ceil(numel / 8); the padding bits 0). On the CPU numpy's
    packbits (~0.04 ns a weight here, against ~2 for the same with torch ops); elsewhere torch ops (``use_numpy``:
    force either, for the tests)."""
    flat = mask.detach().reshape(-1)
    if _numpy(flat, use_numpy):
        return torch.from_numpy(np.packbits(flat.numpy(), bitorder="little"))
    bits = torch.nn.functional.pad(flat, (0, -flat.numel() % 8)).view(-1, 8).to(torch.uint8)
    return (bits << _BITS.to(bits.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int, use_numpy: bool | None = None) -> torch.Tensor:
    """The flat bool tensor of :func:`pack_bits`' first ``numel`` bits."""
    if _numpy(packed, use_numpy):
        return torch.from_numpy(np.unpackbits(packed.numpy(), count=numel, bitorder="little").view(np.bool_))
    return ((packed.unsqueeze(-1) >> _BITS.to(packed.device)) & 1).view(-1)[:numel].bool()


_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def count_bits(packed: torch.Tensor, use_numpy: bool | None = None) -> int:
    """The number of set bits of a packed mask (or of an and / or / xor of two)."""
    if _numpy(packed, use_numpy) and hasattr(np, "bitwise_count"):      # numpy >= 2.0
        return int(np.bitwise_count(packed.numpy()).sum(dtype=np.int64))
    return int(_POPCOUNT.to(packed.device)[packed.long()].sum())


# ---------------------------------------------------------------------------------------------------
# storage codecs: how z and u are held in memory


class Fp32Codec:
    """Full precision (ELSA)."""

    def encode(self, x: torch.Tensor):
        return x.detach().to(torch.float32, copy=True)

    def decode(self, stored) -> torch.Tensor:
        return stored

    def nbytes(self, stored) -> int:
        return stored.numel() * stored.element_size()

    def bytes_per_weight(self, density: float) -> float:
        """What a tensor of this codec holds per weight, at ``density`` non-zeros (the plan's figure)."""
        return 4.0


class Bf16Codec(Fp32Codec):
    def bytes_per_weight(self, density):
        return 2.0

    def encode(self, x):
        return x.detach().to(torch.bfloat16)

    def decode(self, stored):
        return stored.float()


class Fp8Codec(Fp32Codec):
    """FP8 e4m3 with one dynamic scale per tensor: scale = amax / 448 (e4m3's largest normal)."""

    FMAX = 448.0

    def bytes_per_weight(self, density):
        return 1.0

    def encode(self, x):
        amax = float(x.detach().abs().max()) if x.numel() else 0.0
        scale = amax / self.FMAX if amax > 0 else 1.0
        return ((x.detach().float() / scale).to(torch.float8_e4m3fn), torch.tensor(scale, dtype=torch.float32))

    # every e4m3 byte's value; q.float() * scale is then one look-up of (table * scale): the same fp32 products
    _VALUES = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()

    def decode(self, stored, use_numpy: bool | None = None):
        q, scale = stored
        if _numpy(q, use_numpy):      # numpy's take of the scaled table: ~1.1 ns a weight, the cast ~7.8 here
            table = (self._VALUES * scale).numpy()
            return torch.from_numpy(np.take(table, q.view(torch.uint8).numpy()))
        return q.float() * scale

    def nbytes(self, stored):
        q, scale = stored
        return q.numel() * q.element_size() + scale.numel() * scale.element_size()


class SparseBf16Codec(Fp32Codec):
    """The non-zeros in BF16 and a bitmask of where they are: 1/8 byte a weight plus 2 per non-zero, below FP8's
    one byte a weight beyond 56% sparsity, at BF16's rounding (2^-9 relative) instead of e4m3's (2^-4). For z,
    whose zeros are the pruned weights: at 90% FP8's rounding of z (2.7% of its norm, measured on ELSA's step-320
    state, docs/results.md) is three times the kept weights' own distance to z (0.85%), so the proximal term
    pulls the kept weights toward the rounding. Decodes to exactly what :class:`Bf16Codec` decodes."""

    def bytes_per_weight(self, density):
        return 0.125 + 2.0 * density

    def encode(self, x):
        flat = x.detach().reshape(-1)
        keep = flat != 0
        return pack_bits(keep), flat[keep].to(torch.bfloat16), torch.tensor(x.shape, dtype=torch.int64)

    def decode(self, stored, use_numpy: bool | None = None):
        packed, values, shape = stored
        numel = math.prod(shape.tolist())
        if _numpy(values, use_numpy):        # numpy's index assignment: ~1.3 ns a weight, masked_scatter_ ~3.8
            out = np.zeros(numel, np.float32)
            out[np.flatnonzero(unpack_bits(packed, numel).numpy())] = values.float().numpy()
            return torch.from_numpy(out).view(shape.tolist())
        out = torch.zeros(numel, dtype=torch.float32, device=values.device)
        out.masked_scatter_(unpack_bits(packed, numel, use_numpy).to(values.device), values.float())
        return out.view(shape.tolist())

    def nbytes(self, stored):
        return sum(t.numel() * t.element_size() for t in stored)


CODECS = {"fp32": Fp32Codec, "bf16": Bf16Codec, "fp8": Fp8Codec, "sparse_bf16": SparseBf16Codec}


def codec(name: str, key: str):
    if name not in CODECS:
        raise config_error(key, name, f"one of {', '.join(CODECS)}")
    return CODECS[name]()


# ---------------------------------------------------------------------------------------------------
# penalty (lambda) schedules


class LambdaSchedule:
    """lam(t) for t in [0, T]: constant, linear/cosine/exponential from lam to lam_final, or adaptive
    residual balancing (Boyd et al. 3.4.1): grow by tau when the primal residual is mu times the dual
    residual, shrink when the converse holds."""

    def __init__(self, kind: str, lam: float, lam_final: float | None, total: int, mu: float = 10.0,
                 tau: float = 2.0, lam_max: float = 1e4):
        if kind not in SCHEDULES:
            raise config_error("method.lambda_schedule", kind, f"one of {', '.join(SCHEDULES)}")
        if not (isinstance(lam, (int, float)) and lam >= 0 and math.isfinite(lam)):
            raise config_error("method.lam", lam, "a finite number >= 0")
        self.kind, self.lam0, self.total, self.mu, self.tau, self.lam_max = kind, float(lam), max(total, 1), mu, tau, lam_max
        self.lam1 = float(lam if lam_final is None else lam_final)
        if self.lam1 < 0:
            raise config_error("method.lam_final", lam_final, "a number >= 0")
        if kind == "exponential" and (self.lam0 <= 0 or self.lam1 <= 0):
            raise config_error("method.lam", lam, "> 0 (and lam_final > 0) for the exponential schedule")
        self.current = self.lam0

    def at(self, step: int) -> float:
        if self.kind in ("constant", "adaptive"):
            return self.current
        frac = min(max(step / self.total, 0.0), 1.0)
        if self.kind == "linear":
            return self.lam0 + (self.lam1 - self.lam0) * frac
        if self.kind == "cosine":
            return self.lam1 + (self.lam0 - self.lam1) * 0.5 * (1 + math.cos(math.pi * frac))
        return self.lam0 * (self.lam1 / self.lam0) ** frac

    def balance(self, primal: float, dual: float) -> float:
        """Adaptive update after a dual step; returns the new lambda (unchanged for fixed schedules)."""
        if self.kind == "adaptive":
            if primal > self.mu * dual:
                self.current = min(self.current * self.tau, self.lam_max)
            elif dual > self.mu * primal:
                self.current = self.current / self.tau
        return self.current

    def state_dict(self):
        return {"current": self.current}

    def load_state_dict(self, state):
        self.current = state["current"]


SPARSITY_SCHEDULES = ("cubic", "linear", "cosine", "exponential")


def sparsity_fraction(kind: str, p: float, initial: float = 0.0) -> float:
    """The fraction of the target the projection uses at progress ``p`` = step / peak step in [0, 1), starting
    from ``initial`` (a fraction of the target), as ELSA's code (prune_lora, SparsityScheduler) defines them:
    linear f0 + (1 - f0) p; cosine f0 + (1 - f0) (1 - cos(pi p)) / 2; exponential f0 (1 / f0)^p (plain p when
    f0 = 0, as there); cubic 1 + (f0 - 1) (1 - p)^3 (Zhu & Gupta's gradual pruning)."""
    if kind == "cubic":
        return 1.0 - (1.0 - p) ** 3 if initial == 0 else 1.0 + (initial - 1.0) * (1.0 - p) ** 3
    if kind == "linear":
        return initial + (1.0 - initial) * p
    if kind == "cosine":
        return initial + (1.0 - initial) * 0.5 * (1.0 - math.cos(math.pi * p))
    if kind == "exponential":
        return initial * (1.0 / initial) ** p if initial > 0 else p
    raise config_error("method.sparsity_schedule", kind, f"one of {', '.join(SPARSITY_SCHEDULES)}")


def sparsity_at(target: Sparsity, step: int, warmup_steps: int, kind: str = "cubic",
                initial: float = 0.0) -> Sparsity:
    """The projection's target at ``step``: a ramp (``kind``) from ``initial`` x the target to the target at the
    peak step ``warmup_steps``, the target from then on (N:M: no ramp). Every allocated ratio scales alike."""
    if target.is_nm or warmup_steps <= 0 or step >= warmup_steps:
        return target
    return target.scaled(sparsity_fraction(kind, step / warmup_steps, initial))


# ---------------------------------------------------------------------------------------------------


class Scorer:
    """Projection scores beyond |x| and Adam's v * x^2 (ELSA's code, prune_lora), for x = w (+ u) of weight
    ``name`` (storage layout, this rank's rows):

    - ``objective_corrected``: v_hat * x^2, v_hat = v / (1 - beta2^t) (Adam's bias correction; one positive
      constant per step for every tensor, so its masks equal ``objective``'s: kept for the record and Taylor);
    - ``activation``: sum over training tokens of x_j^2 (the weight's inputs) times x^2 (Wanda's statistic, squared);
    - ``gradient``: sum over steps of grad^2 times x^2 (an empirical-Fisher saliency);
    - ``taylor``: 1/2 v_hat x^2 - m_hat x, the second-order Taylor estimate of the loss increase from zeroing x
      with Adam's bias-corrected moments as gradient and diagonal curvature; it can be negative, so an exact
      zero (score 0) is ranked below every non-zero, and the projection keeps exactly the target's non-zeros.
    """

    KINDS = ("objective_corrected", "activation", "gradient", "taylor")

    def __init__(self, kind: str, opt, params: dict, betas, transposed: dict | None = None):
        self.kind, self.opt, self.params, self.betas = kind, opt, params, betas
        self.transposed = transposed or {}
        self.act: dict[str, torch.Tensor] = {}          # name -> sum of x_j^2 over tokens (input features)
        self.grad_sq: dict[str, torch.Tensor] = {}       # name -> sum of grad^2 over steps (local rows)

    def _state(self, p, key):
        v = self.opt.state.get(p, {}).get(key)
        if v is None:
            return None
        return local(v.dequantize() if hasattr(v, "dequantize") else v).float()

    def _step(self, p) -> float:
        t = self.opt.state.get(p, {}).get("step", 0)
        return float(t.item() if torch.is_tensor(t) else t)

    def moments(self, p):
        """(m_hat, v_hat) of parameter ``p``, or (None, None) before Adam's first step."""
        m, v, t = self._state(p, "exp_avg"), self._state(p, "exp_avg_sq"), self._step(p)
        if v is None or t <= 0:
            return None, None
        b1, b2 = self.betas
        return (None if m is None else m / (1 - b1 ** t)), v / (1 - b2 ** t)

    def __call__(self, name: str, x: torch.Tensor, p=None) -> torch.Tensor:
        p = self.params[name] if p is None else p
        if self.kind in ("objective_corrected", "taylor"):
            m_hat, v_hat = self.moments(p)
            if v_hat is None:
                return x.abs()
            if self.kind == "objective_corrected":
                return v_hat * x.square()
            # an exact zero costs nothing to prune (score 0) and a weight whose estimated loss falls when it
            # is zeroed scores below 0; ranked as they are, the top-k would keep zeros over such weights and the
            # projection would hold fewer non-zeros than the target allows (a frozen-support phase or a sparse
            # start leaves exact zeros: 0.932 measured for 0.9). Zeros rank last, so k non-zeros are kept.
            score = 0.5 * v_hat * x.square() - m_hat * x
            return score.masked_fill(x == 0, float("-inf"))
        if self.kind == "activation":
            a = self.act.get(name)
            if a is None:
                return x.abs()
            a = a.to(x.device)
            return (a.reshape(-1, 1) if self.transposed.get(name) else a.reshape(1, -1)) * x.square()
        g = self.grad_sq.get(name)
        return x.abs() if g is None else g * x.square()

    def add_gradients(self) -> None:
        for name, p in self.params.items():
            if p.grad is not None:
                g = local(p.grad).detach().float().square()
                self.grad_sq[name] = g if name not in self.grad_sq else self.grad_sq[name] + g

    def add_inputs(self, name: str, x: torch.Tensor) -> None:
        sq = x.detach().reshape(-1, x.shape[-1]).float().square().sum(0)
        self.act[name] = sq if name not in self.act else self.act[name] + sq

    def state_dict(self) -> dict:
        return {"act": self.act, "grad_sq": self.grad_sq}

    def load_state_dict(self, state: dict) -> None:
        self.act, self.grad_sq = state.get("act", {}), state.get("grad_sq", {})


def _allreduce(values: list[float]) -> list[float]:
    if dist.is_available() and dist.is_initialized():
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()
    return values


class AdmmState:
    """z and u for every constrained weight, stored through a codec; the first and the last projection's masks
    kept bit-packed (1/8 byte a weight each: :func:`pack_bits`) for the flip metrics and the frozen support.

    With FSDP2 the weights are DTensors sharded on dim 0: z, u and the masks hold this rank's rows only,
    and a projection gathers one layer's scores at a time so the top-k is exact over the whole layer.
    """

    def __init__(self, params: dict[str, torch.nn.Parameter], target, group: str, z_codec, u_codec,
                 transposed: dict[str, bool] | None = None):
        """``target``, here and in every projection: the run's plan (elsa.sparsity.plan; ``params`` by full
        name), one block's part of it (by path within the block), or one Sparsity for plain matrices."""
        self.params, self.target, self.group = params, target, group
        self.transposed = transposed or {}        # {name: stored [in, out]} (Conv1D); 3-D expert stacks per expert
        self.zc, self.uc = z_codec, u_codec
        self.z, self.u, self.mask0, self.mask_prev = {}, {}, {}, {}

    def weight(self, name: str) -> torch.Tensor:
        return local(self.params[name]).detach().float()

    def mask(self, name: str, x: torch.Tensor, target: Sparsity, second_moment) -> torch.Tensor:
        """Keep-mask (local rows) of the projection of x (local rows) onto the sparsity set."""
        p = self.params[name]
        if isinstance(second_moment, Scorer):
            scores = second_moment(name, x, p)
        else:
            v = second_moment(name) if second_moment is not None else None
            scores = x.abs() if v is None else v * x.square()
        return scatter(p, mask_of(target, name, gather(p, scores), self.group, self.transposed.get(name, False)))

    @torch.no_grad()
    def init(self, target: Sparsity, second_moment=None):
        for name in self.params:
            w = self.weight(name)
            mask = self.mask(name, w, target, second_moment)
            self.z[name] = self.zc.encode(w * mask)
            self.u[name] = self.uc.encode(torch.zeros_like(w))
            self.mask0[name] = self.mask_prev[name] = pack_bits(mask)

    def zu(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.zc.decode(self.z[name]), self.uc.decode(self.u[name])

    @torch.no_grad()
    def prox_residual(self, name: str) -> torch.Tensor:
        """w - z + u (local rows), the direction of the proximal term."""
        z, u = self.zu(name)
        return self.weight(name) - z + u

    @torch.no_grad()
    def dual_update(self, target: Sparsity, lam_ratio: float = 1.0, second_moment=None, step: float = 1.0,
                    relax: float = 1.0) -> dict:
        """z <- Proj(w + u); u <- u + step (w - z); returns global metrics. ``lam_ratio`` = lam_old / lam_new
        rescales the scaled dual when the penalty changed since the last update; ``step`` < 1 under-relaxes
        the dual ascent (1: standard ADMM). ``relax`` in (0, 2) is over-relaxation (Boyd et al. 2011, 3.4.3):
        w is replaced by relax * w + (1 - relax) * z_old in both updates (1: standard ADMM)."""
        sums = [0.0] * 8  # primal^2, w^2, dz^2, flips_prev, flips_init, inter_init, union_init, numel
        for name in self.params:
            w = self.weight(name)
            z_old, u = self.zu(name)
            if lam_ratio != 1.0:
                u = u * lam_ratio
            w_hat = w if relax == 1.0 else relax * w + (1.0 - relax) * z_old
            v = w_hat + u
            mask = self.mask(name, v, target, second_moment)
            z = v * mask
            u = u + step * (w_hat - z)
            self.z[name], self.u[name] = self.zc.encode(z), self.uc.encode(u)
            m0, mp, packed = self.mask0[name], self.mask_prev[name], pack_bits(mask)
            sums[0] += float((w - z).square().sum())
            sums[1] += float(w.square().sum())
            sums[2] += float((z - z_old).square().sum())
            sums[3] += count_bits(packed ^ mp)
            sums[4] += count_bits(packed ^ m0)
            sums[5] += count_bits(packed & m0)
            sums[6] += count_bits(packed | m0)
            sums[7] += mask.numel()
            self.mask_prev[name] = packed
        s = _allreduce(sums)
        return {"primal_residual": math.sqrt(s[0] / max(s[1], 1e-30)),
                "dual_residual_unscaled": math.sqrt(s[2] / max(s[1], 1e-30)),
                "mask_flips_prev": s[3] / s[7], "mask_flips_init": s[4] / s[7],
                "mask_iou_init": s[5] / max(s[6], 1.0)}

    @torch.no_grad()
    def final_projection(self, target: Sparsity, second_moment=None) -> None:
        for name, p in self.params.items():
            w = self.weight(name)
            local(p).copy_((w * self.mask(name, w, target, second_moment)).to(p.dtype))

    @torch.no_grad()
    def apply_support(self) -> None:
        """Hard constraint on the support of the last projection (the frozen-mask phase)."""
        for name, p in self.params.items():
            w = local(p)
            w.mul_(unpack_bits(self.mask_prev[name], w.numel()).view(w.shape).to(w.device, p.dtype))

    def nbytes(self) -> int:
        """The bytes of z, u and the two packed masks."""
        return sum(self.zc.nbytes(self.z[n]) + self.uc.nbytes(self.u[n]) + self.mask0[n].numel()
                   + self.mask_prev[n].numel() for n in self.params)

    def state_dict(self) -> dict:
        return {"z": self.z, "u": self.u, "mask0": self.mask0, "mask_prev": self.mask_prev}

    def load_state_dict(self, state: dict) -> None:
        """A checkpoint's state; masks saved as bool tensors (before they were packed) are packed."""
        def packed(masks):
            return {n: pack_bits(m) if m.dtype == torch.bool else m for n, m in masks.items()}

        self.z, self.u = state["z"], state["u"]
        self.mask0, self.mask_prev = packed(state["mask0"]), packed(state["mask_prev"])
