"""DSnoT (Zhang et al., ICLR 2024, "Dynamic Sparse No Training: Training-Free Fine-tuning for Sparse LLMs").

A training-free prune-and-grow refinement of a one-shot mask, without weight updates. Per Linear with weight W
and inputs X (the calibration tokens it sees, mean mu_j and variance var_j of input j):

- the base mask: Wanda's (|W_ij| ||X_j||, per output row) or SparseGPT's criterion (W_ij^2 / [U]_jj^2 with U the
  upper Cholesky factor of the damped inverse Hessian, per output row) on the dense weights;
- the expected reconstruction error of row i: e_i = sum over its pruned j of W_ij mu_j L (L: tokens per
  calibration window, the reference's per-window input sums), what the row's output loses on average;
- per cycle and row while |e_i| > ``update_threshold`` (at most ``cycles`` cycles): grow the pruned weight
  whose W_ij mu_j / var_j^pow is the largest (e_i > 0) or the smallest (else), and prune, in exchange, the
  kept weight with the lowest Wanda score among those whose W_ij mu_j has the sign that moves e_i back
  (unstructured), or the kept weight with the lowest base score in the grown weight's group of M (N:M, where
  a swap also needs e_i to keep its initial sign, as in the reference). One out, one in: every row keeps its
  exact count, every group its N.

By default the MLP's matrices keep their base mask (the reference's default ``--skip_layer mlp``); the MLP is
found structurally: the matrices whose owning module holds an activation module, and every expert matrix.
``skip=none`` refines every matrix. SparseGPT as the base gives SparseGPT's mask criterion only: like the
reference, no OBS weight update is applied (DSnoT never updates a weight; the kept weights are the dense ones).
"""
from __future__ import annotations

import torch

from elsa.engines.layerwise import BATCH, LayerwisePruner
from elsa.methods.base import Annotated, Choice, Number, PruneContext
from elsa.methods.sparsegpt import inverse_cholesky
from elsa.model.structure import in_moe
from elsa.sparsity.plan import BlockPlan, MatrixId
from elsa.sparsity.patterns import Sparsity, mask_from_scores

BASES = ("wanda", "sparsegpt")
SKIPS = ("mlp", "none")


class InputMoments:
    """Per input feature: sum, sum of squares (and X^T X for a SparseGPT base), in float32."""

    def __init__(self, features: int, device, hessian: bool):
        self.sum = torch.zeros(features, dtype=torch.float32, device=device)
        self.sq = torch.zeros(features, dtype=torch.float32, device=device)
        self.xtx = torch.zeros(features, features, dtype=torch.float32, device=device) if hessian else None
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.float()
        self.sum += x.sum(0)
        self.sq += (x * x).sum(0)
        if self.xtx is not None:
            self.xtx.addmm_(x.t(), x)
        self.tokens += x.shape[0]

    def mean(self) -> torch.Tensor:
        return self.sum / max(self.tokens, 1)

    def var(self) -> torch.Tensor:
        return (self.sq / max(self.tokens, 1) - self.mean().square()).clamp_min(0.0)


def sparsegpt_scores(weight: torch.Tensor, xtx: torch.Tensor, tokens: int, percdamp: float, name: str) -> torch.Tensor:
    """SparseGPT's saliency W^2 / [U]_jj^2 on the dense weights (no sequential update): the reference's base."""
    h = xtx * (2.0 / max(tokens, 1))
    w = weight.detach().float().clone()
    dead = torch.diagonal(h) == 0
    h = h.clone()
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    u, _ = inverse_cholesky(h, percdamp, name)
    return w.square() / torch.diagonal(u).square().reshape(1, -1)


def mlp_matrices(view: BlockPlan) -> set[MatrixId]:
    """The block's MLP matrices, structurally: owned by a module with an activation module among its children
    (Llama's mlp.act_fn, OPT's block-level activation_fn, GPT-2's mlp.act), or expert matrices."""
    from elsa.methods.sparsellm import _activations

    block, out = view.module, set()
    for name in view.ids:
        if in_moe(block, name.path, name.expert):
            out.add(name)
            continue
        owner = name.path.rsplit(".", 1)[0] if "." in name.path else ""
        parent = block.get_submodule(owner) if owner else block
        children = {id(c) for c in parent.children()}
        if any(id(a) in children for a in _activations(parent)):
            out.add(name)
    return out


