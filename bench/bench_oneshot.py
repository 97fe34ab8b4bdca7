"""One-shot baselines benchmark (issue 3): quality (perplexity) and speed (prune time vs one forward).

    python bench/bench_oneshot.py --out bench/results/oneshot.jsonl            # speed, then the quality grid
    python bench/bench_oneshot.py --report bench/results/oneshot.jsonl         # markdown tables from the log

Everything runs in one process through the real pipeline (composed configs, dense perplexity cached).
Each finished measurement is appended to the JSONL file at once, so a stopped run keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

BASE = ["model=smollm2-135m", "dataset=wiki", "nsamples=64", "seqlen=512", "eval.max_tokens=65536",
        "logger=none", "save_model=false"]
METHODS = ["magnitude", "wanda", "sparsegpt"]
SPARSITIES = ["0.5", "2:4", "0.7", "0.9", "0.6", "0.8"]     # the most telling first


def compose(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS:
    """Peak resident memory while the block runs (sampled every 20 ms)."""

    def __enter__(self):
        self.start = self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def append(out: Path, record: dict) -> None:
    record = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), **record}
    with out.open("a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


@torch.no_grad()
def speed(out: Path, methods, sparsity: str) -> None:
    """Time one plain forward over the calibration tokens, then each method's pruning, same process."""
    from elsa.data.corpora import sample_starts, token_stream, windows
    from elsa.eval.perplexity import bos_id
    from elsa.methods.base import PruneContext
    from elsa.sparsity.plan import PruningPlan
    from elsa.run.recipe import Run, build
    from elsa.sparsity.patterns import Sparsity

    cfg = compose([*BASE, "method=wanda", f"sparsity={sparsity}", "output_dir=/tmp/elsa-bench-speed"])
    job = Run(cfg)
    job.validate()
    model, tok = job.source.load()
    train = token_stream(tok, job.dataset, "train")
    calib = windows(train, cfg.seqlen, bos_id(tok, True), sample_starts(len(train), cfg.nsamples, cfg.seqlen, 0))
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    batch = int(cfg.method.batch_size)
    with PeakRSS() as mem:
        t = time.perf_counter()
        for i in range(0, len(calib), batch):
            model(input_ids=calib[i:i + batch], use_cache=False)
        fwd = time.perf_counter() - t
    append(out, {"kind": "forward", "tokens": calib.numel(), "batch": batch, "seconds": fwd,
                 "peak_rss_mb": mem.peak, "rss_before_mb": mem.start, "threads": torch.get_num_threads()})
    for name in methods:
        model.load_state_dict(dense)
        method = build(compose([*BASE, f"method={name}"]).method, "method")
        target = Sparsity.parse(sparsity)
        method.validate(PruningPlan.build(model, target))
        ctx = PruneContext(model=model, tokenizer=tok, target=target, calibration=calib, seqlen=cfg.seqlen,
                           device="cpu")
        with PeakRSS() as mem:
            t = time.perf_counter()
            method.prune(ctx)
            secs = time.perf_counter() - t
        append(out, {"kind": "speed", "method": name, "sparsity": sparsity, "seconds": secs,
                     "x_forward": secs / fwd, "forward_s": fwd, "peak_rss_mb": mem.peak,
                     "rss_before_mb": mem.start})


def quality(out: Path, methods, sparsities) -> None:
    from elsa.run.recipe import run

    root = Path("/tmp/elsa-bench-quality")
    # No separate method=dense run: every run reports the dense perplexity (computed once, then cached).
    any_dense = [False]
    for sp in sparsities:
        for name in methods:
            res = run(compose([*BASE, f"method={name}", f"sparsity={sp}",
                               f"output_dir={root / (name + '-' + sp.replace(':', 'of'))}"]))
            if not any_dense[0]:
                append(out, {"kind": "quality", "method": "dense", "sparsity": "0",
                             "ppl": res["dense_perplexity"]["wiki"]})
                any_dense[0] = True
            append(out, {"kind": "quality", "method": name, "sparsity": sp, "ppl": res["perplexity"]["wiki"],
                         "dense_ppl": res["dense_perplexity"].get("wiki"), "measured": res["sparsity"]["measured"],
                         "prune_s": res["time_s"].get("prune"), "method_stats": res.get("method_stats")})


def report(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    q = {(r["method"], r["sparsity"]): r for r in rows if r["kind"] == "quality"}
    sps = [s for s in ["0.5", "0.6", "0.7", "0.8", "0.9", "2:4"] if any(k[1] == s for k in q)]
    lines = ["| method | " + " | ".join(sps) + " |", "|---|" + "---:|" * len(sps)] if sps else \
        ["(no quality run finished)"]
    if ("dense", "0") in q and sps:
        lines.append("| dense | " + " | ".join(f"{q['dense', '0']['ppl']:.2f}" for _ in sps) + " |")
    for m in METHODS if sps else []:
        cells = [f"{q[m, s]['ppl']:.2f}" if (m, s) in q else "not run" for s in sps]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    fwd = [r for r in rows if r["kind"] == "forward"]
    speed_rows = [r for r in rows if r["kind"] == "speed"]
    if fwd:
        f = fwd[-1]
        lines += ["", f"Plain forward over the calibration tokens ({f['tokens']} tokens, batches of {f['batch']}): "
                      f"{f['seconds']:.1f} s, peak RSS {f['peak_rss_mb']:.0f} MB.", "",
                  "| method | prune time (s) | x forward | peak RSS while pruning (MB) |", "|---|---:|---:|---:|"]
        for r in speed_rows:
            lines.append(f"| {r['method']} ({r['sparsity']}) | {r['seconds']:.1f} | {r['x_forward']:.2f} | "
                         f"{r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "oneshot.jsonl")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--sparsities", default=",".join(SPARSITIES))
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--report", type=Path, help="print markdown tables from a JSONL log and exit")
    args = ap.parse_args()
    if args.report:
        print(report(args.report))
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    methods = args.methods.split(",")
    append(args.out, {"kind": "start", "argv": sys.argv, "machine": platform.processor() or platform.machine(),
                      "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "loadavg": os.getloadavg()})
    if not args.skip_speed:
        speed(args.out, methods, "0.5")
    if not args.skip_quality:
        quality(args.out, methods, args.sparsities.split(","))


if __name__ == "__main__":
    main()
