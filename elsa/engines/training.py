"""The training engine of the global methods (ELSA, ELSA-L, AST): everything that is not the method.

:class:`TrainSettings` holds and validates the keys every training method shares (steps, batch, optimiser,
checkpoints...). :class:`TrainEngine` runs one training: the data windows, the optimizer and LR schedule, the
dense teacher and the distillation loss, gradient accumulation, the NaN stop, gradient clipping, the progress
bar, periodic records (tracker + log), held-out evaluation, the atomic checkpoint with resume (refused under a
different configuration), the FSDP2 wrapper and the state-bytes accounting. It knows no concrete method: it
calls the hooks of a :class:`elsa.methods.training_method.TrainingMethod`, in this order::

    state = setup(run)              the method's state for this run (fresh or resumed), kept as run.state
    start(run)                      fresh runs only: initial projection / masks; may add to run.stats
    load_method_state(run, saved)   resumed runs only, instead of start
    per step:  (forward + extra_loss(run, step) / backward over the micro-batches, NaN stop, grad clip)
        before_optimizer(run, step) -> postfix dict      gradient edits
        (optimizer step, LR step)
        after_optimizer(run, step)                       weight edits
        periodic(run, done) -> record dict or None       every `interval` steps, method-defined
        (held-out eval through evaluate_sparse, record to tracker/log, checkpoint with method_state)
    finish(run)                     final projection
    teardown(run)                   undo what setup installed (always, even on errors)
    method_nbytes(run) -> (label, bytes)   method state for state_bytes_per_param
"""
from __future__ import annotations

import copy
import logging
import math
import statistics
import time
from dataclasses import dataclass, fields
from typing import Annotated, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from elsa.eval import compute
from elsa.engines import distributed as D
from elsa.engines import precision
from elsa.engines.checkpoint import Checkpointer, rng_state, set_rng_state
from elsa.data.corpora import TrainWindows, eval_windows, token_stream
from elsa.errors import ElsaError
from elsa.eval.perplexity import perplexity
from elsa.engines.losses import kl_loss, kl_loss_chunked, lm_loss, lm_loss_chunked
from elsa.methods.base import PruneContext
from elsa.methods.registry import Choice, Flag, Number, Numbers, check_fields
from elsa.model.structure import decoder_blocks, prunable_weights

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "adamw8bit")
WHOLE, WHOLE_OR_ZERO = Number(gt=0, whole=True), Number(ge=0, whole=True)


