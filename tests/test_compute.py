"""Compute on every row (issue 26): tokens, FLOPs and wall time per phase in results.json, a training budget in
tokens, and the report's frontier plot and "tokens to pass" table."""
from __future__ import annotations

import json

import pandas as pd

from conftest import run_pipeline

from elsa.report.tables import collect, write_report

ELSA = ["method=elsa", "budget=demo", "method.eval_every=2", "method.eval_split=test", "method.eval_tokens=2048",
        "method.eval_initial=false"]


def test_training_tokens_are_steps_times_batch_and_tokens_set_the_steps(tmp_path):
    r = run_pipeline(tmp_path / "a", *ELSA, "method.steps=6", "method.batch_size=2", "method.grad_accum=2")
    train = r["compute"]["training"]
    assert r["method_stats"]["steps"] == 6
    assert train["tokens"] == 6 * 2 * 2 * 128 == r["method_stats"]["tokens_seen"]
    n = train["flops"] / train["tokens"]
    assert n > 0 and train["wall_s"] > 0 and r["compute"]["evaluation"]["tokens"] == 2048
    # the held-out history is on the run's own test windows, with the tokens of each point
    hist = [h for h in r["method_stats"]["history"] if "heldout_ppl" in h]
    assert [h["tokens"] for h in hist] == [s * 512 for s in (2, 4, 6)]
    assert r["method_stats"]["heldout"] == {"split": "test", "windows": 16, "tokens": 2048}
    # a budget in tokens sets the steps: 5000 tokens of 2 x 2 x 128 per step -> 10 steps
    r = run_pipeline(tmp_path / "b", *ELSA, "method.batch_size=2", "method.grad_accum=2", "++method.tokens=5000")
    assert r["method_stats"]["steps"] == 10 and r["compute"]["training"]["tokens"] == 10 * 512


def test_one_shot_rows_record_their_calibration(tmp_path):
    r = run_pipeline(tmp_path, "method=sparsegpt")
    cal = r["compute"]["calibration"]
    assert cal["tokens"] == 4 * 128 and cal["flops"] > 0 and "SparseGPT" in cal["rule"]
    assert r["compute"]["total"]["tokens"] == cal["tokens"] + r["compute"]["evaluation"]["tokens"]
    r = run_pipeline(tmp_path / "m", "method=magnitude")
    assert r["compute"]["selection"]["tokens"] == 0


def test_report_draws_the_frontier_and_the_tokens_to_pass(tmp_path):
    root = tmp_path / "sweep"
    run_pipeline(root / "wanda", "method=wanda")
    run_pipeline(root / "magnitude", "method=magnitude")
    run_pipeline(root / "elsa", *ELSA, "method.steps=8")
    df = collect(root)
    files = write_report(root)
    assert files["frontier_wiki"].exists() and files["frontier_wiki"].stat().st_size > 0
    elsa_row = df[df["method_name"] == "elsa"].iloc[0]
    assert elsa_row["method"] == "elsa (demo) [1k tokens]"     # 8 steps x 128 tokens: the row says what it cost
    assert df[df["method_name"] == "wanda"].iloc[0]["method"] == "wanda"
    curve = json.loads(elsa_row["curve"])
    assert [p[0] for p in curve] == [s * 128 for s in (2, 4, 6, 8)]
    md = files["markdown"].read_text()
    assert "## Tokens to pass (wiki)" in md
    # a table per model and sparsity: a row per training curve, a column per one-shot method (its ppl in the header)
    section = md.split("## Tokens to pass (wiki)")[1].split("### tiny at 0.5\n\n")[1].split("\n\n")[0]
    header, _, row = section.splitlines()
    heads, cells = [c.strip() for c in header.split("|")[1:-1]], [c.strip() for c in row.split("|")[1:-1]]
    assert cells[0] == "elsa (demo) [1k tokens]"
    assert cells[1] == f"{curve[-1][0]:,} tokens, ppl {float(elsa_row['ppl/wiki']):.2f}"
    for one_shot in ("wanda", "magnitude"):
        level = float(df[df["method_name"] == one_shot]["ppl/wiki"].iloc[0])
        hit = next((t for t, p in curve if p < level), None)
        i = heads.index(f"{one_shot}: {level:.2f}")
        assert cells[i] == (f"{hit:,}" if hit is not None else "-")
    # a curve measured on another protocol (validation windows) is not drawn against the table's cells
    run_pipeline(root / "elsa_val", *ELSA[:-3], "method.eval_initial=false", "method.steps=4", "seed=1")
    assert pd.isna(collect(root).query("seed == 1")["curve"].iloc[0])


