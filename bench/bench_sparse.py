"""Sparse inference benchmark (issue 16): dense against the sparse kernels, side by side in one process.

    python bench/bench_sparse.py matrices [--sparsities 0.5,0.7,0.9,2:4] [--out bench/results/sparse.jsonl]
    python bench/bench_sparse.py model    [--sparsities 0.5,0.7,0.9,2:4] [--new-tokens 32] [--prefill 512]
    python bench/bench_sparse.py report bench/results/sparse.jsonl

``matrices``: single matrices of a 7B model's shapes (4096x4096, 11008x4096, 4096x11008; random weights, magnitude
pruned per matrix), every kernel timed at batch 1 (decode) and at ``--prefill`` tokens in interleaved rounds
through elsa.sparse_linear.plan_matrix (dense: first quartile, others: third), and the kernel it chooses.
``model``: the default model (SmolLM2-135M fp32), magnitude-pruned at each target, sparsified
(elsa.sparse_linear.sparsify: per matrix, the kernel measured fastest) and run against the dense-kernel copy of
the same pruned weights: batch-1 greedy decode tokens/s (KV cache, ``--new-tokens`` after a short prompt) and one
``--prefill``-token forward, alternating dense and sparse rounds.
Each measurement is appended to the JSONL file with the machine's load average (``os.getloadavg``): other jobs
on the machine slow both sides, so absolute figures are upper bounds and the side-by-side ratios are what count.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]


def _env() -> dict:
    return {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "loadavg": os.getloadavg(),
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine()}


def _append(out: Path, rec: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as fh:
        fh.write(json.dumps(rec) + "\n")
    print(json.dumps(rec), flush=True)


def _prune(weight: torch.Tensor, target: str) -> None:
    from elsa.sparsity import Sparsity, mask_from_scores

    weight.mul_(mask_from_scores(weight.abs(), Sparsity.parse(target if ":" in target else float(target))))
    weight.masked_fill_(weight == 0, 0.0)      # -0.0 -> +0.0


@torch.no_grad()
def bench_matrices(args) -> None:
    """Each matrix through the selection itself (elsa.sparse_linear.plan_matrix): every kernel's time per regime
    and the kernel chosen, so the figures are what sparsify sees."""
    from elsa.sparse_linear import plan_matrix

    dtype = getattr(torch, args.dtype)
    for rows, cols in SHAPES:
        g = torch.Generator().manual_seed(0)
        w = (torch.randn(rows, cols, generator=g) / cols ** 0.5).to(args.device, dtype)
        for target in args.sparsities:
            wt = w.clone()
            _prune(wt, target)
            plan, _fns = plan_matrix(wt, None, {"decode": 1, "prefill": args.prefill})
            del _fns
            for regime, tokens in (("decode", 1), ("prefill", args.prefill)):
                us = plan["times_us"][regime]
                _append(args.out, {"bench": "matrix", "shape": [rows, cols], "sparsity": target, "tokens": tokens,
                                   "device": args.device, "dtype": args.dtype,
                                   "dense_ms": us["dense"] / 1e3,
                                   "speedup": {k: us["dense"] / v for k, v in us.items() if k != "dense"},
                                   "screened": plan.get("screened", {}).get(regime, []),
                                   "rejected": plan["rejected"], "chosen": plan[regime],
                                   "chosen_speedup": us["dense"] / us[plan[regime]], "skipped": plan["skipped"],
                                   **_env()})


@torch.no_grad()
def bench_model(args) -> None:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from elsa.generate import side_by_side
    from elsa.sparse_linear import block_linears, sparsify

    source = instantiate(OmegaConf.load(REPO / "conf" / "model" / "smollm2-135m.yaml"))
    base, tok = source.load()
    ids = tok("The history of the city of Paris begins", return_tensors="pt")["input_ids"]
    for target in args.sparsities:
        dense = copy.deepcopy(base)
        for lin in block_linears(dense).values():
            _prune(lin.weight, target)
        sparse = copy.deepcopy(dense)
        t = time.perf_counter()
        plan = sparsify(sparse, regimes={"decode": 1, "prefill": args.prefill})
        plan_s = time.perf_counter() - t
        r = side_by_side(dense, sparse, ids, args.new_tokens, rounds=args.rounds, prefill_tokens=args.prefill)
        _append(args.out, {"bench": "model", "model": "smollm2-135m", "sparsity": target, **r,
                           "kernels": plan["chosen"], "plan_s": plan_s, **_env()})
        del dense, sparse


def report(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    lines = ["| device | dtype | shape | sparsity | tokens | dense (ms) | torch_csr | csr16 | csr16_1t | semi_structured | "
             "chosen | chosen speedup | load |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["bench"] != "matrix":
            continue
        sp = r["speedup"]
        cell = lambda k: f"{sp[k]:.2f}x" if k in sp else "-"  # noqa: E731
        lines.append(f"| {r.get('device', 'cpu')} | {r.get('dtype', 'float32')} | {r['shape'][0]}x{r['shape'][1]} | "
                     f"{r['sparsity']} | {r['tokens']} | {r['dense_ms']:.3f} | "
                     f"{cell('torch_csr')} | {cell('csr16')} | {cell('csr16_1t')} | {cell('semi_structured')} | {r['chosen']} | "
                     f"{r['chosen_speedup']:.2f}x | {r['loadavg'][0]:.1f} |")
    lines += ["", "| model | sparsity | decode tok/s dense | sparse | speedup | prefill (s) dense | sparse | speedup | "
              "same tokens | decode kernels | prefill kernels | load |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["bench"] != "model":
            continue
        d, p = r["decode_tokens_per_s"], r.get("prefill_s", {})
        lines.append(f"| {r['model']} | {r['sparsity']} | {d['dense']:.1f} | {d['sparse']:.1f} | {r['decode_speedup']:.2f}x | "
                     f"{p.get('dense', float('nan')):.3f} | {p.get('sparse', float('nan')):.3f} | "
                     f"{r.get('prefill_speedup', float('nan')):.2f}x | {r['same_tokens']} | {r['kernels']['decode']} | "
                     f"{r['kernels']['prefill']} | {r['loadavg'][0]:.1f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["matrices", "model", "report"])
    parser.add_argument("path", nargs="?", type=Path, help="report: the JSONL file")
    parser.add_argument("--sparsities", default="0.5,0.7,0.9,2:4", type=lambda s: s.split(","))
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="matrices: cpu or cuda (semi-structured 2:4, cuSPARSE CSR)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="matrices: the weights' dtype (the CUDA 2:4 kernels take float16/bfloat16)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "sparse.jsonl")
    args = parser.parse_args()
    if args.what == "report":
        print(report(args.path or args.out))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    from elsa.pipeline import quiet_third_party_logs

    quiet_third_party_logs()
    (bench_matrices if args.what == "matrices" else bench_model)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
