"""OATS (Zhang & Papyan, ICLR 2025, "OATS: Outlier-Aware Pruning Through Sparse and Low Rank Decomposition").

Per Linear with weight W ``[out, in]`` and D = diag(sqrt(sum_t x_tj^2)) (the inputs' second moments, Wanda's
norms), OATS approximates the scaled weight W D = S' + L' by alternating, ``iters`` times:

    L' = the best rank-r approximation of (W D - S')        (truncated SVD)
    S' = the hard threshold of (W D - L'), keeping the largest |entries| of every output row

and stores W ≈ S + L with S = S' D⁻¹ (in the Linear's weight: sparse) and L = L' D⁻¹ = up @ down, a dense rank-r
branch added to the Linear's output (:class:`LowRank`, a child module ``lowrank`` of the Linear / Conv1D,
saved with the model and re-attached by :func:`from_pretrained`).

The budget counts the low-rank factors as dense parameters (the paper's accounting): a matrix with k = numel -
round(ratio * numel) non-zeros allowed gets rank r = floor(rank_ratio * k / (out + in)) and S keeps exactly
k - r (out + in) weights, shared by the rows as evenly as possible, so S's zeros minus the factors' parameters
are exactly the target's zeros (results.json: ``sparsity.effective``, ``params.dense_by_kind.lowrank``).
N:M (the reference's rule): S is N:M and r = floor(rank_ratio * (N/M) / (1 - rank_ratio) * out in / (out + in)),
so the factors come on top of the N:M target (recorded, and labelled in the report).

Inputs that never fire (D_jj = 0) are scaled by the smallest non-zero D (the reference divides by zero).

    from elsa.methods.oats import from_pretrained
    model = from_pretrained("<run dir>/model")      # the HF model, every low-rank branch re-attached
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from elsa.errors import ElsaError
from elsa.engines.layerwise import BATCH
from elsa.methods.base import Annotated, Choice, Number
from elsa.methods.wanda import InputNormPruner, InputNorms
from elsa.model.structure import expert_tensors
from elsa.sparsity.patterns import Sparsity, mask_from_scores

PREFIX = "lowrank"


class LowRank(nn.Module):
    """The dense rank-r part of one matrix: ``up @ (down @ x)``, added to its module's output."""

    elsa_kind = "lowrank"       # elsa.model.structure.weight_accounting: dense parameters of this kind
    elsa_in_budget = True       # its parameters count against the sparsity target (elsa.run.recipe)

    def __init__(self, in_features: int, out_features: int, rank: int, dtype=torch.float32, device=None):
        super().__init__()
        self.down = nn.Parameter(torch.zeros(rank, in_features, dtype=dtype, device=device))
        self.up = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.down), self.up)

    def extra_repr(self) -> str:
        return f"in_features={self.down.shape[1]}, out_features={self.up.shape[0]}, rank={self.down.shape[0]}"


def attach(module: nn.Module, branch: LowRank) -> LowRank:
    """``module`` (a Linear or Conv1D) returns its output plus ``branch``'s from now on."""
    from elsa.methods.slorb import attach_branch

    return attach_branch(module, PREFIX, branch)


def budget(rows: int, cols: int, target: Sparsity, rank_ratio: float) -> tuple[int, Sparsity]:
    """(the rank, the sparse part's target) of one ``[rows, cols]`` matrix: see the module docstring."""
    numel = rows * cols
    if target.is_nm:
        dense_alloc = (target.n / target.m) / (1.0 - rank_ratio)
        return int(math.floor(rank_ratio * dense_alloc * numel / (rows + cols))), target
    keep = numel - int(round(numel * target.ratio))
    rank = int(math.floor(rank_ratio * keep / (rows + cols)))
    sparse_keep = keep - rank * (rows + cols)
    return rank, Sparsity(ratio=(numel - sparse_keep) / numel, exact=True)


SVDS = ("exact", "subspace")
OVERSAMPLE = 10


