"""Sweep report: every results.json below a dir -> a table (markdown + CSV) and perplexity plots (PNG).

    python -m elsa.report multirun/2026-11-26/10-00-00 [--out DIR]
    python -m elsa.report docs/field/results.csv      # re-draw a stored table (its sweep dir gone)
    python -m elsa.report docs/field/results.csv multirun/new --out docs/field   # refresh some cells of a table

Several sources (sweep dirs and stored results.csv tables) make one table; where two sources hold the same
cell (model, method label, sparsity target, seed), the later source's row replaces the earlier one, and the
report says which rows it replaced. So a stored field table is refreshed with the cells a new sweep re-ran.
A table read from a results.csv or merged from several sources draws no allocation plot (the per-layer
records live only in the job dirs).

One row per job: model, method, sparsity target, seed, status, perplexity per corpus, zero-shot mean acc (when
the job measured it), compressed checkpoint size (save_format=compressed|both) and batch-1 decode speedup of the
sparse kernels over dense (measure_speed=true) where jobs recorded them, measured sparsity, non-zero parameters,
wall time. Failed jobs (and job dirs Hydra made
but that hold no results.json: killed jobs) appear in the table and are left out of the plots.

A row's method is labelled from the run's three choices: the method, where it started and its budget, e.g.
"elsa (from sparsegpt, quick)", and the allocation of the ratio across matrices: "wanda (owl)"; the dense start,
the paper budget and the uniform allocation are left out ("elsa", "wanda"), and so is the budget of a method
without steps or epochs. Method keys set on the command line follow ("elsa (from sparsegpt, demo,
projection=taylor)"), so rows that differ only there do not share a label. Sweep dirs written before these choices existed (results.json
naming a preset such as elsa_quick, or method.init) get the same labels (elsa.run.renamed.OLD_METHODS). Rows are
ordered by method, then start, then budget.

Plots, one PNG per perplexity corpus:
- ``ppl_vs_sparsity_<corpus>.png``: log perplexity vs target sparsity, one panel per model, one line per method
  over the unstructured ratios, N:M targets as diamonds at their ratio (2:4 at 0.5), the dense model as a
  dashed horizontal line;
- ``ppl_vs_nonzero_<corpus>.png``: log perplexity vs non-zero parameters (whole model) across models, one
  colour per method, one marker per model, dense models as black stars;
- ``allocation_per_layer.png`` when jobs ran a non-uniform allocation (allocation=owl, profile): the sparsity
  allocated to each decoder layer, one line per job.
"""
from __future__ import annotations

import argparse
import logging
import math
import numbers
import sys
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from elsa.report.frontier import SERIES, compute_columns, plot_frontier, tokens_to_pass, tokens_to_pass_markdown
from elsa.methods import registry
from elsa.run.renamed import OLD_METHODS
from elsa.sparsity.patterns import Sparsity
from elsa.report.results import RESULTS, RunRecord, read_record

log = logging.getLogger(__name__)
BUDGET_ORDER = ["paper", "cpu", "quick", "demo"]
ALLOCATION_ORDER = ["uniform", "owl", "global", "profile"]
PPL = "ppl/"          # column prefix: perplexity of the pruned model per corpus
DENSE = "dense_ppl/"  # column prefix: perplexity of the dense model per corpus
# notes that describe a method's own structure, not a deviation: the grids and plots name them without the
# per-cell figures of the row label (OATS's "low rank 7.4% + sparse 22.6%" differs at every sparsity)
STRUCTURE = {"lowrank": "sparse + low rank"}


# -- collecting ---------------------------------------------------------------------------------------------
def job_dirs(root: Path) -> list[Path]:
    """Every dir below ``root`` that holds a results.json or a Hydra job record (.hydra/overrides.yaml)."""
    root = Path(root)
    found = {p.parent for p in root.rglob(RESULTS)}
    found |= {p.parent.parent for p in root.rglob(".hydra/overrides.yaml")}
    return sorted(found)


def _target(value) -> tuple[float, bool]:
    """(ratio, is N:M) of a target as stored ("0.9", "2:4"); NaN when it is not a valid target."""
    try:
        s = Sparsity.parse(value)
    except Exception:  # noqa: BLE001 - a failed job may hold any value
        return math.nan, False
    return s.ratio, s.is_nm


def _zero_shot_mean(block) -> float | None:
    if not isinstance(block, dict):
        return None
    value = block.get("mean_acc", block.get("mean"))
    return float(value) if isinstance(value, (int, float)) else None


