"""Perplexity against compute: the frontier plot and the "tokens to pass" table of a report.

A one-shot method is one point (the tokens its calibration walk read); a training method is a curve, its
held-out history (the projected / masked weights evaluated every ``eval_every`` steps), drawn only where that
history was measured with the row's own evaluation (``method.eval_split=test`` and ``method.eval_tokens`` equal
to the eval's tokens), so the curve and the points share one protocol. A start stage's tokens count for the
training curve that continues from it. "Tokens to pass": for each training curve, the first held-out point
below each one-shot method at the same model and sparsity.
"""
from __future__ import annotations

import json

import pandas as pd

PPL = "ppl/"
SERIES = "series"     # a row's line in the grids and plots: its method label less a method's per-cell structure shares


def compute_columns(comp: dict, stats: dict) -> dict:
    """The report columns of results.json's ``compute`` block and, where comparable, the training curve
    (``stats``: the method's statistics, with its held-out history)."""
    work = [comp.get(k) or {} for k in ("start", "calibration", "training", "selection")]
    row = {"compute_tokens": sum(p.get("tokens") or 0 for p in work) if comp else None,
           "compute_flops": sum(p.get("flops") or 0.0 for p in work) if comp else None,
           "training_tokens": (comp.get("training") or {}).get("tokens") if comp else None,
           "curve": None}
    curve = _curve(comp, stats or {}, (comp.get("start") or {}).get("tokens") or 0)
    if curve:
        row["curve"] = json.dumps(curve)
    return row


def _curve(comp: dict, stats: dict, offset: int) -> list | None:
    history = [h for h in stats.get("history") or [] if "heldout_ppl" in h and "tokens" in h]
    protocol = stats.get("heldout") or {}
    evaluated = (comp.get("evaluation") or {}).get("tokens")
    # the curve shares the row's protocol: the run's test windows, as many tokens as its evaluation
    if not history or protocol.get("split") != "test" or protocol.get("tokens") != evaluated:
        return None
    points = []
    for h in history:
        ppl = h["heldout_ppl"]
        value = next(iter(ppl.values())) if isinstance(ppl, dict) else ppl
        points.append([int(h["tokens"]) + offset, float(value)])
    return points


def _one_shot(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["training_tokens"].isna()] if "training_tokens" in df else df.iloc[0:0]


def _training(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["curve"].notna()] if "curve" in df else df.iloc[0:0]


def full_curve(row, col: str) -> list:
    """A training row's held-out history, ended by its own final cell (the same protocol: the curve is only kept
    when it is) where the run went on past its last history point (MaskLLM at budget=quick: 60 steps, a point
    every 40)."""
    curve = json.loads(row["curve"])
    tokens, final = row.get("compute_tokens"), row.get(col)
    if curve and pd.notna(tokens) and pd.notna(final) and float(tokens) > curve[-1][0]:
        curve.append([int(tokens), float(final)])
    return curve


def tokens_to_pass(df: pd.DataFrame, corpus: str) -> pd.DataFrame:
    """One row per (training curve, one-shot method) at the same model and sparsity: the first curve point
    below the one-shot perplexity (its tokens), or None when the curve never passes it."""
    col = PPL + corpus
    rows = []
    one_shot = _one_shot(df)
    for _, t in _training(df).iterrows():
        curve = full_curve(t, col)
        same = one_shot[(one_shot["model"] == t["model"]) & (one_shot["sparsity"] == t["sparsity"]) &
                        one_shot[col].notna()]
        for _, o in same.iterrows():
            hit = next((tok for tok, ppl in curve if ppl < o[col]), None)
            rows.append({"model": t["model"], "sparsity": t["sparsity"], "training": t["method"],
                         "one_shot": o["method"], "one_shot_ppl": o[col],
                         "tokens_to_pass": hit, "curve_tokens": curve[-1][0], "curve_last_ppl": curve[-1][1]})
    return pd.DataFrame(rows)


