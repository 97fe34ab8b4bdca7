"""SAFE and SAFE+ (Lee et al., 2025, "SAFE: Finding Sparse and Flat Minima to Improve Pruning").

SAFE poses pruning as  min_{w in S} max_{||e|| <= rho} f(w + e): a sparse solution that is also flat (its loss
stays low in a rho-ball around it). The sparsity set S is split off with ADMM (scaled form, w = z), so the
inner problem is a smooth penalised one solved by sharpness-aware first-order steps:

    w  <- Adam step on  g_sam + lam (w - z + u),   g_sam = grad f at  w + rho g / ||g||  (g = grad f at w)
    every ``interval`` steps:  z <- Proj_S(w + u);  u <- u + w - z
    at the end:  w <- Proj_S(w)  (the Linear weights only)

For LLMs the paper applies this block by block (layer-wise reconstruction, like SparseGPT and Wanda): f is the
mean squared error between the block's output and the *dense* block's output on the block's current inputs
(those produced by the already-pruned earlier blocks). Every parameter of the block is trained (norm weights
too), the SAM perturbation is taken over all of them, and only the Linear weights carry z and u. The learning
rate warms up linearly and then decays linearly to zero; the Adam betas are (0.9, 0.95). z starts as the
projection of the dense weights and u at zero.

Proj_S is the exact top-k of each Linear (``sparsity`` as a ratio) or N:M per group of M inputs. SAFE ranks by
|w|; SAFE+ (``activation_weighted``) ranks by |w_ij|·||X_j|| with X the Linear's inputs on the calibration
tokens (the Wanda score, a generalised projection with P = diag(XᵀX)). The ADMM state is
:class:`elsa.engines.admm.AdmmState` (ELSA's); SAFE+ hands it v = ||X_j||² as its ``second_moment`` so that its
objective-aware score v·x² orders weights exactly as |x|·||X_j||.

Differences from the reference setup, forced by the engine: the training batches are the engine's capture
batches (``batch_size`` windows each), visited in a seeded random order every epoch, rather than a fresh
shuffle of single windows; the block is trained in float32 (and cast back to its dtype after the projection).

Per block, results.json's ``method_stats`` hold the MSE against the dense block's output on the same inputs of
the no-training projection (magnitude, or the Wanda score for SAFE+), of the trained block before the final
projection (``block_mse_trained``: what the projection gives away is the gap to ``block_mse_final``) and of the
final SAFE block.
"""
from __future__ import annotations

import logging
import math
import zlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from elsa.engines.admm import AdmmState, Fp32Codec
from elsa.errors import ElsaError, config_error
from elsa.engines.layerwise import BATCH, LayerwisePruner, _hidden
from elsa.methods.base import Annotated, Flag, Number, Numbers, PruneContext
from elsa.engines.layerwise import NO_TOKENS
from elsa.sparsity.plan import BlockPlan, MatrixId
from elsa.engines.schedules import linear_schedule

log = logging.getLogger(__name__)


def _input_weights(block: int, name: str, weight, stats) -> torch.Tensor:
    """SAFE+'s ||X_j||² laid out like the parameter (per expert for fused expert tensors, [in, 1] for Conv1D
    storage); an expert that received no calibration token gets ones (magnitude within that expert)."""
    def one(key, cols):
        s = stats[key]
        return torch.ones(cols) if s is NO_TOKENS else s.float().cpu()
    p = weight.param
    if weight.experts is None:
        cols = weight.view(p).shape[1]
        v = one(MatrixId(block, name), cols).reshape(1, -1)
    else:
        cols = weight.view(p, 0).shape[1]
        v = torch.stack([one(MatrixId(block, name, e), cols) for e in range(weight.experts)]).unsqueeze(1)
    v = v.transpose(-1, -2) if weight.transposed else v
    return v.to(p.device)


def _float(obj):
    """Floating tensors (also inside tuples/lists/dicts, e.g. rotary cos/sin) in float32; the rest unchanged."""
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_float(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _float(v) for k, v in obj.items()}
    return obj


