"""SparseLLM's cost per alternation on one gated MLP of the default model's shape (run by hand; figures go to
docs/results.md with the command that produced them).

    python bench/bench_sparsellm.py [--tokens 16384] [--alternations 3] [--threads 1] [--ref OLD.py]

Builds a random SiLU-gated MLP (hidden 576, intermediate 1536: SmolLM2-135M's), its dense output on Gaussian
tokens, and times each phase of SparseLLM's alternations (P, U, S updates, least squares + SparseGPT for the
three weights, objective, MLP error) at 90% sparsity. ``--ref`` times another copy of the module the same way
in the same process, alternating the two, and prints both objectives, so that an optimisation can be checked
to reach the same numbers. Example: the code before commit fe5a388 (its validator has moved since),
    git show fe5a388~1:elsa/methods/sparsellm.py \
      | sed 's/from elsa.methods.alps import check_positive/from elsa.errors import positive as check_positive/' \
      > /tmp/sparsellm_old.py
    python bench/bench_sparsellm.py --ref /tmp/sparsellm_old.py
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from elsa.methods import sparsellm  # noqa: E402
from elsa.sparsity.patterns import Sparsity  # noqa: E402


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(hidden, inner, bias=False), nn.Linear(hidden, inner, bias=False)
        self.down_proj, self.act_fn = nn.Linear(inner, hidden, bias=False), nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def load(path: str):
    spec = importlib.util.spec_from_file_location("sparsellm_ref", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=16384, help="calibration tokens (field: 32 x 512)")
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--inner", type=int, default=1536)
    parser.add_argument("--alternations", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ref", default=None, help="another sparsellm.py to time next to this one")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    mlp = GatedMLP(args.hidden, args.inner)
    x = torch.randn(args.tokens, args.hidden)
    with torch.no_grad():
        y = mlp(x)
    target = Sparsity(0.9)
    impls = {"this": sparsellm}
    if args.ref:
        impls["ref"] = load(args.ref)
    def problem(module):
        if hasattr(module, "MLPProblem"):
            return module.MLPProblem(mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn, x, y, 0.1, 0.1, 0.1)
        return module.GatedMLPProblem(mlp, x, y, 0.1, 0.1, 0.1)    # the code before the plain-MLP commit

    problems = {k: problem(m) for k, m in impls.items()}
    totals = {k: [] for k in impls}
    print(f"{args.tokens} tokens, MLP {args.hidden}x{args.inner}, 90%, {args.threads} thread(s)")
    with torch.no_grad():
        for it in range(args.alternations):
            for name, prob in problems.items():
                phases = {"P": prob.update_p, "U": prob.update_u, "S": prob.update_s,
                          "weights": lambda p=prob: p.update_weights(target, 128, 0.01, "mlp"),
                          "objective": prob.objective, "mlp error": prob.mlp_error}
                times = {phase: timed(fn) for phase, fn in phases.items()}
                totals[name].append(sum(times.values()))
                print(f"[{name}] alternation {it + 1}: {sum(times.values()):.2f} s  "
                      + "  ".join(f"{k} {v:.2f}" for k, v in times.items())
                      + f"  objective {prob.objective():.6g}  MLP error {prob.mlp_error():.6g}", flush=True)
    for name, values in totals.items():
        print(f"[{name}] median {statistics.median(values):.2f} s per alternation")


if __name__ == "__main__":
    main()
