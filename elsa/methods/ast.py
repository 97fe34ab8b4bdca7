"""AST, the Adaptive Sparse Trainer (Huang et al., AAAI 2025): sparse retraining of the whole model.

Every prunable Linear computes with w * m, where m is a keep-mask of the sparsity target (N:M, the paper's
case, or a ratio); the gradient passes straight through the mask to the dense w, so pruned weights keep
learning and can come back. Annealed SR-STE adds lam_W(t) (1 - m) * w to the gradient, lam_W growing linearly
from 0 to ``srste_decay`` over ``increase_step`` steps, which slowly pulls the pruned weights to zero and makes
the mask settle. Every ``mask_interval`` steps m is recomputed from the current dense weights (``magnitude``:
|w|; ``wanda``: |w| * ||x_j||, with the input norms gathered by the forward passes since the last update).
The loss mixes next-token prediction and KL distillation from the dense model (1/3 : 2/3 in the paper). At
the end the weights are w * m, exactly on the target.

AST-Boosted (``method=ast_boosted``, or ``method.slorb=true``): every pruned Linear / Conv1D also gets SLoRB, the
semi-structured low-rank bypass (elsa/methods/slorb.py): a dense branch ``S (P x)`` over groups of ``slorb_k`` inputs,
S initialised from the weights the first mask removes (``slorb_init``), P the group-sum matrix, trainable with
``trainable_projection``; trained with the model, counted in results.json (``params.dense_by_kind.slorb``),
saved with it and reloaded by ``elsa.methods.slorb.from_pretrained``. The loss may add SquareHead
(``squarehead_weight``: every block's output against the dense teacher's, elsa.engines.losses.squarehead_loss); the
paper's GPT-2 command sets it to 0.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from elsa.engines import distributed as D
from elsa.errors import ElsaError, config_error
from elsa.engines.losses import LossTerms
from elsa.methods.base import GROUP, Annotated, Choice, Flag, Number
from elsa.methods.registry import own_arguments
from elsa.methods.training_method import TrainingMethod
from elsa.sparsity.plan import mask_of
from elsa.engines.schedules import cosine_schedule, linear_schedule
from elsa.methods.slorb import INITS

log = logging.getLogger(__name__)

METRICS = ("magnitude", "wanda")


class _MaskedWeight(torch.autograd.Function):
    """w * m forward; the gradient reaches w unmasked (straight-through)."""

    @staticmethod
    def forward(ctx, weight, mask):
        return weight * mask

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def annealed_decay(step: int, decay: float, increase_step: int) -> float:
    """SR-STE strength at ``step``: a linear ramp from 0 to ``decay`` over ``increase_step`` steps, then flat."""
    if increase_step <= 0 or step >= increase_step:
        return decay
    return decay * step / increase_step


def swap_hooks(module: nn.Module, attr: str, masked) -> list:
    """Hooks that, for each forward of ``module``, put ``masked(p)`` in place of its parameter ``attr`` (a fused
    expert tensor has no Linear forward to replace) and put the parameter back after the forward; ``masked``
    returning None leaves the parameter in place. Returns the two hook handles."""
    held: dict[str, nn.Parameter] = {}        # the dense parameter while the masked tensor stands in for it

    def pre(mod, _args):
        tensor = masked(mod._parameters[attr])
        if tensor is not None:
            held["p"] = mod._parameters.pop(attr)
            mod.__dict__[attr] = tensor

    def post(mod, _args, _out):
        p = held.pop("p", None)
        if p is not None:
            del mod.__dict__[attr]
            mod._parameters[attr] = p
    return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


class SparseMasks:
    """The keep-masks of the prunable Linears, the masked forward they run, and the mask statistics.

    Masks are full-layer tensors (the forward sees full weights, also under FSDP2, where a Linear's weight is
    unsharded during its forward); weight and gradient edits use this rank's rows of them.
    """

    def __init__(self, weights: dict, target, metric: str, group: str):
        """``weights``: {name: :class:`elsa.model.structure.Weight`}: Linear and Conv1D modules (their forward is replaced
        by a masked one) and fused expert tensors (masked for the duration of their module's forward);
        ``target``: the plan (elsa.sparsity.plan) whose full names they are, or one Sparsity for plain matrices."""
        self.weights, self.target, self.metric, self.group = weights, target, metric, group
        self.linears = {n: w.module for n, w in weights.items() if w.experts is None}
        self._hooks: list = []
        self.params = {n: w.param for n, w in weights.items()}
        self.keep: dict[str, torch.Tensor] = {}      # current masks (full layer)
        self.initial: dict[str, torch.Tensor] = {}   # the first masks, for the flip metrics
        self.act_sq: dict[str, torch.Tensor] = {}    # sum over tokens of x_j^2 since the last update (wanda)
        self.tokens = 0.0
        self.collect = metric == "wanda"
        self._local: dict[str, torch.Tensor] = {}
        self._dense: dict[str, torch.Tensor] = {}
        self._patched = False

    # -- the masked forward --------------------------------------------------------------------------
    def install(self) -> None:
        for name, lin in self.linears.items():
            lin.forward = self._forward_fn(name, lin)
        for name, w in self.weights.items():
            if w.experts is not None:
                self._hooks += swap_hooks(w.module, w.attr, self._masked_tensor(name))
        self._patched = True

    def remove(self) -> None:
        if self._patched:
            for lin in self.linears.values():
                del lin.forward
            for handle in self._hooks:
                handle.remove()
            self._hooks = []
            self._patched = False

    def _masked_tensor(self, name: str):
        """A fused expert tensor's masked stand-in for its module's forward (straight-through gradient to the
        dense parameter; :func:`swap_hooks`); none before the first mask."""
        def masked(p):
            return None if self.keep.get(name) is None else _MaskedWeight.apply(p, self._as(name, p))
        return masked

    def _forward_fn(self, name: str, lin):
        transposed = self.weights[name].transposed

        def forward(x):
            if self.collect:
                self._observe(name, x)
            mask = self.keep.get(name)
            weight = lin.weight if mask is None else _MaskedWeight.apply(lin.weight, self._as(name, lin.weight))
            if transposed:                                   # Conv1D: x @ w + b with w stored [in, out]
                weight = weight.t()
            return F.linear(x, weight, lin.bias)
        return forward

    def _as(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The mask in the weight's dtype and device, cached until the next update."""
        m = self._dense.get(name)
        if m is None or m.dtype != weight.dtype or m.device != weight.device:
            self._dense[name] = m = self.keep[name].to(weight.device, weight.dtype)
        return m

    @torch.no_grad()
    def _observe(self, name: str, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).double()
        acc = self.act_sq.get(name)
        sq = flat.square().sum(0)
        self.act_sq[name] = sq if acc is None else acc + sq
        if name == next(iter(self.linears)):
            self.tokens += flat.shape[0]

    # -- masks ---------------------------------------------------------------------------------------
    def scores(self, name: str, input_norms: dict | None) -> torch.Tensor:
        p = self.params[name]
        w = D.gather(p, D.local(p).detach().float())
        if self.metric == "wanda":
            norms = input_norms[name].to(w.device, torch.float32)
            return w.abs() * (norms[:, None] if self.weights[name].transposed else norms[None, :])
        return w.abs()

    def _input_norms(self) -> dict | None:
        """||x_j|| per input (root-mean-square over the tokens seen since the last update, all ranks)."""
        if self.metric != "wanda":
            return None
        if not self.act_sq:
            raise RuntimeError("mask_metric=wanda: no activations were observed before a mask update")
        names = list(self.linears)
        flat = torch.cat([self.act_sq[n] for n in names] + [torch.tensor([self.tokens], dtype=torch.float64)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flat)
        total, out, i = max(float(flat[-1]), 1.0), {}, 0
        for n in names:
            k = self.act_sq[n].numel()
            out[n] = (flat[i:i + k] / total).sqrt()
            i += k
        self.act_sq, self.tokens = {}, 0.0
        return out

    @torch.no_grad()
    def update(self) -> dict:
        """Recompute every mask from the current dense weights; the fractions of mask entries that flipped
        against the previous and the initial masks (global over the pruned layers)."""
        norms = self._input_norms()
        flips_prev = flips_init = inter = union = numel = 0.0
        for name in self.weights:
            mask = mask_of(self.target, name, self.scores(name, norms), self.group, self.weights[name].transposed)
            prev, first = self.keep.get(name), self.initial.get(name)
            if first is None:
                self.initial[name] = first = mask
            if prev is not None:
                flips_prev += float((mask ^ prev).sum())
            flips_init += float((mask ^ first).sum())
            inter += float((mask & first).sum())
            union += float((mask | first).sum())
            numel += mask.numel()
            self.keep[name] = mask
        self._local, self._dense = {}, {}
        return {"mask_flips_prev": flips_prev / numel, "mask_flips_init": flips_init / numel,
                "mask_iou_init": inter / max(union, 1.0)}

    def local(self, name: str) -> torch.Tensor:
        """This rank's rows of a mask (the layout of the local weight shard)."""
        if name not in self._local:
            self._local[name] = D.scatter(self.params[name], self.keep[name])
        return self._local[name]

    @torch.no_grad()
    def decay_gradients(self, lam: float) -> None:
        """SR-STE: grad += lam (1 - m) * w on every prunable weight."""
        for name, p in self.params.items():
            w = D.local(p).detach()
            D.local(p.grad).add_(w * (~self.local(name)).to(w.dtype), alpha=lam)

    @torch.no_grad()
    def project(self) -> None:
        """w <- w * m: exactly on the target."""
        for name, p in self.params.items():
            D.local(p).mul_(self.local(name).to(p.dtype))

    def nbytes(self) -> int:
        return sum(self.local(n).numel() * self.local(n).element_size() for n in self.params)

    def state_dict(self) -> dict:
        return {"keep": self.keep, "initial": self.initial, "act_sq": self.act_sq, "tokens": self.tokens}

    def load_state_dict(self, state: dict) -> None:
        self.keep, self.initial = state["keep"], state["initial"]
        self.act_sq, self.tokens = state["act_sq"], state["tokens"]
        self._local, self._dense = {}, {}


@dataclass
class AstRun:
    """AST's state during one training run (``run.state``)."""

    masks: SparseMasks
    decay: float = 0.0               # the SR-STE strength of the current step


class Ast(TrainingMethod, name="ast", variants=("ast_boosted",), position=0):
    """Adaptive Sparse Trainer as hooks of the training engine (elsa/engines/training.py); ``ast_boosted`` is its
    configuration with SLoRB (conf/method/ast_boosted.yaml)."""

    # the reference recipe's values of the engine's keys
    train_defaults = {"steps": 40000, "batch_size": 8, "grad_accum": 16, "warmup_steps": 2000, "lr_final_ratio": 0.1,
                      "temperature": 2.0, "checkpoint_every": 500}

    def validate(self, plan) -> None:
        """mask_metric=wanda reads each Linear's inputs in its forward; a fused expert tensor's per-expert inputs
        are not observed there: refused before any work (the magnitude metric, the default, masks experts). SLoRB
        needs Linear / Conv1D matrices whose inputs split into groups of slorb_k, and the first mask from the
        weights alone (magnitude)."""
        super().validate(plan)
        weights = plan.named_weights()
        stacked = [n for n, w in weights.items() if w.experts is not None]
        if self.slorb:
            if stacked:
                raise ElsaError(f"method.slorb=true: SLoRB bypasses Linear and Conv1D matrices, not the {len(stacked)} "
                                f"fused expert tensor(s) of this model ({stacked[0]}); pass ignore=[experts] to "
                                "leave them dense (recorded in results.json), or method.slorb=false")
            if self.mask_metric != "magnitude":
                raise config_error("method.mask_metric", self.mask_metric, "magnitude with method.slorb=true (SLoRB "
                                   "starts from the weights the first mask removes, computed before any forward)")
            odd = [(n, w.view(w.param).shape[1]) for n, w in weights.items() if w.view(w.param).shape[1] % self.slorb_k]
            if odd:
                raise config_error("method.slorb_k", self.slorb_k, f"a divisor of every pruned matrix's input size "
                                   f"({odd[0][0]} has {odd[0][1]} inputs)")
        if stacked and self.mask_metric == "wanda":
            raise ElsaError(f"method.mask_metric=wanda: AST does not observe the per-expert inputs of {len(stacked)} "
                            f"fused expert tensor(s) ({stacked[0]}{', ...' if len(stacked) > 1 else ''}); use "
                            "method.mask_metric=magnitude on this model, or ignore=[experts] (recorded in results.json)")

    def __init__(self, lr_schedule: Annotated[str, Choice(("cosine", "linear"), "cosine (the paper) or linear")]
                 = "cosine", srste_decay: Annotated[float, Number(ge=0)] = 1e-4,
                 increase_step: Annotated[int, Number(ge=0, whole=True)] = 10000,
                 mask_interval: Annotated[int, Number(gt=0, whole=True)] = 10,
                 mask_metric: Annotated[str, Choice(METRICS, " or ".join(METRICS))] = "magnitude",
                 change_mask: Annotated[bool, Flag("true (masks follow the weights) or false")] = True,
                 group: Annotated[str, GROUP] = "row", task_weight: Annotated[float, Number(ge=0)] = 0.33,
                 kl_weight: Annotated[float, Number(ge=0)] = 0.67,
                 slorb: Annotated[bool, Flag("true (AST-Boosted: the SLoRB bypass) or false (AST-Naive)")] = False,
                 slorb_k: Annotated[int, Number(gt=0, whole=True)] = 16,
                 slorb_init: Annotated[str, Choice(INITS, " or ".join(INITS))] = "mean",
                 trainable_projection: Annotated[bool, Flag()] = True,
                 squarehead_weight: Annotated[float, Number(ge=0)] = 0.0, **shared):
        """AST's own keys; ``shared`` are the engine's (elsa.engines.training.TrainSettings), with the reference recipe's
        defaults (``train_defaults``)."""
        own = own_arguments(self, Ast)
        super().__init__(**shared)
        self.lr_schedule = lr_schedule
        self.srste_decay, self.increase_step, self.mask_interval = float(srste_decay), int(increase_step), \
            int(mask_interval)
        self.mask_metric, self.change_mask, self.group = mask_metric, change_mask, group
        if task_weight + kl_weight == 0:
            raise config_error("method.task_weight", task_weight, "> 0 when method.kl_weight is 0")
        self.slorb, self.slorb_init, self.trainable_projection = slorb, slorb_init, trainable_projection
        self.slorb_k = int(slorb_k)
        self.loss_terms = LossTerms(ntp=float(task_weight), kl=float(kl_weight), squarehead=float(squarehead_weight))
        self.config.update(own)

    def lr_lambda(self):
        make = cosine_schedule if self.lr_schedule == "cosine" else linear_schedule
        t = self.train
        return make(t.warmup_steps, t.steps, t.lr_final_ratio)

    # -- hooks of the training engine -----------------------------------------------------------------
    @torch.no_grad()
    def extend(self, model, ctx) -> None:
        """AST-Boosted: a SLoRB branch on every pruned matrix, S from the weights the first mask removes (the mask
        start() computes next: magnitude scores of the same weights)."""
        if not self.slorb:
            return
        from elsa.methods.slorb import SLoRB, attach, init_from_pruned

        plan = ctx.plan.on(model)
        for name, w in plan.named_weights().items():
            if hasattr(w.module, "slorb"):
                continue                                    # already extended (a resumed or repeated call)
            matrix = w.view(w.param.detach())               # [out, in]
            # the first mask of SparseMasks.update, [out, in]
            keep = w.view(plan.mask(name, w.param.detach().abs().float(), self.group))
            branch = SLoRB(matrix.shape[1], matrix.shape[0], self.slorb_k, self.trainable_projection,
                           dtype=w.param.dtype, device=w.param.device)
            init_from_pruned(branch, matrix, keep, self.slorb_init)
            attach(w.module, branch)

    def setup(self, run):
        masks = SparseMasks(run.plan.named_weights(), run.plan, self.mask_metric, self.group)
        masks.install()
        return AstRun(masks)

    def teardown(self, run):
        run.state.masks.remove()

    def start(self, run):
        masks = run.state.masks
        if self.mask_metric == "wanda":  # input norms for the first mask: the first step's data, dense weights
            with torch.no_grad():
                for micro in range(self.train.grad_accum):
                    run.model(input_ids=run.micro_batch(0, micro), use_cache=False)
        masks.update()
        if self.slorb:
            from elsa.methods.slorb import summary

            run.stats["slorb"] = summary(run.model)
        ctx = run.ctx
        if self.eval_initial and self.mask_metric == "magnitude" and ctx.start is None and "evaluate" in ctx.extras \
                and run.world == 1:
            # the first mask is magnitude pruning of the dense model: its perplexity goes in the table (after a
            # start stage the pipeline reports the start's own)
            run.stats["initial_projection_perplexity"] = self.evaluate_sparse(run, ctx.extras["evaluate"])
            log.info("perplexity of the initial mask (magnitude): %s", run.stats["initial_projection_perplexity"])

    def before_optimizer(self, run, step):
        st = run.state
        st.decay = annealed_decay(step, self.srste_decay, self.increase_step)
        if st.decay:
            st.masks.decay_gradients(st.decay)
        return {"decay": f"{st.decay:.2g}"}

    def periodic(self, run, done):
        if done % self.mask_interval or done >= self.train.steps:
            return None
        st = run.state
        record = {"step": done, "loss": run.loss, "lr": run.sched.get_last_lr()[0], "srste_decay": st.decay}
        if self.change_mask:
            record.update(st.masks.update())
        return record

    def evaluate_sparse(self, run, evaluate):
        masks = run.state.masks
        collect = masks.collect
        masks.collect = False  # evaluation batches do not count towards the wanda norms
        try:
            return evaluate(run.model)
        finally:
            masks.collect = collect
            run.model.train()

    def method_state(self, run):
        return {"masks": run.state.masks.state_dict()}

    def load_method_state(self, run, state):
        run.state.masks.load_state_dict(state["masks"])

    def finish(self, run):
        run.state.masks.project()
        run.state.masks.collect = False

    def method_nbytes(self, run):
        return "masks", run.state.masks.nbytes()

