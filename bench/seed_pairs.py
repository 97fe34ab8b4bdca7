"""ELSA-L (and its arms) against ELSA, seed with seed, from the training runs' results.json: issue 26 item 4's
within-2% question asked of more than one draw.

Each run's held-out history (``method.eval_every``) and final perplexity are paired with ELSA's run of the same
model, sparsity, start and seed; a variant is the method plus the ``method.*`` overrides that are not the history's
own (``method.z_dtype=sparse_bf16``, say). One line a pair (the relative difference at each common step, then the
final perplexity and the step-time ratio), then each variant's final difference over the seeds.

    python bench/seed_pairs.py bench/results/field_grid/cells bench/results/elsa_l_seeds
    python bench/seed_pairs.py /work/seeds/sweep --save bench/results/elsa_l_seeds   # keep the runs' results.json

A pair is only made within one seed, one commit and one precision (``autocast_bf16``): across machines the float
order differs, so a variant's difference is read from the two runs one machine made.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

from elsa.report.results import read_results

HISTORY_KEYS = ("method.eval_every", "method.eval_split", "method.eval_tokens")


def variant(r: dict) -> str:
    extra = sorted(o.lstrip("+") for o in r.get("overrides", [])
                   if o.lstrip("+").startswith("method.") and not o.lstrip("+").startswith(HISTORY_KEYS))
    return " ".join([r["method"], *extra])


def load(roots: list[Path]) -> list[tuple[Path, dict]]:
    out = []
    for root in roots:
        for path in sorted(root.rglob("results.json")):
            r = read_results(path.parent) or {}          # a killed job's unreadable file is skipped, as the report does
            if r.get("status") == "done" and r["method"] in ("elsa", "elsa_l") and r["method_stats"].get("history"):
                out.append((path, r))
    return out


def cell(r: dict) -> tuple:
    used = (r["method_stats"].get("autocast_bf16") or {}).get("used")
    return (r["model"] if isinstance(r["model"], str) else json.dumps(r["model"], sort_keys=True),
            r["sparsity"]["target"], json.dumps(r.get("start"), sort_keys=True), r.get("budget"), r["seed"],
            r["git_sha"][:7], "bf16" if used else "fp32")


def heldout(r: dict) -> dict[int, float]:
    return {h["step"]: h["heldout_ppl"] for h in r["method_stats"]["history"] if "heldout_ppl" in h}


def final(r: dict) -> float:
    return next(iter(r["perplexity"].values()))


def report(runs: list[tuple[Path, dict]]) -> list[str]:
    base = {cell(r): r for _, r in runs if variant(r) == "elsa"}
    lines, finals = [], {}
    for _, r in runs:
        name, (_, sparsity, _, budget, seed, sha, precision) = variant(r), cell(r)
        ref = base.get(cell(r))
        if name == "elsa" or ref is None:
            continue
        mine, theirs = heldout(r), heldout(ref)
        steps = [s for s in sorted(mine) if s in theirs]
        diff = final(r) / final(ref) - 1
        finals.setdefault((name, sparsity, budget), []).append(diff)
        t = r["method_stats"].get("step_time_s"), ref["method_stats"].get("step_time_s")
        lines.append(f"{name} against elsa, sparsity {sparsity}, budget {budget}, seed {seed}, {sha}, {precision}: "
                     + ", ".join(f"step {s} {mine[s] / theirs[s] - 1:+.1%}" for s in steps)
                     + f"; final {final(r):,.1f} against {final(ref):,.1f} ({diff:+.1%})"
                     + (f"; step time {t[0]:.1f} s against {t[1]:.1f} s ({t[0] / t[1]:.2f}x)" if all(t) else ""))
    for (name, sparsity, budget), diffs in sorted(finals.items()):
        spread = f", mean {statistics.mean(diffs):+.1%}" if len(diffs) > 1 else ""
        lines.append(f"{name} at {sparsity} (budget {budget}): {len(diffs)} seed(s), final against ELSA "
                     + ", ".join(f"{d:+.1%}" for d in diffs) + spread)
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("roots", nargs="+", type=Path, help="sweep dirs or stored cells (searched for results.json)")
    ap.add_argument("--save", type=Path, help="copy each run's results.json to SAVE/<its dir name>/results.json")
    args = ap.parse_args(argv)
    runs = load(args.roots)
    if not runs:
        raise SystemExit(f"elsa: error: roots={' '.join(map(str, args.roots))}: no finished ELSA or ELSA-L "
                         "run with a held-out history under them")
    if args.save:
        for path, _ in runs:
            dest = args.save / path.parent.name / "results.json"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)
        print(f"saved {len(runs)} runs under {args.save}")
    print("\n".join(report(runs)))


if __name__ == "__main__":
    main()
