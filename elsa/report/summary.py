"""The summary a finished run prints, from its record."""
from __future__ import annotations

from elsa.report.results import RunRecord


def print_summary(record: RunRecord, path) -> None:
    """Print the summary of a finished run whose results.json is ``path``."""
    print("\n".join(summary_lines(record, path)), flush=True)


def summary_lines(r: RunRecord, path) -> list[str]:
    """The summary a finished run prints: perplexity (dense, start, pruned), zero-shot accuracy, sparsity, the
    weights left dense, and the run's notes (elsa.methods.notes: what did not go as asked, a fallback, over target...)."""
    stats, target, sp = r.stats, r.target, r.sparsity
    start, label = stats.get("initial_projection_perplexity"), "magnitude"  # ELSA's z0 = magnitude pruning
    if start is None and (r.start or {}).get("perplexity"):             # or a start stage's solution
        start, label = r.start["perplexity"], r.start["name"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    head = f"\n{'corpus':<12} {'dense':>12}" + (f" {label + ' ' + target:>20}" if start else "")
    lines = [head + f" {r.method + ' ' + target:>20}"]
    for name, value in r.perplexity.items():
        row = f"{name:<12} {fmt(r.dense_perplexity.get(name)):>12}"
        if start:
            row += f" {fmt(start.get(name)):>20}"
        lines.append(row + f" {value:>20.3f}")
    lines += zero_shot_lines(r.zero_shot, r.dense_zero_shot, f"{r.method} {target}")
    lines.append(f"measured sparsity {sp['measured']:.4f} over {sp['pruned_params']:,} "
                 f"pruned weights; results in {path}")
    p = r.params or {}
    if "dense_by_kind" in p:
        kinds = ", ".join(f"{k} {v:,}" for k, v in p["dense_by_kind"].items())
        lines.append(f"weights: {p['pruned']:,} pruned, {p['dense']:,} dense ({kinds})")
    if r.rehearsal:
        lines.append(f"SHAPE REHEARSAL: {r.rehearsal['like']}'s shapes with {r.rehearsal['blocks']} random-weight "
                     "block(s); the perplexities above are not the model's")
    lines += [note.text for note in r.notes]
    return lines


def _acc(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _acc_pair(metrics: dict) -> str:
    return f"{_acc(metrics.get('acc'))} / {_acc(metrics.get('acc_norm'))}" if metrics else "-"


def zero_shot_lines(pruned: dict, dense: dict, label: str) -> list[str]:
    """Accuracy rows (acc / acc_norm where the task defines it) for the printed summary."""
    if not pruned:
        return []
    lines = [f"\n{'task (acc / acc_norm)':<28} {'dense':>17} {label:>17}"]
    for name, metrics in pruned["tasks"].items():
        lines.append(f"{name:<28} {_acc_pair(dense.get('tasks', {}).get(name, {})):>17} {_acc_pair(metrics):>17}")
    lines.append(f"{'mean acc':<28} {_acc(dense.get('mean_acc')):>17} {_acc(pruned['mean_acc']):>17}")
    return lines
