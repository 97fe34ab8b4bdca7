"""Magnitude pruning: drop the smallest |W| per layer (or per output row); N:M within each group."""
import torch
from tqdm.auto import tqdm

from elsa.methods.base import PruneContext, Pruner, check_group
from elsa.models import prunable_linears
from elsa.sparsity import mask_from_scores


class Magnitude(Pruner):
    def __init__(self, group: str = "layer"):
        self.group = check_group(group)

    @torch.no_grad()
    def prune(self, ctx: PruneContext) -> dict:
        for _name, lin in tqdm(prunable_linears(ctx.model).items(), desc="magnitude", unit="layer", leave=False):
            lin.weight.mul_(mask_from_scores(lin.weight.abs(), ctx.target, self.group))
        return {}
