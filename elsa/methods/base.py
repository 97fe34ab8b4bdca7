"""The one interface every pruning method shares."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from elsa.models import prunable_matrices
from elsa.sparsity import Sparsity


@dataclass
class PruneContext:
    """Everything a method may need. Layer-wise methods use ``calibration``; global ones the dataset."""

    model: nn.Module
    tokenizer: Any
    target: Sparsity
    calibration: torch.Tensor | None = None      # (nsamples, seqlen) input ids
    dataset: Any = None                          # elsa.data.Corpus for methods that train
    seqlen: int = 512
    seed: int = 0
    device: str = "cpu"
    output_dir: Path | None = None
    tracker: Any = None
    extras: dict = field(default_factory=dict)


class Pruner:
    """Prune ``ctx.model`` in place to ``ctx.target``; return a dict of method statistics for results.json.

    Subclasses set ``needs_calibration`` when they read ``ctx.calibration``, and ``offload`` when they move
    the parts of the model they work on to ``ctx.device`` themselves (the pipeline then keeps the model on
    the CPU while pruning, so a model larger than the accelerator's memory can be pruned block by block).
    """

    needs_calibration: bool = False
    offload: bool = False

    def validate(self, model: nn.Module, target: Sparsity) -> None:
        """Cheap checks after the model is loaded and before any expensive work."""
        for name, lin in prunable_matrices(model).items():
            target.check_shape(name, lin.weight.shape)

    def prune(self, ctx: PruneContext) -> dict:
        raise NotImplementedError
