"""Sparsity targets, masks and projections, and the measured-sparsity report.

Everything here is deterministic: ties in the scores (common on de-quantised weights) are broken by
position with a stable sort, and the number of pruned weights is exactly the target count.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from elsa.errors import config_error, one_of

# where a ratio target's top-k is compared: within each output row, over the whole matrix, or within each input
# column (N:M ignores it)
GROUPS = ("row", "layer", "column")


def check_group(value, key: str = "method.group") -> str:
    """The one check of a ``group`` key (magnitude, Wanda, ELSA, AST, and :func:`mask_from_scores` itself)."""
    return one_of(key, value, GROUPS)

_ALLOWED = "a ratio in [0, 1) such as 0.9, or an N:M pattern with 0 < N < M such as 2:4"


@dataclass(frozen=True)
class Sparsity:
    """A sparsity target: a ratio of zeros, or an N:M pattern (at most N non-zeros in every M
    consecutive weights of a row along the input dimension)."""

    ratio: float
    n: int | None = None
    m: int | None = None
    # a matrix's own allocated target (elsa.sparsity.plan): its count round(ratio * numel) is exact also with
    # group=row (the rows share it, the first ``count % rows`` rows prune one more), so the allocation's overall
    # count is exact
    exact: bool = field(default=False, compare=False, repr=False)

    @property
    def is_nm(self) -> bool:
        return self.m is not None

    def scaled(self, fraction: float) -> "Sparsity":
        """The ratio times ``fraction`` (a schedule's ramp towards the target; N:M: the target itself)."""
        if self.is_nm:
            return self
        return Sparsity(ratio=self.ratio * fraction, exact=self.exact)

    def __str__(self) -> str:  # the spelling a user typed: "0.9" or "2:4"
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.ratio:g}"

    @classmethod
    def parse(cls, value, key: str = "sparsity") -> "Sparsity":
        if isinstance(value, Sparsity):
            return value
        if isinstance(value, bool) or value is None:
            raise config_error(key, value, _ALLOWED)
        if isinstance(value, (int, float)):
            ratio = float(value)
            if not math.isfinite(ratio) or not 0.0 <= ratio < 1.0:
                raise config_error(key, value, _ALLOWED)
            return cls(ratio=ratio)
        text = str(value).strip()
        nm = re.fullmatch(r"(\d+)\s*:\s*(\d+)", text)
        if nm:
            n, m = int(nm.group(1)), int(nm.group(2))
            if not 0 < n < m:
                raise config_error(key, value, _ALLOWED)
            return cls(ratio=1.0 - n / m, n=n, m=m)
        try:
            ratio = float(text)
        except ValueError:
            raise config_error(key, value, _ALLOWED) from None
        return cls.parse(ratio, key)

    def check_shape(self, name: str, weight_shape) -> None:
        """N:M needs M to divide the layer's input size; raise a clear error naming the layer."""
        if self.is_nm and weight_shape[-1] % self.m:
            raise config_error(
                "sparsity", self,
                f"layer {name} has {weight_shape[-1]} inputs, which {self.m} does not divide; "
                "pick an M that divides every pruned layer's input size")


def _prune_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask over the last dim that drops the k lowest scores of each row.

    O(n) selection (kthvalue) instead of a full sort. Ties at the threshold are broken by position: the
    earlier index is dropped first, so the count is exact and the mask deterministic.
    """
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k <= 0:
        return keep
    if k >= scores.shape[-1]:
        return ~keep
    thr = scores.kthvalue(k, dim=-1, keepdim=True).values
    below = scores < thr
    tied = scores == thr
    need = k - below.sum(-1, keepdim=True)           # how many tied entries still to drop, per row
    drop_tied = tied & (torch.cumsum(tied, dim=-1) <= need)
    return ~(below | drop_tied)


def mask_from_scores(scores: torch.Tensor, target: Sparsity, group: str = "layer",
                     transposed: bool = False) -> torch.Tensor:
    """Boolean keep-mask (True = kept) of a weight's scores, shaped like the weight.

    The weight is a matrix ``[out, in]``, stored ``[in, out]`` when ``transposed`` (Conv1D), or a stack of
    expert matrices ``[experts, ...]`` (each expert its own matrix at this target: its own count, rows and N:M
    groups; a plan's experts each at their own target: elsa.sparsity.plan.weight_mask).
    group='layer': the ratio of the whole matrix; 'row': the ratio within every output row; 'column': within
    every input column.
    N:M ignores group: within every M consecutive inputs of a row keep the N highest scores.
    """
    if transposed:
        return mask_from_scores(scores.transpose(-1, -2), target, group).transpose(-1, -2).contiguous()
    if scores.dim() == 3:
        return torch.stack([mask_from_scores(s, target, group) for s in scores])
    scores = scores.detach().float()
    rows, cols = scores.shape
    if target.is_nm:
        if cols % target.m:
            raise config_error("sparsity", target, f"a layer's input size {cols} is not a multiple of {target.m}")
        grouped = scores.reshape(rows, cols // target.m, target.m)
        return _prune_lowest(grouped, target.m - target.n).reshape(rows, cols)
    if group == "row":
        if target.exact:                       # an allocated count: rows share it exactly
            k = int(round(rows * cols * target.ratio))
            base, extra = divmod(k, rows)
            if extra == 0:
                return _prune_lowest(scores, base)
            return torch.cat([_prune_lowest(scores[:extra], base + 1), _prune_lowest(scores[extra:], base)])
        return _prune_lowest(scores, int(round(cols * target.ratio)))
    if group == "column":                     # the ratio within every input column
        return mask_from_scores(scores.t(), target, "row").t().contiguous()
    if group == "layer":
        flat = scores.reshape(1, -1)
        return _prune_lowest(flat, int(round(flat.numel() * target.ratio))).reshape(rows, cols)
    check_group(group, "group")
    raise AssertionError(group)  # unreachable: check_group refused every other value


def project(weight: torch.Tensor, target: Sparsity, group: str = "layer", scores: torch.Tensor | None = None,
            transposed: bool = False) -> torch.Tensor:
    """Euclidean projection onto the sparsity set (by |w|, or by the given scores)."""
    mask = mask_from_scores(weight.abs() if scores is None else scores, target, group, transposed)
    return weight * mask


def layer_report(named_weights) -> dict:
    """Measured sparsity per layer and overall, read from the weights themselves."""
    per_layer, zeros, total = {}, 0, 0
    for name, w in named_weights:
        z = int((w == 0).sum())
        per_layer[name] = z / w.numel()
        zeros += z
        total += w.numel()
    return {"measured": zeros / max(total, 1), "per_layer": per_layer, "pruned_params": total, "zeros": zeros}


def nm_violations(weight: torch.Tensor, n: int, m: int) -> int:
    """How many groups of M consecutive inputs hold more than N non-zeros."""
    rows, cols = weight.shape
    nz = (weight.reshape(rows, cols // m, m) != 0).sum(-1)
    return int((nz > n).sum())
