"""ELSA: surrogate-free ADMM on the real next-token loss, and ELSA-L, its low-memory variant.

Primal: Adam steps on the weights with the proximal term lam (w - z + u) added to the gradient after
clipping ("coupled", the paper), or applied to the weights after each step ("decoupled", better for
short budgets); every ``interval`` steps z = Proj(w + u), u += w - z; at the end the weights are projected.
"""
from __future__ import annotations

import copy
import logging
import math
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from elsa import distributed as D
from elsa.admm import AdmmState, LambdaSchedule, codec, sparsity_at
from elsa.data import eval_windows, token_stream
from elsa.errors import ElsaError, config_error
from elsa.evaluation import perplexity
from elsa.methods.base import PruneContext, Pruner
from elsa.models import decoder_blocks, prunable_linears
from elsa.training import Checkpointer, TrainWindows, kl_loss, linear_schedule, lm_loss, rng_state, set_rng_state

log = logging.getLogger(__name__)


def _positive(key: str, value, integer: bool = False, zero_ok: bool = False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and \
        (value >= 0 if zero_ok else value > 0) and (not integer or float(value).is_integer())
    if not ok:
        kind = "a whole number" if integer else "a number"
        raise config_error(key, value, f"{kind} {'>= 0' if zero_ok else '> 0'}")
    return int(value) if integer else float(value)


def tensor_nbytes(t) -> int:
    """Bytes held by a tensor, looking inside tensor subclasses (8-bit optimiser states)."""
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor and not isinstance(t, nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_nbytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


# where the ADMM starts: the dense weights (the paper: z0 = Proj(w0) is magnitude pruning), or a one-shot
# method's pruned weights (w0 = z0 = its solution; the dense model stays the distillation teacher)
INITS = ("dense", "wanda", "sparsegpt")


class Elsa(Pruner):
    name = "elsa"
    supports_fsdp = True

    def __init__(self, steps: int = 4096, batch_size: int = 2, grad_accum: int = 4, lr: float = 2e-4,
                 warmup_steps: int = 0, lr_final_ratio: float = 0.0, betas=(0.9, 0.95), weight_decay: float = 0.0,
                 grad_clip: float = 1.0, lam: float = 0.01, lam_final: float | None = None,
                 lambda_schedule: str = "constant", adaptive_mu: float = 10.0, adaptive_tau: float = 2.0,
                 interval: int = 32, dual_step: float | str = 1.0, proximal: str = "coupled", projection: str = "magnitude", group: str = "layer",
                 sparsity_warmup: float = 0.0, finetune_fraction: float = 0.0, loss: str = "ntp", distill_alpha: float = 0.5,
                 temperature: float = 1.0, autocast_bf16: bool = False, gradient_checkpointing: bool = False,
                 train_dense_params: bool = True, eval_every: int = 0, eval_tokens: int = 16384,
                 eval_initial: bool = True, checkpoint_every: int = 0, resume: bool = True,
                 keep_checkpoint: bool = False, optimizer: str = "adamw", z_dtype: str = "fp32",
                 u_dtype: str = "fp32", init: str = "dense"):
        if init not in INITS:
            raise config_error("method.init", init, f"one of {', '.join(INITS)} (dense: the paper)")
        self.init = init
        self.needs_calibration = init != "dense"   # a one-shot start prunes with the calibration windows
        self.steps = _positive("method.steps", steps, integer=True)
        self.batch_size = _positive("method.batch_size", batch_size, integer=True)
        self.grad_accum = _positive("method.grad_accum", grad_accum, integer=True)
        self.lr = _positive("method.lr", lr)
        self.warmup_steps = _positive("method.warmup_steps", warmup_steps, integer=True, zero_ok=True)
        self.lr_final_ratio = _positive("method.lr_final_ratio", lr_final_ratio, zero_ok=True)
        self.betas = tuple(float(b) for b in betas)
        self.weight_decay = _positive("method.weight_decay", weight_decay, zero_ok=True)
        self.grad_clip = _positive("method.grad_clip", grad_clip, zero_ok=True)
        self.interval = _positive("method.interval", interval, integer=True)
        if not (isinstance(lam, (int, float)) and lam >= 0):
            raise config_error("method.lam", lam, "a number >= 0")
        self.lam, self.lam_final, self.lambda_schedule = float(lam), lam_final, lambda_schedule
        self.adaptive_mu, self.adaptive_tau = adaptive_mu, adaptive_tau
        LambdaSchedule(lambda_schedule, self.lam, lam_final, self.steps)  # validate early
        if not (dual_step == "auto" or isinstance(dual_step, (int, float)) and 0 < dual_step <= 1):
            raise config_error("method.dual_step", dual_step, "a number in (0, 1] or auto")
        self.dual_step = dual_step
        if proximal not in ("coupled", "decoupled"):
            raise config_error("method.proximal", proximal, "coupled (in the gradient, the paper) or decoupled")
        if proximal == "decoupled" and max(self.lam, lam_final or 0) > 1:
            raise config_error("method.lam", lam, "at most 1 with proximal=decoupled (a pull fraction per step)")
        if projection not in ("magnitude", "objective"):
            raise config_error("method.projection", projection, "magnitude (|x|) or objective (v * x^2)")
        if group not in ("layer", "row"):
            raise config_error("method.group", group, "one of layer, row")
        if not 0 <= sparsity_warmup < 1:
            raise config_error("method.sparsity_warmup", sparsity_warmup, "a fraction of the steps in [0, 1)")
        if not 0 <= finetune_fraction < 1:
            raise config_error("method.finetune_fraction", finetune_fraction, "a fraction of the steps in [0, 1)")
        self.finetune_fraction = finetune_fraction
        if loss not in ("ntp", "kl", "mix"):
            raise config_error("method.loss", loss, "ntp (next-token), kl (distillation) or mix")
        if optimizer not in ("adamw", "adamw8bit"):
            raise config_error("method.optimizer", optimizer, "adamw or adamw8bit")
        self.proximal, self.projection, self.group = proximal, projection, group
        self.sparsity_warmup, self.loss, self.distill_alpha, self.temperature = sparsity_warmup, loss, distill_alpha, temperature
        self.autocast_bf16, self.gradient_checkpointing = autocast_bf16, gradient_checkpointing
        self.train_dense_params = train_dense_params
        self.eval_every = _positive("method.eval_every", eval_every, integer=True, zero_ok=True)
        self.eval_tokens, self.eval_initial = eval_tokens, eval_initial
        self.checkpoint_every = _positive("method.checkpoint_every", checkpoint_every, integer=True, zero_ok=True)
        self.resume, self.keep_checkpoint = resume, keep_checkpoint
        self.optimizer_name = optimizer
        self.z_codec, self.u_codec = codec(z_dtype, "method.z_dtype"), codec(u_dtype, "method.u_dtype")
        self.config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}

    # -- pieces -------------------------------------------------------------------------------------
    def make_optimizer(self, params):
        groups = [{"params": params}]
        if self.optimizer_name == "adamw8bit":
            try:
                from torchao.optim import AdamW8bit
            except ImportError as exc:  # pragma: no cover - torchao is a dependency
                raise ElsaError("method.optimizer=adamw8bit needs torchao (pip install torchao)") from exc
            return AdamW8bit(groups, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)
        return torch.optim.AdamW(groups, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay,
                                 foreach=True)

    def second_moment_fn(self, opt, params: dict):
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

    def compute_loss(self, model, teacher, ids):
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=self.autocast_bf16):
            logits = model(input_ids=ids, use_cache=False).logits
            if self.loss == "ntp":
                return lm_loss(logits, ids)
            with torch.no_grad():
                t_logits = teacher(input_ids=ids, use_cache=False).logits
            kl = kl_loss(logits, t_logits, self.temperature)
            return kl if self.loss == "kl" else (1 - self.distill_alpha) * lm_loss(logits, ids) + self.distill_alpha * kl

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

    # -- the loop -----------------------------------------------------------------------------------
    def one_shot_start(self, ctx: PruneContext) -> dict:
        """Prune ``ctx.model`` with the one-shot method named by ``init`` (its default hyperparameters); the
        dense model is kept as the distillation teacher. Returns the start's statistics for results.json."""
        from elsa.methods.sparsegpt import SparseGPT
        from elsa.methods.wanda import Wanda

        if self.loss != "ntp":
            ctx.extras["teacher"] = copy.deepcopy(ctx.model).eval().requires_grad_(False)
        t0 = time.perf_counter()
        start = {"wanda": Wanda, "sparsegpt": SparseGPT}[self.init]()
        with torch.no_grad():
            start.prune(ctx)
        info = {"method": self.init, "time_s": time.perf_counter() - t0}
        if self.eval_initial and "evaluate" in ctx.extras and D.world_size() == 1:
            info["perplexity"] = ctx.extras["evaluate"](ctx.model)
            ctx.model.train()
            log.info("perplexity of the %s start: %s", self.init, info["perplexity"])
        return info

    def prune(self, ctx: PruneContext) -> dict:
        start = self.one_shot_start(ctx) if self.init != "dense" else None
        stats = self._prune(ctx)
        if start is not None:
            stats["init"] = start
        return stats

    def _prune(self, ctx: PruneContext) -> dict:
        if not ctx.extras.get("fsdp"):
            return self.train(ctx.model, ctx)
        # FSDP2: train a sharded copy, then bring the full weights back into the caller's model (rank 0)
        work = copy.deepcopy(ctx.model)
        D.shard(work, decoder_blocks(work))
        stats = self.train(work, ctx)
        full = D.full_state_dict(work)
        if D.is_main():
            ctx.model.load_state_dict(full)
        ctx.model.requires_grad_(False).eval()
        return stats

    def train(self, model, ctx: PruneContext) -> dict:
        device, target = torch.device(ctx.device), ctx.target
        constrained = {n: lin.weight for n, lin in prunable_linears(model).items()}
        ids_c = {id(p) for p in constrained.values()}
        for p in model.parameters():
            p.requires_grad_(self.train_dense_params or id(p) in ids_c)
        trainable = [p for p in model.parameters() if p.requires_grad]
        if self.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        teacher = None
        if self.loss != "ntp":
            teacher = ctx.extras.get("teacher") or copy.deepcopy(model).eval().requires_grad_(False)

        bos = ctx.tokenizer.bos_token_id
        world, rank = D.world_size(), D.rank()
        # one global batch of batch_size x world windows; each rank takes its own rows
        data = TrainWindows(token_stream(ctx.tokenizer, ctx.dataset, "train"), ctx.seqlen, self.batch_size * world,
                            ctx.seed, bos)
        heldout = None
        if self.eval_every:
            heldout = eval_windows(token_stream(ctx.tokenizer, ctx.dataset, "validation"), ctx.seqlen, bos,
                                   self.eval_tokens)

        opt = self.make_optimizer(trainable)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(self.warmup_steps, self.steps,
                                                                       self.lr_final_ratio))
        lam = LambdaSchedule(self.lambda_schedule, self.lam, self.lam_final, self.steps, self.adaptive_mu,
                             self.adaptive_tau)
        admm = AdmmState(constrained, target, self.group, self.z_codec, self.u_codec)
        second_moment = self.second_moment_fn(opt, constrained)
        warm = int(self.sparsity_warmup * self.steps)
        # the last finetune_fraction of the steps train on the frozen support of z (no dual updates)
        freeze_at = self.steps - int(round(self.finetune_fraction * self.steps))
        signature = {"method": self.config, "target": str(target), "seed": ctx.seed, "seqlen": ctx.seqlen,
                     "dataset": getattr(ctx.dataset, "name", None), "params": sum(p.numel() for p in trainable)}
        if world > 1 and self.checkpoint_every:
            log.warning("checkpoints are not written under FSDP yet (method.checkpoint_every ignored)")
        ckpt = Checkpointer(ctx.output_dir if world == 1 else None, self.name, signature)
        state = ckpt.load() if self.resume else None
        stats: dict = {"history": []}
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            lam.load_state_dict(state["lambda"])
            admm.load_state_dict(state["admm"])
            set_rng_state(state["rng"])
            stats, start, lam_prev = state["stats"], state["step"], state["lam_prev"]
            log.info("resumed %s from %s at step %d", self.name, ckpt.path, start)
            stats["resumed_from_step"] = start
        else:
            admm.init(sparsity_at(target, 0, warm))
            start, lam_prev = 0, lam.at(0)
            if self.eval_initial and self.init == "dense" and "evaluate" in ctx.extras and D.world_size() == 1:
                # z0 = Proj(w0) is the magnitude-pruned dense model, the baseline ELSA starts from: report its
                # perplexity with the run's own protocol, so the table shows dense, magnitude and ELSA
                stats["initial_projection_perplexity"] = self.on_projection(model, admm, target, None,
                                                                            ctx.extras["evaluate"])
                log.info("perplexity of the initial projection (magnitude): %s", stats["initial_projection_perplexity"])

        t0, tracker = time.perf_counter(), ctx.tracker
        model.train()
        bar = tqdm(range(start, self.steps), desc=self.name, unit="step", initial=start, total=self.steps,
                   disable=not D.is_main())
        for step in bar:
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for micro in range(self.grad_accum):
                ids = data.batch(step * self.grad_accum + micro)[rank * self.batch_size:(rank + 1) * self.batch_size]
                ids = ids.to(device)
                loss = self.compute_loss(model, teacher, ids) / self.grad_accum
                loss.backward()
                total += float(loss)
            if world > 1:  # the logged loss is the global batch's
                t = torch.tensor([total], dtype=torch.float64)
                torch.distributed.all_reduce(t)
                total = float(t) / world
            if not math.isfinite(total):
                where = f"; the last good checkpoint is {ckpt.path}" if ckpt.path and ckpt.path.exists() else ""
                raise ElsaError(f"method={self.name}: the loss is {total} at step {step}{where}; "
                                "lower method.lr or method.lam")
            if self.grad_clip:
                torch.nn.utils.clip_grad_norm_(trainable, self.grad_clip)
            frozen = step >= freeze_at
            if frozen and step == freeze_at:
                admm.dual_update(target, 1.0, second_moment)  # a last projection at the full target
                admm.apply_support()
                log.info("step %d: support frozen; %d steps of masked training follow", step, self.steps - step)
            lam_t = 0.0 if frozen else lam.at(step)
            if self.proximal == "coupled" and lam_t:
                for name, p in constrained.items():
                    D.local(p.grad).add_(admm.prox_residual(name).to(p.grad.dtype), alpha=lam_t)
            opt.step()
            sched.step()
            if frozen:
                admm.apply_support()
            if self.proximal == "decoupled" and lam_t:
                with torch.no_grad():
                    for name, p in constrained.items():
                        D.local(p).sub_(admm.prox_residual(name).to(p.dtype), alpha=lam_t)
            bar.set_postfix(loss=f"{total:.3f}", lam=f"{lam_t:.3g}")

            done = step + 1
            record = None
            if not frozen and (done % self.interval == 0 or done == self.steps):
                lam_now = lam.at(done)
                metrics = admm.dual_update(sparsity_at(target, done, warm),
                                           lam_prev / lam_now if lam_now and lam_prev else 1.0, second_moment,
                                           self.dual_step_at(lam_now))
                metrics["dual_residual"] = lam_now * metrics.pop("dual_residual_unscaled")
                new_lam = lam.balance(metrics["primal_residual"], metrics["dual_residual"])
                if new_lam != lam_now and lam_now:
                    # adaptive lambda changed: rescale the scaled dual u = y / lam at once
                    for name in constrained:
                        admm.u[name] = admm.uc.encode(admm.zu(name)[1] * (lam_now / new_lam))
                lam_prev = new_lam
                record = {"step": done, "loss": total, "lr": sched.get_last_lr()[0], "lambda": lam_now,
                          "target_ratio": sparsity_at(target, done, warm).ratio, **metrics}
            if self.eval_every and heldout is not None and done % self.eval_every == 0:
                record = record or {"step": done, "loss": total}
                record["heldout_ppl"] = self.on_projection(
                    model, admm, target, second_moment,
                    lambda m: perplexity(m, heldout, batch_size=4, device=device, desc="held-out ppl"))
            if record:
                stats["history"].append(record)
                if tracker is not None and D.is_main():
                    tracker.log({f"{self.name}/{k}": v for k, v in record.items() if k != "step"}, step=done)
                log.info("step %d: %s", done, ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "step"))
            if self.checkpoint_every and done % self.checkpoint_every == 0 and done < self.steps:
                ckpt.save({"step": done, "model": model.state_dict(), "optimizer": opt.state_dict(),
                           "scheduler": sched.state_dict(), "lambda": lam.state_dict(), "admm": admm.state_dict(),
                           "rng": rng_state(), "stats": stats, "lam_prev": lam_prev})
        bar.close()

        admm.final_projection(target, second_moment)
        if self.gradient_checkpointing:
            model.gradient_checkpointing_disable()
        model.requires_grad_(False).eval()
        n_c = sum(D.local(p).numel() for p in constrained.values())
        opt_bytes = sum(tensor_nbytes(D.local(v)) for p in constrained.values() for v in opt.state.get(p, {}).values()
                        if isinstance(v, torch.Tensor) and v.numel() > 1)
        stats.update(steps=self.steps, train_time_s=time.perf_counter() - t0,
                     tokens_seen=self.steps * self.grad_accum * self.batch_size * ctx.seqlen,
                     state_bytes_per_param={"optimizer": opt_bytes / n_c, "admm": admm.nbytes() / n_c,
                                            "total": (opt_bytes + admm.nbytes()) / n_c})
        if not self.keep_checkpoint:
            ckpt.remove()
        return stats


class ElsaL(Elsa):
    """ELSA-L: z in FP8 e4m3 (per-tensor scale), u in BF16, 8-bit AdamW (torchao); fp32 arithmetic."""

    name = "elsa_l"

    def __init__(self, optimizer: str = "adamw8bit", z_dtype: str = "fp8", u_dtype: str = "bf16", **kwargs):
        super().__init__(optimizer=optimizer, z_dtype=z_dtype, u_dtype=u_dtype, **kwargs)
