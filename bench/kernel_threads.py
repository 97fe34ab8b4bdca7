"""Issue 30: does a batch-1 sparse decode gain from running the compressed kernels on fewer threads than torch?

    python bench/kernel_threads.py [--sparsity 0.9] [--threads 2] [--rounds 5] [--new-tokens 32]

The default model magnitude-pruned at ``--sparsity``, sparsified twice (elsa.artifacts.linear.sparsify, decode
regime), one copy with its compressed kernels on every torch thread (as planned today) and one with each of them
on one thread (its descriptor's thread count set to 1 after planning; torch's own ops keep ``--threads``), timed
against dense fp32 in alternating rounds in one process (elsa.artifacts.generate.compare). Why: at 90% the
kernels' in-model cost per token (~9 ms for 210 calls at 2 threads on this CPU) is far above their one-thread
microbenchmark's (~4.6 ms), which points at the parallel regions' start and the two OpenMP pools (torch's and
the kernels') waking each other's threads, not at the bytes read. One JSON line per run on stdout and appended to
``--out``, with the load average.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402


def _kernels(model: torch.nn.Module) -> list:
    """The compressed kernels a sparsified model's decode runs (each SparseLinear's decode fn, whose ``nd`` is the
    kernel's bound forward_nd)."""
    from elsa.artifacts.kernels import CompressedKernel
    from elsa.artifacts.linear import SparseLinear

    found = []
    for m in model.modules():
        if isinstance(m, SparseLinear):
            k = getattr(getattr(m.kernels["decode"], "nd", None), "__self__", None)
            if isinstance(k, CompressedKernel):
                found.append(k)
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sparsity", default="0.9")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "kernel_threads.jsonl")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from bench_sparse import _prune
    from elsa.artifacts.generate import compare
    from elsa.artifacts.linear import block_linears, sparsify
    from elsa.run.recipe import quiet_third_party_logs

    quiet_third_party_logs()
    source = instantiate(OmegaConf.load(REPO / "conf" / "model" / "smollm2-135m.yaml"))
    dense, tok = source.load()
    ids = tok("The history of the city of Paris begins", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for lin in block_linears(dense).values():
            _prune(lin.weight, a.sparsity)
    models, chosen = {"dense": dense}, {}
    for name in ("sparse_all_threads", "sparse_kernels_1t"):
        models[name] = copy.deepcopy(dense)
        chosen[name] = sparsify(models[name], regimes={"decode": 1})["chosen"]
        mine = _kernels(models[name])
        if name.endswith("_1t"):
            for k in mine:
                k._desc[3] = 1          # elsa_mv reads its thread count from the descriptor (nthreads=0)
        chosen[name]["compressed_kernels"] = len(mine)
    r = compare(models, ids, a.new_tokens, a.rounds, same_as={k: "dense" for k in models if k != "dense"})
    tps = r["decode_tokens_per_s"]
    rec = {"bench": "kernel_threads", "sparsity": a.sparsity, **r, "chosen": chosen,
           "speedup": {k: v / tps["dense"] for k, v in tps.items() if k != "dense"},
           "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "loadavg": os.getloadavg()}
    print(json.dumps(rec))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a") as fh:
        fh.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
