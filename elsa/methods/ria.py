"""RIA (Zhang et al., ICLR 2024, "Plug-and-Play: An Efficient Post-Training Pruning Method for LLMs").

Relative importance and activations: per Linear with weight W ``[out, in]`` and input norms ||X_j||_2 over the
calibration tokens,

    score_ij = ( |W_ij| / sum_k |W_kj|  +  |W_ij| / sum_k |W_ik| ) * ||X_j||_2 ** a

(the weight's share of its input column's and of its output row's total magnitude, times the input norm to the
power ``a``, 0.5 in the paper). Unstructured: the lowest scores of the whole matrix are pruned (the reference
code's default; ``group=row`` compares within each output row, its ``--per_outneuron``). N:M: the lowest
M-N scores of every group of M inputs of a row.

``permute=true`` (N:M only) is the reference's heuristic channel reallocation: the input channels are sorted by
their total score and dealt to the M slots of the groups (slot k takes the k-th M-quantile of the channels, in
reverse order for every second slot), so that every group holds channels of every importance; the N:M mask is
chosen in that order. The reference's optional linear-sum-assignment refinement (``--lsa``) is not implemented.
The weight stays in its original layout (as in the reference): it is N:M after the input permutation, which a
deployment applies as a gather of the inputs; the permutations are saved to ``ria_permutations.safetensors``
in the run dir (one int64 vector per matrix, ``weight[:, perm]`` is N:M) and results.json records the retained
score before and after.
"""
from __future__ import annotations

import torch

from elsa.errors import config_error
from elsa.engines.layerwise import BATCH
from elsa.methods.base import GROUP, Annotated, Flag, Number, PruneContext
from elsa.methods.wanda import InputNormPruner, InputNorms
from elsa.sparsity.patterns import Sparsity, mask_from_scores


def ria_scores(weight: torch.Tensor, norms: torch.Tensor, a: float) -> torch.Tensor:
    """Relative importance times the input norm to the power ``a`` (float32, shaped like ``weight``)."""
    w = weight.detach().float().abs()
    column = w.sum(0, keepdim=True)          # over the output rows: each input column's total
    row = w.sum(1, keepdim=True)             # over the inputs: each output row's total
    ri = w / column.clamp_min(torch.finfo(w.dtype).tiny) + w / row.clamp_min(torch.finfo(w.dtype).tiny)
    return ri * norms.to(w.device).float().reshape(1, -1).pow(a)


def reallocation(scores: torch.Tensor, m: int) -> torch.Tensor:
    """The heuristic channel reallocation: a permutation ``perm`` of the input channels such that group g of
    ``scores[:, perm]`` holds, in slot k, the channel of rank g (or its mirror, for odd k) within the k-th
    M-quantile of the channels sorted by their total score."""
    cols = scores.shape[1]
    order = torch.sort(scores.sum(0), stable=True).indices
    chunk = cols // m
    perm = torch.empty_like(order)
    for k in range(m):
        part = order[k * chunk:(k + 1) * chunk]
        perm[k::m] = part.flip(0) if k % 2 else part
    return perm


def retained(scores: torch.Tensor, keep: torch.Tensor) -> float:
    return float((scores * keep).sum())


class RIA(InputNormPruner, name="ria", position=1):
    def __init__(self, a: Annotated[float, Number(ge=0, paper="0.5")] = 0.5, group: Annotated[str, GROUP] = "layer",
                 permute: Annotated[bool, Flag("true (channel reallocation for N:M) or false")] = False,
                 batch_size: Annotated[int, BATCH] = 8):
        super().__init__(batch_size)
        self.a, self.group, self.permute = float(a), group, permute
        self.permutations: dict[str, torch.Tensor] = {}

    def validate(self, plan) -> None:
        target = plan.target
        super().validate(plan)
        if self.permute and not target.is_nm:
            raise config_error("method.permute", self.permute, f"false for sparsity={target} (channel "
                               "permutation is for N:M targets such as 2:4)")

    @torch.no_grad()
    def prune_linear(self, name: str, linear, stats: InputNorms, target: Sparsity) -> dict | None:
        scores = ria_scores(linear.weight, stats.norms(), self.a)
        if not (self.permute and target.is_nm):
            linear.weight.mul_(mask_from_scores(scores, target, self.group).to(linear.weight.dtype))
            return None
        plain = retained(scores, mask_from_scores(scores, target))
        perm = reallocation(scores, target.m)
        keep_permuted = mask_from_scores(scores[:, perm], target)
        keep = torch.empty_like(keep_permuted)
        keep[:, perm] = keep_permuted
        linear.weight.mul_(keep.to(linear.weight.dtype))
        self.permutations[name] = perm.cpu()
        return {"retained_plain": plain, "retained_permuted": retained(scores, keep)}

    def prune(self, ctx: PruneContext) -> dict:
        self.permutations = {}
        stats = super().prune(ctx)
        if self.permutations and ctx.output_dir is not None:
            from safetensors.torch import save_file

            path = ctx.output_dir / "ria_permutations.safetensors"
            save_file({k: v.contiguous() for k, v in self.permutations.items()}, str(path))
            stats["permutations"] = str(path)
        return stats

    def summarize(self, per_layer: dict[str, dict]) -> dict:
        if not per_layer:
            return {}
        plain = sum(v["retained_plain"] for v in per_layer.values())
        permuted = sum(v["retained_permuted"] for v in per_layer.values())
        return {"channel_permutation": {
            "rule": "heuristic channel reallocation (no linear-sum-assignment step); weight[:, perm] is N:M",
            "matrices": len(per_layer), "retained_score_plain": plain, "retained_score_permuted": permuted,
            "matrices_improved": sum(v["retained_permuted"] > v["retained_plain"] for v in per_layer.values())}}
