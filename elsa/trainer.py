"""The training loop the global methods share (ELSA, ELSA-L, AST).

:class:`SparseTrainer` owns everything that is not the method: validation of the shared keys, the optimizer and
LR schedule, the data windows, the dense teacher and the distillation loss, gradient accumulation, the NaN stop,
gradient clipping, the progress bar, periodic records (tracker + log), held-out evaluation, the atomic
checkpoint with resume (refused under a different configuration), the FSDP2 wrapper and the state-bytes
accounting. A method fills in a few hooks, called in this order::

    setup(run)                      method state, once per run (fresh or resumed)
    start(run)                      fresh runs only: initial projection / masks; may add to run.stats
    load_method_state(run, state)   resumed runs only, instead of start
    per step:  (forward/backward over the micro-batches, NaN stop, grad clip)
        before_optimizer(run, step) -> postfix dict      gradient edits
        (optimizer step, LR step)
        after_optimizer(run, step)                       weight edits
        periodic(run, done) -> record dict or None       every `interval` steps, method-defined
        (held-out eval through evaluate_sparse, record to tracker/log, checkpoint with method_state)
    finish(run)                     final projection
    method_nbytes(run) -> (label, bytes)   method state for state_bytes_per_param
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
from elsa.data import eval_windows, token_stream
from elsa.errors import ElsaError, config_error, positive
from elsa.evaluation import perplexity
from elsa.methods.base import PruneContext, Pruner
from elsa.models import decoder_blocks, prunable_linears
from elsa.training import Checkpointer, TrainWindows, kl_loss, linear_schedule, lm_loss, rng_state, set_rng_state

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "adamw8bit")


def tensor_nbytes(t) -> int:
    """Bytes held by a tensor, looking inside tensor subclasses (8-bit optimiser states)."""
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor and not isinstance(t, nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_nbytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


class TrainRun:
    """What one training run holds; hooks read it and may hang their own state on it."""

    def __init__(self, model, ctx: PruneContext, constrained: dict, trainable: list, teacher, opt, sched, data,
                 heldout):
        self.model, self.ctx, self.target, self.device = model, ctx, ctx.target, torch.device(ctx.device)
        self.constrained, self.trainable, self.teacher = constrained, trainable, teacher
        self.opt, self.sched, self.data, self.heldout = opt, sched, data, heldout
        self.world, self.rank = D.world_size(), D.rank()
        self.stats: dict = {"history": []}
        self.loss = float("nan")


class SparseTrainer(Pruner):
    """Train the whole model on the next-token / distillation loss while a method keeps the prunable weights
    on their way to the sparsity target (see the module docstring for the hooks)."""

    name = "trainer"
    supports_fsdp = True
    takes_start = True    # trains from whatever the model holds: the dense weights or a start stage's solution
    has_budget = True
    nan_hint = "lower method.lr"

    def __init__(self, steps: int = 4096, batch_size: int = 2, grad_accum: int = 4, lr: float = 2e-4,
                 warmup_steps: int = 0, lr_final_ratio: float = 0.0, betas=(0.9, 0.95), weight_decay: float = 0.0,
                 grad_clip: float = 1.0, temperature: float = 1.0, autocast_bf16: bool = False,
                 gradient_checkpointing: bool = False, train_dense_params: bool = True, eval_every: int = 0,
                 eval_tokens: int = 16384, eval_initial: bool = True, checkpoint_every: int = 0, resume: bool = True,
                 keep_checkpoint: bool = False, optimizer: str = "adamw"):
        """The keys every training method shares (defaults: ELSA's paper recipe); a method passes its own
        defaults for them and adds its keys to ``self.config`` (the checkpoint signature)."""
        self.config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.steps = positive("method.steps", steps, whole=True)
        self.batch_size = positive("method.batch_size", batch_size, whole=True)
        self.grad_accum = positive("method.grad_accum", grad_accum, whole=True)
        self.lr = positive("method.lr", lr)
        self.warmup_steps = positive("method.warmup_steps", warmup_steps, whole=True, zero_ok=True)
        self.lr_final_ratio = positive("method.lr_final_ratio", lr_final_ratio, zero_ok=True)
        self.betas = tuple(float(b) for b in betas)
        self.weight_decay = positive("method.weight_decay", weight_decay, zero_ok=True)
        self.grad_clip = positive("method.grad_clip", grad_clip, zero_ok=True)
        if optimizer not in OPTIMIZERS:
            raise config_error("method.optimizer", optimizer, " or ".join(OPTIMIZERS))
        self.temperature = temperature
        self.autocast_bf16, self.gradient_checkpointing = autocast_bf16, gradient_checkpointing
        self.train_dense_params = train_dense_params
        self.eval_every = positive("method.eval_every", eval_every, whole=True, zero_ok=True)
        self.eval_tokens, self.eval_initial = eval_tokens, eval_initial
        self.checkpoint_every = positive("method.checkpoint_every", checkpoint_every, whole=True, zero_ok=True)
        self.resume, self.keep_checkpoint = resume, keep_checkpoint
        self.optimizer_name = optimizer
        # loss = task_weight * next-token + kl_weight * KL(teacher || student); a teacher exists iff kl_weight
        self.task_weight, self.kl_weight = 1.0, 0.0

    # -- hooks: a method overrides these -------------------------------------------------------------
    def setup(self, run: TrainRun) -> None:
        """Build the method's state for this run (before a checkpoint is loaded)."""

    def start(self, run: TrainRun) -> None:
        """A fresh run: initial masks / projections; may add entries to ``run.stats``."""

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

    def method_nbytes(self, run: TrainRun) -> tuple[str, int]:
        """(label, bytes) of the method's own state, for ``state_bytes_per_param``."""
        return "method", 0

    # -- shared pieces -------------------------------------------------------------------------------
    def lr_lambda(self):
        """The LR multiplier per step (LambdaLR)."""
        return linear_schedule(self.warmup_steps, self.steps, self.lr_final_ratio)

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

    def compute_loss(self, model, teacher, ids):
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=self.autocast_bf16):
            logits = model(input_ids=ids, use_cache=False).logits
            if not self.kl_weight:
                return lm_loss(logits, ids)
            with torch.no_grad():
                t_logits = teacher(input_ids=ids, use_cache=False).logits
            kl = kl_loss(logits, t_logits, self.temperature)
            if not self.task_weight:
                return kl
            return self.task_weight * lm_loss(logits, ids) + self.kl_weight * kl

    def micro_batch(self, run: TrainRun, step: int, micro: int) -> torch.Tensor:
        """This rank's rows of micro-batch ``micro`` of ``step`` (one global batch of batch_size x world)."""
        ids = run.data.batch(step * self.grad_accum + micro)[run.rank * self.batch_size:
                                                             (run.rank + 1) * self.batch_size]
        return ids.to(run.device)

    @property
    def distils(self) -> bool:
        """The loss reads a teacher: after a start stage the pipeline keeps the dense model for it."""
        return bool(self.kl_weight)

    # -- the loop ------------------------------------------------------------------------------------
    def prune(self, ctx: PruneContext) -> dict:
        """Train from ``ctx.model`` as it is (dense, or a start stage's solution; the teacher is ``ctx.teacher``
        when the pipeline kept the dense model, else a frozen copy of the model)."""
        return self.train_from(ctx, ctx.teacher)

    def train_from(self, ctx: PruneContext, dense=None) -> dict:
        if not ctx.extras.get("fsdp"):
            return self.train(ctx.model, ctx, dense)
        # FSDP2: train a sharded copy, then bring the full weights back into the caller's model (rank 0)
        work = copy.deepcopy(ctx.model)
        D.shard(work, decoder_blocks(work))
        teacher = None
        if self.kl_weight:  # a sharded module cannot be deep-copied: the teacher is its own sharded dense copy
            teacher = dense if dense is not None else copy.deepcopy(ctx.model)
            D.shard(teacher, decoder_blocks(teacher))
        stats = self.train(work, ctx, teacher)
        full = D.full_state_dict(work)
        if D.is_main():
            ctx.model.load_state_dict(full)
        ctx.model.requires_grad_(False).eval()
        return stats

    def train(self, model, ctx: PruneContext, teacher=None) -> dict:
        """Train ``model`` in place; ``teacher`` (distillation) defaults to a frozen copy of ``model``."""
        constrained = {n: lin.weight for n, lin in prunable_linears(model).items()}
        ids_c = {id(p) for p in constrained.values()}
        for p in model.parameters():
            p.requires_grad_(self.train_dense_params or id(p) in ids_c)
        trainable = [p for p in model.parameters() if p.requires_grad]
        if self.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if self.kl_weight:
            teacher = (teacher if teacher is not None else copy.deepcopy(model)).eval().requires_grad_(False)

        bos = ctx.tokenizer.bos_token_id
        world = D.world_size()
        data = TrainWindows(token_stream(ctx.tokenizer, ctx.dataset, "train"), ctx.seqlen, self.batch_size * world,
                            ctx.seed, bos)
        heldout = None
        if self.eval_every:
            heldout = eval_windows(token_stream(ctx.tokenizer, ctx.dataset, "validation"), ctx.seqlen, bos,
                                   self.eval_tokens)
        opt = self.make_optimizer(trainable)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_lambda())
        run = TrainRun(model, ctx, constrained, trainable, teacher, opt, sched, data, heldout)
        self.setup(run)

        signature = {"method": self.config, "target": str(ctx.target), "seed": ctx.seed, "seqlen": ctx.seqlen,
                     "dataset": getattr(ctx.dataset, "name", None), "params": sum(p.numel() for p in trainable)}
        ckpt = Checkpointer(ctx.output_dir, self.name, signature, model=model, optimizer=opt)
        state = ckpt.load() if self.resume else None
        if state is not None:
            sched.load_state_dict(state["scheduler"])
            self.load_method_state(run, state)
            set_rng_state(state["rng"])
            run.stats, start = state["stats"], state["step"]
            log.info("resumed %s from %s at step %d", self.name, ckpt.path, start)
            run.stats["resumed_from_step"] = start
        else:
            start = 0
            self.start(run)
        try:
            self.loop(run, start, ckpt)
            self.finish(run)
        finally:
            self.teardown(run)
        if self.gradient_checkpointing:
            model.gradient_checkpointing_disable()
        model.requires_grad_(False).eval()
        n_c = sum(D.local(p).numel() for p in constrained.values())
        opt_bytes = sum(tensor_nbytes(D.local(v)) for p in constrained.values() for v in opt.state.get(p, {}).values()
                        if isinstance(v, torch.Tensor) and v.numel() > 1)
        label, m_bytes = self.method_nbytes(run)
        run.stats.update(steps=self.steps, train_time_s=time.perf_counter() - run.t0,
                         tokens_seen=self.steps * self.grad_accum * self.batch_size * ctx.seqlen,
                         state_bytes_per_param={"optimizer": opt_bytes / n_c, label: m_bytes / n_c,
                                                "total": (opt_bytes + m_bytes) / n_c})
        if not self.keep_checkpoint:
            ckpt.remove()
        return run.stats

    def teardown(self, run: TrainRun) -> None:
        """Undo what :meth:`setup` installed on the model (hooks, patched forwards); runs even on errors."""

    def loop(self, run: TrainRun, start: int, ckpt: Checkpointer) -> None:
        model, opt, sched, tracker = run.model, run.opt, run.sched, run.ctx.tracker
        run.t0 = time.perf_counter()
        model.train()
        bar = tqdm(range(start, self.steps), desc=self.name, unit="step", initial=start, total=self.steps,
                   disable=not D.is_main())
        for step in bar:
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for micro in range(self.grad_accum):
                loss = self.compute_loss(model, run.teacher, self.micro_batch(run, step, micro)) / self.grad_accum
                loss.backward()
                total += float(loss.detach())
            if run.world > 1:  # the logged loss is the global batch's
                t = torch.tensor([total], dtype=torch.float64)
                torch.distributed.all_reduce(t)
                total = float(t) / run.world
            if not math.isfinite(total):
                where = f"; the last good checkpoint is {ckpt.path}" if ckpt.path and ckpt.path.exists() else ""
                raise ElsaError(f"method={self.name}: the loss is {total} at step {step}{where}; {self.nan_hint}")
            run.loss = total
            if self.grad_clip:
                torch.nn.utils.clip_grad_norm_(run.trainable, self.grad_clip)
            postfix = self.before_optimizer(run, step)
            opt.step()
            sched.step()
            self.after_optimizer(run, step)
            bar.set_postfix(loss=f"{total:.3f}", **postfix)

            done = step + 1
            record = self.periodic(run, done)
            if self.eval_every and run.heldout is not None and done % self.eval_every == 0:
                record = record or {"step": done, "loss": total}
                record["heldout_ppl"] = self.evaluate_sparse(
                    run, lambda m: perplexity(m, run.heldout, batch_size=4, device=run.device, desc="held-out ppl"))
            if record:
                run.stats["history"].append(record)
                if tracker is not None and D.is_main():
                    tracker.log({f"{self.name}/{k}": v for k, v in record.items() if k != "step"}, step=done)
                log.info("step %d: %s", done, ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "step"))
            if self.checkpoint_every and done % self.checkpoint_every == 0 and done < self.steps:
                ckpt.save({"step": done, "scheduler": sched.state_dict(), **self.method_state(run), "rng": rng_state(),
                           "stats": run.stats})
        bar.close()