def tokens_to_pass_markdown(table: pd.DataFrame) -> str:
    """Per model and sparsity, a training curve per row and a one-shot method per column (its perplexity in the
    header): the tokens at the curve's first point below that method, "-" where the curve ends above it."""
    if table.empty:
        return ""
    parts = []
    for (model, sparsity), g in table.groupby(["model", "sparsity"], sort=False):
        shots = list(dict.fromkeys(g["one_shot"]))
        level = {o: g.loc[g["one_shot"] == o, "one_shot_ppl"].iloc[0] for o in shots}
        parts += [f"### {model} at {sparsity}", "",
                  "| training method | curve ends at | " + " | ".join(f"{o}: {_ppl(level[o])}" for o in shots) + " |",
                  "|---|---|" + "---:|" * len(shots)]
        for training, t in g.groupby("training", sort=False):
            hits = dict(zip(t["one_shot"], t["tokens_to_pass"]))
            cells = [f"{int(hits[o]):,}" if pd.notna(hits.get(o)) else "-" for o in shots]
            end = f"{int(t['curve_tokens'].iloc[0]):,} tokens, ppl {_ppl(t['curve_last_ppl'].iloc[0])}"
            parts.append(f"| {training} | {end} | " + " | ".join(cells) + " |")
        parts.append("")
    return "\n".join(parts).rstrip() + "\n"


def _ppl(v: float) -> str:
    return f"{v:,.0f}" if v >= 1e3 else f"{v:.2f}"


def plot_frontier(df: pd.DataFrame, corpus: str, path, plt, colors: dict, markers: dict):
    """One panel per sparsity: perplexity (log) against tokens (log); points for the one-shot methods, curves
    for the training methods' held-out histories (their final cell as a point at the curve's end)."""
    col = PPL + corpus
    ok = df[(df["status"] == "done") & df[col].notna() & df["compute_tokens"].notna()]
    targets = [s for s in ok["sparsity"].dropna().unique()]
    if not targets:
        return None
    fig, axes = plt.subplots(1, len(targets), figsize=(5.2 * len(targets) + 2.5, 4.2), squeeze=False)
    # a data-free method (magnitude: 0 tokens) has no place on a log axis: it is drawn in a column of its own at
    # the left edge, a quarter of the fewest tokens any method read, marked "data-free", so the axis spans the
    # methods that read data rather than the decades down to 1 token
    used = ok.loc[ok["compute_tokens"] > 0, "compute_tokens"]
    low = float(used.min()) if not used.empty else 1.0
    free_x = low / 4
    for ax, target in zip(axes[0], sorted(targets, key=str)):
        cell = ok[ok["sparsity"] == target]
        for _, r in cell.iterrows():
            m = r[SERIES]
            x = float(r["compute_tokens"]) if r["compute_tokens"] > 0 else free_x
            ax.scatter([x], [r[col]], color=colors.get(m), marker=markers.get(m, "o"), label=m, zorder=3)
            if isinstance(r.get("curve"), str):
                pts = full_curve(r, col)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colors.get(m), lw=1.2)
        ax.set_xscale("log")
        if (cell["compute_tokens"] <= 0).any():
            ax.axvline(low / 2, color="grey", lw=0.8, ls=":")
            ax.text(free_x, 0.02, "data-free", transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                    fontsize=7, color="grey", rotation=90)
            ax.set_xlim(left=low / 8)
        if (cell[col] > 0).all() and cell[col].max() / max(cell[col].min(), 1e-9) > 10:
            ax.set_yscale("log")
        ax.set_title(f"sparsity {target}")
        ax.set_xlabel("tokens processed (calibration, start, training)")
        ax.set_ylabel(f"perplexity ({corpus})")
        ax.grid(True, which="both", alpha=0.3)
    seen = {}
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    axes[0][-1].legend(seen.values(), seen.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
