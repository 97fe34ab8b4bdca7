"""Magnitude pruning: drop the smallest |W| per layer (or per output row); N:M within each group."""
import torch
from tqdm.auto import tqdm

from elsa.methods.base import GROUP, Annotated, PruneContext, Pruner
from elsa.models import prunable_weights
from elsa.sparsity import mask_from_scores


class Magnitude(Pruner, name="magnitude", position=1):
    def __init__(self, group: Annotated[str, GROUP] = "layer"):
        self.group = group

    @torch.no_grad()
    def prune(self, ctx: PruneContext) -> dict:
        for name, w in tqdm(prunable_weights(ctx.model).items(), desc="magnitude", unit="layer", leave=False):
            w.param.mul_(mask_from_scores(w.param.abs(), ctx.target.at(name), self.group, w.transposed))
        return {}
