"""Issue 27's table: every method on ONE 7B-shaped decoder block (model=shapes) at 16 x 2048 calibration tokens,
with the plan's prediction (python -m elsa.plan) beside each measured cell. Resumable: each cell runs run.py in
its own dir under ``--root`` and is skipped once its results.json says done; every start, end and figure goes to
``<root>/bench_shapes.log``; ``--table`` prints the markdown table of what is done.

    python bench/bench_shapes.py                          # every cell not yet done, in the table's order
    python bench/bench_shapes.py --only llama2-7b:wanda   # some cells (like:method, comma separated)
    python bench/bench_shapes.py --only llama2-7b:wanda@128   # at the papers' 128 x 2048 tokens, within 20 GB
    python bench/bench_shapes.py --only smollm2-135m:elsa     # the default model (field protocol) against its plan
    python bench/bench_shapes.py --table                  # the table so far (measured vs plan)
    python bench/bench_shapes.py --only ... --replan [--at-mean-load]   # re-plan done cells (at the load each
                                                          # started under, or the mean sampled while it ran)

One thread (hardware.threads=1) and the machine's load average are recorded per cell: the machine is shared.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

def _every_method() -> list[str]:
    """Every registered method but ``dense``, in the report's order (the issue: every method on llama2-7b)."""
    sys.path.insert(0, str(REPO))
    from elsa.methods.registry import methods

    return [name for name in methods() if name != "dense"]


# the first cells are the ones measured first (their order kept, so the log reads as before); then every other
# method on llama2-7b; then the three the issue asks on llama3-8b and mixtral-8x7b
FIRST = ["wanda", "sparsegpt", "sparsellm", "elsa", "alps", "elsa_l"]
# the issue's check at the papers' calibration (128 x 2048 tokens, "<method>@128"): Wanda, SparseGPT and SparseLLM
# on one llama2-7b block run within 20 GB (hardware.memory_gb=20: the plan refuses before loading when they would
# not, naming the figure); each needs ~20 GB free, so they come last and wait for it
PAPER_CALIBRATION = [("llama2-7b", f"{m}@128") for m in ("wanda", "sparsegpt", "sparsellm")]
# the check of the plan on the default model (SmolLM2-135M, whole, the field protocol: 32 x 512 calibration
# tokens, 8,192 evaluation tokens) for magnitude, Wanda, SparseGPT, SparseLLM and ELSA at budget=demo
DEFAULT = "smollm2-135m"
DEFAULT_CELLS = [(DEFAULT, m) for m in ("magnitude", "wanda", "sparsegpt", "sparsellm", "elsa")]
CELLS = [("llama2-7b", m) for m in FIRST + [m for m in _every_method() if m not in FIRST]] + \
        [(a, m) for a in ("llama3-8b", "mixtral-8x7b") for m in ["wanda", "sparsegpt", "sparsellm", "elsa"]] + \
        PAPER_CALIBRATION + DEFAULT_CELLS
COMMON = ["model=shapes", "model.blocks=1", "nsamples=16", "seqlen=2048", "hardware.threads=1", "logger=none",
          "eval=quick", "eval.max_tokens=4096", "eval.batch_size=1", "eval.dense=false", "save_model=false"]
SPARSITY = {"maskllm": "2:4"}     # MaskLLM learns N:M masks only; every other cell at 50%
# OATS: its subspace SVD mode (exact SVDs at the first and last of its 80 alternations): the paper's exact mode is
# planned at ~9 h for one llama2-7b block at one thread here (80 x 7 SVDs up to 4096 x 11008), subspace at ~30 min
OPTIONS = {"oats": ["method.svd=subspace"]}
# the layer-wise methods run their block over 2 windows at a time (the default 8 holds 4 GB more of transient
# activations at 7B widths, more than this shared machine has free); every method with a budget (the training
# methods and SAFE) at budget=demo (ELSA: 30 steps of 1 x seqlen; SAFE: one epoch per block)
LAYERWISE_BATCH = ["method.batch_size=2"]
# what makes a cell fit beside the machine's other jobs (~10-12 GB free): hardware.low_memory (the layer-wise
# walk keeps the embeddings and head on disk, collects and prunes Mixtral's 8 experts' Hessians one expert at a
# time and keeps the block's dense copy on disk: the same pruned weights; AdamW steps one tensor at a time, the
# teacher shares the frozen weights) and, for the training methods, only the pruned matrices
# train (method.train_dense_params=false: the 32k-128k vocabulary's embedding and head and the norms stay
# frozen; results.json records it under method_stats.trained_params)
LEAN = {"mixtral-8x7b": ["hardware.low_memory=true"], ("llama3-8b", "sparsegpt"): ["hardware.low_memory=true"],
        ("llama2-7b", "sparsellm"): ["hardware.low_memory=true"], ("llama3-8b", "sparsellm"): ["hardware.low_memory=true"]}