class SAFE(LayerwisePruner, name="safe", position=6):
    has_budget = True     # layer-wise, but it trains each block: epochs / warmup_epochs / interval: budget= sets them

    def matrix_flops(self, out_features: int, in_features: int, tokens: int) -> float:
        """Training the block on its calibration inputs: 6 out in per token and epoch."""
        return 6.0 * out_features * in_features * tokens * self.epochs

    def __init__(self, epochs: Annotated[int, Number(gt=0, whole=True, paper="30")] = 30,
                 warmup_epochs: Annotated[float, Number(ge=0, paper="2")] = 2,
                 batch_size: Annotated[int, BATCH] = 8, lr: Annotated[float, Number(gt=0, paper="2e-4")] = 2e-4,
                 betas: Annotated[tuple, Numbers(2, Number(ge=0, lt=1), "two numbers in [0, 1) (the paper: "
                                                 "[0.9, 0.95])")] = (0.9, 0.95),
                 lam: Annotated[float, Number(ge=0, paper="1e-3")] = 1e-3,
                 rho: Annotated[float, Number(ge=0, paper="2e-4")] = 2e-4,
                 interval: Annotated[int, Number(gt=0, whole=True, paper="32")] = 32,
                 activation_weighted: Annotated[bool, Flag("true (SAFE+) or false (SAFE)")] = False):
        if warmup_epochs > epochs:
            raise config_error("method.warmup_epochs", warmup_epochs, f"at most method.epochs={epochs}")
        betas = tuple(betas)
        super().__init__(batch_size)
        self.epochs, self.warmup_epochs, self.lr, self.betas = epochs, float(warmup_epochs), float(lr), betas
        self.lam, self.rho, self.interval = float(lam), float(rho), interval
        self.activation_weighted, self.seed = activation_weighted, 0

    def prune(self, ctx: PruneContext) -> dict:
        self.seed = int(ctx.seed)
        return super().prune(ctx)

    # -- SAFE+: squared input norms ||X_j||² per Linear, from the engine's hooks on the block's current inputs --
    def stats_init(self, name, linear: nn.Linear) -> Any:
        if not self.activation_weighted:
            return None
        return torch.zeros(linear.in_features, dtype=torch.float64, device=linear.weight.device)

    def accumulate(self, stats: Any, x: torch.Tensor) -> Any:
        if stats is None:
            return None
        return stats + x.double().square().sum(0)

    # -- the block -----------------------------------------------------------------------------------------
    def prune_block(self, view: BlockPlan, stats: dict[MatrixId, Any], inputs) -> dict:
        block = view.module
        dtype = next(block.parameters()).dtype
        flags = {n: p.requires_grad for n, p in block.named_parameters()}
        if dtype != torch.float32:
            block.float()
        batches = [(h.float(), _float(kw)) for h, kw in inputs]
        try:
            info = self._train_block(view, stats, batches)
        finally:
            for n, p in block.named_parameters():
                p.requires_grad_(flags[n])
            if dtype != torch.float32:
                block.to(dtype)
        return {view.prefix: info}

    @torch.no_grad()
    def block_mse(self, block: nn.Module, batches, targets) -> float:
        """Mean squared error of ``block`` against ``targets`` over every batch (per element, like the loss)."""
        total, count = 0.0, 0
        for (h, kw), y in zip(batches, targets):
            out = _hidden(block(h, **kw)).float()
            total += float((out - y).square().sum())
            count += y.numel()
        return total / max(count, 1)

    def _train_block(self, target: BlockPlan, stats, batches) -> dict:
        """Train one block (``target``: its part of the plan) to reconstruct its dense output, ADMM-projected."""
        block, prefix = target.module, target.prefix
        with torch.no_grad():
            targets = [_hidden(block(h, **kw)).float().detach() for h, kw in batches]   # the dense block's output
        found = target.weights
        weights = {name: w.param for name, w in found.items()}
        second_moment = None
        if self.activation_weighted:
            norms = {name: _input_weights(target.index, name, w, stats) for name, w in found.items()}
            second_moment = norms.__getitem__
        admm = AdmmState(weights, target, "layer", Fp32Codec(), Fp32Codec(),
                         {name: w.transposed for name, w in found.items()})
        admm.init(target, second_moment)

        # the no-training baseline: the block with its Linears projected (z0) and nothing else changed
        saved = {name: w.detach().clone() for name, w in weights.items()}
        with torch.no_grad():
            for name, w in weights.items():
                w.copy_(admm.zu(name)[0])
            mse_initial = self.block_mse(block, batches, targets)
            for name, w in weights.items():
                w.copy_(saved[name])
        del saved

        frozen = target.kept_dense()   # routers and ignored / untargeted weights stay as they are
        params = [p for p in block.parameters() if id(p) not in frozen]
        for p in params:
            p.requires_grad_(True)
        admm_ids = {id(w): name for name, w in weights.items()}
        opt = torch.optim.Adam(params, lr=self.lr, betas=self.betas, weight_decay=0.0)
        per_epoch = len(batches)
        total = self.epochs * per_epoch
        warmup = math.ceil(self.warmup_epochs * per_epoch)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(warmup, total))
        gen = torch.Generator().manual_seed(self.seed * 100003 + zlib.crc32(prefix.encode()))
        step, epoch_losses, dual = 0, [], {}
        for _epoch in range(self.epochs):
            losses = []
            for i in torch.randperm(per_epoch, generator=gen).tolist():
                (h, kw), y = batches[i], targets[i]
                loss = self._sam_step(block, params, admm, admm_ids, h, kw, y, prefix, step)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss)
                step += 1
                if step % self.interval == 0:
                    dual = admm.dual_update(target, second_moment=second_moment)
            epoch_losses.append(sum(losses) / len(losses))
        for p in params:
            p.requires_grad_(False)
        mse_trained = self.block_mse(block, batches, targets)     # the dense-support w the projection starts from
        admm.final_projection(target, second_moment)
        mse_final = self.block_mse(block, batches, targets)
        log.info("%s: SAFE %d steps, block MSE %.4g (projection without training) -> %.4g (trained, before the "
                 "final projection) -> %.4g", prefix, step, mse_initial, mse_trained, mse_final)
        return {"mse_initial": mse_initial, "mse_trained": mse_trained, "mse_final": mse_final, "steps": step,
                "train_loss": epoch_losses, "primal_residual": dual.get("primal_residual")}

    def _loss(self, block, h, kw, y, prefix: str, step: int, what: str) -> torch.Tensor:
        loss = F.mse_loss(_hidden(block(h, **kw)).float(), y)
        if not torch.isfinite(loss):
            raise ElsaError(f"SAFE: the {what}reconstruction loss of block {prefix} is {float(loss.detach())} at step {step}; "
                            "lower method.lr or method.rho")
        return loss

    def _sam_step(self, block, params, admm: AdmmState, admm_ids, h, kw, y, prefix: str, step: int) -> float:
        """Leave in ``p.grad`` the sharpness-aware gradient plus the ADMM proximal term; return the loss at w."""
        with torch.enable_grad():
            loss = self._loss(block, h, kw, y, prefix, step, "")
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        if self.rho > 0:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            scale = self.rho / (float(norm) + 1e-12)
            saved = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.add_(g, alpha=scale)                       # climb to w + rho g / ||g||
            try:
                with torch.enable_grad():
                    perturbed = self._loss(block, h, kw, y, prefix, step, "perturbed (SAM) ")
                    grads = torch.autograd.grad(perturbed, params, allow_unused=True)
            finally:
                with torch.no_grad():
                    for p, w in zip(params, saved):
                        p.copy_(w)                               # back to w exactly
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        for p, g in zip(params, grads):
            name = admm_ids.get(id(p))
            if name is not None and self.lam > 0:
                g = g + self.lam * admm.prox_residual(name).to(g.dtype)
            p.grad = g.detach()
        return float(loss.detach())

    def summarize(self, per_layer: dict[str, dict]) -> dict:
        blocks = {k: v for k, v in per_layer.items() if "mse_final" in v}
        return {"block_mse_initial": {k: v["mse_initial"] for k, v in blocks.items()},
                "block_mse_trained": {k: v["mse_trained"] for k, v in blocks.items()},
                "block_mse_final": {k: v["mse_final"] for k, v in blocks.items()},
                "train_loss": {k: v["train_loss"] for k, v in blocks.items()},
                "primal_residual": {k: v["primal_residual"] for k, v in blocks.items()},
                "steps_per_block": max((v["steps"] for v in blocks.values()), default=0),
                "variant": "safe+" if self.activation_weighted else "safe"}
