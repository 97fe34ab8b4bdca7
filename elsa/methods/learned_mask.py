"""Learned masks on frozen weights (MaskLLM, LEAP): what the two methods share.

Every prunable weight gets trainable mask logits (a :class:`MaskLogits` module attached to the weight's module
before the optimizer and any sharding, so the engine trains them, checkpoints them with the model and FSDP2
shards them with their block). The weights themselves stay frozen (``trains_weights = False``): each prunable
Linear / Conv1D / fused expert tensor computes with ``w * m``, where ``m`` is a relaxed mask sampled from the
logits in training (a subclass's ``soft``) and the final, exact mask in evaluation (its ``hard``). The
logits start from a prior mask: the start stage's solution (``start=sparsegpt``: the pruned weights' support,
and the dense weights are put back from the kept dense model) or, from the dense model, the magnitude mask at
the target. ``finish`` multiplies the dense weights by the hard mask, so kept weights are bit-identical to the
dense ones and the zeros are exact; the logits are then detached from the model.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from elsa.engines import distributed as D
from elsa.engines.training import tensor_nbytes
from elsa.errors import ElsaError, config_error
from elsa.methods.ast import swap_hooks
from elsa.methods.base import Annotated, Number, Numbers
from elsa.methods.training_method import TrainingMethod
from elsa.engines.schedules import cosine_schedule

log = logging.getLogger(__name__)


class MaskLogits(nn.Module):
    """The mask logits of one module's prunable tensors, by attribute name (2-D tensors: a 3-D one would read as
    a fused expert tensor)."""

    elsa_trains = True    # elsa.engines.training: trained whatever train_dense_params says

    def __init__(self):
        super().__init__()
        self.logits = nn.ParameterDict()


def attached(weight) -> torch.Tensor:
    return weight.module.elsa_mask.logits[weight.attr]


def schedule(bounds, step: int, steps: int) -> float:
    """Linear from bounds[0] at step 0 to bounds[1] at the last step (the references' temperature and scale)."""
    frac = min(step / max(steps, 1), 1.0)
    return float(bounds[0]) + (float(bounds[1]) - float(bounds[0])) * frac


# a gumbel_temperature / gumbel_scale key: its value at the first step and at the last
RANGE = Numbers(2, Number(gt=0), "[start, end], two numbers > 0 (linear from the first step to the last)")


@dataclass
class MaskRun:
    """A learned-mask method's state during one training run (``run.state``)."""

    weights: dict                    # name -> elsa.model.structure.Weight of run.model
    step: int = 0                    # the step whose forward runs next (the schedules read it)
    terms: dict = field(default_factory=dict)   # name -> this forward's regulariser parts, per matrix
    hooks: list = field(default_factory=list)
    hard: dict = field(default_factory=dict)    # name -> hard mask of the current logits (evaluation cache)
    last: dict = field(default_factory=dict)    # the last regulariser values, for the history


class LearnedMask(TrainingMethod):
    """Frozen weights times a mask learned from logits; a subclass defines the logits and the masks."""

    trains_weights = False
    keeps_dense = True        # the dense weights are what the mask multiplies
    nan_hint = "lower method.lr"
    train_defaults = {"train_dense_params": False}

    def __init__(self, gumbel_temperature: Annotated[list, RANGE], gumbel_scale: Annotated[list, RANGE],
                 prior_strength: Annotated[float, Number(ge=0)] = 3.0, init_std: Annotated[float, Number(gt=0)] = 0.01,
                 weight_reg: Annotated[float, Number(ge=0)] = 0.0, **shared):
        """The keys both methods have (a subclass declares its own defaults): the Gumbel temperature and logit
        scale schedules, the prior's strength, the logits' initial spread, the weight regulariser."""
        super().__init__(**shared)
        if self.train.train_dense_params:
            raise config_error("method.train_dense_params", True, "false: the method learns a mask on frozen "
                               "weights (the embeddings, norms and head stay frozen too)")
        self.prior_strength, self.init_std, self.weight_reg = float(prior_strength), float(init_std), float(weight_reg)
        self.gumbel_temperature = [float(v) for v in gumbel_temperature]
        self.gumbel_scale = [float(v) for v in gumbel_scale]
        self.config.update(prior_strength=prior_strength, init_std=init_std, weight_reg=weight_reg,
                           gumbel_temperature=self.gumbel_temperature, gumbel_scale=self.gumbel_scale)

    # -- what a subclass defines --------------------------------------------------------------------
    def init_logits(self, weight, prior: torch.Tensor) -> torch.Tensor:
        """2-D logits of one weight from its prior keep-mask (storage layout, bool)."""
        raise NotImplementedError

    def soft(self, weight, logits: torch.Tensor, step: int) -> torch.Tensor:
        """The relaxed mask (storage layout) sampled in a training forward."""
        raise NotImplementedError

    def hard(self, name: str, weight, logits: torch.Tensor) -> torch.Tensor:
        """The exact keep-mask (storage layout, bool) of the logits, to the target of weight ``name`` (its full
        name) in ``self.plan``."""
        raise NotImplementedError

    def record(self, st: MaskRun, name: str, weight: torch.Tensor, mask: torch.Tensor) -> None:
        """Keep what the regulariser needs of this matrix's forward (full tensors, also under FSDP2)."""
        if self.weight_reg:
            st.terms[name] = {"kept_sq": (weight.detach().float() * mask.float()).square().sum()}

    def extra_loss(self, run, step):
        """MaskLLM's sparse-weight regularisation: - weight_reg (1 - t/T) sum ||w * m||^2 (keep large weights)."""
        st = run.state
        if not self.weight_reg or not st.terms:
            return None
        kept = sum(t["kept_sq"] for t in st.terms.values())
        st.terms = {}
        reg = -self.weight_reg * (1.0 - step / self.train.steps) * kept
        st.last = {"kept_weight_sq": float(kept.detach()), "regulariser": float(reg.detach())}
        return reg

    def lr_lambda(self):
        t = self.train
        return cosine_schedule(t.warmup_steps, t.steps, t.lr_final_ratio)

    # -- the prior and the logits (before the optimizer and the sharding) --------------------------------
    @torch.no_grad()
    def extend(self, model, ctx) -> None:
        plan = ctx.plan.on(model)
        weights = plan.named_weights()
        if ctx.start is not None:
            if ctx.teacher is None:
                raise ElsaError(f"internal: method={self.name} after start={ctx.start} needs the dense model "
                                "(ctx.teacher)")
            dense = ctx.plan.on(ctx.teacher).named_weights()
        self.prior = "magnitude" if ctx.start is None else ctx.start
        self.priors = {}
        for name, w in weights.items():
            p = w.param
            if ctx.start is not None:       # the start's support is the prior; the weights go back to dense
                prior = p.detach() != 0
                p.copy_(dense[name].param.detach())
            else:
                prior = plan.mask(name, p.detach().abs().float(), getattr(self, "group", "layer"))
            self.priors[name] = prior
            if not hasattr(w.module, "elsa_mask"):
                w.module.elsa_mask = MaskLogits()
            w.module.elsa_mask.logits[w.attr] = nn.Parameter(self.init_logits(w, prior))
        ctx.teacher = None     # the dense weights are back in the model: the copy is freed (no distillation)

    def prior_logits(self, shape, agreement: torch.Tensor) -> torch.Tensor:
        """N(0, init_std) logits shifted by ``agreement`` (in [-1, 1] per entry) x their std x prior_strength:
        both references' prior."""
        logits = torch.randn(shape) * self.init_std
        return logits + agreement.float() * logits.std() * self.prior_strength

    # -- the masked forward ---------------------------------------------------------------------------
    def setup(self, run):
        # at a low temperature some sampled probabilities are subnormal (1.8% of 1M 2:4 groups at tau 0.05, scale
        # 500), which CPUs compute slowly: flushed to zero while the method trains (a sample + backward of those
        # groups: 1.05-1.2 s flushed, 1.22-1.35 s not, one thread under load), numerically nothing
        torch.set_flush_denormal(True)
        st = MaskRun(run.plan.named_weights())
        for name, w in st.weights.items():
            if w.experts is None:
                w.module.forward = self._forward_fn(st, name, w)
            else:
                st.hooks += swap_hooks(w.module, w.attr, self._masked_tensor(st, name, w))
        return st

    def teardown(self, run):
        torch.set_flush_denormal(False)
        st = run.state
        for w in st.weights.values():
            if "forward" in vars(w.module):
                del w.module.forward
        for handle in st.hooks:
            handle.remove()
        st.hooks = []

    def mask_of(self, st: MaskRun, name: str, w, weight: torch.Tensor) -> torch.Tensor:
        logits = attached(w)
        if w.module.training and torch.is_grad_enabled():
            mask = self.soft(w, logits, st.step)
            self.record(st, name, weight, mask)
            return mask.to(weight.dtype)
        if name not in st.hard:
            st.hard[name] = self.hard(name, w, logits.detach())
        return st.hard[name].to(weight.dtype)

    def _forward_fn(self, st, name, w):
        lin = w.module

        def forward(x):
            weight = lin.weight * self.mask_of(st, name, w, lin.weight)
            return F.linear(x, weight.t() if w.transposed else weight, lin.bias)
        return forward

    def _masked_tensor(self, st, name, w):
        """A fused expert tensor: for its module's forward the parameter is swapped for the masked tensor
        (elsa.methods.ast.swap_hooks)."""
        def masked(p):
            return p * self.mask_of(st, name, w, p)
        return masked

    # -- hooks of the training engine -----------------------------------------------------------------
    def start(self, run):
        run.state.step = 0
        run.stats["prior"] = self.prior
        ctx = run.ctx
        if self.eval_initial and "evaluate" in ctx.extras and run.world == 1:
            # the hard mask of the initial logits (the prior's, up to the init noise) on the dense weights: what
            # the training starts from (after start=sparsegpt: SparseGPT's mask without its weight updates)
            run.stats["initial_mask_perplexity"] = self.evaluate_sparse(run, ctx.extras["evaluate"])
            log.info("perplexity of the initial mask (%s prior): %s", self.prior, run.stats["initial_mask_perplexity"])

    def load_method_state(self, run, state):
        run.state.step = int(state["step"])

    def after_optimizer(self, run, step):
        run.state.step = step + 1
        run.state.hard = {}

    def periodic(self, run, done):
        """A history record about 20 times a run: the loss (the regulariser included: the next-token loss is about
        loss - regulariser), LR, temperature, scale."""
        every = max(1, self.train.steps // 20)
        if done % every and done != self.train.steps:
            return None
        t = self.train.steps
        return {"step": done, "loss": run.loss, "lr": run.sched.get_last_lr()[0],
                "tau": schedule(self.gumbel_temperature, done, t), "scale": schedule(self.gumbel_scale, done, t),
                **run.state.last}

    def evaluate_sparse(self, run, evaluate):
        try:
            return evaluate(run.model)
        finally:
            run.state.hard = {}
            run.model.train()

    @torch.no_grad()
    def finish(self, run):
        """w <- w * hard mask, on this rank's rows; the agreement of the final masks with the prior."""
        st, kept, total, same = run.state, 0, 0, 0
        for name, w in st.weights.items():
            logits = attached(w)
            full = self.hard(name, w, D.gather(logits, D.local(logits).detach()))
            local = D.local(w.param)
            local.mul_(D.scatter(w.param, full).to(local.dtype))
            kept += int(full.sum())
            total += full.numel()
            prior = self.priors.get(name)
            if prior is not None:
                same += int((prior.to(full.device) == full).sum())
        run.stats.update(kept_fraction=kept / max(total, 1),
                         mask_agreement_with_prior=same / max(total, 1) if self.priors else None)

    def method_nbytes(self, run):
        params = [attached(w) for w in run.state.weights.values()]
        state = sum(tensor_nbytes(D.local(v)) for p in params for v in run.opt.state.get(p, {}).values()
                    if isinstance(v, torch.Tensor) and v.numel() > 1)
        return "mask_logits", sum(tensor_nbytes(D.local(p)) for p in params) + state

    def prune(self, ctx):
        """Train the logits in the engine, then detach them: the model is a plain sparse model again."""
        from elsa.engines.training import TrainEngine

        self.plan = ctx.plan                  # each matrix's target (hard masks)
        try:
            return TrainEngine(self).run(ctx, None)   # no teacher: the loss is the next-token loss
        finally:
            for w in ctx.plan.weights.values():
                if hasattr(w.module, "elsa_mask"):
                    del w.module.elsa_mask
