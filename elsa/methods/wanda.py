"""Wanda (Sun et al., 2023): prune by |W_ij| * ||X_j||_2 within each output row; no weight update.

||X_j||_2 is the norm of input feature j over every calibration token the Linear sees (inside the
layer-wise walk: the inputs produced by the already-pruned earlier blocks).
"""
from __future__ import annotations

import torch
from torch import nn

from elsa.engines.layerwise import BATCH, LayerwisePruner
from elsa.methods.base import GROUP, Annotated
from elsa.sparsity.patterns import Sparsity, mask_from_scores


class InputNorms:
    """Running sum of squared inputs per feature, in float32."""

    def __init__(self, features: int, device):
        self.sq = torch.zeros(features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.float()
        self.sq += (x * x).sum(0)
        self.tokens += x.shape[0]

    def norms(self) -> torch.Tensor:
        return self.sq.sqrt()


def wanda_scores(weight: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    return weight.detach().float().abs() * norms.to(weight.device).reshape(1, -1)


class InputNormPruner(LayerwisePruner):
    """A layer-wise method whose statistics are the inputs' feature norms ||X_j||_2 (Wanda, RIA, OATS)."""

    def stats_init(self, name, linear: nn.Linear) -> InputNorms:
        return InputNorms(linear.in_features, linear.weight.device)

    def accumulate(self, stats: InputNorms, x: torch.Tensor) -> InputNorms:
        stats.add(x)
        return stats


class Wanda(InputNormPruner, name="wanda", position=0):
    def __init__(self, group: Annotated[str, GROUP] = "row", batch_size: Annotated[int, BATCH] = 8):
        super().__init__(batch_size)
        self.group = group

    def matrix_flops(self, out_features: int, in_features: int, tokens: int) -> float:
        return 2.0 * in_features * tokens + 2.0 * out_features * in_features   # input norms, scores

    @torch.no_grad()
    def prune_linear(self, name: str, linear: nn.Linear, stats: InputNorms, target: Sparsity) -> None:
        keep = mask_from_scores(wanda_scores(linear.weight, stats.norms()), target, self.group)
        linear.weight.mul_(keep.to(linear.weight.dtype))
