"""Where the default model's sparse decode spends its matrix time, in CPU time of one thread (robust to a shared
machine's other jobs): the 210 pruned matrices' kernels called back to back in model order (the whole set streams
from memory: 53 MB at 90% fp32, more than stays cached between two passes), the same after the tied head's
matrix-vector product (113 MB), the head alone, each matrix class's kernel in a hot loop (L2-resident: the
kernel's compute), and the greedy decode of dense, sparse and sparse with its matrices free.

    python bench/decode_sequence.py [--sparsity 0.9]
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
    ap.add_argument("--sparsity", default="0.9")
    a = ap.parse_args()
    torch.set_num_threads(1)
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    import bench_sparse
    from elsa.artifacts.generate import compare, greedy
    from elsa.artifacts.linear import SparseLinear, block_linears, sparsify

    clk = time.thread_time
    dense, tok = instantiate(OmegaConf.load(REPO / "conf" / "model" / "smollm2-135m.yaml")).load()
    with torch.no_grad():
        for lin in block_linears(dense).values():
            bench_sparse._prune(lin.weight, a.sparsity)
        sparse = copy.deepcopy(dense)
        plan = sparsify(sparse)
    mods = [m for m in sparse.modules() if isinstance(m, SparseLinear)]
    print(f"one thread, CPU time; sparsity {a.sparsity}; kernels {plan['chosen']['decode']}")
    xs = [torch.randn(1, 1, m.in_features) for m in mods]
    head = sparse.lm_head.weight
    res = {"matrices back to back": [], "the same after the head": [], "the head": []}
    with torch.inference_mode():
        def seq():
            for m, x in zip(mods, xs):
                m(x)
        for _ in range(15):
            t = clk(); seq(); res["matrices back to back"].append(clk() - t)
            torch.nn.functional.linear(torch.randn(1, head.shape[1]), head)
            t = clk(); seq(); res["the same after the head"].append(clk() - t)
            t = clk(); torch.nn.functional.linear(torch.randn(1, head.shape[1]), head); res["the head"].append(clk() - t)
        for k, v in res.items():
            print(f"{k:28s} {statistics.median(v) * 1e3:7.2f} ms (median of 15)")
        hot, seen = 0.0, {}
        for m, x in zip(mods, xs):
            key = (m.out_features, m.in_features)
            if key not in seen:
                m(x)
                ts = []
                for _ in range(7):
                    t = clk()
                    for _ in range(200):
                        m(x)
                    ts.append((clk() - t) / 200)
                seen[key] = statistics.median(ts)
                print(f"  {key[0]}x{key[1]} hot loop {seen[key] * 1e6:6.1f} us a call")
            hot += seen[key]
        print(f"{'the hot loops summed':28s} {hot * 1e3:7.2f} ms")
        ids = tok("The history of the city of Paris begins", return_tensors="pt")["input_ids"]
        models = {"dense": dense, "sparse": sparse, "matrices free": bench_sparse._free_matrices(dense)}
        for m in models.values():
            greedy(m, ids, 3)
        tps = compare(models, ids, 33, rounds=5, clock=clk)["decode_tokens_per_s"]
        for k, v in tps.items():
            print(f"{k:28s} {1e3 / v:7.2f} ms a token (median of 5 alternating rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