def _missing_row(job_dir: Path, root: Path) -> dict:
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    overrides = list(OmegaConf.load(overrides_file)) if overrides_file.exists() else []
    return {"status": "missing", "dir": str(job_dir.relative_to(root)), "overrides": " ".join(overrides),
            "error": "no results.json (killed or still running)"}


def choices(data: dict) -> tuple[str | None, str, str | None]:
    """(method, start, budget) of one results.json: budget None for a method without steps or epochs. Old
    results (before start= and budget=) are read from the preset name in their overrides or method key."""
    rec = as_record(data)
    method = rec.method
    if rec.start is not None:
        return method, rec.start.get("name") or "dense", rec.budget
    overrides = dict(o.split("=", 1) for o in rec.overrides or [] if "=" in o)
    old = OLD_METHODS.get(overrides.get("method")) or OLD_METHODS.get(method)
    if old is not None:
        method, budget, start = old
    else:
        budget, start = ("paper" if method in registry.names("has_budget") else None), "dense"
    init = rec.stats.get("init")            # the old trainer's one-shot start
    if isinstance(init, dict) and init.get("method"):
        start = init["method"]
    return method, overrides.get("method.init", start), budget


def allocation_of(data: dict) -> str:
    """The allocation a results.json ran (results before allocations existed: uniform)."""
    return (as_record(data).allocation or {}).get("name") or "uniform"


# method keys that only observe a training run (its held-out history, its checkpoints): the weights and the
# perplexity are the same bit for bit with or without them (tests/test_report.py runs ELSA both ways), so they
# do not split a row's label
OBSERVING = ("eval_every", "eval_split", "eval_tokens", "eval_initial", "checkpoint_every")


def method_options(data: dict) -> list[str]:
    """The method keys a run set on its command line (``method.projection=taylor`` -> ``projection=taylor``):
    rows that differ only there must not share a label. ``method.init`` (the old start) is read by choices; the
    keys that only observe the run (``OBSERVING``) are not options."""
    opts = []
    for o in as_record(data).overrides or []:
        key, _, value = o.lstrip("+~").partition("=")
        name = key[len("method."):]
        if key.startswith("method.") and key != "method.init" and value and name not in OBSERVING:
            opts.append(f"{name}={value}")
    return sorted(opts)


def label(method: str | None, start: str, budget: str | None, allocation: str = "uniform",
          options: list[str] = ()) -> str | None:
    """"elsa (owl, from sparsegpt, quick, projection=taylor)": the method, then what is not the default (uniform
    allocation, dense start, paper budget), then the method keys set on the command line."""
    if method is None:
        return None
    parts = ([allocation] if allocation not in (None, "uniform") else []) + \
        ([f"from {start}"] if start != "dense" else []) + ([budget] if budget not in (None, "paper") else []) + \
        list(options)
    return f"{method} ({', '.join(parts)})" if parts else method


def _order(base, start, budget, allocation="uniform") -> int:
    """Where a row goes: by method, then start, then budget, then allocation."""
    return ((_rank(registry.names(), base) * 100 + _rank(["dense", *registry.names("start_eligible")], start)) * 100 +
            _rank(BUDGET_ORDER, budget)) * 10 + _rank(ALLOCATION_ORDER, allocation)


def _count(n: float) -> str:
    """287k, 1.3M, 10M: a token count for a row label."""
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            v = n / div
            return f"{v:.1f}{unit}".replace(".0" + unit, unit) if v < 10 else f"{v:.0f}{unit}"
    return str(int(n))


def _rank(order: list[str], value) -> int:
    return order.index(value) if value in order else len(order)


def as_record(data: dict | RunRecord) -> RunRecord:
    return data if isinstance(data, RunRecord) else RunRecord.from_dict(data)


