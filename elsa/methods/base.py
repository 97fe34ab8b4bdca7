"""The one interface every pruning method shares."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from elsa.models import prunable_matrices
from elsa.sparsity import Sparsity, check_group  # noqa: F401 - check_group: the methods import it from here



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
    start: str | None = None                     # the start stage that pruned ``model`` first (None: dense)
    teacher: nn.Module | None = None             # the dense model, kept when a start stage ran (distillation)


class Pruner:
    """Prune ``ctx.model`` in place to ``ctx.target``; return a dict of method statistics for results.json.

    Subclasses set ``needs_calibration`` when they read ``ctx.calibration``, and ``offload`` when they move
    the parts of the model they work on to ``ctx.device`` themselves (the pipeline then keeps the model on
    the CPU while pruning, so a model larger than the accelerator's memory can be pruned block by block).
    ``takes_start``: the method continues from whatever ``ctx.model`` holds, so a start stage (start=) may
    prune it first; the others prune the dense model by definition and the pipeline does not run a start.
    """

    needs_calibration: bool = False
    offload: bool = False
    takes_start: bool = False     # continues from the model it is given (start=): the training methods
    has_budget: bool = False      # has steps / epochs that budget= sets (conf/method_budget/<budget>/<name>.yaml)
    distils: bool = False         # reads ctx.teacher (the dense model) when a start stage ran
    keeps_dense: bool = False     # reads ctx.teacher too: learns a mask on the dense weights (MaskLLM, LEAP)
    eval_initial: bool = False    # the pipeline reports the perplexity of the start stage's solution

    def matrix_flops(self, out_features: int, in_features: int, tokens: int) -> float:
        """An estimate of this method's own work on one ``[out, in]`` matrix given ``tokens`` calibration tokens
        (beyond the forward passes; elsa.compute): selection only, for a method that reads no data."""
        return float(out_features * in_features)

    def validate(self, model: nn.Module, target: Sparsity) -> None:
        """Cheap checks after the model is loaded and before any expensive work."""
        for name, lin in prunable_matrices(model).items():
            target.check_shape(name, lin.weight.shape)

    def prune(self, ctx: PruneContext) -> dict:
        raise NotImplementedError
