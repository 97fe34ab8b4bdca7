"""ELSA: surrogate-free ADMM on the real next-token loss, and ELSA-L, its low-memory variant.

Primal: Adam steps on the weights with the proximal term lam (w - z + u) added to the gradient after
clipping ("coupled", the paper), or applied to the weights after each step ("decoupled", better for
short budgets); every ``interval`` steps z = Proj(w + u), u += w - z; at the end the weights are projected.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from elsa.engines import distributed as D
from elsa.engines.admm import CODECS, SCHEDULES, SPARSITY_SCHEDULES, AdmmState, LambdaSchedule, Scorer, codec, sparsity_at
from elsa.engines.training import OPTIMIZERS
from elsa.errors import config_error
from elsa.engines.losses import LossTerms
from elsa.methods.base import GROUP, Annotated, Choice, Number
from elsa.methods.registry import own_arguments
from elsa.methods.training_method import TrainingMethod

log = logging.getLogger(__name__)


@dataclass
class ElsaRun:
    """ELSA's state during one training run (``run.state``)."""

    lam: LambdaSchedule
    admm: AdmmState
    second_moment: Any               # name -> Adam's second moment (projection=objective), or None
    warm: int                        # steps over which z's ratio ramps to the target
    freeze_at: int                   # from this step on: support of z frozen, masked training
    lam_prev: float = 0.0
    frozen: bool = False
    lam_t: float = 0.0               # the penalty of the current step
    hooks: list | None = None        # projection=activation: the input hooks


# projection scores: |x|, Adam's v * x^2 (objective), and those of elsa.engines.admm.Scorer
PROJECTIONS = ("magnitude", "objective") + Scorer.KINDS
NEW_DEFAULTS = {"sparsity_schedule": "cubic", "sparsity_initial": 0.0, "relaxation": 1.0, "dual_timing": "interval",
                "lam_scaling": "global"}
DUAL_TIMINGS = ("interval", "reference")      # z/u after steps k*interval | after step 1 and 1 + k*interval
LAM_SCALINGS = ("global", "per_process")      # lam as given | lam / ranks (the reference's optimizer)
LOSSES = ("ntp", "kl", "mix", "rem")
FRACTION_OF_STEPS = Number(ge=0, lt=1, note="(a fraction of the steps)")


