"""What a training method (ELSA, ELSA-L, AST) is to the pipeline and to the training engine.

A :class:`TrainingMethod` is a Pruner whose ``prune`` hands itself to :class:`elsa.engines.training.TrainEngine`; it owns
its own keys (validated in its constructor) and the hooks the engine calls (elsa/engines/training.py lists them in
order). The keys every training method shares are an :class:`elsa.engines.training.TrainSettings` in ``self.train``.
Per-run state is whatever ``setup`` returns: the engine keeps it as ``run.state``.
"""
from __future__ import annotations

from elsa.engines.training import TrainEngine, TrainRun, TrainSettings
from elsa.engines.losses import LossTerms
from elsa.methods.base import PruneContext, Pruner
from elsa.methods.registry import TRAINING
from elsa.engines.schedules import linear_schedule

# keys added to TrainSettings after checkpoints existed: at their defaults they stay out of the signature
SIGNATURE_NEUTRAL = {"eval_split": "validation", "tokens": None}


class TrainingMethod(Pruner):
    """A method that trains the whole model (the global family)."""

    family = TRAINING     # takes_start (trains from the dense weights or a start stage's solution), has_budget, FSDP
    name = "trainer"
    nan_hint = "lower method.lr"
    shared_settings = TrainSettings   # where **shared goes: its fields are keys of every training method (elsa.run.spec)
    train_defaults: dict = {}         # the method's own defaults for shared keys (its paper's recipe)
    trains_weights = True   # False: the prunable weights stay frozen (only the method's own modules train: MaskLLM)

    def __init__(self, **shared):
        """``shared``: the keys of :class:`TrainSettings` (the method's ``train_defaults`` where not given); a method
        adds its own keys to ``self.config`` (the checkpoint signature)."""
        shared = {**self.train_defaults, **shared}
        self.config = {**TrainSettings.defaults(), **shared}
        for key, default in SIGNATURE_NEUTRAL.items():   # later keys join the checkpoint signature only when set,
            if self.config.get(key) == default:           # so a checkpoint written before them still resumes
                self.config.pop(key)
        self.train = TrainSettings(**shared)
        self.eval_initial = self.train.eval_initial
        self.loss_terms = LossTerms()   # the next-token loss; a method sets its own terms (elsa.engines.losses)

    @property
    def distils(self) -> bool:
        """The loss reads a teacher: after a start stage the pipeline keeps the dense model for it."""
        return self.loss_terms.needs_teacher

    def prune(self, ctx: PruneContext) -> dict:
        """Train from ``ctx.model`` as it is (dense, or a start stage's solution; the teacher is ``ctx.teacher``
        when the pipeline kept the dense model, else a frozen copy of the model)."""
        return TrainEngine(self).run(ctx, ctx.teacher)

    # -- hooks: a method overrides these -------------------------------------------------------------
    def lr_lambda(self):
        """The LR multiplier per step (LambdaLR)."""
        t = self.train
        return linear_schedule(t.warmup_steps, t.steps, t.lr_final_ratio)

    def extend(self, model, ctx: PruneContext) -> None:
        """Add the method's own modules to ``model`` before the optimizer is built (and before FSDP shards a copy
        of it): AST's SLoRB branches. Their parameters train when their module says ``elsa_trains``."""

    def setup(self, run: TrainRun):
        """The method's state for this run (before a checkpoint is loaded); the engine keeps it as run.state."""
        return None

    def start(self, run: TrainRun) -> None:
        """A fresh run: initial masks / projections; may add entries to ``run.stats``."""

    def extra_loss(self, run: TrainRun, step: int):
        """A term added to each micro-batch's loss after its forward (a tensor), or None."""
        return None

    def before_optimizer(self, run: TrainRun, step: int) -> dict:
        """Edit the (clipped) gradients; return extra progress-bar fields."""
        return {}

    def after_optimizer(self, run: TrainRun, step: int) -> None:
        """Edit the weights after the optimizer step."""

    def periodic(self, run: TrainRun, done: int) -> dict | None:
        """After ``done`` steps: the method's periodic update, returning a record for the history, or None."""
        return None

    def evaluate_sparse(self, run: TrainRun, evaluate):
        """``evaluate(model)`` on the sparse model the method would return now."""
        return evaluate(run.model)

    def method_state(self, run: TrainRun) -> dict:
        """Top-level entries the checkpoint adds for the method."""
        return {}

    def load_method_state(self, run: TrainRun, state: dict) -> None:
        """Restore what :meth:`method_state` saved."""

    def finish(self, run: TrainRun) -> None:
        """Leave exactly sparse weights in ``run.model``."""

    def teardown(self, run: TrainRun) -> None:
        """Undo what :meth:`setup` installed on the model (hooks, patched forwards); runs even on errors."""

    def method_nbytes(self, run: TrainRun) -> tuple[str, int]:
        """(label, bytes) of the method's own state, for ``state_bytes_per_param``."""
        return "method", 0
