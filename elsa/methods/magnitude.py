"""Magnitude pruning: drop the smallest |W| per layer (or per output row); N:M within each group."""
import torch
from tqdm.auto import tqdm

from elsa.methods.base import GROUP, Annotated, PruneContext, Pruner


class Magnitude(Pruner, name="magnitude", position=1):
    def __init__(self, group: Annotated[str, GROUP] = "layer"):
        self.group = group

    @torch.no_grad()
    def prune(self, ctx: PruneContext) -> dict:
        plan = ctx.plan
        for wid, w in tqdm(plan.weights.items(), desc="magnitude", unit="layer", leave=False):
            w.param.mul_(plan.mask(wid, w.param.abs(), self.group))
        return {}
