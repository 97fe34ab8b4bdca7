"""Sparse inference benchmark (issues 16, 30): dense against the sparse kernels, side by side in one process.

    python bench/bench_sparse.py matrices [--sparsities 0.5,0.7,0.9,2:4] [--dtypes float32,bfloat16] [--threads 1]
    python bench/bench_sparse.py model    [--sparsities 0.5,0.7,0.9,2:4] [--new-tokens 32] [--bf16 auto] [--threads 1]
    python bench/bench_sparse.py report bench/results/sparse.jsonl

``matrices`` (CPU, issue 30): single matrices of a 7B model's shapes (4096x4096, 11008x4096, 4096x11008; random
weights, magnitude-pruned per matrix) at batch 1: dense in each dtype, dense fp32 and each decode kernel
(``bitmask``, ``nm``: the compressed layouts; ``csr16``) timed in interleaved rounds (medians of ``--reps``),
and the kernel the plan chooses (elsa.artifacts.linear.plan_matrix: the bytes model checked by measurement).
``--device cuda``: issue 16's bench (every kernel through plan_matrix's timed choice, batch 1 and ``--prefill``).
``model``: the default model (SmolLM2-135M fp32), magnitude-pruned at each target, as dense fp32, sparse fp32
(elsa.artifacts.linear.sparsify, planned twice to check that the plan repeats) and, where the CPU has bf16
arithmetic, dense bf16 and sparse with bf16 values: batch-1 greedy decode tokens/s (KV cache, ``--new-tokens``
after a short prompt), all four alternating in rounds in one process (``--prefill N``: also an N-token forward).
Each measurement is appended to the JSONL file with the machine's load average (``os.getloadavg``): other jobs
on the machine slow both sides, so absolute figures are upper bounds and the side-by-side ratios are what count.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

from elsa.artifacts import generate  # noqa: E402

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
    from elsa.sparsity.patterns import Sparsity, mask_from_scores

    weight.mul_(mask_from_scores(weight.abs(), Sparsity.parse(target if ":" in target else float(target))))
    weight.masked_fill_(weight == 0, 0.0)      # -0.0 -> +0.0


@torch.no_grad()
def bench_matrices(args) -> None:
    """Each matrix through the selection itself (elsa.artifacts.linear.plan_matrix): every kernel's time per regime
    and the kernel chosen, so the figures are what sparsify sees."""
    from elsa.artifacts.linear import plan_matrix

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


def bench_decode_matrices(args) -> None:
    """CPU, batch 1 (issue 30): each 7B-shaped matrix pruned per target, every decode kernel in each dtype timed
    side by side with dense in the same dtype and with dense fp32 (medians of ``--reps`` interleaved calls), and
    the kernel the plan (the bytes model, checked by measurement) chooses."""
    from elsa.artifacts.linear import DECODE_ONLY, candidates, evictor, interleaved_timer, plan_matrix

    # --cold: the caches evicted before every timed call (elsa.artifacts.linear.evictor): in a model's decode every
    # matrix comes from memory, while a matrix timed again and again stays in L3 where it fits (4096x4096 fp32 is
    # 64 MiB), which makes dense look faster than it is in a model
    evict = evictor() if args.cold else None
    for rows, cols in SHAPES:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(rows, cols, generator=g) / cols ** 0.5
        for target in args.sparsities:
            wt = w.clone()
            _prune(wt, target)
            x32 = torch.randn(1, cols, generator=g)
            ref = {"dense_fp32": (lambda: torch.nn.functional.linear(x32, wt))}
            for dt in args.dtypes:
                wd = wt.to(getattr(torch, dt))
                x = x32.to(wd.dtype)
                fns, skipped = candidates(wd, None, only={*DECODE_ONLY, "csr16"})
                fns.pop("torch_csr", None)
                run = {**ref, **{k: (lambda f=f: f(x)) for k, f in fns.items()}}
                t = interleaved_timer(run, reps=args.reps, warmup=2, median=True, before=evict,
                                      clock=time.thread_time if args.clock == "cpu" else time.perf_counter)
                plan, _ = plan_matrix(wd, None, {"decode": 1}, kernels=set(DECODE_ONLY))
                _append(args.out, {"bench": "decode_matrix", "shape": [rows, cols], "sparsity": target, "tokens": 1,
                                   "dtype": dt, "us": {k: v * 1e6 for k, v in t.items()},
                                   "speedup": {k: t["dense"] / v for k, v in t.items() if k not in ("dense", "dense_fp32")},
                                   "speedup_vs_fp32": {k: t["dense_fp32"] / v for k, v in t.items() if k != "dense_fp32"},
                                   "chosen": plan["decode"], "bytes_model": plan.get("bytes_model", {}).get("decode"),
                                   "clock": args.clock, "cold": bool(args.cold),
                                   "skipped": {k: v for k, v in skipped.items() if k in (*DECODE_ONLY, "csr16")},
                                   **_env()})


class _Free(torch.nn.Module):
    """A block matrix that costs nothing (its output's shape in zeros): a model of these decodes at the ceiling
    that any kernel for the pruned matrices can reach (the lm_head, attention, norms and the per-token Python
    of the HF code stay)."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


def _free_matrices(model: torch.nn.Module) -> torch.nn.Module:
    from elsa.artifacts.linear import block_linears, matrix_view

    free = copy.deepcopy(model)
    for name, lin in block_linears(free).items():
        parent, _, child = name.rpartition(".")
        setattr(free.get_submodule(parent), child, _Free(matrix_view(lin).shape[0]))
    return free


def _checked_ratios(plan: dict) -> dict:
    """Per measured class (the matrix it was measured on): the bytes model's measured speed-ups over dense and
    the choice, so a plan that differs between runs shows how near its thresholds (VETO, BYTES_TIE) it sat."""
    out = {}
    for name, p in plan["matrices"].items():
        bm = p.get("bytes_model", {}).get("decode")
        if bm and bm.get("checked"):
            out[name] = {**bm["checked"], "chosen": p.get("decode")}
    return out


def _per_matrix(plan: dict) -> dict:
    return {n: {r: p.get(r) for r in plan["regimes"]} for n, p in plan["matrices"].items()}


@torch.no_grad()
def bench_model(args) -> None:
    """The default model pruned per target: dense fp32, sparse fp32 and (``--bf16``, default where the CPU has bf16
    arithmetic) dense bf16 and sparse with bf16 values, all in one process, alternating rounds. Each dense model
    runs its matrices in the faster of their two layouts (elsa.artifacts.linear.dense_layouts), and each sparse
    model its dense ones (the head) as its dense model does; ``dense_stock`` is the fp32 model in torch's layout
    (``speedup_vs_dense_stock``). Each sparse copy
    is planned twice from scratch: ``same_plan`` says whether the two per-matrix plans agree, ``plan_sha`` is a hash
    of each (compare it across runs)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from elsa.artifacts.generate import compare, cpu_has_bf16, layout_summary
    from elsa.artifacts.linear import block_linears, dense_layouts, sparsify

    regimes = {"decode": 1, **({"prefill": args.prefill} if args.prefill else {})}
    bf16 = cpu_has_bf16() if args.bf16 == "auto" else args.bf16 == "yes"
    source = instantiate(OmegaConf.load(REPO / "conf" / "model" / "smollm2-135m.yaml"))
    base, tok = source.load()
    ids = tok("The history of the city of Paris begins", return_tensors="pt")["input_ids"]
    for target in args.sparsities:
        dense = copy.deepcopy(base)
        for lin in block_linears(dense).values():
            _prune(lin.weight, target)
        stock = {"dense": dense, **({"dense_bf16": copy.deepcopy(dense).to(torch.bfloat16)} if bf16 else {})}
        rec = {"plan_s": {}, "kernels": {}, "same_plan": {}, "verified_in_model": {}, "dense_layout": {}}
        models, same_as = {}, {}
        for name, src in stock.items():
            # the dense baseline at its best (each dense matrix in the faster of its layouts: dense_layouts, the
            # same choice for the sparse model's dense matrices); the fp32 model in torch's layout beside it
            best = copy.deepcopy(src, {id(p): p for p in src.parameters()})
            layouts = dense_layouts(best)
            rec["dense_layout"][name] = layout_summary(layouts)
            models[name] = best
            if name == "dense" and args.stock:
                models["dense_stock"] = src
            sname = name.replace("dense", "sparse")
            plans = []
            for _ in range(2):
                sparse = copy.deepcopy(src)
                t = time.perf_counter()
                plans.append(sparsify(sparse, regimes=regimes))
                dense_layouts(sparse, saved=layouts)
                rec["plan_s"][sname] = time.perf_counter() - t
            rec["same_plan"][sname] = _per_matrix(plans[0]) == _per_matrix(plans[1])
            rec.setdefault("plan_sha", {})[sname] = [hashlib.sha256(json.dumps(_per_matrix(p), sort_keys=True)
                                                                   .encode()).hexdigest()[:12] for p in plans]
            rec["kernels"][sname] = [p["chosen"] for p in plans]
            rec.setdefault("checked", {})[sname] = [_checked_ratios(p) for p in plans]
            rec["verified_in_model"][sname] = plans[1]["verified_in_model"]
            models[sname], same_as[sname] = sparse, name      # the second plan's model runs
            if args.ceiling:
                free = _free_matrices(src)
                dense_layouts(free, saved=layouts)
                models[name.replace("dense", "free")] = free
        r = compare(models, ids, args.new_tokens, args.rounds, args.prefill or None, same_as,
                    clock=time.thread_time if args.clock == "cpu" else time.perf_counter, compile=args.compile)
        r["clock"] = args.clock
        tps = r["decode_tokens_per_s"]
        r["speedup"] = {k: tps[k] / tps[k.replace("sparse", "dense")] for k in tps if k.startswith("sparse")}
        r["speedup_vs_dense_fp32"] = {k: v / tps["dense"] for k, v in tps.items() if k != "dense"}
        if "dense_stock" in tps:
            r["speedup_vs_dense_stock"] = {k: v / tps["dense_stock"] for k, v in tps.items() if k.startswith("sparse")}
        if args.ceiling:     # the most any kernel could give: every pruned matrix free, the rest as it is
            r["ceiling"] = {k.replace("free", "sparse"): tps[k] / tps[k.replace("free", "dense")]
                            for k in tps if k.startswith("free")}
        _append(args.out, {"bench": "decode_model", "model": "smollm2-135m", "sparsity": target, **r, **rec,
                           **_env()})
        del models, dense, sparse


def report_decode(rows: list[dict]) -> list[str]:
    """The issue-30 tables: decode kernels per matrix and dtype; the model in fp32 and bf16."""
    lines = ["| shape | sparsity | dtype | dense (us) | dense fp32 (us) | bitmask | nm | csr | csr16 | chosen | chosen vs "
             "same dtype | chosen vs fp32 | clock | load |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["bench"] != "decode_matrix":
            continue
        sp = r["speedup"]
        cell = lambda k: f"{sp[k]:.2f}x" if k in sp else "-"  # noqa: E731
        ch = r["chosen"]
        lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['sparsity']} | {r['dtype']} | {r['us']['dense']:.0f} | "
                     f"{r['us']['dense_fp32']:.0f} | {cell('bitmask')} | {cell('nm')} | {cell('csr')} | {cell('csr16')} | {ch} | "
                     f"{r['us']['dense'] / r['us'][ch]:.2f}x | {r['us']['dense_fp32'] / r['us'][ch]:.2f}x | "
                     f"{r.get('clock', 'wall')} | {r['loadavg'][0]:.1f} |")
    lines += ["", "| sparsity | threads | tok/s dense fp32 | sparse fp32 | speedup | dense bf16 | sparse bf16 | speedup "
              "| sparse bf16 vs dense fp32 | ceiling fp32; bf16 | same tokens | same plan twice | decode kernels (fp32; bf16) "
              "| clock | load |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["bench"] != "decode_model":
            continue
        t, sp = r["decode_tokens_per_s"], r["speedup"]
        f = lambda d, k, fmt="{:.1f}": fmt.format(d[k]) if k in d else "-"  # noqa: E731
        lines.append(f"| {r['sparsity']} | {r['threads']} | {t['dense']:.1f} | {t['sparse']:.1f} | {sp['sparse']:.2f}x | "
                     f"{f(t, 'dense_bf16')} | {f(t, 'sparse_bf16')} | {f(sp, 'sparse_bf16', '{:.2f}x')} | "
                     f"{f(r['speedup_vs_dense_fp32'], 'sparse_bf16', '{:.2f}x')} | "
                     f"{'; '.join(f'{v:.2f}x' for v in r.get('ceiling', {}).values()) or '-'} | {r['same_tokens_as']} | "
                     f"{r['same_plan']} | {'; '.join(str(k[-1]['decode']) for k in r['kernels'].values())} | "
                     f"{r.get('clock', 'wall')} | {r['loadavg'][0]:.1f} |")
    return lines


MODEL_TARGETS = {"0.9": {"sparse": 2.4, "sparse_bf16": 1.6}, "0.7": {"sparse": 1.2, "sparse_bf16": 1.2},
                 "2:4": {"sparse": 1.2, "sparse_bf16": 1.2}, "0.5": {"sparse": 1.0, "sparse_bf16": 1.0}}
MATRIX_TARGET = 5.0      # issue 30: 7B-shaped matrices at 90%, batch 1, against dense in the same dtype


def round_spread(r: dict) -> float | None:
    """The widest spread (fastest round / slowest) of one model's decode rounds in a decode_model row (None for
    rows before the rounds were recorded)."""
    return generate.round_spread(r.get("decode_rounds"))


def robust_ratios(r: dict, sparse: str) -> str:
    """A decode_model row's ``sparse`` against its dense partner read two ways that a burst of outside load on one
    round moves less than the medians' ratio: the median of the per-round ratios (each round's sparse rate over
    the same round's dense rate; the rounds alternate) and the ratio of the two fastest rounds ("-" for rows
    before the rounds were recorded)."""
    rounds = r.get("decode_rounds", {})
    s, d = rounds.get(sparse), rounds.get(sparse.replace("sparse", "dense"))
    if not s or not d:
        return "-"
    return f"{statistics.median(a / b for a, b in zip(s, d)):.2f}x; {max(s) / max(d):.2f}x"


def accept_report(rows: list[dict]) -> list[str]:
    """Issue 30's acceptance figures from one file (bench/accept30.sh): per sparsity and run, sparse fp32 against
    dense fp32 and sparse with bf16 values against dense bf16, each with its target; whether every plan of a
    sparsity and dtype (two per run) hashed the same; the 7B-shaped matrices at 90% against dense in the same
    dtype. ``met`` compares a figure with its target and nothing else; ``rounds spread`` says whether the machine
    was quiet while the row ran (above elsa.artifacts.generate.STEADY: it was not, and the row says so), and two
    readings less moved by such load stand beside it (:func:`robust_ratios`)."""
    def mark(v: float, t: float) -> str:     # 3 decimals where 2 would round a miss up to its target
        digits = 3 if v < t and round(v, 2) >= t else 2
        return f"{v:.{digits}f}x ({'met' if v >= t else 'NOT met'}: >= {t}x)"
    lines = ["| sparsity | run | threads | dense fp32 tok/s (torch's layout) | sparse fp32 vs dense fp32 | "
             "vs dense fp32 in torch's layout | dense bf16 tok/s | sparse bf16 vs dense bf16 | ceiling fp32; bf16 | "
             "same greedy tokens fp32; bf16 | rounds spread | fp32 per-round median; fastest rounds | "
             "bf16 per-round median; fastest rounds | load |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    model = [r for r in rows if r["bench"] == "decode_model"]
    shas: dict = {}
    for sp in MODEL_TARGETS:
        for i, r in enumerate(x for x in model if x["sparsity"] == sp):
            t, s, tg = r["decode_tokens_per_s"], r["speedup"], MODEL_TARGETS[sp]
            for k, v in r.get("plan_sha", {}).items():
                shas.setdefault((sp, k), set()).update(v)
            bf = (f"{t['dense_bf16']:.1f} | {mark(s['sparse_bf16'], tg['sparse_bf16'])}" if "sparse_bf16" in s
                  else "- | -")
            ceil = "; ".join(f"{v:.2f}x" for v in r.get("ceiling", {}).values()) or "-"
            stock = r.get("speedup_vs_dense_stock", {}).get("sparse")    # rows before the layouts: none
            same = "; ".join(str(v) for v in r.get("same_tokens_as", {}).values()) or "-"
            stock_tps = f" ({t['dense_stock']:.1f})" if "dense_stock" in t else ""
            lines.append(f"| {sp}{' (compiled)' if r.get('compiled') else ''} | {i + 1} | {r['threads']} | "
                         f"{t['dense']:.1f}{stock_tps} | "
                         f"{mark(s['sparse'], tg['sparse'])} | {'-' if stock is None else f'{stock:.2f}x'} | "
                         f"{bf} | {ceil} | {same} | {generate.steadiness(r.get('decode_rounds'))} | "
                         f"{robust_ratios(r, 'sparse')} | "
                         f"{robust_ratios(r, 'sparse_bf16')} | {r['loadavg'][0]:.1f} |")
    lines += ["", "Plans (every plan of a sparsity and dtype, two per run, hashed): " + "; ".join(
        f"{sp} {k}: {'the same' if len(v) == 1 else 'DIFFER ' + ', '.join(sorted(v))}" for (sp, k), v in shas.items())]
    lines += ["", "| shape | dtype | caches | dense (us) | chosen | chosen vs dense, same dtype | load |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["bench"] == "decode_matrix" and r["sparsity"] == "0.9":
            us, caches = r["us"], "evicted before each call" if r.get("cold") else "kept between calls"
            lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['dtype']} | {caches} | {us['dense']:.0f} | "
                         f"{r['chosen']} | {mark(us['dense'] / us[r['chosen']], MATRIX_TARGET)} | "
                         f"{r['loadavg'][0]:.1f} |")
    return lines


def report(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if any(r["bench"].startswith("decode_") for r in rows):
        return "\n".join(report_decode(rows))
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
    parser.add_argument("what", choices=["matrices", "model", "report", "accept"])
    parser.add_argument("path", nargs="?", type=Path, help="report, accept: the JSONL file")
    parser.add_argument("--sparsities", default="0.5,0.7,0.9,2:4", type=lambda s: s.split(","))
    parser.add_argument("--prefill", type=int, default=0,
                        help="also plan and time a forward of this many tokens (0: decode only; cuda matrices: 512)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=31)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="matrices: cpu or cuda (semi-structured 2:4, cuSPARSE CSR)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="matrices on cuda: the weights' dtype (the CUDA 2:4 kernels take float16/bfloat16)")
    parser.add_argument("--dtypes", default="float32,bfloat16", type=lambda s: s.split(","),
                        help="matrices on cpu: the dtypes of the weights (each timed against dense fp32 too)")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="wall time, or this thread's CPU time (with --threads 1 only: the work without the waits "
                             "for a core on a shared machine; the plan's own check stays on wall time)")
    parser.add_argument("--cold", action=argparse.BooleanOptionalAction, default=False,
                        help="matrices on cpu: evict the caches before every timed call (a model's decode streams "
                             "every matrix from memory); --no-cold: the matrix stays cached between calls")
    parser.add_argument("--ceiling", action=argparse.BooleanOptionalAction, default=True,
                        help="model: also time each dense model with its pruned matrices free (zeros, no work): "
                             "the speedup no kernel can pass, the rest of the token being the same")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                        help="model: every model (dense and sparse alike) under torch.compile, each compiled by one "
                             "untimed decode first (2-3 minutes a model at 2 threads on the default model)")
    parser.add_argument("--stock", action=argparse.BooleanOptionalAction, default=True,
                        help="model: also the fp32 model in torch's layout (dense_stock); --no-stock leaves it out")
    parser.add_argument("--bf16", default="auto", choices=["auto", "yes", "no"],
                        help="model: also dense bf16 against sparse with bf16 values (auto: where the CPU has bf16)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "sparse.jsonl")
    args = parser.parse_args()
    if args.what in ("report", "accept"):
        path = args.path or args.out
        if args.what == "accept":
            print("\n".join(accept_report([json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()])))
        else:
            print(report(path))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and torch.get_num_threads() != 1:
        print(f"elsa: error: --clock=cpu is not allowed with {torch.get_num_threads()} threads: it needs --threads 1 "
              "(one thread's CPU time)", file=sys.stderr)
        return 2
    from elsa.run.recipe import quiet_third_party_logs

    quiet_third_party_logs()
    if args.what == "matrices" and args.device == "cpu":
        bench_decode_matrices(args)
    else:
        if args.what == "matrices":
            args.prefill = args.prefill or 512
        (bench_matrices if args.what == "matrices" else bench_model)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
