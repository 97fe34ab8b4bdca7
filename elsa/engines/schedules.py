"""Learning-rate multipliers per step (torch LambdaLR): linear warmup, then linear or cosine decay."""
from __future__ import annotations

import math


def linear_schedule(warmup: int, total: int, final_ratio: float = 0.0):
    """LR multiplier: linear warmup over ``warmup`` steps, then linear decay to ``final_ratio`` at ``total``."""
    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        frac = (step - warmup) / max(total - warmup, 1)
        return max(final_ratio, 1.0 - (1.0 - final_ratio) * frac)
    return fn


def cosine_schedule(warmup: int, total: int, final_ratio: float = 0.0):
    """LR multiplier: linear warmup over ``warmup`` steps, then a half cosine down to ``final_ratio`` at ``total``."""
    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        frac = min(max((step - warmup) / max(total - warmup, 1), 0.0), 1.0)
        return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * frac))
    return fn