class Elsa(TrainingMethod, name="elsa", position=4):
    """Global ADMM on the training loss, as hooks of the training engine (elsa/engines/training.py)."""

    nan_hint = "lower method.lr or method.lam"
    train_defaults = {"checkpoint_every": 256}   # the engine's defaults are ELSA's recipe; a checkpoint every 256 steps

    def __init__(self, lam: Annotated[float, Number(ge=0)] = 0.01,
                 lam_final: Annotated[float | None, Number(ge=0, also=(None,))] = None,
                 lambda_schedule: Annotated[str, Choice(SCHEDULES)] = "constant",
                 adaptive_mu: Annotated[float, Number(gt=0)] = 10.0, adaptive_tau: Annotated[float, Number(gt=0)] = 2.0,
                 interval: Annotated[int, Number(gt=0, whole=True)] = 32,
                 dual_step: Annotated[float | str, Number(gt=0, le=1, also=("auto",))] = 1.0,
                 proximal: Annotated[str, Choice(("coupled", "decoupled"), "coupled (in the gradient, the paper) "
                                                 "or decoupled")] = "coupled",
                 projection: Annotated[str, Choice(PROJECTIONS)] = "magnitude", group: Annotated[str, GROUP] = "layer",
                 sparsity_warmup: Annotated[float, FRACTION_OF_STEPS] = 0.0,
                 finetune_fraction: Annotated[float, FRACTION_OF_STEPS] = 0.0,
                 loss: Annotated[str, Choice(LOSSES, "ntp (next-token), kl (distillation), mix or rem (MSE of the "
                                             "final hidden states against the dense model's)")] = "ntp",
                 distill_alpha: Annotated[float, Number(ge=0, le=1)] = 0.5,
                 z_dtype: Annotated[str, Choice(tuple(CODECS))] = "fp32",
                 u_dtype: Annotated[str, Choice(tuple(CODECS))] = "fp32",
                 sparsity_schedule: Annotated[str, Choice(SPARSITY_SCHEDULES)] = "cubic",
                 sparsity_initial: Annotated[float, Number(ge=0, lt=1, note="(a fraction of the target)")] = 0.0,
                 relaxation: Annotated[float, Number(gt=0, lt=2, note="(1: standard ADMM)")] = 1.0,
                 dual_timing: Annotated[str, Choice(DUAL_TIMINGS)] = "interval",
                 lam_scaling: Annotated[str, Choice(LAM_SCALINGS)] = "global", **shared):
        """ELSA's own keys; ``shared`` are the engine's (steps, lr, ..., see elsa.engines.training.TrainSettings)."""
        own = own_arguments(self, Elsa)
        # keys added by issue 15 join the checkpoint signature only when set, so older checkpoints still resume
        for key, default in NEW_DEFAULTS.items():
            if own.get(key) == default:
                own.pop(key)
        super().__init__(**shared)
        self.interval = int(interval)
        self.lam, self.lam_final, self.lambda_schedule = float(lam), lam_final, lambda_schedule
        self.adaptive_mu, self.adaptive_tau = adaptive_mu, adaptive_tau
        LambdaSchedule(lambda_schedule, self.lam, lam_final, self.train.steps)  # validate early
        self.dual_step = dual_step
        if proximal == "decoupled" and max(self.lam, lam_final or 0) > 1:
            raise config_error("method.lam", lam, "at most 1 with proximal=decoupled (a pull fraction per step)")
        self.sparsity_schedule, self.sparsity_initial = sparsity_schedule, float(sparsity_initial)
        self.relaxation = float(relaxation)
        self.dual_timing, self.lam_scaling = dual_timing, lam_scaling
        self.finetune_fraction = finetune_fraction
        self.proximal, self.projection, self.group = proximal, projection, group
        self.sparsity_warmup, self.loss, self.distill_alpha = sparsity_warmup, loss, distill_alpha
        ntp, kl = {"ntp": (1.0, 0.0), "kl": (0.0, 1.0), "mix": (1 - distill_alpha, distill_alpha),
                   "rem": (0.0, 0.0)}[loss]
        self.loss_terms = LossTerms(ntp=ntp, kl=kl, rem=1.0 if loss == "rem" else 0.0)
        self.z_codec, self.u_codec = codec(z_dtype, "method.z_dtype"), codec(u_dtype, "method.u_dtype")
        self.config.update(own)

    def validate(self, plan) -> None:
        super().validate(plan)
        if self.projection == "activation" and any(w.experts for w in plan.weights.values()):
            raise config_error("method.projection", "activation", "magnitude, objective, objective_corrected, "
                               "gradient or taylor for a model with fused expert tensors (their per-expert inputs "
                               "are not observed in training)")

    # -- pieces -------------------------------------------------------------------------------------
    def ramp(self, target, step, warm):
        """The projection's target at ``step`` (the sparsity schedule up to the peak step ``warm``)."""
        return sparsity_at(target, step, warm, self.sparsity_schedule, self.sparsity_initial)

    def second_moment_fn(self, opt, params: dict, layouts=None):
        if self.projection in Scorer.KINDS:
            return Scorer(self.projection, opt, params, self.train.betas, layouts)
        if self.projection != "objective":
            return None

        def fn(name):
            state = opt.state.get(params[name], {})
            v = state.get("exp_avg_sq")
            if v is None:
                return None
            return D.local(v.dequantize() if hasattr(v, "dequantize") else v).float()
        return fn

    def dual_step_at(self, lam: float) -> float:
        """The dual ascent step. 'auto' (decoupled only): the fraction of the distance to z - u that the pull
        covers in one interval, 1 - (1 - lam)^interval, so u grows no faster than w can follow it."""
        if self.dual_step != "auto":
            return float(self.dual_step)
        if self.proximal != "decoupled":
            return 1.0
        return max(1.0 - (1.0 - min(lam, 1.0)) ** self.interval, 1e-6)

    @staticmethod
    @torch.no_grad()
    def on_projection(model, admm, target, second_moment, evaluate):
        """``evaluate(model)`` with the constrained weights projected, then the weights restored."""
        saved = {n: D.local(p).detach().clone() for n, p in admm.params.items()}
        admm.final_projection(target, second_moment)
        try:
            return evaluate(model)
        finally:
            for n, p in admm.params.items():
                D.local(p).copy_(saved[n])
            model.train()

    # -- hooks of the training engine -----------------------------------------------------------------
    def setup(self, run):
        steps = self.train.steps
        layouts = {n: w.transposed for n, w in run.plan.named_weights().items()}
        scorer = self.second_moment_fn(run.opt, run.constrained, layouts)
        hooks = None
        if self.projection == "activation":
            if D.world_size() > 1:
                raise config_error("method.projection", "activation", "a single-process run (not yet under FSDP)")
            hooks = []
            for name, w in run.plan.named_weights().items():
                def hook(module, args, name=name):
                    if module.training and torch.is_grad_enabled():
                        scorer.add_inputs(name, args[0])
                hooks.append(w.module.register_forward_pre_hook(hook))
        return ElsaRun(
            lam=LambdaSchedule(self.lambda_schedule, self.lam, self.lam_final, steps, self.adaptive_mu,
                               self.adaptive_tau),
            admm=AdmmState(run.constrained, run.plan, self.group, self.z_codec, self.u_codec, layouts),
            second_moment=scorer, hooks=hooks,
            warm=int(self.sparsity_warmup * steps),
            # the last finetune_fraction of the steps train on the frozen support of z (no dual updates)
            freeze_at=steps - int(round(self.finetune_fraction * steps)))

    def start(self, run):
        st = run.state
        st.admm.init(self.ramp(run.plan, 0, st.warm))
        st.lam_prev = st.lam.at(0)
        ctx = run.ctx
        if self.eval_initial and ctx.start is None and "evaluate" in ctx.extras and D.world_size() == 1:
            # z0 = Proj(w0) is the magnitude-pruned dense model, the baseline ELSA starts from: report its
            # perplexity with the run's own protocol, so the table shows dense, magnitude and ELSA
            run.stats["initial_projection_perplexity"] = self.on_projection(run.model, st.admm, run.plan, None,
                                                                            ctx.extras["evaluate"])
            log.info("perplexity of the initial projection (magnitude): %s", run.stats["initial_projection_perplexity"])

    def before_optimizer(self, run, step):
        st, target = run.state, run.plan
        admm = st.admm
        if isinstance(st.second_moment, Scorer) and self.projection == "gradient":
            st.second_moment.add_gradients()     # the loss gradient (clipped), before the proximal term
        st.frozen = frozen = step >= st.freeze_at
        if frozen and step == st.freeze_at:
            admm.dual_update(target, 1.0, st.second_moment)  # a last projection at the full target
            admm.apply_support()
            log.info("step %d: support frozen; %d steps of masked training follow", step, self.train.steps - step)
        st.lam_t = lam_t = 0.0 if frozen else st.lam.at(step)
        if self.lam_scaling == "per_process":   # the reference divides the term by the ranks (gradients are
            st.lam_t = lam_t = lam_t / run.world  # already averaged), so its runs on N ranks used lam / N
        if self.proximal == "coupled" and lam_t:
            for name, p in run.constrained.items():
                D.local(p.grad).add_(admm.prox_residual(name).to(p.grad.dtype), alpha=lam_t)
        return {"lam": f"{lam_t:.3g}"}

    def after_optimizer(self, run, step):
        st = run.state
        if st.frozen:
            st.admm.apply_support()
        if self.proximal == "decoupled" and st.lam_t:
            with torch.no_grad():
                for name, p in run.constrained.items():
                    D.local(p).sub_(st.admm.prox_residual(name).to(p.dtype), alpha=st.lam_t)

    def periodic(self, run, done):
        st = run.state
        phase = 1 if self.dual_timing == "reference" else 0   # the reference's first z/u update follows step 1
        if st.frozen or not ((done - phase) % self.interval == 0 or done == self.train.steps):
            return None
        admm, lam, target, warm = st.admm, st.lam, run.plan, st.warm
        lam_now, lam_prev = lam.at(done), st.lam_prev
        metrics = admm.dual_update(self.ramp(target, done, warm),
                                   lam_prev / lam_now if lam_now and lam_prev else 1.0, st.second_moment,
                                   self.dual_step_at(lam_now), self.relaxation)
        metrics["dual_residual"] = lam_now * metrics.pop("dual_residual_unscaled")
        new_lam = lam.balance(metrics["primal_residual"], metrics["dual_residual"])
        if new_lam != lam_now and lam_now:
            # adaptive lambda changed: rescale the scaled dual u = y / lam at once
            for name in run.constrained:
                admm.u[name] = admm.uc.encode(admm.zu(name)[1] * (lam_now / new_lam))
        st.lam_prev = new_lam
        return {"step": done, "loss": run.loss, "lr": run.sched.get_last_lr()[0], "lambda": lam_now,
                "target_ratio": self.ramp(target, done, warm).ratio, **metrics}

    def evaluate_sparse(self, run, evaluate):
        st = run.state
        return self.on_projection(run.model, st.admm, run.plan, st.second_moment, evaluate)

    def method_state(self, run):
        st = run.state
        out = {"lambda": st.lam.state_dict(), "admm": st.admm.state_dict(), "lam_prev": st.lam_prev}
        if isinstance(st.second_moment, Scorer):
            out["scores"] = st.second_moment.state_dict()
        return out

    def load_method_state(self, run, state):
        st = run.state
        st.lam.load_state_dict(state["lambda"])
        st.admm.load_state_dict(state["admm"])
        st.lam_prev = state["lam_prev"]
        if isinstance(st.second_moment, Scorer):
            st.second_moment.load_state_dict(state.get("scores", {}))

    def finish(self, run):
        run.state.admm.final_projection(run.plan, run.state.second_moment)

    def teardown(self, run):
        for handle in (getattr(run.state, "hooks", None) or []):
            handle.remove()

    def method_nbytes(self, run):
        return "admm", run.state.admm.nbytes()


class ElsaL(Elsa, name="elsa_l", position=5):
    """ELSA-L: z in FP8 e4m3 (per-tensor scale), u in BF16, 8-bit AdamW (torchao); fp32 arithmetic."""

    def __init__(self, optimizer: Annotated[str, Choice(OPTIMIZERS, " or ".join(OPTIMIZERS))] = "adamw8bit",
                 z_dtype: Annotated[str, Choice(tuple(CODECS))] = "fp8",
                 u_dtype: Annotated[str, Choice(tuple(CODECS))] = "bf16", **kwargs):
        super().__init__(optimizer=optimizer, z_dtype=z_dtype, u_dtype=u_dtype, **kwargs)
