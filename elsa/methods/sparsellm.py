"""SparseLLM (Bai et al., 2024, "SparseLLM: Towards Global Pruning of Pre-trained Language Models").

Attention Linears are pruned by SparseGPT. The MLP is pruned jointly: its intermediate activations become
auxiliary variables, so that the coupled layers decompose into closed-form subproblems solved alternately.
The paper treats OPT's ReLU MLP (fc2(relu(fc1 x))); here it is adapted to the gated MLP of Llama-family
models, down(act(gate(x)) ⊙ up(x)). With X the MLP's input tokens (rows), Y the dense MLP's output, and
auxiliaries S (gate pre-activation), U (up output), P (down's input), the objective (per token) is

    L = γ ||P W_dᵀ - Y||² + β ||P - act(S) ⊙ U||² + α (||S - X W_gᵀ||² + ||U - X W_uᵀ||²)

Initialised at the dense values (L = 0), each of ``iterations`` alternations updates, in order:
  - P  ← (γ Y W_d + β act(S)⊙U) (γ W_dᵀ W_d + β I)⁻¹                        (ridge, closed form)
  - U  ← (β act(S)⊙P + α X W_uᵀ) / (β act(S)² + α)                          (elementwise, closed form)
  - S  ← argmin β (P - act(S)⊙U)² + α (S - X W_gᵀ)²                           (elementwise; act is not
        piecewise linear here, so a few safeguarded Gauss-Newton steps that never increase the objective)
  - W_d, W_g, W_u ← least squares onto their targets (Y from P; S, U from X), then re-pruned by SparseGPT
    with the matching Hessian (2/n PᵀP or 2/n XᵀX): SparseGPT on the least-squares solution minimises the
    distance to the target on the fixed inputs, ||T - X Ŵᵀ||², up to a constant.
The first alternation therefore reproduces SparseGPT; later ones let the layers compensate each other.
L (``objective``) and the real MLP error ||mlp(X) - Y||² / n with the pruned weights (``mlp_error``) are
recorded after every alternation in the method statistics.

All Linears see the dense block's inputs (the engine's convention). A block whose MLP is not gated (no
gate_proj/up_proj/down_proj Linears + act_fn: OPT's fc1/fc2, fused gate_up_proj, MoE experts) makes the run
refuse right after the model loads (``validate``), before any calibration; with ``fallback: sparsegpt`` such
blocks are pruned by SparseGPT alone, and the fallback is recorded in the method statistics (``fallback``),
printed in the summary and carried into the report row's label.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from elsa.errors import ElsaError, config_error, positive
from elsa.layerwise import LayerwisePruner
from elsa.methods.sparsegpt import SparseGPT, sparsegpt_prune
from elsa.models import block_matrices, blocks_and_prefix
from elsa.sparsity import Sparsity

log = logging.getLogger(__name__)

GATED = ("gate_proj", "up_proj", "down_proj")
ROUNDING = 1 + 1e-6   # an element's S-loss "rose" only above this factor: below it is float32 rounding noise


def gated_mlp(block: nn.Module) -> tuple[str, nn.Module] | None:
    """The block's gated MLP (a submodule with gate_proj, up_proj, down_proj Linears and an act_fn), by name."""
    for name, mod in block.named_modules():
        if all(isinstance(getattr(mod, k, None), nn.Linear) for k in GATED) and callable(getattr(mod, "act_fn", None)):
            return name, mod
    return None


