"""The one interface every pruning method shares."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any  # noqa: F401 - Annotated: the methods import it from here

import torch
from torch import nn

from elsa.methods.registry import ONE_SHOT, Choice, Flag, Number, Numbers, declare  # noqa: F401 - for the methods
from elsa.sparsity.plan import PruningPlan
from elsa.sparsity.patterns import GROUPS, Sparsity, check_group  # noqa: F401 - check_group: the methods import it from here

GROUP = Choice(GROUPS)    # a ``group`` key: where a ratio's top-k is compared (elsa.sparsity.patterns.mask_from_scores)



@dataclass
class PruneContext:
    """Everything a method may need. Layer-wise methods use ``calibration``; global ones the dataset."""

    model: nn.Module
    tokenizer: Any
    target: Sparsity
    calibration: torch.Tensor | None = None      # (nsamples, seqlen) input ids
    dataset: Any = None                          # elsa.data.corpora.Corpus for methods that train
    seqlen: int = 512
    seed: int = 0
    device: str = "cpu"
    output_dir: Path | None = None
    tracker: Any = None
    extras: dict = field(default_factory=dict)
    start: str | None = None                     # the start stage that pruned ``model`` first (None: dense)
    teacher: nn.Module | None = None             # the dense model, kept when a start stage ran (distillation)
    # what to prune, each matrix to what target (elsa.sparsity.plan); None: every matrix of ``model`` at ``target``
    plan: PruningPlan | None = None

    def __post_init__(self):
        if self.plan is None:
            self.plan = PruningPlan.build(self.model, self.target)


class Pruner:
    """Prune ``ctx.model`` in place to ``ctx.target``; return a dict of method statistics for results.json.

    A method declares itself (elsa.methods.registry): its ``family`` sets the flags the pipeline reads
    (``needs_calibration``, ``offload``, ``takes_start``, ``has_budget``, ``supports_fsdp``, ``start_eligible``,
    ``distils``, ``keeps_dense``, ``eval_initial``: see the registry), ``class X(Pruner, name="x")`` registers it,
    and its constructor's ``Annotated[type, rule]`` parameters are its keys, checked before the body runs.
    ``offload``: the method moves the parts of the model it works on to ``ctx.device`` itself (the pipeline then
    keeps the model on the CPU while pruning, so a model larger than the accelerator's memory can be pruned block
    by block). ``takes_start``: the method continues from whatever ``ctx.model`` holds, so a start stage (start=)
    may prune it first; the others prune the dense model by definition and the pipeline does not run a start.
    """

    family = ONE_SHOT
    name: str = ""
    names: tuple[str, ...] = ()     # the name and its variants (conf files that configure the same class)
    position: float = 0             # where the report lists it within its family

    def __init_subclass__(cls, name: str | None = None, variants: tuple[str, ...] = (), position: float | None = None,
                          **kwargs):
        super().__init_subclass__(**kwargs)
        declare(cls, name, variants, position)

    def matrix_flops(self, out_features: int, in_features: int, tokens: int) -> float:
        """An estimate of this method's own work on one ``[out, in]`` matrix given ``tokens`` calibration tokens
        (beyond the forward passes; elsa.eval.compute): selection only, for a method that reads no data."""
        return float(out_features * in_features)

    def validate(self, plan: PruningPlan) -> None:
        """Cheap checks after the model is loaded and ``plan`` made, before any expensive work."""
        for mid, lin, target in plan.matrices():
            target.check_shape(plan.name(mid), lin.weight.shape)

    def prune(self, ctx: PruneContext) -> dict:
        raise NotImplementedError


declare(Pruner)   # the one-shot family's flags
