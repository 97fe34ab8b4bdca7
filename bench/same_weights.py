"""Are the pruned weights of a run bit-identical between two checkouts? (issue 28: behaviour unchanged)

    python bench/same_weights.py --base /work/wt/base -- method=wanda sparsity=0.5
    python bench/same_weights.py --base /work/wt/base --cells default     # the issue's default-model cells

Runs ``run.py <overrides> save_model=true`` once with the code of this checkout and once with the code of
``--base`` (a git worktree of another commit; the same Python environment), each in its own output dir under
``--out``, then compares every tensor of the two saved models with ``torch.equal``. Prints one line per cell and
appends it to ``<out>/same_weights.jsonl``; a cell whose two saved models already exist is only compared again.
One thread, so the two runs do the same float operations in the same order. Each side's run dir is named
by the cell and its checkout's commit (a dirty tree reruns every time it is asked: its dir says +dirty).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUICK = ["eval=quick", "eval.dense=false", "logger=none", "hardware.threads=1", "save_model=true"]
# ELSA in fp32: bf16 autocast became the default on CPUs that run it faster after e43c12b (issue 26), and the
# issue's identity is for the fp32 step
CELLS = {"default": [["method=magnitude", "sparsity=0.5"], ["method=wanda", "sparsity=0.5"],
                     ["method=sparsegpt", "sparsity=0.5"],
                     ["method=elsa", "budget=demo", "sparsity=0.5", "method.autocast_bf16=false"]]}


def run(code: Path, overrides: list[str], out: Path) -> None:
    if (out / "model").is_dir() and not out.name.endswith("+dirty"):   # a clean commit's run is done once
        return
    env = dict(os.environ, PYTHONPATH=str(code), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="disabled")
    cmd = [sys.executable, "run.py", *overrides, *QUICK, f"output_dir={out}"]
    with open(out.with_suffix(".log"), "w") as log:
        subprocess.run(cmd, cwd=code, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)


def tensors(model_dir: Path) -> dict:
    from safetensors.torch import load_file
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def differing(x: dict, y: dict) -> tuple[list[str], list[str]]:
    """(names whose tensors differ, names only one side has) of two name -> tensor dicts (bench/bit_identity.py
    shares it)."""
    import torch
    return (sorted(k for k in x.keys() & y.keys() if not torch.equal(x[k], y[k])), sorted(x.keys() ^ y.keys()))


def compare(a: Path, b: Path) -> dict:
    ta, tb = tensors(a / "model"), tensors(b / "model")
    differ, one_side = differing(ta, tb)
    return {"tensors": len(ta), "only_one_side": one_side, "differ": differ,
            "identical": not differ and not one_side}


def commit(code: Path) -> str:
    return subprocess.run(["git", "-C", str(code), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip() + ("+dirty" if subprocess.run(
                              ["git", "-C", str(code), "status", "--porcelain", "--untracked-files=no"],
                              capture_output=True, text=True).stdout.strip() else "")


def cell(overrides: list[str], base: Path, out: Path) -> dict:
    key = hashlib.sha1(" ".join(overrides).encode()).hexdigest()[:10]
    # each side's output dir is named by its commit, so a rerun after a new commit runs again
    head, base_commit = commit(REPO), commit(base)   # read once: a commit made during the runs is not theirs
    here, there = out / f"{key}_{head}", out / f"{key}_{base_commit}"
    t0 = time.time()
    for code, d in ((REPO, here), (base, there)):
        d.parent.mkdir(parents=True, exist_ok=True)
        run(code, overrides, d)
    row = {"overrides": overrides, "head": head, "base": base_commit, **compare(here, there),
           "wall_s": round(time.time() - t0, 1)}
    with open(out / "same_weights.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True, help="a worktree of the commit to compare with")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "runs" / "same_weights")
    ap.add_argument("--cells", choices=sorted(CELLS), help="a named set of cells instead of overrides")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    cells = CELLS[args.cells] if args.cells else [args.overrides]
    ok = True
    for overrides in cells:
        row = cell(overrides, args.base.resolve(), args.out.resolve())
        ok &= row["identical"]
        print(f"{' '.join(overrides)}: {'identical' if row['identical'] else 'DIFFERENT'} "
              f"({row['tensors']} tensors, {len(row['differ'])} differ; {row['head']} vs {row['base']}, "
              f"{row['wall_s']} s)", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