LEAN_TRAINING = ["hardware.low_memory=true", "method.train_dense_params=false"]
# SparseLLM models no expert MLP: on Mixtral it is SparseGPT on every matrix, said in results.json and the report
FALLBACK = {("mixtral-8x7b", "sparsellm"): ["method.fallback=sparsegpt"]}


def overrides(like: str, cell: str) -> list[str]:
    """run.py's overrides of one cell; ``<method>@<n>``: the method at n x 2048 calibration tokens within 20 GB."""
    from elsa.methods.registry import LAYER_WISE, TRAINING, get

    method, _, windows = cell.partition("@")
    cls = get(method)
    if like == DEFAULT:
        return ["experiment=field", "hardware.threads=1", "logger=none", "sparsity=0.5", f"method={method}",
                *(["budget=demo"] if cls.has_budget else [])]
    training = cls.family is TRAINING
    lean = LEAN_TRAINING if training else LEAN.get((like, method), LEAN.get(like, []))
    common = [f"nsamples={windows}", "hardware.memory_gb=20"] + [a for a in COMMON if not a.startswith("nsamples=")] \
        if windows else COMMON
    return [*common, f"sparsity={SPARSITY.get(method, '0.5')}", f"model.like={like}", f"method={method}",
            *(["budget=demo"] if cls.has_budget else []), *(LAYERWISE_BATCH if cls.family is LAYER_WISE else []), *lean,
            *FALLBACK.get((like, method), []), *OPTIONS.get(method, [])]


