"""LEAP (Mozaffari et al., 2026): an unstructured mask learned end to end on frozen weights.

Every prunable weight has its own logit theta; a training forward samples a relaxed Bernoulli gate by
Gumbel-sigmoid, m = sigmoid((theta * scale + L) / tau) with L logistic noise (the reference's two-way
Gumbel-softmax over (0, theta * scale), the same distribution), tau annealed linearly from 4 to 0.05 and the
scale from 25 to 350 over the steps. theta starts at N(0, 0.014) plus +-1 x its std x ``prior_strength`` (3) on
the prior mask's kept / pruned weights: a one-shot method's mask (``start=wanda``, the reference's) or the
magnitude mask from the dense model. Only theta trains (AdamW at 1e-3, cosine after 5 warmup steps, no weight
decay), on the next-token loss plus ``sparse_reg`` |density - target density| (the soft masks' mean over every
pruned matrix: the global budget) minus ``weight_reg`` (1 - t/T) sum ||m * w|| / sum ||w|| (the weight-aware
term). The reference's final mask is theta > 0, whose density the penalty only approaches; here the final mask
keeps exactly the target's count: the largest theta per matrix at its (allocated) ratio (``group``: the whole
matrix, or per row / column). The final weights are the dense weights times it.
"""
from __future__ import annotations

import torch

from elsa.errors import ElsaError
from elsa.methods.base import GROUP, Annotated, Number
from elsa.methods.learned_mask import RANGE, LearnedMask, schedule


class Leap(LearnedMask, name="leap", position=3):
    """Per-weight Gumbel-sigmoid masks under a density penalty, as hooks of the training engine."""

    train_defaults = {**LearnedMask.train_defaults, "steps": 2000, "batch_size": 8, "grad_accum": 16, "lr": 1e-3,
                      "warmup_steps": 5, "lr_final_ratio": 0.0, "weight_decay": 0.0, "checkpoint_every": 100}

    def __init__(self, gumbel_temperature: Annotated[list, RANGE] = (4.0, 0.05),
                 gumbel_scale: Annotated[list, RANGE] = (25.0, 350.0),
                 prior_strength: Annotated[float, Number(ge=0)] = 3.0, init_std: Annotated[float, Number(gt=0)] = 0.014,
                 sparse_reg: Annotated[float, Number(ge=0)] = 7.0, weight_reg: Annotated[float, Number(ge=0)] = 10.0,
                 group: Annotated[str, GROUP] = "layer", **shared):
        super().__init__(gumbel_temperature, gumbel_scale, prior_strength, init_std, weight_reg, **shared)
        self.sparse_reg, self.group = float(sparse_reg), group
        self.config.update(sparse_reg=sparse_reg, group=group)

    def validate(self, plan) -> None:
        target = plan.target
        if target.is_nm:
            raise ElsaError(f"method=leap learns unstructured masks; sparsity={target} is an N:M pattern (use a "
                            "ratio such as sparsity=0.5, or method=maskllm for N:M masks learned end to end)")
        super().validate(plan)

    # -- the logits: one per weight, the parameter's storage as [-1, last dim] ----------------------------
    def init_logits(self, w, prior):
        sign = prior.float() * 2.0 - 1.0                     # +1 kept, -1 pruned by the prior
        return self.prior_logits(sign.shape, sign).reshape(-1, sign.shape[-1])

    def soft(self, w, logits, step):
        tau = schedule(self.gumbel_temperature, step, self.train.steps)
        scale = schedule(self.gumbel_scale, step, self.train.steps)
        u = torch.rand_like(logits, dtype=torch.float32).clamp_(1e-10, 1.0 - 1e-7)
        noise = torch.log(u) - torch.log1p(-u)               # logistic = the difference of two Gumbels
        return torch.sigmoid((logits.float() * scale + noise) / tau).reshape(w.param.shape)

    def hard(self, name, w, logits):
        return self.plan.mask(name, logits.float().reshape(w.param.shape), self.group)

    # -- the regularisers -----------------------------------------------------------------------------
    def record(self, st, name, weight, mask):
        m = mask.float()
        st.terms[name] = {"kept": m.sum(), "numel": m.numel(),
                          "norm": (weight.detach().float() * m).norm(), "dense_norm": weight.detach().float().norm()}

    def extra_loss(self, run, step):
        """sparse_reg |density - (1 - target)| - weight_reg (1 - t/T) sum ||m w|| / sum ||w||, the reference's."""
        terms = list(run.state.terms.values())
        run.state.terms = {}
        if not terms:
            return None
        density = sum(t["kept"] for t in terms) / sum(t["numel"] for t in terms)
        loss = self.sparse_reg * (density - (1.0 - run.plan.ratio)).abs()
        if self.weight_reg:
            ratio = sum(t["norm"] for t in terms) / sum(t["dense_norm"] for t in terms)
            loss = loss - self.weight_reg * (1.0 - step / self.train.steps) * ratio
            run.state.last["kept_norm_ratio"] = float(ratio.detach())
        run.state.last.update(soft_density=float(density.detach()), regulariser=float(loss.detach()))
        return loss