def job_row(data: dict | RunRecord, job_dir: Path, root: Path) -> dict:
    """One table row from one results.json (its record, or the dict it holds)."""
    rec = as_record(data)
    sparsity = rec.sparsity or {}
    target = sparsity.get("target")
    ratio, is_nm = _target(target)
    params = rec.params or {}
    base, start, budget = choices(rec)
    allocation = allocation_of(rec)
    method = series = label(base, start, budget, allocation, method_options(rec))
    for note in rec.notes:      # what did not go as asked (a fallback, over target, ...): the row must say so
        if method and note.label:
            method = f"{method} ({note.label})"
            # a method's own structure (OATS's low rank) is labelled per cell with its shares; its cells are
            # still one series of the grids and plots (a fallback or an over-target cell stays its own)
            series = f"{series} ({STRUCTURE.get(note.kind, note.label)})"
    compute = compute_columns(rec.compute or {}, rec.stats)
    cost = ""                   # a training row says what it cost, not only its budget's name
    if compute.get("training_tokens"):
        cost = f" [{_count(compute['training_tokens'])} tokens]"
    elif rec.stats.get("steps_per_block"):     # a block-wise trainer (SAFE): its optimiser steps a block
        cost = f" [{rec.stats['steps_per_block']} steps a block]"
    if method:
        method, series = method + cost, series + cost
    before = rec.stats.get("wall_s_before_resume") or 0.0
    model, rehearsal = rec.model, rec.rehearsal
    if model and isinstance(rehearsal, dict):     # model=shapes: random weights, its own row label
        model = f"{model} (shape rehearsal, random weights)"
    row = {"model": model, "rehearsal": bool(rehearsal), "method": method, SERIES: series if method else None,
           "method_name": base, "start": start,
           "budget": budget, "allocation": allocation,
           "order": _order(base, start, budget, allocation),
           "sparsity": target,
           "sparsity_ratio": ratio, "nm": is_nm, "seed": rec.seed, "status": rec.status,
           "measured_sparsity": sparsity.get("measured"), "nonzero_params": params.get("nonzero"),
           "lowrank_params": sparsity.get("lowrank_params"),
           "total_params": params.get("total"), "pruned_layer_params": sparsity.get("pruned_params"),
           "zero_shot_mean": _zero_shot_mean(rec.zero_shot),
           "dense_zero_shot_mean": _zero_shot_mean(rec.dense_zero_shot),
           "recon_error_mean": (rec.stats.get("reconstruction") or {}).get("mean"),
           # a training run resumed from a checkpoint: its process timed only the rest; the earlier processes'
           # training wall (up to the checkpoint it resumed from) is added, so the row says what the cell cost
           "time_s": _plus(rec.phase_time("total"), before), "prune_s": _plus(rec.phase_time("prune"), before),
           "resumed_from_step": rec.stats.get("resumed_from_step"),
           "peak_rss_mb": rec.memory("cpu_rss"), "rss_at_start_mb": rec.memory("cpu_rss_at_start"),
           "peak_gpu_mb": rec.memory("gpu"),
           "compressed_mb": (rec.compressed or {}).get("mb"),
           "decode_speedup": (rec.inference or {}).get("decode_speedup"),
           "decode_rounds_spread": (rec.inference or {}).get("rounds_spread"),
           "dir": str(job_dir.relative_to(root)) if job_dir != root else ".",
           "overrides": " ".join(rec.overrides or []), "error": rec.error, "git_sha": rec.git_sha,
           **compute}
    for corpus, value in (rec.perplexity or {}).items():
        row[PPL + corpus] = value
    for corpus, value in (rec.dense_perplexity or {}).items():
        row[DENSE + corpus] = value
    return row


def _plus(value: float | None, extra: float) -> float | None:
    return value + extra if value is not None and extra else value


def collect(root: Path) -> pd.DataFrame:
    """The table of every job below ``root`` (a sweep dir, a single run dir or a parent of several)."""
    root = Path(root)
    rows = []
    for job_dir in job_dirs(root):
        rec = read_record(job_dir)
        rows.append(job_row(rec, job_dir, root) if rec is not None else _missing_row(job_dir, root))
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    for col in ("model", "method", "sparsity", "seed", "sparsity_ratio", "nm", "order"):
        if col not in df:
            df[col] = None
    return _sorted(df)


def from_csv(path: Path) -> pd.DataFrame:
    """A report table stored earlier (``results.csv``), for re-drawing when its sweep dir is gone. Tables
    written before the method/budget/start split name presets (``elsa_quick``) or the recorded method name;
    their rows get the three choices and the label from each row's overrides, as :func:`collect` does."""
    df = pd.read_csv(path)
    if "start" not in df:
        rows = []
        for _, r in df.iterrows():
            data = {"method": r.get("method"), "overrides": str(r.get("overrides") or "").split()}
            base, start, budget = choices(data)
            rows.append({"method": label(base, start, budget), "method_name": base, "start": start, "budget": budget})
        for col in ("method", "method_name", "start", "budget"):
            df[col] = [row[col] for row in rows]
    # the order is derived: recomputed, so tables stored before a method was registered sort as new ones do
    def cell(r, col, default=None):
        value = r.get(col, default)
        return default if pd.isna(value) else value

    df["order"] = [_order(cell(r, "method_name"), cell(r, "start"), cell(r, "budget"), cell(r, "allocation", "uniform"))
                   for _, r in df.iterrows()]
    return _sorted(df)