def test_the_frontier_draws_a_data_free_method_beside_the_axis_not_at_one_token(tmp_path):
    """Magnitude reads no token: on a log axis it used to sit at 1 token, stretching the axis over four empty
    decades; it is drawn in a column of its own, a quarter of the fewest tokens any method read."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from elsa.report.frontier import plot_frontier
    df = pd.DataFrame([
        {"status": "done", "ppl/wiki": 400.0, "compute_tokens": 0, "sparsity": "0.5", "method": "magnitude",
         "series": "magnitude", "curve": None},
        {"status": "done", "ppl/wiki": 50.0, "compute_tokens": 16384, "sparsity": "0.5", "method": "wanda",
         "series": "wanda", "curve": None},
        {"status": "done", "ppl/wiki": 45.0, "compute_tokens": 81920, "sparsity": "0.5", "method": "elsa",
         "series": "elsa", "curve": json.dumps([[40960, 70.0], [81920, 45.0]])}])
    figs = []

    class Keep:       # pyplot, with the figure kept for inspection
        def __getattr__(self, name):
            return getattr(plt, name)

        def subplots(self, *a, **k):
            figs.append(plt.subplots(*a, **k))
            return figs[-1]

        def close(self, fig):
            pass

    plot_frontier(df, "wiki", tmp_path / "f.png", Keep(), {}, {})
    ax = figs[0][1][0][0]
    xs = sorted(float(c.get_offsets()[0][0]) for c in ax.collections)
    assert xs == [16384 / 4, 16384, 81920]
    assert 1000 < ax.get_xlim()[0] <= 16384 / 8 and "data-free" in [t.get_text() for t in ax.texts]
    plt.close("all")


def test_a_curve_ends_at_its_rows_own_cell():
    """MaskLLM at budget=quick trains 60 steps with a held-out point every 40: the curve (and the tokens to pass
    read from it) ends at the run's final cell, not at step 40; a run whose last point is its end is left as is."""
    from elsa.report.frontier import full_curve
    row = {"curve": json.dumps([[36864, 117.3]]), "compute_tokens": 47104, "ppl/wiki": 98.9}
    assert full_curve(row, "ppl/wiki") == [[36864, 117.3], [47104, 98.9]]
    row = {"curve": json.dumps([[40960, 60.0], [81920, 43.4]]), "compute_tokens": 81920, "ppl/wiki": 43.4}
    assert full_curve(row, "ppl/wiki") == [[40960, 60.0], [81920, 43.4]]
    table = pd.DataFrame([{"model": "m", "sparsity": "2:4", "status": "done", "method": "maskllm", "series": "maskllm",
                           "training_tokens": 30720, "ppl/wiki": 98.9, "compute_tokens": 47104,
                           "curve": json.dumps([[36864, 117.3]])},
                          {"model": "m", "sparsity": "2:4", "status": "done", "method": "sparsegpt",
                           "series": "sparsegpt", "training_tokens": None, "ppl/wiki": 107.9, "compute_tokens": 16384,
                           "curve": None}])
    from elsa.report.frontier import tokens_to_pass
    assert tokens_to_pass(table, "wiki")["tokens_to_pass"].tolist() == [47104]
