"""Issue 26's dense-start curves while they run: held-out perplexity of the projected weights against training
tokens, read from the claim runs' logs (bench/elsa_claim.sh), with the one-shot methods' levels of the field
table at the same sparsity and protocol; the first point below each level is printed (the crossing).

    python bench/claim_plot.py [--root /work/elsa_claim] [--field docs/field_mixed/results.csv] [--out docs/elsa_claim.png]
    python bench/claim_plot.py --save bench/results/elsa_claim   # keep the runs' held-out points in the repo

The runs' logs and checkpoints live on this machine's disk only (a session may be handed another machine: the seed-0
logs of docs/results.md went that way), so `--save` copies each log's held-out lines to DIR/<run>.log, which
`--root DIR` reads back. The levels default to the mixed-commit table the documented crossings were read against;
`--field docs/field/results.csv` reads the one-commit grid's.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

POINT = re.compile(r"step (\d+): .*?target_ratio=([\d.]+),.*?heldout_ppl=([\d.e+]+), tokens=([\d.e+]+)")
LEVELS = ("sparsegpt", "alps", "sparsellm")
RECIPES = {False: "the paper's recipe", True: "short-budget recipe (decoupled pull, KL)"}


def curves(root: Path) -> dict[str, list[tuple[int, float, int]]]:
    """run name -> [(tokens, ppl, step)] from its log, one point per step (a resumed run logs a step again)."""
    out = {}
    for log in sorted(root.glob("s*.log")):
        points = {}
        for m in POINT.finditer(log.read_text(errors="replace")):
            step, ratio, ppl, tokens = int(m[1]), float(m[2]), float(m[3]), float(m[4])
            tokens = step * round(tokens / step / 64) * 64   # the log prints 4 digits; a step is a multiple of 64
            points[step] = (tokens, ppl, step, ratio)
        if points:
            out[log.stem] = [points[s] for s in sorted(points)]
    return out


RUN = re.compile(r"(s\d+(?:_short)?)(?:_(elsa\w*?))?(?:_seed(\d+))?$")


def pairs(runs: dict[str, list[tuple]]) -> list[str]:
    """Each variant run (ELSA-L, its arms) against ELSA's run of the same sparsity, recipe and seed, at the steps
    both logged: the within-2% question of issue 26 item 4, one line a pair (seed against seed, never across)."""
    parsed = {name: RUN.match(name) for name in runs}
    base = {(m[1], m[3] or "0"): name for name, m in parsed.items() if m and not m[2]}
    out = []
    for name, m in parsed.items():
        ref = base.get((m[1], m[3] or "0")) if m and m[2] else None
        if ref is None:
            continue
        theirs = {p[2]: p[1] for p in runs[ref]}
        common = [(p[2], p[1] / theirs[p[2]] - 1) for p in runs[name] if p[2] in theirs]
        if common:
            out.append(f"{name} against {ref}: " + ", ".join(f"step {s} {d:+.1%}" for s, d in common[-4:]))
    return out


def levels(field: Path) -> dict[float, dict[str, float]]:
    import pandas as pd

    df = pd.read_csv(field)
    df = df[df["method_name"].isin(LEVELS) & (df["start"].fillna("dense") == "dense") & ~df["nm"].astype(bool)]
    return {float(r): {m: float(v) for m, v in zip(g["method_name"], g["ppl/wiki"])}
            for r, g in df.groupby("sparsity_ratio")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="/work/elsa_claim", type=Path)
    ap.add_argument("--field", default=Path(__file__).resolve().parent.parent / "docs/field_mixed/results.csv",
                    type=Path)
    ap.add_argument("--out", default=None, type=Path)
    ap.add_argument("--save", default=None, type=Path, help="copy each log's held-out lines to DIR/<run>.log")
    args = ap.parse_args()
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
        for log in sorted(args.root.glob("s*.log")):
            lines = [m[0] for m in POINT.finditer(log.read_text(errors="replace"))]
            if lines:
                (args.save / log.name).write_text("\n".join(lines) + "\n")
                print(f"saved {len(lines)} held-out points of {log.name} to {args.save}")
        return
    runs, lv = curves(args.root), levels(args.field)
    for name, pts in runs.items():
        ratio = pts[0][3]
        best = min(pts, key=lambda p: p[1])
        print(f"{name}: {len(pts)} points, last step {pts[-1][2]} ({pts[-1][0]:,} tokens) ppl {pts[-1][1]:.4g}; "
              f"best {best[1]:.4g} at {best[0]:,} tokens")
        for method, level in sorted(lv.get(ratio, {}).items(), key=lambda kv: -kv[1]):
            hit = next((p for p in pts if p[1] < level), None)
            print(f"  {method} {level:,.2f}: " + (f"passed at step {hit[2]} ({hit[0]:,} tokens)" if hit else "not passed"))
    for line in pairs(runs):
        print(line)
    if args.out:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
        for ax, ratio in zip(axes, (0.7, 0.9)):
            for name, pts in runs.items():
                if abs(pts[0][3] - ratio) < 1e-9:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=f"{name}: {'ELSA-L, ' if '_elsa_l' in name else ''}{RECIPES['_short' in name]}")
            for method, level in lv.get(ratio, {}).items():
                ax.axhline(level, ls="--", lw=0.8, color="grey")
                ax.text(0.01, level, f"{method} {level:,.0f}", transform=ax.get_yaxis_transform(), fontsize=7,
                        va="bottom", color="grey")
            ax.set(xscale="log", yscale="log", xlabel="training tokens", ylabel="held-out perplexity (wiki, 8,192 tokens)",
                   title=f"ELSA from the dense model, {ratio:.0%}")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.out, dpi=120)
        print("wrote", args.out)


if __name__ == "__main__":
    main()