CELL = ["model", "method", "sparsity", "seed"]   # what makes two rows the same cell of a table


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    # a row without a series (a missing job's; a results.csv stored before the column existed): its method label
    df[SERIES] = df[SERIES].fillna(df["method"]) if SERIES in df else df["method"]
    for col in ("seed", "nonzero_params", "total_params", "pruned_layer_params", "order", "resumed_from_step"):
        if col in df:
            df[col] = df[col].astype("Int64")
    # by series before the label: a series' cells (OATS's, whose labels carry per-cell shares) in sparsity order
    return df.sort_values(["model", "order", SERIES, "nm", "sparsity_ratio", "method", "seed", "dir"],
                          na_position="last", kind="stable").reset_index(drop=True)


def merge(tables: list[tuple[str, pd.DataFrame]]) -> tuple[pd.DataFrame, list[str]]:
    """One table from several (name, table) sources, in order: a row of a later source replaces the rows of
    earlier sources with the same cell (:data:`CELL`); rows of one source never replace each other (a sweep
    may hold a cell twice, e.g. a rerun into a new job dir, and both stay visible). Returns the table (with a
    ``source`` column: where each row came from, kept from a stored merged table) and one line per replaced row."""
    kept: list[pd.DataFrame] = []
    replaced: list[str] = []

    def key(df):
        return df[CELL].apply(lambda r: "|".join("" if pd.isna(v) else str(v) for v in r), axis=1)

    for name, df in tables:
        df = df.copy()   # a stored merged table keeps the sources it names; its other rows are this source's
        df["source"] = df["source"].fillna(name) if "source" in df else name
        if df.empty:
            continue
        new = set(key(df))
        for i, old in enumerate(kept):
            hit = key(old).isin(new)
            for _, r in old[hit].iterrows():
                replaced.append(f"{r['model']} / {r['method']} / {r['sparsity']} / seed {r['seed']}: "
                                f"{r['source']} ({r['dir']}) replaced by {name}")
            kept[i] = old[~hit]
        kept.append(df)
    kept = [k for k in kept if not k.empty]
    if not kept:
        return pd.DataFrame(), replaced
    return _sorted(pd.concat(kept, ignore_index=True)), replaced


def read_source(path: Path) -> pd.DataFrame:
    """A sweep dir (its jobs) or a stored results.csv (re-labelled) as a table."""
    path = Path(path)
    if path.is_file() and path.suffix == ".csv":
        return from_csv(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory or a results.csv")
    df = collect(path)
    if df.empty:
        raise FileNotFoundError(f"no {RESULTS} below {path}")
    return df


def corpora(df: pd.DataFrame) -> list[str]:
    return [c[len(PPL):] for c in df.columns if c.startswith(PPL)]


def done(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["status"] == "done"] if "status" in df else df.iloc[0:0]


def dense_baselines(df: pd.DataFrame, corpus: str) -> dict[str, float]:
    """Dense perplexity per model: a method=dense job's result, else the dense_perplexity jobs report."""
    out: dict[str, float] = {}
    ok = done(df)
    for model, group in ok.groupby("model"):
        dense_jobs = group[group["method"] == "dense"]
        values = dense_jobs.get(PPL + corpus, pd.Series(dtype=float)).dropna()
        if values.empty:
            values = group.get(DENSE + corpus, pd.Series(dtype=float)).dropna()
        if not values.empty:
            out[model] = float(values.median())
    return out


# -- tables ---------------------------------------------------------------------------------------------------
def _fmt(value, digits: int = 3) -> str:
    if value is None or (not isinstance(value, (str, bool)) and pd.isna(value)):
        return ""
    if isinstance(value, (bool, str)):
        return str(value).replace("|", "\\|").replace("\n", " ")
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}"
    if isinstance(value, numbers.Real):
        if abs(value) >= 1e5:
            return f"{value:,.0f}"
        return f"{value:,.1f}" if abs(value) >= 1e3 else f"{value:.{digits}f}"
    return str(value).replace("|", "\\|")


