"""Where a decode token's time goes on the default model at one sparsity: dense, sparse (the plan's kernels) and the
same model with its pruned matrices free (bench_sparse.py's ceiling), milliseconds a token; then the time spent
inside the sparse Linears during decoding (per token and per call) and each layer-0 matrix's module and bare-kernel
call in a hot loop (medians of alternating rounds). Wall clock; one process.

    python bench/decode_profile.py [--threads 1] [--sparsity 0.9] [--new-tokens 33]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sparsity", default="0.9")
    ap.add_argument("--new-tokens", type=int, default=33)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    import bench_sparse
    from elsa.artifacts.generate import compare, greedy
    from elsa.artifacts.linear import SparseLinear, block_linears, sparsify

    model, tok = instantiate(OmegaConf.load(REPO / "conf" / "model" / "smollm2-135m.yaml")).load()
    ids = tok("The history of the city of Paris begins", return_tensors="pt")["input_ids"]
    clock, steps = time.perf_counter, a.new_tokens - 1
    with torch.no_grad():
        for lin in block_linears(model).values():
            bench_sparse._prune(lin.weight, a.sparsity)
        sparse = copy.deepcopy(model)
        plan = sparsify(sparse)
        print(f"threads {a.threads}, sparsity {a.sparsity}, kernels {plan['chosen']['decode']}")
        models = {"dense": model, "sparse": sparse, "matrices free": bench_sparse._free_matrices(model)}
        for name, m in models.items():
            greedy(m, ids, 3)
        tps = compare(models, ids, a.new_tokens, rounds=3, clock=clock)["decode_tokens_per_s"]
        for name, v in tps.items():
            print(f"{name:14s} {1e3 / v:7.2f} ms a token (median of 3 alternating rounds)")
        inside = [0.0, 0]
        forward = SparseLinear.forward

        def timed(self, x):
            t = clock()
            y = forward(self, x)
            inside[0] += clock() - t
            inside[1] += 1
            return y
        SparseLinear.forward = timed
        try:
            greedy(sparse, ids, a.new_tokens, clock)
        finally:
            SparseLinear.forward = forward
        print(f"inside the sparse Linears (the prompt's forward included): {inside[0] / steps * 1e3:.2f} ms a token, {inside[1] / steps:.0f} calls "
              f"a token, {inside[0] / max(inside[1], 1) * 1e6:.1f} us a call")
        layer0 = [(n, m) for n, m in sparse.named_modules() if isinstance(m, SparseLinear) and ".layers.0." in n]
        calls: dict = {}
        for _ in range(3):
            for name, mod in layer0:
                x = torch.randn(1, 1, mod.in_features)
                kernel = mod.kernels["decode"]
                for _ in range(20):
                    mod(x)
                t = clock()
                for _ in range(300):
                    mod(x)
                tm = (clock() - t) / 300
                t = clock()
                for _ in range(300):
                    kernel(x.view(1, -1))
                calls.setdefault(name, []).append((tm, (clock() - t) / 300))
        for name, v in calls.items():
            mod = dict(layer0)[name]
            print(f"  {name.split('layers.0.')[1]:22s} {mod.out_features}x{mod.in_features}: module "
                  f"{statistics.median(t for t, _ in v) * 1e6:.1f} us, bare kernel {statistics.median(k for _, k in v) * 1e6:.1f} us "
                  "(hot loop, median of 3)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