def tensor_nbytes(t) -> int:
    """Bytes held by a tensor, looking inside tensor subclasses (8-bit optimiser states)."""
    if hasattr(t, "state") and hasattr(t, "codes"):     # elsa.engines.optim8bit.Quantized: codes and scales
        return sum(tensor_nbytes(v) for v in t.state().values())
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor and not isinstance(t, nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_nbytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def tokens_per_step(s, world: int, seqlen: int) -> int:
    """Tokens one optimizer step reads: the global batch (batch_size x ranks) x grad_accum x seqlen."""
    return s.batch_size * s.grad_accum * world * seqlen


def make_teacher(model, kept=None, shard: bool = False, bf16: bool = False, share_frozen: bool = False) -> nn.Module:
    """The frozen dense model a distilling loss reads (elsa.engines.losses.LossTerms.needs_teacher), made here only:
    ``kept`` (the dense model the pipeline copied before a start stage pruned ``model``) or a copy of ``model`` as
    it is now; sharded like the student under FSDP2; its Linear weights cast to bf16 once when the student trains
    under bf16 autocast (the values autocast would cast to). ``share_frozen`` (hardware.low_memory): the copy
    shares the student's frozen weights outside the pruned matrices (embeddings, head, norms and routers when
    they do not train: the same values for the whole run) instead of copying them."""
    memo = {}
    if share_frozen and kept is None and not shard:
        pruned = {id(w.param) for w in prunable_weights(model).values()}
        memo = {id(p): p for p in model.parameters() if not p.requires_grad and id(p) not in pruned}
    teacher = kept if kept is not None else copy.deepcopy(model, memo)
    if shard:
        D.shard(teacher, decoder_blocks(teacher))
    teacher.eval().requires_grad_(False)
    if bf16:
        precision.bf16_linear_weights(teacher)
    return teacher


@dataclass
class TrainSettings:
    """The keys every training method shares (defaults: ELSA's paper recipe), validated on construction."""

    steps: Annotated[int, WHOLE] = 4096
    # a training budget in tokens: sets steps = tokens / (batch x accum x ranks x seqlen)
    tokens: Annotated[Any, Number(gt=0, also=(None,))] = None
    batch_size: Annotated[int, WHOLE] = 2
    grad_accum: Annotated[int, WHOLE] = 4
    lr: Annotated[float, Number(gt=0)] = 2e-4
    warmup_steps: Annotated[int, WHOLE_OR_ZERO] = 0
    lr_final_ratio: Annotated[float, Number(ge=0)] = 0.0
    betas: Annotated[Any, Numbers(2, Number(ge=0, lt=1), "two numbers in [0, 1)")] = (0.9, 0.95)
    weight_decay: Annotated[float, Number(ge=0)] = 0.0
    grad_clip: Annotated[float, Number(ge=0)] = 1.0
    temperature: Annotated[float, Number(gt=0)] = 1.0
    # auto: where this device runs bf16 matmuls faster (elsa.engines.precision)
    autocast_bf16: Annotated[Any, precision.AUTOCAST] = "auto"
    gradient_checkpointing: Annotated[bool, Flag()] = False
    train_dense_params: Annotated[bool, Flag()] = True
    eval_every: Annotated[int, WHOLE_OR_ZERO] = 0
    eval_tokens: Annotated[int, WHOLE] = 16384
    eval_split: Annotated[str, Choice(("validation", "test"), "validation (held-out) or test (the run's evaluation "
                                      "split, so the history is on the table's protocol)")] = "validation"
    eval_initial: Annotated[bool, Flag()] = True
    checkpoint_every: Annotated[int, WHOLE_OR_ZERO] = 0
    resume: Annotated[bool, Flag()] = True
    keep_checkpoint: Annotated[bool, Flag()] = False
    optimizer: Annotated[str, Choice(OPTIMIZERS, " or ".join(OPTIMIZERS))] = "adamw"

    def __post_init__(self):
        check_fields(self)     # the annotations: types, bounds, choices (elsa.methods.registry)
        self.steps, self.batch_size, self.grad_accum = int(self.steps), int(self.batch_size), int(self.grad_accum)
        if self.tokens is not None:
            self.tokens = int(self.tokens)   # 2e6 from the command line is a float
        self.lr, self.lr_final_ratio = float(self.lr), float(self.lr_final_ratio)
        self.warmup_steps, self.eval_every = int(self.warmup_steps), int(self.eval_every)
        self.betas = tuple(float(b) for b in self.betas)
        self.weight_decay, self.grad_clip = float(self.weight_decay), float(self.grad_clip)
        self.checkpoint_every = int(self.checkpoint_every)

    @classmethod
    def defaults(cls) -> dict:
        return {f.name: f.default for f in fields(cls)}


class TrainRun:
    """What one training run holds: the engine's objects, and the method's own state in ``state`` (what its
    ``setup`` hook returned); nothing else is added to it."""

    def __init__(self, model, ctx: PruneContext, settings: TrainSettings, constrained: dict, trainable: list,
                 teacher, opt, sched, data, heldout):
        self.model, self.ctx, self.device = model, ctx, torch.device(ctx.device)
        self.plan = ctx.plan.on(model)       # the plan over the model trained (a sharded copy with FSDP)
        self.settings = settings
        self.constrained, self.trainable, self.teacher = constrained, trainable, teacher
        self.opt, self.sched, self.data, self.heldout = opt, sched, data, heldout
        self.world, self.rank = D.world_size(), D.rank()
        self.stats: dict = {"history": []}
        self.loss = float("nan")
        self.t0 = time.perf_counter()
        self.state: Any = None
        self.step_times: list[float] = []    # wall time of each step this process ran (held-out evals excluded)

    def micro_batch(self, step: int, micro: int) -> torch.Tensor:
        """This rank's rows of micro-batch ``micro`` of ``step`` (one global batch of batch_size x world)."""
        s = self.settings
        ids = self.data.batch(step * s.grad_accum + micro)[self.rank * s.batch_size:(self.rank + 1) * s.batch_size]
        return ids.to(self.device)


class TrainEngine:
    """Train the whole model on the next-token / distillation loss while ``method``'s hooks keep the prunable
    weights on their way to the sparsity target (see the module docstring)."""

    def __init__(self, method):
        self.method, self.s = method, method.train
        self.autocast = bool(self.s.autocast_bf16 is True)   # resolved per run in train()
        self.optimizer_impl = None

    def make_optimizer(self, params, device_type: str = "cpu", low_memory: bool = False):
        """``low_memory`` (hardware.low_memory): the fp32 AdamW steps one tensor at a time (foreach=False: no
        temporaries the size of every trainable weight; the same update)."""
        s = self.s
        groups = [{"params": params}]
        if s.optimizer == "adamw8bit" and device_type == "cpu" and D.world_size() == 1:
            # torchao's state format stepped by one C pass per block (elsa.engines.optim8bit): torchao's own step runs
            # as dozens of eager ops on a CPU
            from elsa.engines.optim8bit import AdamW8bitCPU

            opt = AdamW8bitCPU(groups, lr=s.lr, betas=s.betas, weight_decay=s.weight_decay)
            self.optimizer_impl = "elsa.engines.optim8bit.AdamW8bitCPU" + (" (torch path: " + opt.kernel_missing + ")"
                                                                  if opt.lib is None else " (C kernel)")
            return opt
        if s.optimizer == "adamw8bit":
            self.optimizer_impl = "torchao.optim.AdamW8bit"
            try:
                from torchao.optim import AdamW8bit
            except ImportError as exc:  # pragma: no cover - torchao is a dependency
                raise ElsaError("method.optimizer=adamw8bit needs torchao (pip install torchao)") from exc
            return AdamW8bit(groups, lr=s.lr, betas=s.betas, weight_decay=s.weight_decay)
        # the bf16 fast path also fuses AdamW's update into one kernel (equal up to float rounding); the fp32 path
        # keeps the foreach implementation, so autocast_bf16=false reproduces earlier runs bit for bit
        fast = {"fused": True} if self.autocast and D.world_size() == 1 else {"foreach": not low_memory}
        self.optimizer_impl = f"torch.optim.AdamW ({next(iter(fast)) if any(fast.values()) else 'per tensor'})"
        return torch.optim.AdamW(groups, lr=s.lr, betas=s.betas, weight_decay=s.weight_decay, **fast)

    def compute_loss(self, model, teacher, ids):
        terms = self.method.loss_terms
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = model(input_ids=ids, use_cache=False, output_hidden_states=terms.hidden)
            # the bf16 fast path computes the vocabulary-wide losses in token chunks (no fp32 copy of the logits
            # kept for the backward pass); equal to the plain ones up to float summation order
            ce, kl = (lm_loss_chunked, kl_loss_chunked) if self.autocast else (lm_loss, kl_loss)
            if not terms.needs_teacher:
                return ce(out.logits, ids)
            with torch.no_grad():
                t_out = teacher(input_ids=ids, use_cache=False, output_hidden_states=terms.hidden)
            return terms.combine(out, t_out, ids, ce, kl, self.s.temperature)

    def run(self, ctx: PruneContext, dense=None) -> dict:
        """Train ``ctx.model`` in place; ``dense`` is the teacher to keep (a start stage ran), else a frozen copy
        of the model is the teacher where the method distils."""
        self.method.extend(ctx.model, ctx)   # the method's own modules, before the optimizer and any sharding
        if not ctx.extras.get("fsdp"):
            return self.train(ctx.model, ctx, dense)
        # FSDP2: train a sharded copy, then bring the full weights back into the caller's model (rank 0)
        work = copy.deepcopy(ctx.model)
        D.shard(work, decoder_blocks(work))
        # a sharded module cannot be deep-copied: the teacher is its own sharded dense copy
        teacher = make_teacher(ctx.model, dense, shard=True) if self.method.distils else None
        stats = self.train(work, ctx, teacher)
        full = D.full_state_dict(work)
        if D.is_main():
            ctx.model.load_state_dict(full)
        ctx.model.requires_grad_(False).eval()
        return stats

    def train(self, model, ctx: PruneContext, teacher=None) -> dict:
        """Train ``model`` in place; ``teacher`` (distillation) defaults to a frozen copy of ``model``."""
        m, s = self.method, self.s
        self.apply_token_budget(ctx)
        constrained, trainable = self.select_trainable(model, ctx.plan)
        if s.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        signature = self.signature(ctx, trainable)
        ckpt = Checkpointer(ctx.output_dir, m.name, signature, model=model)
        # a resumed run keeps the precision it started with (auto can decide otherwise on another machine)
        recorded = ckpt.recorded("autocast_bf16") if s.resume else None
        self.autocast, autocast_record = precision.resolve(s.autocast_bf16, ctx.device, recorded)
        if m.distils:
            teacher = make_teacher(model, teacher, bf16=self.autocast and not ctx.extras.get("fsdp"),
                                   share_frozen=ctx.extras.get("low_memory", False))

        bos = ctx.tokenizer.bos_token_id
        world = D.world_size()
        data = TrainWindows(token_stream(ctx.tokenizer, ctx.dataset, "train"), ctx.seqlen, s.batch_size * world,
                            ctx.seed, bos)
        heldout = None
        if s.eval_every:
            heldout = eval_windows(token_stream(ctx.tokenizer, ctx.dataset, s.eval_split), ctx.seqlen, bos,
                                   s.eval_tokens)
        opt = self.make_optimizer(trainable, torch.device(ctx.device).type, ctx.extras.get("low_memory", False))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, m.lr_lambda())
        run = TrainRun(model, ctx, s, constrained, trainable, teacher, opt, sched, data, heldout)
        if self.autocast:
            autocast_record["fast_path"] = "token-chunked vocabulary losses, the teacher's Linear weights " \
                                           "stored in bf16 (and AdamW fused: optimizer_impl)"
        run.stats["autocast_bf16"] = autocast_record
        run.stats["optimizer_impl"] = self.optimizer_impl
        run.stats["trained_params"] = {"count": sum(D.local(p).numel() for p in trainable),
                                       "train_dense_params": s.train_dense_params,
                                       "teacher_shares_frozen": bool(m.distils and ctx.extras.get("low_memory"))}
        run.state = m.setup(run)
        if heldout is not None:
            run.stats["heldout"] = {"split": s.eval_split, "windows": heldout.shape[0], "tokens": heldout.numel()}

        ckpt.optimizer = opt
        start = self.resume_or_start(run, ckpt, sched)
        try:
            self.loop(run, start, ckpt)
            m.finish(run)
        finally:
            m.teardown(run)
        if s.gradient_checkpointing:
            model.gradient_checkpointing_disable()
        model.requires_grad_(False).eval()
        self.final_stats(run, opt)
        if not s.keep_checkpoint:
            ckpt.remove()
        return run.stats

    def apply_token_budget(self, ctx: PruneContext) -> None:
        """``method.tokens``: the budget in tokens fixes the steps for this run's global batch."""
        s = self.s
        if s.tokens is None:
            return
        per_step = tokens_per_step(s, D.world_size(), ctx.seqlen)
        s.steps = max(1, math.ceil(s.tokens / per_step))
        self.method.config["steps"] = s.steps
        log.info("method.tokens=%d: %d steps of %d tokens", s.tokens, s.steps, per_step)

    def select_trainable(self, model, plan) -> tuple[dict, list]:
        """The constrained (pruned) weights by name and every parameter that trains: the constrained ones when
        the method trains weights, the dense ones when ``train_dense_params`` (except routers and ignored /
        untargeted weights, which stay bit-identical), and a method's own modules (AST's SLoRB) always.
        ``plan``: the run's (elsa.sparsity.plan), of which ``model`` is the planned model or a copy (FSDP)."""
        s, m = self.s, self.method
        plan = plan.on(model)
        constrained = {n: w.param for n, w in plan.named_weights().items()}
        ids_c = {id(p) for p in constrained.values()}
        frozen = plan.kept_dense()
        own = {id(p) for mod in model.modules() if getattr(mod, "elsa_trains", False) for p in mod.parameters()}
        for p in model.parameters():
            p.requires_grad_((s.train_dense_params and id(p) not in frozen) or (id(p) in ids_c and m.trains_weights)
                             or id(p) in own)
        return constrained, [p for p in model.parameters() if p.requires_grad]

    def resume_or_start(self, run: TrainRun, ckpt: Checkpointer, sched) -> int:
        """The step to start from: a checkpoint's (its scheduler, method state, RNG and stats restored), or 0
        after the method's own start."""
        m = self.method
        state = ckpt.load() if self.s.resume else None
        if state is None:
            m.start(run)
            return 0
        sched.load_state_dict(state["scheduler"])
        m.load_method_state(run, state)
        set_rng_state(state["rng"])
        run.stats, start = state["stats"], state["step"]
        log.info("resumed %s from %s at step %d", m.name, ckpt.path, start)
        run.stats["resumed_from_step"] = start
        run.stats["wall_s_before_resume"] = run.stats.get("wall_s_at_checkpoint", 0.0)  # earlier sessions
        return start

    def final_stats(self, run: TrainRun, opt) -> None:
        """What the run cost: step time, tokens, compute, and the state bytes per constrained weight."""
        m, s, ctx, model, constrained = self.method, self.s, run.ctx, run.model, run.constrained
        n_c = sum(D.local(p).numel() for p in constrained.values())
        opt_bytes = sum(tensor_nbytes(D.local(v)) for p in constrained.values() for v in opt.state.get(p, {}).values()
                        if hasattr(v, "codes") or isinstance(v, torch.Tensor) and v.numel() > 1)
        label, m_bytes = m.method_nbytes(run)
        if len(run.step_times) > 1:   # the first step allocates the optimizer state
            run.stats["step_time_s"] = statistics.median(run.step_times[1:])
        tokens = s.steps * tokens_per_step(s, run.world, ctx.seqlen)
        heldout_tokens = (s.steps // s.eval_every) * run.heldout.numel() if run.heldout is not None else 0
        run.stats["compute"] = compute.training(compute.matmul_params(model), tokens, m.distils, heldout_tokens,
                                                run.stats.get("wall_s_before_resume", 0.0) +
                                                time.perf_counter() - run.t0)
        run.stats.update(steps=s.steps, train_time_s=time.perf_counter() - run.t0,
                         tokens_seen=tokens,
                         state_bytes_per_param={"optimizer": opt_bytes / n_c, label: m_bytes / n_c,
                                                "total": (opt_bytes + m_bytes) / n_c})

    def signature(self, ctx, trainable) -> dict:
        """What a checkpoint must have been written with to be resumed by this run."""
        sig = {"method": self.method.config, "target": str(ctx.target), "seed": ctx.seed, "seqlen": ctx.seqlen,
               "dataset": getattr(ctx.dataset, "name", None), "params": sum(p.numel() for p in trainable)}
        ratios = ctx.plan.allocated_ratios()
        if ratios is not None:              # a resumed run must have the same per-matrix ratios
            import hashlib
            sig["allocation"] = hashlib.sha1(repr(sorted(ratios.items())).encode()).hexdigest()
        return sig

    def loop(self, run: TrainRun, start: int, ckpt: Checkpointer) -> None:
        m, s = self.method, self.s
        model, opt, sched, tracker = run.model, run.opt, run.sched, run.ctx.tracker
        run.t0 = time.perf_counter()
        model.train()
        bar = tqdm(range(start, s.steps), desc=m.name, unit="step", initial=start, total=s.steps,
                   disable=not D.is_main())
        for step in bar:
            t_step = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for micro in range(s.grad_accum):
                loss = self.compute_loss(model, run.teacher, run.micro_batch(step, micro))
                extra = m.extra_loss(run, step)      # a method's own terms (regularisers of its forward)
                loss = (loss if extra is None else loss + extra) / s.grad_accum
                loss.backward()
                total += float(loss.detach())
            if run.world > 1:  # the logged loss is the global batch's
                t = torch.tensor([total], dtype=torch.float64)
                torch.distributed.all_reduce(t)
                total = float(t) / run.world
            if not math.isfinite(total):
                where = f"; the last good checkpoint is {ckpt.path}" if ckpt.path and ckpt.path.exists() else ""
                raise ElsaError(f"method={m.name}: the loss is {total} at step {step}{where}; {m.nan_hint}")
            run.loss = total
            if s.grad_clip:
                torch.nn.utils.clip_grad_norm_(run.trainable, s.grad_clip)
            postfix = m.before_optimizer(run, step)
            opt.step()
            sched.step()
            m.after_optimizer(run, step)
            bar.set_postfix(loss=f"{total:.3f}", **postfix)

            done = step + 1
            record = m.periodic(run, done)
            run.step_times.append(time.perf_counter() - t_step)   # the step and the method's periodic update
            if s.eval_every and run.heldout is not None and done % s.eval_every == 0:
                record = record or {"step": done, "loss": total}
                record["heldout_ppl"] = m.evaluate_sparse(
                    run, lambda mod: perplexity(mod, run.heldout, batch_size=4, device=run.device, desc="held-out ppl"))
            if record:
                record.setdefault("tokens", done * tokens_per_step(s, run.world, run.ctx.seqlen))
                run.stats["history"].append(record)
                if tracker is not None and D.is_main():
                    tracker.log({f"{m.name}/{k}": v for k, v in record.items() if k != "step"}, step=done)
                log.info("step %d: %s", done, ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "step"))
            if s.checkpoint_every and done % s.checkpoint_every == 0 and done < s.steps:
                run.stats["wall_s_at_checkpoint"] = run.stats.get("wall_s_before_resume", 0.0) + \
                    time.perf_counter() - run.t0
                ckpt.save({"step": done, "scheduler": sched.state_dict(), **m.method_state(run), "rng": rng_state(),
                           "stats": run.stats})
        bar.close()