def log(root: Path, line: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    with open(root / "bench_shapes.log", "a") as fh:
        fh.write(f"{stamp} {line}\n")
    print(f"{stamp} {line}", flush=True)


def done(cell: Path) -> dict | None:
    try:
        data = json.loads((cell / "results.json").read_text())
    except (OSError, ValueError):
        return None
    return data if data.get("status") == "done" else None


def plan_of(args: list[str], load: float | None = None) -> dict:
    extra = [] if load is None else ["--load", str(load)]
    out = subprocess.run([sys.executable, "-m", "elsa.plan", "--json", "--full", *extra, *args], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    if out.returncode:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.stdout)


def total_gb() -> float:
    with open("/proc/meminfo") as fh:
        return int(fh.readline().split()[1]) / 1024 ** 2


def refused(cell: Path) -> str | None:
    """The plan's refusal recorded in the cell's results.json (run.py refused before loading), if any."""
    try:
        data = json.loads((cell / "results.json").read_text())
    except (OSError, ValueError):
        return None
    error = data.get("error") or ""
    return error.split(": ", 1)[-1] if data.get("status") == "failed" and "the plan needs" in error else None


def available_gb() -> float:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024 ** 2
    return float("inf")


def wait_for_memory(root: Path, need_gb: float, patience: float) -> bool:
    """The machine is shared: start a cell only when its predicted peak (+1 GB) is free, waiting up to
    ``patience`` seconds; a cell that would push the machine into the OOM killer takes others' jobs with it."""
    t0 = time.time()
    while available_gb() < need_gb + 1:
        if time.time() - t0 > patience:
            return False
        time.sleep(30)
    return True


def run_cell(root: Path, like: str, method: str, timeout: float, patience: float = 1800) -> None:
    cell = root / f"{like}_{method}"
    if done(cell) or refused(cell):
        log(root, f"skip {like}:{method} ({'done' if done(cell) else 'refused by the plan'})")
        return
    args = overrides(like, method)
    plan = plan_of(args)
    cell.mkdir(parents=True, exist_ok=True)
    (cell / "plan.json").write_text(json.dumps(plan, indent=1))
    need = plan.get("peak_cpu_gb", 0.0)
    # else run.py refuses before loading (the memory, or hardware.low_memory's files on the disk): that refusal is
    # the cell's result, with no wait for memory
    from elsa.run.forecast import free_disk_gb

    free_disk = free_disk_gb(tempfile.gettempdir())   # what run.py's check reads
    fits = need <= total_gb() and plan.get("peak_disk_gb", 0.0) <= free_disk
    if fits and not wait_for_memory(root, need, patience):
        log(root, f"skip {like}:{method}: the plan's peak {need:.1f} GB is not free ({available_gb():.1f} GB "
                  "available); rerun later")
        return
    load = os.getloadavg()[0]
    log(root, f"start {like}:{method} load {load:.2f}; plan: {plan.get('forecast', plan.get('error'))}")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HYDRA_FULL_ERROR="1")
    t0 = time.time()
    loads, stop = [], threading.Event()
    sampler = threading.Thread(target=_sample_load, args=(loads, stop), daemon=True)
    sampler.start()
    with open(cell / "run.log", "w") as fh:
        try:
            rc = subprocess.run([sys.executable, "run.py", *args, f"output_dir={cell}"], cwd=REPO, env=env,
                                stdout=fh, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    stop.set()
    sampler.join()
    during = sum(loads) / len(loads) if loads else float("nan")
    data = done(cell)
    refusal = refused(cell)
    if refusal:
        log(root, f"REFUSED {like}:{method} in {time.time() - t0:.0f} s: {refusal}")
        return
    if data is None:
        log(root, f"FAILED {like}:{method} rc={rc} after {time.time() - t0:.0f} s (see {cell}/run.log)")
        return
    cpu = (data.get("cpu_s") or {}).get("prune")
    log(root, f"done {like}:{method} prune {data['time_s']['prune']:.0f} s ({cpu or float('nan'):.0f} CPU-s), "
              f"peak RSS "
              f"{data['peak_memory_mb']['cpu_rss'] / 1024:.2f} GB, load at start {load:.2f}, "
              f"after {os.getloadavg()[0]:.2f}, mean during {during:.2f} ({len(loads)} samples; "
              f"--replan --at-mean-load plans the cell at it)")


def _sample_load(loads: list[float], stop: threading.Event, every: float = 30.0) -> None:
    """The 1-minute load average every ``every`` seconds while a cell runs: the load it ran under, which a plan
    made at the start cannot know (a cell that started beside a test run and then ran alone)."""
    while not stop.wait(every):
        loads.append(os.getloadavg()[0])


def _last_logged(root: Path, event: str, like: str, method: str, key: str, end: str) -> float | None:
    """The number after ``key`` (up to ``end``) on the cell's last ``event`` line of the log that has one."""
    values = [line.split(key)[1].split(end)[0] for line in (root / "bench_shapes.log").read_text().splitlines()
              if f"{event} {like}:{method} " in line and key in line]
    return float(values[-1]) if values and values[-1] != "nan" else None


def start_load(root: Path, like: str, method: str) -> float | None:
    """The load average logged when the cell's (last) run started."""
    return _last_logged(root, "start", like, method, " load ", ";")


def mean_load(root: Path, like: str, method: str) -> float | None:
    """The mean load logged when the cell's (last) run ended (cells run before the sampler: None)."""
    return _last_logged(root, "done", like, method, " mean during ", " ")


def replan(root: Path, cells, at_mean: bool = False) -> None:
    """Rewrite the done cells' plan.json with the current plan code, for the load each run started under (or,
    ``at_mean``, the other jobs' load while it ran: the mean sampled, less the cell's own thread, where the log
    has one). The plan's share of a core is cores / (others' load + threads): a load average sampled during the
    cell counts the cell itself."""
    for like, method in cells:
        cell = root / f"{like}_{method}"
        if done(cell):
            load = ran_under(root, like, method) if at_mean else start_load(root, like, method)
            plan = plan_of(overrides(like, method), load)
            plan["planned_at_load"] = load
            (cell / "plan.json").write_text(json.dumps(plan, indent=1))
            log(root, f"replanned {like}:{method} at load {load}: {plan.get('forecast', plan.get('error'))}")


def others_load(root: Path, like: str, method: str) -> float | None:
    """The other jobs' load while the cell ran: its sampled mean less its one thread (None: not sampled)."""
    mean = mean_load(root, like, method)
    return round(max(0.0, mean - 1), 2) if mean is not None else None


def ran_under(root: Path, like: str, method: str) -> float | None:
    """The other jobs' load while the cell ran, else the load at its start."""
    others = others_load(root, like, method)
    return others if others is not None else start_load(root, like, method)


def whole(plan: dict | None, key: str) -> str:
    if not plan:
        return "-"
    from elsa.plan import duration

    return f"{duration(plan['total_s'])}, {plan[key]:.0f}"


def _pct(measured: float | None, plan: float | None) -> str:
    return "" if not measured or not plan else f" ({(plan - measured) / measured:+.0%})"


def table(root: Path) -> str:
    """Every done (or refused) cell: the block's wall time against the plan at the load it ran under, its CPU
    seconds against the plan for a whole core (load-free), the peak against the plan, and the plan's whole model
    at 128 x 2048 (this CPU idle; one 80 GB GPU). The code each cell ran (results.json git_sha)."""
    rows = ["| shapes | method | code | per block (s) | plan (at load) | CPU-s | plan, whole core | peak RSS (GB) | "
            "plan | load: start, others during | whole model at 128 x 2048, this CPU idle: time, GB | one 80 GB "
            "GPU: time, GPU GB |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|---|"]
    off = {"memory": [], "cpu": [], "wall": []}     # plan over measured - 1, per cell
    for like, method in CELLS:
        cell = root / f"{like}_{method}"
        data = done(cell)
        if data is None:
            if refused(cell):
                rows.append(f"| {like} | {method} | | refused before loading: {refused(cell)} |||||||||")
            continue
        plan = json.loads((cell / "plan.json").read_text()) if (cell / "plan.json").exists() else {}
        wall = data["time_s"]["prune"]
        blocks = (data.get("method_stats") or {}).get("per_block") or []
        cpu = (data.get("cpu_s") or {}).get("prune") or (sum(b.get("cpu_s", 0.0) for b in blocks) or None)
        p_wall, share = plan.get("prune_s"), plan.get("share")
        p_core = p_wall * share if p_wall and share else None
        peak, p_peak = data["peak_memory_mb"]["cpu_rss"] / 1024, plan.get("peak_cpu_gb")
        start, others = start_load(root, like, method), others_load(root, like, method)
        at = plan.get("planned_at_load", start)
        for key, m, p in (("memory", peak, p_peak), ("cpu", cpu, p_core), ("wall", wall, p_wall)):
            if m and p:
                off[key].append((p / m - 1, f"{like}:{method}"))
        rows.append(
            f"| {like} | {method} | {(data.get('git_sha') or '?')[:7]} | {wall:.0f} | "
            f"{p_wall or float('nan'):.0f}{_pct(wall, p_wall)} at {at if at is not None else '?'} | "
            f"{f'{cpu:.0f}' if cpu else '-'} | {f'{p_core:.0f}' if p_core else '-'}{_pct(cpu, p_core)} | "
            f"{peak:.2f} | {p_peak or float('nan'):.2f}{_pct(peak, p_peak)} | "
            f"{start if start is not None else '?'}, {others if others is not None else '-'} | "
            f"{whole(plan.get('full_cpu'), 'peak_cpu_gb')} | {whole(plan.get('full_cuda'), 'peak_gpu_gb')} |")
    rows.append("")
    for key, limit, what in (("memory", 0.25, "peak memory"), ("cpu", 0.5, "time against the CPU seconds"),
                             ("wall", 0.5, "time against the wall clock at the load it ran under")):
        cells = off[key]
        if cells:
            out = [f"{c} ({v:+.0%})" for v, c in cells if abs(v) > limit]
            rows.append(f"The plan's {what}: within {limit:.0%} in {len(cells) - len(out)} of {len(cells)} cells "
                        f"({min(v for v, _ in cells):+.0%} to {max(v for v, _ in cells):+.0%})"
                        + (f"; outside: {', '.join(out)}." if out else "."))
    return "\n".join(rows)


DOCS_BEGIN = "<!-- bench_shapes.py --table --docs: begin (generated; edit the cells, not these lines) -->"
DOCS_END = "<!-- bench_shapes.py --table --docs: end -->"


def write_docs(path: Path, text: str) -> None:
    """Replace what lies between the markers in ``path`` with ``text``."""
    doc = path.read_text()
    if doc.count(DOCS_BEGIN) != 1 or doc.count(DOCS_END) != 1 or doc.index(DOCS_BEGIN) > doc.index(DOCS_END):
        raise SystemExit(f"elsa: error: --docs={path}: needs one '{DOCS_BEGIN}' line and one '{DOCS_END}' after it")
    head, rest = doc.split(DOCS_BEGIN)
    path.write_text(f"{head}{DOCS_BEGIN}\n{text}\n{DOCS_END}{rest.split(DOCS_END, 1)[1]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(REPO / "bench" / "runs" / "shapes"))
    ap.add_argument("--only", default="", help="like:method[,like:method...]")
    ap.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per cell")
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--docs", default="", help="with --table: write the table into this markdown file, between "
                    "its '<!-- bench_shapes.py --table --docs: begin/end -->' lines")
    ap.add_argument("--replan", action="store_true", help="rewrite the done cells' plans (of --only) with the current code; runs no cell")
    ap.add_argument("--at-mean-load", action="store_true", help="with --replan: plan each cell at the mean load "
                    "sampled while it ran (logged with its 'done' line), not the load it started under")
    a = ap.parse_args()
    root = Path(a.root)
    root.mkdir(parents=True, exist_ok=True)
    cells = [tuple(c.split(":")) for c in a.only.split(",")] if a.only else CELLS
    if a.replan:
        replan(root, cells, a.at_mean_load)
    if a.table:
        text = table(root)
        if a.docs:
            write_docs(Path(a.docs), text)
        print(text)
        return
    if a.replan:
        return
    for like, method in cells:
        run_cell(root, like, method, a.timeout)


if __name__ == "__main__":
    main()
