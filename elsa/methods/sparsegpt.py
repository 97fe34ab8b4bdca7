"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning with OBS weight reconstruction.

Per Linear with weight W (rows x cols) and calibration inputs X (cols x tokens), the layer objective is
||WX - ŴX||². Its Hessian is H = 2/n X Xᵀ. Removing weight w_q of a row and updating the remaining ones
optimally (Optimal Brain Surgeon) costs w_q² / [H⁻¹]_qq and moves the row by -w_q / [H⁻¹]_qq · H⁻¹_{q,:}.
Processing columns left to right, the inverse Hessian of the not-yet-processed columns is given by the
rows of the upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU): row i of U, divided by U_ii, is the update
direction once columns < i are fixed, and U_ii² is the matching [H⁻¹]_ii. So:

- H += λI with λ = percdamp · mean(diag H); inputs that never fire (H_ii = 0) get H_ii = 1 and W[:, i] = 0;
- U = chol(H⁻¹), upper;
- for each block of ``blocksize`` columns: choose the mask inside the block by w² / U_ii² (unstructured:
  the lowest scores of the whole block, so rows adapt; N:M: per group of M columns, chosen when the group
  starts), then column by column zero the pruned weights and spread the error err = (w - q) / U_ii over the
  block's later columns with U_i,:, and after the block over all later columns (lazy batch update).