def markdown_table(df: pd.DataFrame, columns: list[str], headers: list[str]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def grid(df: pd.DataFrame, column: str, model: str, dense: float | None = None) -> pd.DataFrame:
    """Method x sparsity target for one model: ``column`` of the finished jobs (the median over seeds),
    "failed" where every job of the cell failed, "" where none ran; a dense row first when ``dense`` is given."""
    jobs = df[(df["model"] == model) & df[SERIES].notna() & df["sparsity"].notna()]
    if jobs.empty:
        return pd.DataFrame()
    targets = (jobs[["sparsity", "sparsity_ratio", "nm"]].drop_duplicates("sparsity")
               .sort_values(["nm", "sparsity_ratio"], kind="stable")["sparsity"].astype(str).tolist())
    rows = []
    if dense is not None:
        rows.append({"method": "dense", **{t: dense for t in targets}})
    for method in _method_order(jobs):
        if method == "dense" and dense is not None:
            continue                                  # already the first row
        row = {"method": method}
        for target in targets:
            cell = jobs[(jobs[SERIES] == method) & (jobs["sparsity"].astype(str) == target)]
            values = done(cell)[column].dropna() if column in cell else pd.Series(dtype=float)
            row[target] = float(values.median()) if not values.empty else ("failed" if len(cell) else "")
        rows.append(row)
    return pd.DataFrame(rows, columns=["method", *targets])


def grids(df: pd.DataFrame) -> list[str]:
    """Per model: perplexity, wall time and peak memory as method x sparsity grids (when the sweep has several
    methods or targets: the shape of a results table in a paper)."""
    parts = []
    names = corpora(df)
    for model in sorted(df["model"].dropna().unique()):
        jobs = df[df["model"] == model]
        if jobs[SERIES].nunique() < 2 and jobs["sparsity"].nunique() < 2:
            continue
        for title, column, dense in (
                *[(f"perplexity ({c})", PPL + c, dense_baselines(df, c).get(model)) for c in names],
                ("compressed size (MB)", "compressed_mb", None), ("decode speedup (sparse / dense)", "decode_speedup", None),
                ("time (s)", "time_s", None), ("peak RSS (MB)", "peak_rss_mb", None)):
            table = grid(df, column, model, dense)
            if table.empty or column not in df or not df[column].notna().any():
                continue
            cols = list(table.columns)
            notes = _unequal_nonzeros(table, jobs) if column.startswith(PPL) else []
            parts += [f"## {model}: {title} by method and sparsity", "",
                      markdown_table(table, cols, cols), "", *notes, *([""] if notes else [])]
    return parts


def _params(n: float) -> str:
    return f"{n / 1e6:,.1f}M" if n >= 1e6 else f"{n:,.0f}"


def _unequal_nonzeros(table: pd.DataFrame, jobs: pd.DataFrame, tolerance: float = 0.01) -> list[str]:
    """Mark (†, in ``table``) the perplexity cells whose model keeps more or fewer non-zero parameters than the
    column's other methods (by more than ``tolerance`` of their median), e.g. OATS at N:M, whose low-rank factors
    come on top of the N:M part, and say by how much below the grid: a grid reads as equal non-zeros per column."""
    if "nonzero_params" not in jobs:
        return []
    ok = done(jobs).dropna(subset=["nonzero_params"])
    lines = []
    for target in [c for c in table.columns if c != "method"]:
        cell = ok[ok["sparsity"].astype(str) == target]
        if cell[SERIES].nunique() < 2:
            continue
        median = float(cell.groupby(SERIES)["nonzero_params"].median().median())
        for series, group in cell.groupby(SERIES, sort=False):
            n = float(group["nonzero_params"].median())
            if abs(n - median) <= tolerance * median:
                continue
            i = table.index[table["method"] == series]
            if len(i) and isinstance(table.at[i[0], target], float):
                table[target] = table[target].astype(object)
                table.at[i[0], target] = f"{_fmt(table.at[i[0], target])} †"
                lines.append(f"† {series} at {target}: {_params(n)} non-zero parameters, the column's median "
                             f"{_params(median)} ({n / median - 1:+.0%})")
    return lines


def markdown(df: pd.DataFrame) -> str:
    names = corpora(df)
    cols = ["model", "method", "sparsity", "seed", "status", *[PPL + c for c in names]]
    heads = ["model", "method", "sparsity", "seed", "status", *[f"ppl {c}" for c in names]]
    for col, head in (("compressed_mb", "compressed (MB)"), ("decode_speedup", "decode speedup"),
                      ("decode_rounds_spread", "decode rounds spread")):   # > elsa.artifacts.generate.STEADY: not quiet
        if col in df and df[col].notna().any():   # jobs that saved a compressed model / measured sparse decoding
            cols.append(col)
            heads.append(head)
    if "zero_shot_mean" in df and df["zero_shot_mean"].notna().any():
        cols.append("zero_shot_mean")
        heads.append("zero-shot mean acc")
    if "recon_error_mean" in df and df["recon_error_mean"].notna().any():   # the layer-wise methods' yardstick
        cols.append("recon_error_mean")
        heads.append("mean rel. output error")
    cols += ["measured_sparsity", "nonzero_params", "prune_s", "time_s", "peak_rss_mb"]
    heads += ["measured sparsity", "non-zero params", "prune (s)", "time (s)", "peak RSS (MB)"]
    if "rss_at_start_mb" in df and df["rss_at_start_mb"].notna().any():
        cols.append("rss_at_start_mb")          # a sweep's jobs share a process: what the job found held
        heads.append("RSS at start (MB)")
    if "peak_gpu_mb" in df and df["peak_gpu_mb"].notna().any():
        cols.append("peak_gpu_mb")
        heads.append("peak GPU (MB)")
    parts = [*grids(df), "## Results", "", markdown_table(df, cols, heads), ""]
    dense = [(m, c, v) for c in names for m, v in dense_baselines(df, c).items()]
    if dense:
        table = pd.DataFrame(dense, columns=["model", "corpus", "ppl"])
        parts += ["## Dense baselines", "", markdown_table(table, ["model", "corpus", "ppl"],
                                                           ["model", "corpus", "dense ppl"]), ""]
    bad = df[df["status"] != "done"]
    if not bad.empty:
        parts += ["## Jobs that did not finish", "",
                  markdown_table(bad, ["dir", "status", "overrides", "error"], ["dir", "status", "overrides", "error"]),
                  ""]
    for c in names:
        passing = tokens_to_pass_markdown(tokens_to_pass(df, c))
        if passing:
            parts += [f"## Tokens to pass ({c}): the tokens at which each training curve's held-out perplexity first "
                      "fell below each one-shot method's (\"-\": not by the curve's end)", "", passing, ""]
    parts.append("Pruned: every Linear inside the decoder blocks; embeddings, norms and lm_head stay dense. "
                 "Non-zero params count the whole model.")
    return "\n".join(parts) + "\n"


def summary(df: pd.DataFrame) -> str:
    """The sweep's jobs as one aligned text table for the terminal (printed at the end of a sweep): per model
    the dense model first, then one line per job in report order, with perplexity per corpus and wall time."""
    names = corpora(df)
    heads = ["model", "method", "sparsity", *[f"ppl {c}" for c in names], "time (s)", "status"]
    rows = []
    for model in [m for m in df["model"].dropna().unique()]:
        jobs = df[df["model"] == model]
        dense = {c: dense_baselines(df, c).get(model) for c in names}
        if any(v is not None for v in dense.values()) and not (jobs["method"] == "dense").any():
            rows.append([model, "dense", "", *[_fmt(dense[c]) for c in names], "", ""])
        for _, job in jobs.iterrows():
            rows.append([model, _fmt(job.get("method")), _fmt(job.get("sparsity")),
                         *[_fmt(job.get(PPL + c)) for c in names], _fmt(job.get("time_s"), 0),
                         _fmt(job.get("status"))])
    rows += [["", _fmt(r.get("dir")), "", *[""] * len(names), "", _fmt(r.get("status"))]
             for _, r in df[df["model"].isna()].iterrows()]   # job dirs without results (killed jobs)
    widths = [max(len(str(x)) for x in col) for col in zip(heads, *rows)]
    line = lambda cells: "  ".join(f"{c:<{w}}" if i < 3 else f"{c:>{w}}"  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(heads), *map(line, rows)])


