"""elsa.report.tables on a hand-written sweep dir: table values, failed/missing jobs, PNG plots."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from elsa.report import tables as report
REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _job(model, method, target, ratio, ppl, dense, measured, nonzero, total, seed=0, zero_shot=None):
    data = {"status": "done", "model": model, "method": method, "seed": seed,
            "sparsity": {"target": target, "target_ratio": ratio, "measured": measured, "pruned_params": 1000},
            "overrides": [f"model={model}", f"method={method}", f"sparsity={target}"],
            "dense_perplexity": {"wiki": dense}, "perplexity": {"wiki": ppl},
            "params": {"total": total, "nonzero": nonzero}, "time_s": {"prune": 1.0, "total": 2.5},
            "peak_memory_mb": {"cpu_rss": 1234.5, "cpu_rss_at_start": 600.0}}
    if zero_shot is not None:
        data["zero_shot"] = {"tasks": {}, "mean_acc": zero_shot}
    return data


def _write(root: Path, name: str, data: dict | None, overrides=None) -> None:
    d = root / name
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides or data["overrides"]))
    if data is not None:
        (d / "results.json").write_text(json.dumps(data))


@pytest.fixture
def sweep_dir(tmp_path: Path) -> Path:
    root = tmp_path / "multirun" / "2026-11-26" / "10-00-00"
    jobs = [
        _job("tiny", "magnitude", "0.5", 0.5, 40.0, 20.0, 0.5, 1500, 2000, zero_shot=0.41),
        _job("tiny", "magnitude", "0.7", 0.7, 400.0, 20.0, 0.7, 1300, 2000, zero_shot=0.35),
        _job("tiny", "magnitude", "2:4", 0.5, 60.0, 20.0, 0.5, 1500, 2000),
        _job("tiny", "wanda", "0.5", 0.5, 30.0, 20.0, 0.5, 1500, 2000),
        _job("tiny", "wanda", "0.7", 0.7, 90.0, 20.0, 0.7, 1300, 2000),
        _job("other", "magnitude", "0.5", 0.5, 25.0, 12.0, 0.5, 3000, 4000),
        _job("other", "dense", "0.5", 0.5, 12.5, 12.5, 0.0, 4000, 4000),
    ]
    for i, data in enumerate(jobs):
        _write(root, str(i), data)
    _write(root, str(len(jobs)), {"status": "failed", "model": "tiny", "method": "wanda", "sparsity": {"target": "1.5"},
                                  "overrides": ["model=tiny", "method=wanda", "sparsity=1.5"],
                                  "error": "ElsaError: sparsity=1.5 is not allowed", "time_s": {"total": 0.0}})
    _write(root, str(len(jobs) + 1), None, overrides=["model=tiny", "method=wanda", "sparsity=0.9"])  # killed
    return root


def test_collect_table_values(sweep_dir):
    df = report.collect(sweep_dir)
    assert len(df) == 9
    assert (df["status"] == "done").sum() == 7
    failed = df[df["status"] == "failed"].iloc[0]
    assert failed["sparsity"] == "1.5" and "not allowed" in failed["error"] and failed["dir"] == "7"
    assert df[df["status"] == "missing"].iloc[0]["overrides"] == "model=tiny method=wanda sparsity=0.9"
    row = df[(df["model"] == "tiny") & (df["method"] == "wanda") & (df["sparsity"] == "0.7")].iloc[0]
    assert row["ppl/wiki"] == 90.0 and row["measured_sparsity"] == 0.7 and row["nonzero_params"] == 1300
    assert row["time_s"] == 2.5 and row["prune_s"] == 1.0 and row["peak_rss_mb"] == 1234.5
    assert row["rss_at_start_mb"] == 600.0
    nm = df[df["sparsity"] == "2:4"].iloc[0]
    assert bool(nm["nm"]) and nm["sparsity_ratio"] == 0.5
    assert df[df["sparsity"] == "0.5"]["zero_shot_mean"].dropna().tolist() == [0.41]
    # dense line: a method=dense job where there is one, else the dense perplexity the jobs measured
    assert report.dense_baselines(df, "wiki") == {"other": 12.5, "tiny": 20.0}
    # methods in the usual order (dense first), then by sparsity
    tiny = df[(df["model"] == "tiny") & (df["status"] == "done")]
    assert tiny["method"].tolist() == ["magnitude"] * 3 + ["wanda"] * 2


def test_compressed_size_and_speedup_columns(sweep_dir, tmp_path):
    """Jobs that saved a compressed model / measured sparse decoding show both next to perplexity; a sweep
    where no job did shows neither column."""
    df = report.collect(sweep_dir)
    assert "compressed (MB)" not in report.markdown(df) and "decode speedup" not in report.markdown(df)
    data = _job("tiny", "magnitude", "0.9", 0.9, 900.0, 20.0, 0.9, 1100, 2000)
    data["compressed"] = {"mb": 0.3125, "hf_mb": 1.0}
    data["inference"] = {"decode_speedup": 1.75, "rounds_spread": 1.4}     # beside it, how steady the machine was
    _write(sweep_dir, "90", data)
    df = report.collect(sweep_dir)
    row = df[df["sparsity"] == "0.9"].iloc[0]
    assert row["compressed_mb"] == 0.3125 and row["decode_speedup"] == 1.75 and row["decode_rounds_spread"] == 1.4
    md = report.markdown(df)
    assert "| ppl wiki | compressed (MB) | decode speedup | decode rounds spread |" in md
    assert "| tiny | magnitude | 0.9 | 0 | done | 900.000 | 0.312 | 1.750 | 1.400 |" in md
    assert "## tiny: compressed size (MB) by method and sparsity" in md


def test_method_by_sparsity_grid(sweep_dir):
    df = report.collect(sweep_dir)
    table = report.grid(df, "ppl/wiki", "tiny", dense=20.0)
    assert list(table.columns) == ["method", "0.5", "0.7", "1.5", "2:4"]      # N:M targets after the ratios
    rows = {r["method"]: r for r in table.to_dict("records")}
    assert list(rows) == ["dense", "magnitude", "wanda"]
    assert rows["dense"]["0.7"] == 20.0
    assert (rows["magnitude"]["0.5"], rows["magnitude"]["0.7"], rows["magnitude"]["2:4"]) == (40.0, 400.0, 60.0)
    assert rows["wanda"]["2:4"] == "" and rows["wanda"]["1.5"] == "failed"     # not run / failed
    md = report.markdown(df)
    assert "## tiny: perplexity (wiki) by method and sparsity" in md and "## tiny: time (s) by method" in md
    assert "| wanda | 30.000 | 90.000 | failed |  |" in md
    assert report.grid(df, "ppl/wiki", "other", dense=12.5)["method"].tolist() == ["dense", "magnitude"]


def test_report_files(sweep_dir, tmp_path):
    out = tmp_path / "report"
    files = report.write_report(sweep_dir, out)
    csv = pd.read_csv(files["csv"])
    assert len(csv) == 9 and set(csv["status"]) == {"done", "failed", "missing"}
    md = files["markdown"].read_text()
    assert "| tiny | wanda | 0.7 | 0 | done | 90.000 |" in md
    assert "zero-shot mean acc" in md and "0.410" in md
    assert "## Jobs that did not finish" in md and "sparsity=1.5 is not allowed" in md
    for key in ("sparsity_wiki", "nonzero_wiki"):
        assert files[key].read_bytes()[:8] == PNG_MAGIC


def test_failed_jobs_are_left_out_of_plots(sweep_dir):
    df = report.collect(sweep_dir)
    plotted = report.done(df)
    assert "failed" not in set(plotted["status"]) and len(plotted) == 7


def test_cli(sweep_dir, tmp_path):
    out = tmp_path / "cli_report"
    proc = subprocess.run([sys.executable, "-m", "elsa.report", str(sweep_dir), "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| other | dense | 0.5 | 0 | done | 12.500 |" in proc.stdout
    assert (out / "ppl_vs_sparsity_wiki.png").read_bytes()[:8] == PNG_MAGIC
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([sys.executable, "-m", "elsa.report", str(empty)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "no results.json" in proc.stderr


def test_rows_are_labelled_from_the_three_choices(tmp_path):
    """New results carry start and budget; old sweep dirs (preset names, method.init) get the same labels."""
    root = tmp_path / "sweep"
    rows = [  # (method key, overrides' method, start record, budget, extra stats)
        ("elsa", "elsa", {"name": "sparsegpt"}, "quick", {}),
        ("elsa", "elsa", {"name": "dense"}, "quick", {}),
        ("elsa", "elsa", {"name": "dense"}, "paper", {}),
        ("magnitude", "magnitude", {"name": "dense", "skipped": "sparsegpt"}, None, {}),
        ("ast", "ast", {"name": "wanda"}, "cpu", {}),
        ("elsa_from_sparsegpt", "elsa_quick_sgpt", None, None, {}),                 # old: preset names
        ("elsa", "elsa_cpu", None, None, {"init": {"method": "sparsegpt", "time_s": 1.0}}),
        ("elsa", "elsa", None, None, {"init": {"method": "wanda", "time_s": 1.0}}),  # old: method.init=wanda
        ("ast", "ast_quick", None, None, {}),
        ("wanda", "wanda", None, None, {}),
    ]
    for i, (method, preset, start, budget, stats) in enumerate(rows):
        data = _job("tiny", method, "0.7", 0.7, 100.0 + i, 20.0, 0.7, 1300, 2000)
        data["overrides"] = [f"method={preset}", "sparsity=0.7"]
        data["method_stats"] = stats
        if start is not None:
            data.update(start=start, budget=budget)
        _write(root, str(i), data)
    df = report.collect(root)
    assert df["method"].tolist() == ["magnitude", "wanda", "ast (quick)", "ast (from wanda, cpu)", "elsa",
                                     "elsa (quick)", "elsa (from wanda)", "elsa (from sparsegpt, cpu)",
                                     "elsa (from sparsegpt, quick)", "elsa (from sparsegpt, quick)"]
    assert df.loc[df["method"] == "ast (quick)", "ppl/wiki"].tolist() == [108.0]
    assert df.loc[df["method"] == "elsa (from sparsegpt, quick)", "ppl/wiki"].tolist() == [100.0, 105.0]
    grid_rows = report.grid(df, "ppl/wiki", "tiny", dense=20.0)["method"].tolist()
    assert grid_rows[0] == "dense" and grid_rows[1:] == list(dict.fromkeys(df["method"]))


def test_method_keys_of_the_command_line_are_in_the_label(tmp_path):
    """A sweep over method.projection: each row names its projection; an over-target job says so."""
    root = tmp_path / "sweep"
    for i, proj in enumerate(["magnitude", "taylor"]):
        data = _job("tiny", "elsa", "0.9", 0.9, 100.0 + i, 20.0, 0.9, 1300, 2000)
        data["overrides"] = ["method=elsa", "budget=demo", "start=sparsegpt", f"method.projection={proj}",
                             "++method.lr=1e-3", "sparsity=0.9"]
        data.update(start={"name": "sparsegpt"}, budget="demo")
        if proj == "taylor":
            data["sparsity"].update(measured=0.932, over_target=0.032)
        _write(root, str(i), data)
    df = report.collect(root)
    assert df["method"].tolist() == ["elsa (from sparsegpt, demo, lr=1e-3, projection=magnitude)",
                                     "elsa (from sparsegpt, demo, lr=1e-3, projection=taylor) (over target: 0.932)"]


def test_a_methods_structure_is_one_series_a_deviation_its_own(tmp_path, monkeypatch):
    """OATS's low-rank share differs at every sparsity: each row names its shares, the grid and the plots draw its
    cells as one series; a cell that went over target stays a series of its own (the row must say so)."""
    root = tmp_path / "sweep"
    for i, (target, measured, lowrank) in enumerate([("0.5", 0.62, 120), ("0.7", 0.77, 70), ("0.9", 0.95, 50)]):
        data = _job("tiny", "oats", target, float(target), 50.0 + 100 * i, 20.0, measured, 1500 - 500 * i, 2000)
        data["sparsity"].update(lowrank_params=lowrank, effective=float(target))
        _write(root, str(i), data)
    data = _job("tiny", "wanda", "0.5", 0.5, 30.0, 20.0, 0.5, 1500, 2000)
    _write(root, "3", data)
    data = _job("tiny", "wanda", "0.7", 0.7, 90.0, 20.0, 0.73, 1300, 2000)
    data["sparsity"].update(over_target=0.03)
    _write(root, "4", data)
    df = report.collect(root)
    oats = df[df["method_name"] == "oats"]
    assert oats["method"].tolist() == ["oats (low rank 12.0% + sparse 38.0%)", "oats (low rank 7.0% + sparse 23.0%)",
                                       "oats (low rank 5.0% + sparse 5.0%)"]      # the Results rows: per cell
    assert set(oats[report.SERIES]) == {"oats (sparse + low rank)"}
    table = report.grid(df, "ppl/wiki", "tiny", dense=20.0)
    rows = {r["method"]: r for r in table.to_dict("records")}
    assert list(rows) == ["dense", "wanda", "wanda (over target: 0.730)", "oats (sparse + low rank)"]
    assert (rows["oats (sparse + low rank)"]["0.5"], rows["oats (sparse + low rank)"]["0.9"]) == (50.0, 250.0)
    assert rows["wanda"]["0.7"] == "" and rows["wanda (over target: 0.730)"]["0.7"] == 90.0
    md = report.markdown(df)
    # a grid reads as equal non-zeros per column: a cell that is not says so (OATS at 0.7 keeps 1,000, wanda 1,300)
    assert "| oats (sparse + low rank) | 50.000 | 150.000 † | 250.000 |" in md
    assert "† oats (sparse + low rank) at 0.7: 1,000 non-zero parameters, the column's median 1,150 (-13%)" in md
    assert "at 0.5:" not in md and "at 0.9:" not in md       # 1,500 against 1,500; a column of one series
    assert "| tiny | oats (low rank 7.0% + sparse 23.0%) | 0.7 |" in md
    drawn = []      # the sparsity plot draws one line for OATS's three cells
    real_plot = report.plot_vs_sparsity

    def spy(df, corpus, path):
        import matplotlib.axes
        orig = matplotlib.axes.Axes.plot
        monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                            lambda ax, *a, **k: (drawn.append((k.get("label"), len(a[0]))), orig(ax, *a, **k))[1])
        try:
            return real_plot(df, corpus, path)
        finally:
            monkeypatch.setattr(matplotlib.axes.Axes, "plot", orig)

    spy(df, "wiki", tmp_path / "s.png")
    assert ("oats (sparse + low rank)", 3) in drawn
    # a results.csv stored before the series column: every row its own series, as its label
    old = tmp_path / "old.csv"
    df.drop(columns=[report.SERIES]).to_csv(old, index=False)
    assert report.from_csv(old)[report.SERIES].tolist() == report.from_csv(old)["method"].tolist()


def test_a_resumed_run_counts_its_earlier_processes_time(tmp_path):
    """A training run resumed from its step-60 checkpoint timed only its own process; the row adds the training
    wall of the processes before (method_stats.wall_s_before_resume), so the time grid says what the cell cost."""
    root = tmp_path / "sweep"
    fresh = _job("tiny", "ast", "0.5", 0.5, 40.0, 20.0, 0.5, 1500, 2000)
    resumed = _job("tiny", "ast", "0.7", 0.7, 90.0, 20.0, 0.7, 1300, 2000)
    resumed["method_stats"] = {"resumed_from_step": 60, "wall_s_before_resume": 731.5}
    _write(root, "0", fresh)
    _write(root, "1", resumed)
    df = report.collect(root).set_index("sparsity")
    assert (df.at["0.5", "time_s"], df.at["0.5", "prune_s"]) == (2.5, 1.0) and pd.isna(df.at["0.5", "resumed_from_step"])
    assert (df.at["0.7", "time_s"], df.at["0.7", "prune_s"], df.at["0.7", "resumed_from_step"]) == (734.0, 732.5, 60)


def test_a_block_wise_trainer_says_how_many_steps_a_block_it_took(tmp_path):
    """SAFE at budget=cpu trains each block 4 steps (one epoch), its paper 240: the row says so, as a training
    row says its tokens."""
    data = _job("tiny", "safe", "0.5", 0.5, 474.6, 20.0, 0.5, 1500, 2000)
    data.update(start={"name": "dense"}, budget="cpu", method_stats={"steps_per_block": 4, "variant": "safe"})
    _write(tmp_path / "sweep", "0", data)
    assert report.collect(tmp_path / "sweep")["method"].tolist() == ["safe (cpu) [4 steps a block]"]


def test_keys_that_only_observe_a_run_do_not_split_its_label(tmp_path):
    """The held-out history and the checkpoints (report.OBSERVING) leave the weights and the perplexity as they
    are, bit for bit (ELSA run both ways), so a row with them is labelled as one without."""
    import hashlib

    import torch
    from conftest import run_pipeline
    from safetensors.torch import load_file

    def weights(path):
        return {k: hashlib.sha256(v.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
                for k, v in load_file(str(path / "model" / "model.safetensors")).items()}

    base = ["method=elsa", "budget=demo", "sparsity=0.7", "hardware.threads=1", "method.steps=6"]
    plain = run_pipeline(tmp_path / "plain", *base, "method.eval_every=0", "method.eval_initial=false")
    observed = run_pipeline(tmp_path / "observed", *base, *(f"++method.{k}={v}" for k, v in zip(
        report.OBSERVING, (2, "test", 512, "true", 3))))
    assert weights(tmp_path / "plain") == weights(tmp_path / "observed")
    assert plain["perplexity"] == observed["perplexity"]
    history = ["++method.eval_every=40", "++method.eval_split=test", "++method.eval_tokens=8192",
               "method.checkpoint_every=32", "method.eval_initial=false"]
    labels = [report.label("elsa", "dense", "demo", options=report.method_options(
        {"overrides": ["method=elsa", "budget=demo", "method.steps=6", *extra]})) for extra in ([], history)]
    assert labels == ["elsa (demo, steps=6)"] * 2


def test_a_stored_table_is_redrawn_with_the_three_choices(tmp_path):
    """python -m elsa.report <results.csv>: a table written before the method/budget/start split (preset names
    in the overrides) is re-drawn with the labels a sweep dir of that time gets."""
    root = tmp_path / "old"
    for i, (method, preset) in enumerate([("elsa", "elsa_quick"), ("elsa_from_sparsegpt", "elsa_quick_sgpt"),
                                          ("wanda", "wanda"), ("safe", "safe_cpu")]):
        data = _job("tiny", method, "0.7", 0.7, 100.0 + i, 20.0, 0.7, 1300, 2000)
        data["overrides"] = [f"method={preset}", "sparsity=0.7"]
        _write(root, str(i), data)
    old = report.collect(root).drop(columns=["method_name", "start", "budget", "order"])
    recorded = {"elsa_quick": "elsa", "elsa_quick_sgpt": "elsa_from_sparsegpt", "wanda": "wanda", "safe_cpu": "safe"}
    old["method"] = [recorded[o.split()[0].split("=")[1]] for o in old["overrides"]]   # what old tables held
    old.to_csv(tmp_path / "results.csv", index=False)
    proc = subprocess.run([sys.executable, "-m", "elsa.report", str(tmp_path / "results.csv"), "--out",
                           str(tmp_path / "new")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    new = pd.read_csv(tmp_path / "new" / "results.csv")
    assert dict(zip(new["method"], new["ppl/wiki"])) == {"wanda": 102.0, "safe (cpu)": 103.0, "elsa (quick)": 100.0,
                                                        "elsa (from sparsegpt, quick)": 101.0}
    assert "| elsa (from sparsegpt, quick) | 101.000 |" in (tmp_path / "new" / "results.md").read_text()


def test_summary_puts_dense_first_and_one_line_per_job(sweep_dir):
    lines = report.summary(report.collect(sweep_dir)).splitlines()
    cells = [line.split() for line in lines]
    assert cells[0] == ["model", "method", "sparsity", "ppl", "wiki", "time", "(s)", "status"]
    tiny = [c for c in cells if c[0] == "tiny"]
    assert tiny[0] == ["tiny", "dense", "20.000"]
    assert ["tiny", "wanda", "0.7", "90.000", "2", "done"] in tiny
    assert any(c[-1] == "missing" for c in cells)   # the killed job is a line too


def test_allocation_in_label_and_ratio_plot(tmp_path):
    """A non-uniform allocation joins the row label (uniform is left out) and gets a ratio-per-layer plot."""
    root = tmp_path / "sweep"
    uniform = _job("tiny", "wanda", "0.7", 0.7, 90.0, 20.0, 0.7, 1300, 2000)
    uniform["allocation"] = {"name": "uniform"}
    owl = _job("tiny", "wanda", "0.7", 0.7, 80.0, 20.0, 0.7, 1300, 2000)
    owl["allocation"] = {"name": "owl", "M": 5.0, "lambda": 0.08,
                         "outlier_ratios": {"model.layers.0": 0.004, "model.layers.1": 0.006},
                         "per_layer": {"model.layers.0": 0.78, "model.layers.1": 0.62}}
    old = _job("tiny", "sparsegpt", "0.7", 0.7, 70.0, 20.0, 0.7, 1300, 2000)   # before allocations: uniform
    for i, data in enumerate([uniform, owl, old]):
        _write(root, str(i), data)
    df = report.collect(root)
    assert sorted(df["method"]) == ["sparsegpt", "wanda", "wanda (owl)"]
    assert list(df["method"]).index("wanda") < list(df["method"]).index("wanda (owl)")
    assert report.label("elsa", "sparsegpt", "quick", "owl") == "elsa (owl, from sparsegpt, quick)"
    files = report.write_report(root)
    assert files["allocation"].read_bytes()[:8] == PNG_MAGIC
    jobs = report.allocations(root)
    assert [j["label"] for j in jobs] == ["wanda (owl) 0.7"] and jobs[0]["ratios"] == [0.78, 0.62]


def test_several_sources_merge_and_a_later_cell_replaces_an_earlier(sweep_dir, tmp_path):
    """python -m elsa.report <old results.csv> <new sweep dir> --out D: one table; the cells the new sweep
    re-ran replace the stored rows (and the report names them), every other stored row stays."""
    stored = tmp_path / "stored"
    report.write_report(sweep_dir, stored)
    rerun = tmp_path / "rerun"
    _write(rerun, "0", _job("tiny", "wanda", "0.7", 0.7, 55.0, 20.0, 0.7, 1300, 2000))   # a re-run cell
    _write(rerun, "1", _job("tiny", "wanda", "2:4", 0.5, 70.0, 20.0, 0.5, 1500, 2000))   # a new cell
    out = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "-m", "elsa.report", str(stored / "results.csv"), str(rerun), "--out",
                           str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "replaced tiny / wanda / 0.7 / seed 0" in proc.stdout
    assert proc.stdout.count("elsa.report.tables: replaced") == 1
    df = pd.read_csv(out / "results.csv")
    done = df[df["status"] == "done"]
    cells = {(r.model, r.method, str(r.sparsity)): r["ppl/wiki"] for _, r in done.iterrows()}
    assert cells[("tiny", "wanda", "0.7")] == 55.0                      # the re-run replaced the stored 90.0
    assert cells[("tiny", "wanda", "2:4")] == 70.0
    assert cells[("tiny", "wanda", "0.5")] == 30.0                      # stored rows nobody re-ran stay
    assert cells[("tiny", "magnitude", "0.7")] == 400.0
    assert len(done) == 8                                               # 7 stored, 1 replaced, 1 new
    assert set(done[done["method"] == "wanda"]["source"]) == {str(stored / "results.csv"), str(rerun)}
    assert "| tiny | wanda | 0.7 | 0 | done | 55.000 |" in (out / "results.md").read_text()
    assert (out / "ppl_vs_sparsity_wiki.png").read_bytes()[:8] == PNG_MAGIC
    # the merged table, re-drawn or merged again, keeps the sources its rows name
    for extra in ([], [str(tmp_path / "empty.csv")]):
        pd.DataFrame(columns=df.columns).to_csv(tmp_path / "empty.csv", index=False)
        again = tmp_path / f"again{len(extra)}"
        assert report.main([str(out / "results.csv"), *extra, "--out", str(again)]) == 0
        assert set(pd.read_csv(again / "results.csv")["source"].dropna()) == {str(stored / "results.csv"),
                                                                              str(rerun)}


def test_several_sources_need_out(sweep_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "elsa.report", str(sweep_dir), str(sweep_dir)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("elsa.report.tables: error: --out is required")
    assert not (sweep_dir / "report").exists()