"""
from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
from torch import nn

from elsa.errors import ElsaError, config_error
from elsa.engines.layerwise import BATCH, LayerwisePruner
from elsa.methods.base import Annotated, Number
from elsa.sparsity.patterns import Sparsity, mask_from_scores

log = logging.getLogger(__name__)
PERCDAMP = Number(gt=0, paper="0.01")   # the Hessian's damping: a fraction of its mean diagonal


class Hessian:
    """H = 2/n Σ x xᵀ over the n calibration tokens, accumulated in float32."""

    def __init__(self, features: int, device):
        self.xtx = torch.zeros(features, features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.float()
        self.xtx.addmm_(x.t(), x)
        self.tokens += x.shape[0]

    def matrix(self) -> torch.Tensor:
        return self.xtx * (2.0 / max(self.tokens, 1))


def inverse_cholesky(h: torch.Tensor, percdamp: float, name: str = "", retries: int = 6) -> tuple[torch.Tensor, int]:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = percdamp · mean(diag H); on failure retry with 10x λ.

    Returns (U, number of retries)."""
    mean_diag = float(torch.diagonal(h).mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    damp = percdamp
    for attempt in range(retries + 1):
        lower, info = torch.linalg.cholesky_ex(h + (damp * mean_diag) * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return upper, attempt
        log.warning("%s: Hessian not positive definite with damping %.3g x mean diag; retrying with %.3g",
                    name or "layer", damp, damp * 10)
        damp *= 10
    raise ElsaError(f"{name}: the Hessian stays singular even with damping {damp / 10:g} x its mean diagonal; "
                    "raise method.percdamp or use more calibration samples (nsamples)")


def block_counts(rows: int, cols: int, blocksize: int, ratio: float) -> list[int]:
    """How many weights to prune in each column block so that the layer total is exactly round(ratio·numel)."""
    out, done = [], 0
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        upto = int(round(rows * end * ratio))
        out.append(upto - done)
        done = upto
    return out


@contextmanager
def _threads(n: int):
    """The column loop is thousands of small ops: on a busy CPU, OpenMP threads only add barrier waits
    (measured here: 0.8 s with 1 thread vs 24 s with 2 for a 576x1536 layer on a loaded 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, h: torch.Tensor, target: Sparsity, blocksize: int = 128,
                    percdamp: float = 0.01, name: str = "") -> tuple[torch.Tensor, dict]:
    """The pruned (and reconstructed) weight, float32, and statistics. Does not modify its inputs."""
    with _threads(1 if weight.device.type == "cpu" else torch.get_num_threads()):
        return _sparsegpt(weight, h, target, blocksize, percdamp, name)


def _sparsegpt(weight, h, target, blocksize, percdamp, name):
    # Work on Wᵀ (cols x rows) so that a column of W is a contiguous row in memory.
    wt = weight.detach().float().t().contiguous()
    h = h.float().clone()
    cols, rows = wt.shape
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    wt[dead] = 0.0
    u, retries = inverse_cholesky(h, percdamp, name)
    del h
    counts = None if target.is_nm else block_counts(rows, cols, blocksize, target.ratio)
    for b, i1 in enumerate(range(0, cols, blocksize)):
        i2 = min(i1 + blocksize, cols)
        w1 = wt[i1:i2].clone()                       # (block cols, rows)
        u1 = u[i1:i2, i1:i2]
        d = torch.diagonal(u1)
        err1 = torch.empty_like(w1)
        if counts is not None:                       # adaptive mask over the whole block
            scores = (w1 / d.reshape(-1, 1)) ** 2
            keep = mask_from_scores(scores, Sparsity(ratio=counts[b] / scores.numel()), "layer").float()
        else:
            keep = torch.empty_like(w1)
        for i in range(i2 - i1):
            if target.is_nm and i % target.m == 0:   # N:M: choose the group's mask when the group starts
                g = slice(i, i + target.m)
                scores = (w1[g] / d[g].reshape(-1, 1)) ** 2
                keep[g] = mask_from_scores(scores.t(), target).t().float()
            col = w1[i]
            e = col * (1.0 - keep[i]) / d[i]
            err1[i] = e
            w1[i:].addr_(u1[i, i:], e, alpha=-1.0)
            w1[i] *= keep[i]                          # exact zeros (the update leaves keep·w there)
        wt[i1:i2] = w1
        if i2 < cols:
            wt[i2:].addmm_(u[i1:i2, i2:].t(), err1, alpha=-1.0)
    return wt.t().contiguous(), {"dead_inputs": int(dead.sum()), "cholesky_retries": retries}


class HessianPruner(LayerwisePruner):
    """A layer-wise method whose statistics are the input Hessian H = 2/n XXᵀ (SparseGPT, ALPS, L-ADMM)."""

    square_stats = True     # hardware.low_memory: the Hessians one fused expert at a time

    def matrix_flops(self, out_features: int, in_features: int, tokens: int) -> float:
        """The Hessian (2 in^2 per token), its inverse (~in^3) and the column-wise updates (2 out in^2)."""
        return 2.0 * in_features ** 2 * tokens + in_features ** 3 + 2.0 * out_features * in_features ** 2

    def stats_init(self, name, linear: nn.Linear) -> Hessian:
        return Hessian(linear.in_features, linear.weight.device)

    def accumulate(self, stats: Hessian, x: torch.Tensor) -> Hessian:
        stats.add(x)
        return stats


class SparseGPT(HessianPruner, name="sparsegpt", position=3):
    def __init__(self, percdamp: Annotated[float, PERCDAMP] = 0.01,
                 blocksize: Annotated[int, Number(gt=0, whole=True, paper="128")] = 128,
                 batch_size: Annotated[int, BATCH] = 8):
        super().__init__(batch_size)
        self.percdamp, self.blocksize = float(percdamp), int(blocksize)

    def validate(self, plan) -> None:
        target = plan.target
        super().validate(plan)
        if target.is_nm and self.blocksize % target.m:
            raise config_error("method.blocksize", self.blocksize,
                               f"a multiple of M={target.m} for sparsity={target}")

    @torch.no_grad()
    def prune_linear(self, name: str, linear: nn.Linear, stats: Hessian, target: Sparsity) -> dict:
        w, info = sparsegpt_prune(linear.weight, stats.matrix(), target, self.blocksize, self.percdamp, name)
        linear.weight.copy_(w.to(linear.weight.dtype))
        return info

    def summarize(self, per_layer: dict[str, dict]) -> dict:
        return {"dead_inputs": sum(v["dead_inputs"] for v in per_layer.values()),
                "cholesky_retries": sum(v["cholesky_retries"] for v in per_layer.values()),
                "layers_with_retries": [k for k, v in per_layer.items() if v["cholesky_retries"]]}