# -- plots ------------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(methods) -> dict[str, tuple]:
    """One distinct colour per method: tab10 up to ten methods, tab20 beyond (the field has eleven)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(methods) <= 10 else "tab20"]
    return {m: cmap(i % cmap.N) for i, m in enumerate(methods)}


MARKERS = "os^vPX*h<>p"   # one per method too, so that curves which coincide (SAFE-1-epoch on magnitude) show


def _markers(methods) -> dict[str, str]:
    return {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(methods)}


def _legend_outside(ax, fontsize: int = 8) -> None:
    ax.legend(fontsize=fontsize, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def _curve(group: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Mean over seeds at each x, sorted by x."""
    return group.groupby(x, as_index=False)[y].mean().sort_values(x)


def plot_vs_sparsity(df: pd.DataFrame, corpus: str, path: Path) -> Path:
    plt = _plt()
    y = PPL + corpus
    ok = done(df).dropna(subset=[y, "sparsity_ratio"])
    models = sorted(ok["model"].unique())
    methods = [m for m in _method_order(ok) if m != "dense"]
    colors, marks = _colors(methods), _markers(methods)
    dense = dense_baselines(df, corpus)
    fig, axes = plt.subplots(1, max(len(models), 1), figsize=(7 * max(len(models), 1), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        sub = ok[ok["model"] == model]
        for method in methods:
            rows = sub[sub[SERIES] == method]
            dense_part, nm_part = rows[~rows["nm"].astype(bool)], rows[rows["nm"].astype(bool)]
            if not dense_part.empty:
                c = _curve(dense_part, "sparsity_ratio", y)
                ax.plot(c["sparsity_ratio"], c[y], marker=marks[method], color=colors[method], label=method,
                        markerfacecolor="none", markersize=8)
            for _target, g in nm_part.groupby("sparsity"):
                ax.scatter([g["sparsity_ratio"].iloc[0]], [g[y].mean()], marker="D", s=60, color=colors[method],
                           edgecolors="black", zorder=3)
        if ok.loc[ok["model"] == model, "nm"].astype(bool).any():   # one legend entry for every N:M diamond
            ax.scatter([], [], marker="D", s=60, color="white", edgecolors="black", label="N:M (at N/M)")
        if model in dense:
            ax.axhline(dense[model], color="black", linestyle="--", linewidth=1, label="dense")
        _log_axis(ax, "y")
        ax.set_title(str(model))
        ax.set_xlabel("sparsity (fraction of pruned weights; N:M at N/M)")
        ax.set_ylabel(f"perplexity ({corpus})")
        ax.grid(True, which="both", alpha=0.3)
        _legend_outside(ax)
    return _save(plt, fig, path)


def plot_vs_nonzero(df: pd.DataFrame, corpus: str, path: Path) -> Path:
    plt = _plt()
    y = PPL + corpus
    ok = done(df).dropna(subset=[y, "nonzero_params"])
    methods = [m for m in _method_order(ok) if m != "dense"]
    colors = _colors(methods)
    markers = dict(zip(sorted(ok["model"].unique()), "osv^<>pPhX"))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model, sub in ok.groupby("model"):
        for method in methods:
            rows = sub[(sub[SERIES] == method) & ~sub["nm"].astype(bool)]
            if not rows.empty:
                c = _curve(rows, "nonzero_params", y)
                ax.plot(c["nonzero_params"], c[y], marker=markers.get(model, "o"), color=colors[method],
                        label=f"{method} ({model})")
        dense_rows = sub[sub["method"] == "dense"]
        if dense_rows.empty:  # every job knows its dense perplexity; the dense model keeps all its parameters
            dense_rows = sub.dropna(subset=[DENSE + corpus, "total_params"]) if DENSE + corpus in sub else sub[0:0]
            xs, ys = dense_rows["total_params"], dense_rows.get(DENSE + corpus)
        else:
            xs, ys = dense_rows["nonzero_params"], dense_rows[y]
        if len(xs):
            ax.scatter([float(xs.median())], [float(ys.median())], marker="*", s=150, color="black", zorder=3,
                       label=f"dense ({model})")
    ax.set_xscale("log")
    _log_axis(ax, "y")
    ax.set_xlabel("non-zero parameters (whole model)")
    ax.set_ylabel(f"perplexity ({corpus})")
    ax.grid(True, which="both", alpha=0.3)
    _legend_outside(ax, fontsize=7)
    return _save(plt, fig, path)


def allocations(root: Path) -> list[dict]:
    """The non-uniform allocations of the finished jobs below ``root``: label, target, per-layer ratios."""
    out = []
    for job_dir in job_dirs(Path(root)):
        data = read_record(job_dir)
        alloc = (data.allocation if data is not None else None) or {}
        if data is None or data.status != "done" or not alloc.get("per_layer"):
            continue
        base, start, budget = choices(data)
        out.append({"label": f"{label(base, start, budget, allocation_of(data))} {data.target}",
                    "model": data.model, "ratios": list(alloc["per_layer"].values()),
                    "outliers": list((alloc.get("outlier_ratios") or {}).values())})
    return out


def plot_allocation(jobs: list[dict], path: Path) -> Path:
    """The sparsity allocated to each decoder layer, one line per job (one panel per model)."""
    plt = _plt()
    models = sorted({j["model"] for j in jobs}, key=str)
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        for job in (j for j in jobs if j["model"] == model):
            ax.plot(range(len(job["ratios"])), job["ratios"], marker="o", markersize=4, label=job["label"])
        ax.set_title(str(model))
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("allocated sparsity")
        ax.grid(True, alpha=0.3)
        _legend_outside(ax)
    return _save(plt, fig, path)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")      # the legends sit outside the axes
    plt.close(fig)
    return path


def _log_axis(ax, axis: str) -> None:
    """Log scale with plain-number labels; minor ticks labelled only when the range is under a decade."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    getattr(ax, f"set_{axis}scale")("log")
    target = ax.yaxis if axis == "y" else ax.xaxis
    target.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    lo, hi = ax.get_ylim() if axis == "y" else ax.get_xlim()
    target.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}") if hi / max(lo, 1e-12) < 10 else NullFormatter())


def _method_order(df: pd.DataFrame) -> list[str]:
    """The series (row labels of the grids, lines of the plots) in order: by method, then start, then budget (the
    ``order`` column), then name."""
    rows = df.dropna(subset=[SERIES])
    order = rows.groupby(SERIES)["order"].min() if "order" in rows else pd.Series(dtype="Int64")
    big = 10 ** 9
    return sorted(rows[SERIES].unique(), key=lambda m: (int(order.get(m)) if pd.notna(order.get(m)) else big, m))


# -- the command -----------------------------------------------------------------------------------------------
def write_report(root: Path | None, out: Path | None = None, table: pd.DataFrame | None = None) -> dict[str, Path]:
    """Write results.csv, results.md and the PNG plots into ``out`` (default ``<root>/report``), from the jobs
    below ``root`` or from ``table`` (a stored results.csv read by :func:`from_csv`)."""
    df = collect(Path(root)) if table is None else table
    if df.empty:
        raise FileNotFoundError(f"no {RESULTS} below {root}")
    out = Path(out) if out is not None else Path(root) / "report"
    out.mkdir(parents=True, exist_ok=True)
    files = {"csv": out / "results.csv", "markdown": out / "results.md"}
    df.to_csv(files["csv"], index=False)
    files["markdown"].write_text(markdown(df))
    ok = done(df)
    for corpus in corpora(df):
        if not ok[PPL + corpus].notna().any():
            continue
        files[f"sparsity_{corpus}"] = plot_vs_sparsity(df, corpus, out / f"ppl_vs_sparsity_{corpus}.png")
        if "nonzero_params" in ok and ok["nonzero_params"].notna().any():
            files[f"nonzero_{corpus}"] = plot_vs_nonzero(df, corpus, out / f"ppl_vs_nonzero_{corpus}.png")
    if "compute_tokens" in ok and ok["compute_tokens"].notna().any():
        methods = _method_order(df)
        for corpus in corpora(df):
            path = plot_frontier(df, corpus, out / f"ppl_vs_tokens_{corpus}.png", _plt(), _colors(methods),
                                 _markers(methods))
            if path is not None:
                files[f"frontier_{corpus}"] = path
    jobs = allocations(root) if table is None else []   # a stored table has no per-layer records
    if jobs:
        files["allocation"] = plot_allocation(jobs, out / "allocation_per_layer.png")
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m elsa.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", type=Path, nargs="+", metavar="dir",
                        help="a sweep dir (multirun/...), a run dir, or any parent of them; or a results.csv a "
                             "report wrote (re-drawn, old labels updated); several make one table, a later "
                             "source's cell replacing an earlier source's")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write the report (default: <dir>/report; for a results.csv: its dir; "
                             "required for several sources)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if len(args.dirs) > 1 and args.out is None:
        print(f"elsa.report.tables: error: --out is required with several sources ({len(args.dirs)} given): a merged "
              "report has no default dir", file=sys.stderr)
        return 2
    first = args.dirs[0]
    try:
        if len(args.dirs) == 1 and first.is_dir():
            files = write_report(first, args.out)
        else:
            if len(args.dirs) == 1:   # a stored table, re-drawn as it is (a merged one keeps its sources)
                table, replaced = read_source(first), []
            else:
                table, replaced = merge([(str(d), read_source(d)) for d in args.dirs])
            for line in replaced:
                print(f"elsa.report.tables: replaced {line}")
            files = write_report(first, args.out or first.parent, table)
    except FileNotFoundError as exc:
        print(f"elsa.report.tables: error: {exc}", file=sys.stderr)
        return 2
    print(Path(files["markdown"]).read_text())
    for kind, path in files.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