def _ordered(values: torch.Tensor, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the column indices where ``candidates`` holds, by ascending value (a row with fewer candidates
    than the longest is padded at its end), and each row's count."""
    key = torch.where(candidates, values, torch.full_like(values, float("inf")))
    counts = candidates.sum(1)
    return torch.sort(key, dim=1, stable=True).indices[:, :int(counts.max())], counts


def _pointers(counts: torch.Tensor) -> torch.Tensor:
    """(rows, 2) the next index from the start (column 0) and from the end (column 1) of each row's list."""
    ptr = torch.zeros(len(counts), 2, dtype=torch.long, device=counts.device)
    ptr[:, 1] = counts - 1
    return ptr


def _take(order: torch.Tensor, ptr: torch.Tensor, from_end: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The column at each row's start or end pointer (``from_end``), and whether the list still had one."""
    pos = torch.where(from_end, ptr[:, 1], ptr[:, 0])
    valid = ptr[:, 0] <= ptr[:, 1]
    col = order.gather(1, pos.clamp(0, max(order.shape[1] - 1, 0)).unsqueeze(1)).squeeze(1) \
        if order.shape[1] else torch.zeros_like(pos)
    ptr[:, 1] -= from_end.long()
    ptr[:, 0] += (~from_end).long()
    return col, valid


def refine_unstructured(keep: torch.Tensor, expected: torch.Tensor, grow_key: torch.Tensor, order: torch.Tensor,
                        cycles: int, threshold: float) -> tuple[torch.Tensor, int]:
    """DSnoT's unstructured cycles on the keep-mask ``keep`` ``[rows, cols]`` (returned, refined; and the
    number of swaps). ``expected``: W_ij mu_j L; ``grow_key``: expected / var^pow; ``order``: the base's pruning
    order (lower is pruned first) among the kept weights."""
    keep = keep.clone()
    rows = torch.arange(keep.shape[0], device=keep.device)
    err = (expected * ~keep).sum(1)
    grow, g_count = _ordered(grow_key, ~keep)            # pruned weights by ascending grow key
    ranked, p_count = _ordered(order, keep)              # kept weights by ascending base score
    sign = expected.gather(1, ranked)
    rank = torch.arange(ranked.shape[1], device=keep.device).expand_as(ranked).float()
    n = float(ranked.shape[1])
    # negatives first (ascending score), zeros, then positives (descending score): both ends hold low scores;
    # a shorter row's padding stays behind its own list
    key = torch.where(sign < 0, rank, torch.where(sign > 0, 3.0 * n - rank, torch.full_like(rank, 1.5 * n)))
    key = torch.where(rank < p_count.unsqueeze(1), key, 4.0 * n + rank)
    prune = ranked.gather(1, torch.sort(key, dim=1, stable=True).indices)
    g_ptr, p_ptr = _pointers(g_count), _pointers(p_count)
    active = torch.ones_like(err, dtype=torch.bool)
    swaps = 0
    for _ in range(cycles):
        g, g_ok = _take(grow, g_ptr, err > 0)
        p, p_ok = _take(prune, p_ptr, err < 0)
        active &= (err.abs() > threshold) & g_ok & p_ok
        if not bool(active.any()):
            break
        r = rows[active]
        keep[r, p[active]] = False
        keep[r, g[active]] = True
        err = err + torch.where(active, expected[rows, p] - expected[rows, g], torch.zeros_like(err))
        swaps += int(active.sum())
    return keep, swaps


def refine_nm(keep: torch.Tensor, expected: torch.Tensor, grow_key: torch.Tensor, base: torch.Tensor, m: int,
              cycles: int, threshold: float) -> tuple[torch.Tensor, int]:
    """DSnoT's N:M cycles: the grown weight's group of M gives up its kept weight of lowest base score (never
    one DSnoT grew); a swap also needs the row's error to keep its initial sign (the reference's N:M rule)."""
    keep = keep.clone()
    rows = torch.arange(keep.shape[0], device=keep.device)
    err = (expected * ~keep).sum(1)
    first_sign = torch.sign(err)
    grow, g_count = _ordered(grow_key, ~keep)
    g_ptr = _pointers(g_count)
    prunable = keep.clone()                              # kept by the base and not yet pruned by DSnoT
    offsets = torch.arange(m, device=keep.device)
    active = torch.ones_like(err, dtype=torch.bool)
    swaps = 0
    for _ in range(cycles):
        g, g_ok = _take(grow, g_ptr, err > 0)
        group = (g - g % m).unsqueeze(1) + offsets
        inf = torch.full(group.shape, float("inf"), dtype=base.dtype, device=base.device)
        score = torch.where(prunable.gather(1, group), base.gather(1, group), inf)
        low, at = score.min(1)
        p = group.gather(1, at.unsqueeze(1)).squeeze(1)
        after = err + expected[rows, p] - expected[rows, g]
        active &= (err.abs() > threshold) & g_ok & (torch.sign(after) == first_sign)
        ok = active & torch.isfinite(low)                # a group whose kept weights DSnoT all grew: no swap
        if not bool(active.any()):
            break
        r = rows[ok]
        keep[r, p[ok]] = False
        prunable[r, p[ok]] = False
        keep[r, g[ok]] = True
        err = torch.where(ok, after, err)
        swaps += int(ok.sum())
    return keep, swaps


class DSnoT(LayerwisePruner, name="dsnot", position=2):
    def __init__(self, base: Annotated[str, Choice(BASES)] = "wanda",
                 cycles: Annotated[int, Number(gt=0, whole=True, paper="50")] = 50,
                 update_threshold: Annotated[float, Number(ge=0, paper="0.1")] = 0.1,
                 pow_of_var_regrowing: Annotated[float, Number(ge=0, paper="1")] = 1.0,
                 skip: Annotated[str, Choice(SKIPS)] = "mlp",
                 percdamp: Annotated[float, Number(gt=0, paper="0.01 (SparseGPT's, for base=sparsegpt)")] = 0.01,
                 batch_size: Annotated[int, BATCH] = 8):
        super().__init__(batch_size)
        self.base, self.cycles, self.skip = base, int(cycles), skip
        self.threshold, self.pow, self.percdamp = float(update_threshold), float(pow_of_var_regrowing), float(percdamp)
        self.window = 1                    # tokens per calibration window (L): set from the calibration in prune
        self._skipped: set[str] = set()

    def stats_init(self, name, linear) -> InputMoments:
        return InputMoments(linear.in_features, linear.weight.device, self.base == "sparsegpt")

    def accumulate(self, stats: InputMoments, x: torch.Tensor) -> InputMoments:
        stats.add(x)
        return stats

    def prune(self, ctx: PruneContext) -> dict:
        self.window = int(ctx.calibration.shape[1])
        return super().prune(ctx)

    def prune_block(self, view, stats, inputs):
        self._skipped = {view.name(m) for m in mlp_matrices(view)} if self.skip == "mlp" else set()
        return super().prune_block(view, stats, inputs)

    @torch.no_grad()
    def prune_linear(self, name: str, linear, stats: InputMoments, target: Sparsity) -> dict:
        w = linear.weight.detach().float()
        wanda = w.abs() * stats.sq.sqrt().reshape(1, -1)
        base = wanda if self.base == "wanda" else sparsegpt_scores(w, stats.xtx, stats.tokens, self.percdamp, name)
        keep = mask_from_scores(base, target, "row")
        swaps = 0
        if name not in self._skipped:
            expected = w * (stats.mean() * self.window).reshape(1, -1)
            grow_key = expected / stats.var().clamp_min(1e-12).pow(self.pow).reshape(1, -1) if self.pow else expected
            if target.is_nm:
                keep, swaps = refine_nm(keep, expected, grow_key, base, target.m, self.cycles, self.threshold)
            else:
                keep, swaps = refine_unstructured(keep, expected, grow_key, wanda, self.cycles, self.threshold)
        linear.weight.mul_(keep.to(linear.weight.dtype))
        return {"swaps": swaps, "refined": name not in self._skipped}

    def summarize(self, per_layer: dict[str, dict]) -> dict:
        refined = [k for k, v in per_layer.items() if v["refined"]]
        return {"base": self.base, "refined_matrices": len(refined),
                "kept_base_mask": sorted(k for k, v in per_layer.items() if not v["refined"]),
                "swaps": sum(v["swaps"] for v in per_layer.values()),
                "tokens_per_window": self.window}