@torch.no_grad()
def mlp_io(block: nn.Module, mlp: nn.Module, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The MLP's input tokens X and its (dense) output Y over every batch, float32, (tokens, hidden)."""
    xs, ys = [], []

    def grab(_m, args, out):
        xs.append(args[0].reshape(-1, args[0].shape[-1]).float())
        ys.append(out.reshape(-1, out.shape[-1]).float())

    handle = mlp.register_forward_hook(grab)
    try:
        for h, kw in inputs:
            block(h, **kw)
    finally:
        handle.remove()
    return torch.cat(xs), torch.cat(ys)


def least_squares(x: torch.Tensor, t: torch.Tensor, percdamp: float, gram: torch.Tensor | None = None) -> torch.Tensor:
    """W (out, in) minimising ||X Wᵀ - T||² + damping, damping = percdamp · mean diag(XᵀX); ``gram`` is XᵀX
    when the caller has it already."""
    g = (x.t() @ x) if gram is None else gram.clone()
    g += (percdamp * float(torch.diagonal(g).mean().clamp_min(1e-12))) * torch.eye(g.shape[0], device=g.device)
    chol = torch.linalg.cholesky(g)
    return torch.cholesky_solve(x.t() @ t, chol).t()


def hessian(x: torch.Tensor) -> torch.Tensor:
    return x.t() @ x * (2.0 / len(x))


class GatedMLPProblem:
    """The auxiliary-variable problem of one gated MLP; weights are float32 (out, in) copies.

    ``xg`` = X W_gᵀ and ``xu`` = X W_uᵀ are kept for the current weights: the objective, the MLP error and the
    S and U updates all need them, so each alternation computes them once (after the weight update)."""

    def __init__(self, mlp: nn.Module, x: torch.Tensor, y: torch.Tensor, alpha: float, beta: float, gamma: float,
                 chunk: int = 512):
        self.act = mlp.act_fn
        self.x, self.y = x, y
        self.wg, self.wu, self.wd = (getattr(mlp, k).weight.detach().float().clone() for k in GATED)
        self.alpha, self.beta, self.gamma = alpha, beta, gamma
        self.chunk = chunk
        self._inputs_changed()
        self.s, self.u = self.xg.clone(), self.xu.clone()
        self.p = self.act(self.s) * self.u
        self.hx = hessian(x)                               # X is fixed: its Gram matrix is computed once

    def _inputs_changed(self) -> None:
        self.xg, self.xu = self.x @ self.wg.t(), self.x @ self.wu.t()

    def objective(self) -> float:
        a, b, g = self.alpha, self.beta, self.gamma
        total = (g * (self.p @ self.wd.t() - self.y).pow(2).sum()
                 + b * (self.p - self.act(self.s) * self.u).pow(2).sum()
                 + a * ((self.s - self.xg).pow(2).sum() + (self.u - self.xu).pow(2).sum()))
        return float(total) / len(self.x)

    def mlp_error(self) -> float:
        out = (self.act(self.xg) * self.xu) @ self.wd.t()
        return float((out - self.y).pow(2).sum()) / len(self.x)

    # -- activation updates (closed form / elementwise) -------------------------------------------------
    def update_p(self) -> None:
        b, g = self.beta, self.gamma
        lhs = g * self.wd.t() @ self.wd + b * torch.eye(self.wd.shape[1], device=self.wd.device)
        rhs = g * self.y @ self.wd + b * self.act(self.s) * self.u
        self.p = rhs @ torch.cholesky_inverse(torch.linalg.cholesky(lhs))   # lhs is small and well conditioned

    def update_u(self) -> None:
        sig = self.act(self.s)
        self.u = (self.beta * sig * self.p + self.alpha * self.xu) / (self.beta * sig * sig + self.alpha)

    def _s_loss(self, s, p, u, g):
        return self.beta * (p - self.act(s) * u).pow(2) + self.alpha * (s - g).pow(2)

    def update_s(self, steps: int = 5, halvings: int = 6, rtol: float = 1e-5) -> None:
        """Safeguarded Gauss-Newton on each element of S, a chunk of token rows at a time (the tensors of one
        chunk stay in cache); a step is halved only where it raised that element's loss, and kept only where
        the loss did not rise. A chunk stops early once a step lowers its loss by less than ``rtol`` relative
        (at that point the "rises" are rounding noise, and backtracking on them is all the cost)."""
        for lo in range(0, len(self.s), self.chunk):
            rows = slice(lo, lo + self.chunk)
            self.s[rows] = self._update_s_rows(self.s[rows], self.p[rows], self.u[rows], self.xg[rows], steps,
                                               halvings, rtol)

    def _update_s_rows(self, s, p, u, g, steps: int, halvings: int, rtol: float) -> torch.Tensor:
        for _ in range(steps):
            with torch.enable_grad():
                sv = s.detach().requires_grad_(True)
                a = self.act(sv)
                da, = torch.autograd.grad(a.sum(), sv)     # elementwise activation: its derivative
            a, da = a.detach(), da.detach()
            r = p - a * u
            base = self.beta * r.pow(2) + self.alpha * (s - g).pow(2)
            grad = -2 * self.beta * r * u * da + 2 * self.alpha * (s - g)
            curv = 2 * self.beta * (u * da).pow(2) + 2 * self.alpha
            step = grad / curv
            cand = s - step
            loss = self._s_loss(cand, p, u, g)
            worse = (loss > base * ROUNDING).nonzero(as_tuple=True)
            t = torch.ones_like(step[worse])
            for _ in range(halvings):                     # per-element backtracking on the elements that rose
                if len(t) == 0:
                    break
                t = t * 0.5
                c = s[worse] - t * step[worse]
                lc = self._s_loss(c, p[worse], u[worse], g[worse])
                cand[worse], loss[worse] = c, lc
                still = lc > base[worse] * ROUNDING
                worse, t = tuple(w[still] for w in worse), t[still]
            keep = loss <= base
            s = torch.where(keep, cand, s)
            before = float(base.sum())
            if before - float(torch.where(keep, loss, base).sum()) <= rtol * before:
                break
        return s

    # -- weight updates: least squares, then SparseGPT --------------------------------------------------
    def update_weights(self, target, blocksize: int, percdamp: float, name: str) -> dict:
        """``target``: one Sparsity for the three matrices, or {gate_proj, up_proj, down_proj: Sparsity} (an
        allocation's per-matrix ratios)."""
        n = len(self.x)
        t = target if isinstance(target, Sparsity) else target
        hp = hessian(self.p)
        self.wd, info = sparsegpt_prune(least_squares(self.p, self.y, percdamp, hp * (n / 2)), hp,
                                        _part(t, "down_proj"), blocksize, percdamp, f"{name}.down_proj")
        gx = self.hx * (n / 2)
        self.wg, _ = sparsegpt_prune(least_squares(self.x, self.s, percdamp, gx), self.hx, _part(t, "gate_proj"),
                                     blocksize, percdamp, f"{name}.gate_proj")
        self.wu, _ = sparsegpt_prune(least_squares(self.x, self.u, percdamp, gx), self.hx, _part(t, "up_proj"),
                                     blocksize, percdamp, f"{name}.up_proj")
        self._inputs_changed()
        return info

    def alternate(self, target: Sparsity, blocksize: int, percdamp: float, name: str) -> None:
        self.update_p()
        self.update_u()
        self.update_s()
        self.update_weights(target, blocksize, percdamp, name)


def _part(target, key: str) -> Sparsity:
    return target if isinstance(target, Sparsity) else target[key]


SELECT = ("last", "best")
FALLBACKS = (None, "sparsegpt")


@torch.no_grad()
def sparsellm_mlp(mlp: nn.Module, x: torch.Tensor, y: torch.Tensor, target: Sparsity, alpha: float = 0.1,
                  beta: float = 0.1, gamma: float = 0.1, iterations: int = 10, blocksize: int = 128,
                  percdamp: float = 0.01, name: str = "mlp", select: str = "last") -> dict:
    """Prune the gated ``mlp`` in place so that mlp(X) ≈ Y; returns the objective and MLP error per alternation.

    ``select="last"`` keeps the last alternation's weights (the paper); ``"best"`` the alternation with the
    lowest real MLP error (the first one is SparseGPT's, so the MLP never ends worse than SparseGPT leaves it)."""
    prob = GatedMLPProblem(mlp, x, y, alpha, beta, gamma)
    objective, error, best = [], [], None
    for _ in tqdm(range(iterations), desc=f"sparsellm {name}", unit="alt", leave=False):
        prob.alternate(target, blocksize, percdamp, name)
        objective.append(prob.objective())
        error.append(prob.mlp_error())
        if select == "best" and error[-1] <= min(error):   # the update methods rebind the weights: no copy
            best = (prob.wg, prob.wu, prob.wd)
    for key, w in zip(GATED, best if select == "best" else (prob.wg, prob.wu, prob.wd)):
        lin = getattr(mlp, key)
        lin.weight.copy_(w.to(lin.weight.dtype))
    log.debug("%s: objective %s -> %s, MLP error %s -> %s", name, objective[0], objective[-1], error[0], error[-1])
    return {"objective": objective, "mlp_error": error, "kept": error.index(min(error)) if select == "best"
            else len(error) - 1}


class SparseLLM(SparseGPT):
    def __init__(self, alpha: float = 0.1, beta: float = 0.1, gamma: float = 0.1, iterations: int = 10,
                 percdamp: float = 0.01, blocksize: int = 128, batch_size: int = 8, select: str = "last",
                 fallback: str | None = None):
        super().__init__(percdamp, blocksize, batch_size)
        if fallback not in FALLBACKS:
            raise config_error("method.fallback", fallback, "null (refuse a block whose MLP SparseLLM does not model) "
                               "or sparsegpt (prune such blocks by SparseGPT, recorded)")
        self.fallback = fallback
        self.fallback_blocks: list[str] = []
        self.n_blocks = 0
        if select not in SELECT:
            raise config_error("method.select", select, "last (the paper) or best (lowest real MLP error)")
        self.select = select
        for key, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
            positive(f"method.{key}", value, paper="0.1")
        positive("method.iterations", iterations, whole=True, paper="10")
        self.alpha, self.beta, self.gamma, self.iterations = float(alpha), float(beta), float(gamma), iterations

    def validate(self, model: nn.Module, target: Sparsity) -> None:
        """Right after load, before any calibration: every block's MLP must be the gated MLP SparseLLM models,
        or the user asked for the SparseGPT fallback."""
        super().validate(model, target)
        blocks, prefix = blocks_and_prefix(model)
        self.n_blocks = len(blocks)
        bad = [i for i, b in enumerate(blocks) if gated_mlp(b) is None]
        self.fallback_blocks = [f"{prefix}.{i}" for i in bad]
        if bad and self.fallback is None:
            found = ", ".join(f"{n} {list(lin.weight.shape)}" for n, lin in block_matrices(blocks[bad[0]]).items())
            raise ElsaError(f"method=sparsellm cannot model the MLP of block {prefix}.{bad[0]} ({len(bad)}/"
                            f"{len(blocks)} blocks): its Linears are {found or 'none'}; SparseLLM here supports the "
                            "gated MLP down(act(gate(x)) * up(x)) (a submodule with gate_proj, up_proj, down_proj "
                            "Linears and act_fn). Set method.fallback=sparsegpt to prune such blocks by SparseGPT "
                            "(recorded in results.json and the report)")
        if bad:
            log.warning("sparsellm: SparseGPT fallback on %d/%d blocks (method.fallback=sparsegpt): %s",
                        len(bad), len(blocks), ", ".join(self.fallback_blocks))

    def prune_block(self, prefix: str, block: nn.Module, stats: dict[str, Any], inputs, target: Sparsity) -> dict:
        found = gated_mlp(block)
        if found is None:
            if self.fallback != "sparsegpt":   # validate() refuses this before any model work
                raise ElsaError(f"method=sparsellm cannot model the MLP of block {prefix} "
                                "(set method.fallback=sparsegpt)")
            if prefix not in self.fallback_blocks:
                self.fallback_blocks.append(prefix)
            return LayerwisePruner.prune_block(self, prefix, block, stats, inputs, target)
        mlp_name, mlp = found
        x, y = mlp_io(block, mlp, inputs)                     # before any pruning: the dense block's view
        mlp_linears = {id(m) for m in mlp.modules()}
        local = target.within(prefix)           # each matrix's own ratio when an allocation set them
        names = {id(lin.source.module): name for name, lin in block_matrices(block).items()}
        per_layer = {}
        for name, lin in block_matrices(block).items():
            if id(lin.source.module) not in mlp_linears:
                per_layer[f"{prefix}.{name}"] = self.prune_linear(f"{prefix}.{name}", lin, stats[name], local.at(name))
        mlp_target = target if not target.allocated else \
            {key: local.at(names[id(getattr(mlp, key))]) for key in GATED}
        per_layer[f"{prefix}.{mlp_name}"] = sparsellm_mlp(
            mlp, x, y, mlp_target, self.alpha, self.beta, self.gamma, self.iterations, self.blocksize, self.percdamp,
            f"{prefix}.{mlp_name}", self.select)
        return per_layer

    def summarize(self, per_layer: dict[str, dict]) -> dict:
        linears = {k: v for k, v in per_layer.items() if "objective" not in v}
        mlps = {k: v for k, v in per_layer.items() if "objective" in v}
        out = super().summarize(linears)
        out["mlp_objective"] = {k: v["objective"] for k, v in mlps.items()}
        out["mlp_error"] = {k: v["mlp_error"] for k, v in mlps.items()}
        out["mlp_kept_alternation"] = {k: v["kept"] for k, v in mlps.items()}
        if self.fallback_blocks:
            out["fallback"] = {"method": self.fallback, "blocks": list(self.fallback_blocks),
                               "of": max(self.n_blocks, len(self.fallback_blocks))}
        return out
