"""ALPS (Meng et al., 2024, "ALPS: Improved Optimization for Highly Sparse One-Shot Pruning").

Per Linear with weight W (rows x cols) and calibration Hessian H = 2/n X Xᵀ, the layer objective is
f(Ŵ) = tr((W - Ŵ) H (W - Ŵ)ᵀ) = ||WX - ŴX||² · 2/n. Rows are independent given the shared H, so every
operation below acts on all rows at once.

Coordinates. H is damped (H + λI, λ = percdamp · mean diag, as in SparseGPT) and rescaled to unit diagonal:
H̃ = D^-½ H D^-½, W̃ = W D^½ with D = diag(H). The objective is unchanged, the top-k projection of W̃ ranks
weights by |W_ij| · ||X_j|| (the Wanda score), ρ is relative to a unit diagonal, and the diagonal (Jacobi)
preconditioner of the final conjugate gradient is exactly this rescaling.

ADMM on  min f(Ŵ) s.t. Z ∈ S (sparsity set), Ŵ = Z, with the unscaled dual Λ:
    Ŵ ← (H + ρI)⁻¹ (H W + ρ Z - Λ)          the ridge solve; with H = Q diag(λ) Qᵀ computed once,
                                             (H + ρI)⁻¹ = Q diag(1/(λ + ρ)) Qᵀ costs two matmuls per ρ
    Z ← Proj_S(Ŵ + Λ/ρ)                      exact top-k of the layer, or N:M (elsa.sparsity.patterns.mask_from_scores)
    Λ ← Λ + ρ (Ŵ - Z)
Every ``update_every`` iterations the support of Z is compared with the previous check: ρ grows by
``rho_growth[0]`` (1.3) when more than ``change_thresholds[0]`` (10%) of the kept weights moved, by
``rho_growth[1]`` (1.2) above ``change_thresholds[1]`` (0.5%), by ``rho_growth[2]`` (1.1) otherwise;
the loop stops when the support did not change at all (or after ``max_iters``).
Finally the support is fixed and the kept weights are refined by preconditioned conjugate gradient on
min f(Ŵ) s.t. Ŵ = 0 off the support (``pcg_iters`` iterations), starting from Z.

The eigendecomposition, ridge solve and PCG live here as :class:`Reconstruction`; L-ADMM reuses them.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from elsa.engines.layerwise import BATCH
from elsa.methods.base import Annotated, Number, Numbers
from elsa.methods.sparsegpt import PERCDAMP, Hessian, HessianPruner
from elsa.sparsity.patterns import Sparsity, mask_from_scores

log = logging.getLogger(__name__)


class Reconstruction:
    """The layer reconstruction problem of one weight in unit-diagonal coordinates (see the module doc)."""

    def __init__(self, weight: torch.Tensor, h: torch.Tensor, percdamp: float = 0.01):
        h = h.float().clone()
        diag = torch.diagonal(h)
        diag[diag == 0] = 1.0                                   # inputs that never fire: any weight is free
        h += (percdamp * float(diag.mean())) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
        self.scale = torch.diagonal(h).sqrt()                   # D^½
        self.h = h / self.scale.reshape(-1, 1) / self.scale.reshape(1, -1)
        self.w = weight.detach().float() * self.scale.reshape(1, -1)
        self.wh = self.w @ self.h                               # the right-hand side H W (row form: W H)
        self._eig = None

    # -- the ridge solve --------------------------------------------------------------------------------
    def eig(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._eig is None:
            evals, q = torch.linalg.eigh(self.h)
            self._eig = (evals.clamp_min(0.0), q, self.wh @ q)
        return self._eig[0], self._eig[1]

    def ridge(self, target: torch.Tensor, rho: float) -> torch.Tensor:
        """argmin_Ŵ f(Ŵ) + ρ/2 ||Ŵ - target||² (row form): (W H + ρ target) (H + ρI)⁻¹."""
        evals, q = self.eig()
        whq = self._eig[2]
        return ((whq + rho * (target @ q)) / (evals + rho).reshape(1, -1)) @ q.t()

    # -- objective and refinement ---------------------------------------------------------------------
    def error(self, w_hat: torch.Tensor) -> float:
        """f(Ŵ) = tr((W - Ŵ) H (W - Ŵ)ᵀ) on the damped, rescaled H."""
        d = self.w - w_hat
        return float(((d @ self.h) * d).sum())

    def pcg(self, w_hat: torch.Tensor, keep: torch.Tensor, iters: int, tol: float = 1e-10) -> torch.Tensor:
        """Jacobi-preconditioned conjugate gradient on min f(Ŵ) with Ŵ fixed to zero off ``keep``; one
        independent CG per row, batched. Solves (M H M) ŵ = M H w for every row."""
        m = keep.float()
        x = w_hat * m
        pinv = 1.0 / torch.diagonal(self.h).reshape(1, -1)
        r = (self.wh - x @ self.h) * m
        z = r * pinv
        p = z.clone()
        rz = (r * z).sum(1, keepdim=True)
        start = float(rz.sum())
        for _ in range(iters):
            if float(rz.sum()) <= tol * max(start, 1e-30):
                break
            ap = (p @ self.h) * m
            pap = (p * ap).sum(1, keepdim=True)
            alpha = torch.where(pap > 0, rz / pap.clamp_min(1e-30), torch.zeros_like(pap))
            x += alpha * p
            r -= alpha * ap
            z = r * pinv
            rz_new = (r * z).sum(1, keepdim=True)
            beta = torch.where(rz > 0, rz_new / rz.clamp_min(1e-30), torch.zeros_like(rz))
            p = z + beta * p
            rz = rz_new
        return x * m

    def to_weight(self, w_hat: torch.Tensor) -> torch.Tensor:
        """Back from the rescaled coordinates: W = W̃ D^-½."""
        return w_hat / self.scale.reshape(1, -1)


def project(v: torch.Tensor, target: Sparsity) -> torch.Tensor:
    """Keep-mask of the Euclidean projection of ``v`` onto the sparsity set (whole-layer top-k, or N:M)."""
    return mask_from_scores(v.abs(), target, "layer")


def rho_factor(changed: int, kept: int, thresholds, growth) -> float:
    """How much ρ grows after a support change of ``changed`` entries out of ``kept``."""
    frac = changed / max(kept, 1)
    if frac > thresholds[0]:
        return growth[0]
    if frac > thresholds[1]:
        return growth[1]
    return growth[2]


@torch.no_grad()
def alps_prune(weight: torch.Tensor, h: torch.Tensor, target: Sparsity, rho: float = 0.1, max_iters: int = 300,
               update_every: int = 3, thresholds=(0.1, 0.005), growth=(1.3, 1.2, 1.1), pcg_iters: int = 50,
               percdamp: float = 0.01) -> tuple[torch.Tensor, dict]:
    """The pruned weight (float32) and statistics. Does not modify its inputs."""
    prob = Reconstruction(weight, h, percdamp)
    keep = project(prob.w, target)
    z = prob.w * keep
    dual = torch.zeros_like(z)
    kept, last, iters, converged = int(keep.sum()), keep, 0, False
    for iters in range(1, max_iters + 1):
        w_hat = prob.ridge(z - dual / rho, rho)
        keep = project(w_hat + dual / rho, target)
        z = (w_hat + dual / rho) * keep
        dual += rho * (w_hat - z)
        if iters % update_every == 0:
            changed = int((keep ^ last).sum())
            last = keep
            if changed == 0:
                converged = True
                break
            rho *= rho_factor(changed, kept, thresholds, growth)
    admm_error = prob.error(z)
    refined = prob.pcg(z, keep, pcg_iters)
    info = {"iterations": iters, "converged": converged, "final_rho": rho,
            "admm_error": admm_error, "error": prob.error(refined)}
    return prob.to_weight(refined), info


class ALPS(HessianPruner, name="alps", position=7):
    def matrix_flops(self, out_features: int, in_features: int, tokens: int) -> float:
        """The Hessian, its eigendecomposition (~9 in^3) and at most max_iters ridge solves (4 out in^2 each):
        an upper bound, the loop stops when the support settles."""
        return 2.0 * in_features ** 2 * tokens + 9.0 * in_features ** 3 + \
            4.0 * out_features * in_features ** 2 * self.max_iters

    def __init__(self, rho: Annotated[float, Number(gt=0, paper="0.1")] = 0.1,
                 max_iters: Annotated[int, Number(gt=0, whole=True, paper="300")] = 300,
                 update_every: Annotated[int, Number(gt=0, whole=True, paper="3")] = 3,
                 change_thresholds: Annotated[tuple, Numbers(2, Number(ge=0, le=1), "two fractions in [0, 1]")]
                 = (0.1, 0.005),
                 rho_growth: Annotated[tuple, Numbers(3, Number(ge=1), "three factors >= 1")] = (1.3, 1.2, 1.1),
                 pcg_iters: Annotated[int, Number(ge=0, whole=True, note="(0: no refinement)")] = 50,
                 percdamp: Annotated[float, PERCDAMP] = 0.01, batch_size: Annotated[int, BATCH] = 8):
        super().__init__(batch_size)
        thresholds, growth = tuple(change_thresholds), tuple(rho_growth)
        self.rho, self.max_iters, self.update_every = float(rho), int(max_iters), int(update_every)
        self.thresholds, self.growth = thresholds, growth
        self.pcg_iters, self.percdamp = int(pcg_iters), float(percdamp)

    @torch.no_grad()
    def prune_linear(self, name: str, linear: nn.Linear, stats: Hessian, target: Sparsity) -> dict:
        w, info = alps_prune(linear.weight, stats.matrix(), target, self.rho, self.max_iters, self.update_every,
                             self.thresholds, self.growth, self.pcg_iters, self.percdamp)
        linear.weight.copy_(w.to(linear.weight.dtype))
        log.debug("%s: %d ADMM iterations, final rho %.3g, error %.4g", name, info["iterations"],
                  info["final_rho"], info["error"])
        return info

    def summarize(self, per_layer: dict[str, dict]) -> dict:
        its = [v["iterations"] for v in per_layer.values()]
        return {"admm_iterations_mean": sum(its) / max(len(its), 1),
                "not_converged": [k for k, v in per_layer.items() if not v["converged"]],
                "layer_error": {k: v["error"] for k, v in per_layer.items()}}
