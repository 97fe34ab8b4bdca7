"""MaskLLM (Fang et al., NeurIPS 2024): learnable N:M masks on frozen weights, end to end.

Every group of M consecutive inputs of a row has logits over the C(M, N) candidate masks (6 for 2:4). A training
forward samples a soft mask per group by Gumbel-softmax over ``logits * scale`` at temperature ``tau`` (the mix of
the candidates by the sampled probabilities), with tau annealed linearly from 4 to 0.05 and the scale from 100
to 500 over the steps (the reference's 2:4 scripts). The logits start at N(0, 0.01) plus a prior: each
candidate's overlap with the prior mask minus one, times the logits' std times ``prior_strength`` (3), the prior
being a one-shot method's mask (``start=sparsegpt``, the paper's) or the magnitude mask from the dense model.
Only the logits train (AdamW at the reference's 5e-5 x 10 for the logits, cosine to a tenth, weight decay 0.1),
on the next-token loss minus ``weight_reg`` (1 - t/T) sum ||w * m||^2, the reference's sparse weight
regularisation (it keeps the large weights' mass). The final mask of a group is its argmax candidate; the
final weights are the dense weights times it (exact N:M, kept weights bit-identical).
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from elsa.errors import ElsaError
from elsa.methods.base import Annotated, Flag, Number
from elsa.methods.learned_mask import RANGE, LearnedMask, schedule

MAX_CANDIDATES = 1000   # C(M, N) logits per group of M weights: 2:4 has 6, 4:8 70, 8:16 12870 (refused)


def candidates(n: int, m: int) -> torch.Tensor:
    """The C(m, n) keep-masks of a group of m weights with n kept, [C, m] (lexicographic: 1100, 1010, ...)."""
    rows = [[1.0 if i in keep else 0.0 for i in range(m)] for keep in itertools.combinations(range(m), n)]
    return torch.tensor(rows)


class MaskLLM(LearnedMask, name="maskllm", position=2):
    """N:M masks learned by Gumbel-softmax over each group's candidates, as hooks of the training engine."""

    train_defaults = {**LearnedMask.train_defaults, "steps": 2000, "batch_size": 8, "grad_accum": 32, "lr": 5e-4,
                      "warmup_steps": 0, "lr_final_ratio": 0.1, "weight_decay": 0.1, "checkpoint_every": 500}

    def __init__(self, gumbel_temperature: Annotated[list, RANGE] = (4.0, 0.05),
                 gumbel_scale: Annotated[list, RANGE] = (100.0, 500.0),
                 prior_strength: Annotated[float, Number(ge=0)] = 3.0, init_std: Annotated[float, Number(gt=0)] = 0.01,
                 weight_reg: Annotated[float, Number(ge=0)] = 1e-5,
                 hard_sampling: Annotated[bool, Flag("true (straight-through one-hot samples) or false (soft samples, "
                                                     "the reference's default)")] = False, **shared):
        super().__init__(gumbel_temperature, gumbel_scale, prior_strength, init_std, weight_reg, **shared)
        self.hard_sampling = hard_sampling
        self.config.update(hard_sampling=hard_sampling)
        self.options = None

    def validate(self, plan) -> None:
        target = plan.target
        if not target.is_nm:
            raise ElsaError(f"method=maskllm learns N:M masks; sparsity={target} is a ratio (use sparsity=2:4, or "
                            "method=leap for an unstructured mask learned the same way)")
        count = math.comb(target.m, target.n)
        if count > MAX_CANDIDATES:
            raise ElsaError(f"method=maskllm: sparsity={target} has C({target.m},{target.n}) = {count} candidate "
                            f"masks per group of {target.m} weights, one logit each (at most {MAX_CANDIDATES}); "
                            "use a smaller M such as 2:4 or 4:8")
        super().validate(plan)

    # -- the logits: [groups, C] over the matrix view's groups of M inputs ---------------------------------
    def _options(self, target, device=None) -> torch.Tensor:
        if self.options is None or self.options.shape[1] != target.m:
            self.options = candidates(target.n, target.m)
        return self.options.to(device) if device is not None else self.options

    @staticmethod
    def _groups(w, t: torch.Tensor, m: int) -> torch.Tensor:
        """A tensor of the parameter's storage shape as [groups, m] along the inputs of the matrix view."""
        view = t.transpose(-1, -2) if w.transposed else t
        return view.reshape(-1, m)

    @staticmethod
    def _storage(w, groups: torch.Tensor, shape) -> torch.Tensor:
        """Inverse of :meth:`_groups`: [groups, m] back to the parameter's storage shape."""
        view = list(shape)
        if w.transposed:
            view[-1], view[-2] = view[-2], view[-1]
        t = groups.reshape(view)
        return t.transpose(-1, -2) if w.transposed else t

    def init_logits(self, w, prior):
        target = self.plan.target
        options = self._options(target)
        overlap = self._groups(w, prior.float(), target.m) @ options.t()      # [groups, C]: kept in common
        return self.prior_logits(overlap.shape, overlap - 1.0)

    def soft(self, w, logits, step):
        t = self.plan.target
        tau = schedule(self.gumbel_temperature, step, self.train.steps)
        scale = schedule(self.gumbel_scale, step, self.train.steps)
        probs = F.gumbel_softmax(logits.float() * scale, tau=tau, hard=self.hard_sampling, dim=-1)
        return self._storage(w, probs @ self._options(t, logits.device), w.param.shape)

    def hard(self, name, w, logits):
        options = self._options(self.plan.target, logits.device)
        return self._storage(w, options[logits.argmax(-1)], w.param.shape).bool()