def _truncated(a: torch.Tensor, rank: int, basis: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(up, down, basis) with up @ down the rank-r approximation of ``a``: the exact truncated SVD when ``basis``
    is None, else one subspace-iteration step from ``basis`` (the previous alternation's top right singular
    vectors, r + 10 of them), which the slowly changing ``a`` of the alternation keeps close to exact."""
    if basis is None:
        u, sv, vh = torch.linalg.svd(a, full_matrices=False)
    else:
        q, _ = torch.linalg.qr(a @ basis)
        ub, sv, vh = torch.linalg.svd(q.t() @ a, full_matrices=False)
        u = q @ ub
    keep = min(rank + OVERSAMPLE, vh.shape[0])
    return u[:, :rank] * sv[:rank], vh[:rank], vh[:keep].t().contiguous()


@torch.no_grad()
def oats_decompose(weight: torch.Tensor, norms: torch.Tensor, rank: int, sparse: Sparsity, iters: int,
                   svd: str = "exact") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[float]]:
    """(S, up, down, the relative scaled error ||W D - S' - L'|| / ||W D|| per iteration), float32, with
    W ≈ S + up @ down. ``svd=subspace``: the first and the last alternation take the exact SVD, the others one
    warm-started subspace-iteration step (:func:`_truncated`). Does not modify its inputs."""
    d = norms.float().to(weight.device)
    positive_d = d[d > 0]
    d = d.clamp_min(float(positive_d.min()) if positive_d.numel() else 1.0)
    scaled = weight.detach().float() * d.reshape(1, -1)
    total = float(scaled.norm()) or 1.0
    s = torch.zeros_like(scaled)
    up = scaled.new_zeros(scaled.shape[0], rank)
    down = scaled.new_zeros(rank, scaled.shape[1])
    basis, errors, steps = None, [], iters if rank else 1
    for step in range(steps):
        low = torch.zeros_like(scaled)
        if rank:
            exact = svd == "exact" or step == steps - 1
            up, down, basis = _truncated(scaled - s, rank, None if exact else basis)
            low = up @ down
        s = scaled - low
        s = s * mask_from_scores(s.abs(), sparse, "row")
        errors.append(float((scaled - s - low).norm()) / total)
    return s / d.reshape(1, -1), up, down / d.reshape(1, -1), errors


class OATS(InputNormPruner, name="oats", position=4):
    start_eligible = False   # its solution holds low-rank branches besides the sparse weights: no start stage

    def __init__(self, rank_ratio: Annotated[float, Number(ge=0, lt=1, paper="0.25")] = 0.25,
                 iters: Annotated[int, Number(gt=0, whole=True, paper="80")] = 80,
                 svd: Annotated[str, Choice(SVDS)] = "exact", batch_size: Annotated[int, BATCH] = 8):
        super().__init__(batch_size)
        self.svd, self.rank_ratio, self.iters = svd, float(rank_ratio), int(iters)

    def validate(self, plan) -> None:
        model = plan.model
        super().validate(plan)
        fused = [n for n, m in model.named_modules() if expert_tensors(m)]
        if fused:
            raise ElsaError(f"method=oats adds a low-rank branch to every pruned Linear / Conv1D, not to fused "
                            f"expert tensors ({len(fused)} modules, e.g. {fused[0]}); use ignore=[experts] to "
                            "leave them dense (recorded in results.json), or another method")

    @torch.no_grad()
    def prune_linear(self, name: str, linear, stats: InputNorms, target: Sparsity) -> dict:
        w = linear.weight
        rank, sparse = budget(w.shape[0], w.shape[1], target, self.rank_ratio)
        s, up, down, errors = oats_decompose(w, stats.norms(), rank, sparse, self.iters, self.svd)
        w.copy_(s.to(w.dtype))
        if rank:
            module = linear.source.module
            branch = LowRank(w.shape[1], w.shape[0], rank, dtype=w.dtype, device=w.device)
            branch.up.copy_(up.to(w.dtype))
            branch.down.copy_(down.to(w.dtype))
            attach(module, branch)
        return {"rank": rank, "lowrank_params": rank * (w.shape[0] + w.shape[1]), "error": errors[-1],
                "error_first": errors[0]}

    def summarize(self, per_layer: dict[str, dict]) -> dict:
        values = list(per_layer.values())
        return {"rank_ratio": self.rank_ratio, "iters": self.iters, "svd": self.svd,
                "lowrank_params": sum(v["lowrank_params"] for v in values),
                "ranks": {k: v["rank"] for k, v in per_layer.items()},
                "scaled_error_mean": sum(v["error"] for v in values) / max(len(values), 1),
                "scaled_error_first_iter_mean": sum(v["error_first"] for v in values) / max(len(values), 1)}


def branches(model: nn.Module) -> dict[str, LowRank]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LowRank)}


def from_pretrained(path, **kwargs):
    """A saved OATS model, an HF dir (``<run dir>/model``) or a compressed dir (``<run dir>/model_compressed``):
    the HF model with every low-rank branch re-attached from the saved ``.lowrank.`` tensors, so it computes
    what the pruned model computed when it was saved. A dir without branches loads as the plain model."""
    from elsa.methods.slorb import _owner, load_with_branches

    model, tensors = load_with_branches(Path(path), PREFIX, **kwargs)
    params = dict(model.named_parameters())
    for owner in sorted({k.rsplit(f".{PREFIX}.", 1)[0] for k in tensors}):
        module = _owner(model, owner, params)
        up, down = tensors[f"{owner}.{PREFIX}.up"], tensors[f"{owner}.{PREFIX}.down"]
        ref = next(module.parameters())
        branch = LowRank(down.shape[1], up.shape[0], down.shape[0], dtype=ref.dtype, device=ref.device)
        with torch.no_grad():
            branch.up.copy_(up)
            branch.down.copy_(down)
        attach(module, branch)
    return model
