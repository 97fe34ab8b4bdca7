"""L-ADMM (Boža, 2024, "Fast and Effective Weight Update for Pruned Large Language Models").

Per Linear, the layer reconstruction  min_Ŵ ||WX - ŴX||²  s.t. Ŵ is zero off a mask, solved by ADMM with a
fixed penalty ρ, while the mask itself is grown gradually:

    Ŵ ← (H + ρI)⁻¹ (H W + ρ (Z - U))      ridge solve (one eigendecomposition of the damped H, reused)
    Z ← (Ŵ + U) ⊙ M_t                     M_t keeps the largest |Ŵ + U| at sparsity s_t
    U ← U + Ŵ - Z                         (scaled dual; ρ is constant)

with the cubic schedule s_t = s · (1 - (1 - t/T)³) for t = 1..T (T = ``grow_iters``), then the mask is
fixed at the target for the remaining ``iters - grow_iters`` iterations. Everything runs in the
unit-diagonal coordinates of :class:`elsa.methods.alps.Reconstruction`, where |Ŵ + U| is the Wanda-like
score |W_ij| · ||X_j||. N:M targets have no intermediate sparsity: the N:M projection is applied from the
first iteration (the mask still moves while the weights settle). The last Z is the exact projection; with
``refit`` its kept weights are re-solved on the fixed support by preconditioned conjugate gradient
(``pcg_iters``), which only lowers the layer error.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from elsa.errors import config_error
from elsa.engines.layerwise import BATCH
from elsa.methods.alps import Reconstruction, project
from elsa.methods.base import Annotated, Flag, Number
from elsa.methods.sparsegpt import PERCDAMP, Hessian, HessianPruner
from elsa.sparsity.patterns import Sparsity

log = logging.getLogger(__name__)


def cubic_sparsity(target: Sparsity, step: int, grow_iters: int) -> Sparsity:
    """The sparsity of stage ``step`` (1-based) of the cubic schedule; the target itself for N:M."""
    if target.is_nm or step >= grow_iters:
        return target
    return Sparsity(ratio=target.ratio * (1.0 - (1.0 - step / grow_iters) ** 3))


@torch.no_grad()
def ladmm_prune(weight: torch.Tensor, h: torch.Tensor, target: Sparsity, rho: float = 1.0, iters: int = 30,
                grow_iters: int = 15, refit: bool = True, pcg_iters: int = 20,
                percdamp: float = 0.01) -> tuple[torch.Tensor, dict]:
    """The pruned weight (float32) and statistics. Does not modify its inputs."""
    prob = Reconstruction(weight, h, percdamp)
    z, u = prob.w.clone(), torch.zeros_like(prob.w)
    keep = torch.ones_like(z, dtype=torch.bool)
    for step in range(1, iters + 1):
        w_hat = prob.ridge(z - u, rho)
        keep = project(w_hat + u, cubic_sparsity(target, step, grow_iters))
        z = (w_hat + u) * keep
        u += w_hat - z
    keep = project(z, target)                    # exact at the target (already so when iters >= grow_iters)
    z = z * keep
    info = {"admm_error": prob.error(z)}
    if refit:
        z = prob.pcg(z, keep, pcg_iters)
    info["error"] = prob.error(z)
    return prob.to_weight(z), info


class LADMM(HessianPruner, name="ladmm", position=8):
    def matrix_flops(self, out_features: int, in_features: int, tokens: int) -> float:
        """The Hessian, one factorisation (~in^3) and iters + grow_iters ADMM solves (4 out in^2 each)."""
        return 2.0 * in_features ** 2 * tokens + in_features ** 3 + \
            4.0 * out_features * in_features ** 2 * (self.iters + self.grow_iters)

    def __init__(self, rho: Annotated[float, Number(gt=0, paper="1")] = 1.0,
                 iters: Annotated[int, Number(gt=0, whole=True)] = 30,
                 grow_iters: Annotated[int, Number(gt=0, whole=True)] = 15, refit: Annotated[bool, Flag()] = True,
                 pcg_iters: Annotated[int, Number(ge=0, whole=True)] = 20,
                 percdamp: Annotated[float, PERCDAMP] = 0.01, batch_size: Annotated[int, BATCH] = 8):
        super().__init__(batch_size)
        if grow_iters > iters:
            raise config_error("method.grow_iters", grow_iters, f"at most method.iters={iters}")
        self.rho, self.iters, self.grow_iters = float(rho), int(iters), int(grow_iters)
        self.refit, self.pcg_iters, self.percdamp = refit, int(pcg_iters), float(percdamp)

    @torch.no_grad()
    def prune_linear(self, name: str, linear: nn.Linear, stats: Hessian, target: Sparsity) -> dict:
        w, info = ladmm_prune(linear.weight, stats.matrix(), target, self.rho, self.iters, self.grow_iters,
                              self.refit, self.pcg_iters, self.percdamp)
        linear.weight.copy_(w.to(linear.weight.dtype))
        log.debug("%s: layer error %.4g (ADMM %.4g)", name, info["error"], info["admm_error"])
        return info

    def summarize(self, per_layer: dict[str, dict]) -> dict:
        return {"layer_error": {k: v["error"] for k, v in per_layer.items()},
                "admm_error": {k: v["admm_error"] for k, v in per_layer.items()}}
