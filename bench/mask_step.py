"""The learned masks' own work in a training step, per weight: MaskLLM's Gumbel-softmax sample over its C(M, N)
candidates and LEAP's Gumbel-sigmoid, each through its method's own ``soft``, times a 4096 x 4096 weight, forward
and backward under bf16 autocast (as the training engine runs them on this CPU); and the bytes the sample keeps
for the backward (autograd's saved tensors). One thread, CPU time; the plan's rank-1 rate measured in the same
process, so the ratio is the plan's constant (elsa/run/forecast.py MASK_STEP).

    python bench/mask_step.py [--size 4096] [--reps 3]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _method(name: str):
    """A MaskLLM / LEAP object with only what ``soft`` reads (its schedules and the target), mid-schedule."""
    from elsa.methods.leap import Leap
    from elsa.methods.maskllm import MaskLLM
    from elsa.sparsity.patterns import Sparsity

    cls, target = {"maskllm": (MaskLLM, "2:4"), "leap": (Leap, "0.5")}[name]
    m = object.__new__(cls)
    m.gumbel_temperature, m.gumbel_scale, m.init_std, m.prior_strength = [4.0, 0.05], [100.0, 500.0], 0.01, 3.0
    m.train, m.plan, m.hard_sampling, m.options = SimpleNamespace(steps=100), SimpleNamespace(target=Sparsity.parse(target)), False, None
    return m


def measure(name: str, size: int, reps: int) -> dict:
    torch.set_flush_denormal(True)        # as LearnedMask.setup does while a method trains
    m = _method(name)
    weight = torch.randn(size, size) * 0.02
    w = SimpleNamespace(param=weight, transposed=False)
    prior = weight.abs() > weight.abs().median()
    logits = m.init_logits(w, prior).requires_grad_()
    saved: list[int] = []

    def step():
        saved.clear()
        pack = lambda t: saved.append(t.numel() * t.element_size()) or t  # noqa: E731
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = (weight * m.soft(w, logits, 50)).to(torch.bfloat16)
        y.float().sum().backward()
        logits.grad = None

    step()
    best = float("inf")
    for _ in range(reps):
        t = time.process_time()
        step()
        best = min(best, time.process_time() - t)
    n = weight.numel()
    return {"ns_per_weight": best / n * 1e9, "saved_bytes_per_weight": sum(saved) / n,
            "logits_per_weight": logits.numel() / n}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(1)
    from elsa.run.forecast import probe

    rank1 = probe(1)["rank1"]
    print(f"rank-1 rate {rank1 / 1e9:.1f} GFLOP/s (the plan's vector rate)")
    for name in ("maskllm", "leap"):
        r = measure(name, a.size, a.reps)
        per_logit = r["ns_per_weight"] * 1e-9 * rank1 / r["logits_per_weight"]
        print(f"{name}: {r['ns_per_weight']:.1f} ns a weight ({r['logits_per_weight']:g} logits a weight), "
              f"{per_logit:.0f} vector FLOPs a logit at that rate; saves {r['saved_bytes_per_weight']:.1f} B a weight "
              f"({r['saved_bytes_per_weight'] / r['logits_per_weight']:.1f} a logit) for the backward")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
