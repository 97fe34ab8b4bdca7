"""Sweeps through the real CLI (`python run.py -m ...`) on model=tiny: grids, failures, reruns, launchers,
experiments, and the sbatch script hardware=slurm would submit."""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir

from conftest import CONF, TINY, read_results, run_cli
from elsa.errors import ElsaError
from elsa.run.sweep import finished_result

FAST = [*TINY, "save_model=false", "hardware.threads=1"]


def job_dirs(sweep: Path) -> list[Path]:
    return sorted((d for d in sweep.iterdir() if (d / ".hydra").is_dir()), key=lambda d: int(d.name))


def grid(sweep: Path) -> dict[tuple[str, str], dict]:
    out = {}
    for d in job_dirs(sweep):
        r = read_results(d)
        out[(r["method"], r["sparsity"]["target"])] = r
    return out


def test_grid_rerun_skips_done_jobs_and_redoes_missing(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", *FAST, "method=dense,magnitude", "sparsity=0.5,2:4", f"hydra.sweep.dir={sweep}"]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = grid(sweep)
    assert set(results) == {("dense", "0.5"), ("dense", "2:4"), ("magnitude", "0.5"), ("magnitude", "2:4")}
    for (method, target), r in results.items():
        assert r["status"] == "done"
        assert r["sparsity"]["measured"] == (0.0 if method == "dense" else 0.5)
        assert r["group"] == str(sweep)  # W&B group: the sweep dir
        assert r["job_name"] == ",".join(r["overrides"]) and f"method={method}" in r["job_name"]
    assert "python -m elsa.report" in proc.stdout + proc.stderr  # SweepCallback's summary

    # a killed job leaves no results.json: the rerun of the same command redoes it and only it
    dirs = job_dirs(sweep)
    (dirs[3] / "results.json").unlink()
    mtimes = {d: (d / "results.json").stat().st_mtime_ns for d in dirs[:3]}
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (proc.stdout + proc.stderr).count("skipping:") == 3
    assert {d: (d / "results.json").stat().st_mtime_ns for d in dirs[:3]} == mtimes
    assert read_results(dirs[3])["status"] == "done"


def test_failing_job_does_not_stop_the_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", *FAST, "method=magnitude", "sparsity=1.5,0.5", f"hydra.sweep.dir={sweep}")
    assert proc.returncode != 0
    failed, ok = (read_results(d) for d in job_dirs(sweep))
    assert failed["status"] == "failed" and "sparsity=1.5" in failed["error"]
    assert failed["method"] == "magnitude" and failed["model"] == "tiny"  # enough for the report's table
    assert ok["status"] == "done" and ok["sparsity"]["measured"] == 0.5
    assert re.search(r"job 0 \[.*sparsity=1\.5\]: failed", proc.stdout + proc.stderr)


def test_submitit_local_launcher(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", *FAST, "hydra/launcher=submitit_local", "method=dense,magnitude", "sparsity=0.5,0.7",
                   f"hydra.sweep.dir={sweep}", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = grid(sweep)
    assert len(results) == 4 and all(r["status"] == "done" for r in results.values())
    assert all(r["group"] == str(sweep) for r in results.values())  # the worker knows it is in a sweep
    assert results[("magnitude", "0.7")]["sparsity"]["measured"] == pytest.approx(0.7, abs=1e-3)
    assert (sweep / ".submitit").is_dir()


def test_experiment_grid_with_narrowed_axis(tmp_path):
    """experiment=frontier_small carries its grid in hydra.sweeper.params; a command-line value replaces an axis."""
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", "experiment=frontier_small", *FAST, "method=dense,magnitude", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(grid(sweep)) == {(m, s) for m in ("dense", "magnitude") for s in ("0.5", "0.7", "0.9")}


def _hydra_cfg(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)


def test_experiment_configs_compose():
    frontier = _hydra_cfg(["experiment=frontier"])
    assert frontier.model.name == "smollm2-135m"
    assert frontier.hydra.sweeper.params == {"method": "magnitude,wanda,sparsegpt,elsa",
                                             "sparsity": "0.5,0.6,0.7,0.8,0.9"}
    assert (frontier.budget.name, frontier.start.name) == ("cpu", "sparsegpt")   # ELSA as elsa_cpu ran it
    llama = _hydra_cfg(["experiment=llama2_7b_frontier"])
    assert (llama.model.name, llama.hardware.device, llama.dataset.name) == ("llama2-7b", "cuda", "c4")
    assert (llama.seqlen, llama.nsamples, llama.eval.max_tokens) == (2048, 128, 256 * 2048)
    assert list(llama.eval.corpora) == ["wikitext2", "c4"]
    assert llama.hydra.sweeper.params.method == "magnitude,wanda,sparsegpt,elsa"  # the paper's recipe on GPUs
    small = _hydra_cfg(["experiment=frontier_small"])
    assert small.hydra.sweeper.params.sparsity == "0.5,0.7,0.9" and small.eval.max_tokens == 8192


def test_finished_result_refuses_another_jobs_results(tmp_path):
    from elsa.run.tracking import write_json_atomic

    write_json_atomic(tmp_path / "results.json", {"status": "done", "overrides": ["method=dense", "sparsity=0.5"]})
    assert finished_result(tmp_path, ["sparsity=0.5", "method=dense"])["status"] == "done"
    assert finished_result(tmp_path, ["method=dense", "sparsity=0.5", "hardware=slurm", "logger=none"])
    with pytest.raises(ElsaError, match="other overrides"):
        finished_result(tmp_path, ["method=magnitude", "sparsity=0.5"])
    write_json_atomic(tmp_path / "results.json", {"status": "failed", "overrides": ["method=dense"]})
    assert finished_result(tmp_path, ["method=magnitude"]) is None


# -- SLURM without a cluster: a stand-in sbatch records the script submitit_slurm submits --------------------
@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    capture = tmp_path / "submitted.sh"
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {capture}\necho "sbatch: error: test double" >&2\nexit 1\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit checks that srun exists
    for f in bin_dir.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    old = os.environ["PATH"]
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{old}"
    yield capture
    os.environ["PATH"] = old


def test_sbatch_script_for_hardware_slurm(tmp_path, fake_slurm):
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", *FAST, "hardware=slurm", "method=dense,magnitude", "sparsity=0.5,0.7",
                   f"hydra.sweep.dir={sweep}", "hydra.launcher.partition=gpu", "hydra.launcher.account=myproj",
                   "hydra.launcher.timeout_min=90", 'hydra.launcher.setup=["module load cuda"]')
    assert proc.returncode != 0 and "test double" in proc.stderr  # no cluster: the submission fails loudly
    script = fake_slurm.read_text()
    flags = dict(re.findall(r"^#SBATCH --([\w-]+)=(.*)$", script, re.M))
    assert flags["partition"] == "gpu" and flags["account"] == "myproj"
    assert flags["array"] == "0-3%4"  # one array task per job of the 2x2 grid
    assert flags["gpus-per-node"] == "1" and flags["ntasks-per-node"] == "1"
    assert flags["cpus-per-task"] == "8" and flags["mem"] == "64GB" and flags["time"] == "90"
    assert flags["job-name"] == "elsa" and str(sweep / ".submitit") in flags["output"]
    assert "\nmodule load cuda\n" in script
    assert re.search(r"^srun .* -m submitit\.core\._submit " + re.escape(str(sweep / ".submitit")), script, re.M)
    assert not list(sweep.glob("*/results.json"))  # nothing ran here


def test_sbatch_script_for_multi_gpu_jobs(tmp_path, fake_slurm):
    proc = run_cli("-m", *FAST, "hardware=slurm_fsdp", "method=magnitude", "sparsity=0.5",
                   f"hydra.sweep.dir={tmp_path / 'sweep'}", "hydra.launcher.gpus_per_node=8")
    assert proc.returncode != 0
    flags = dict(re.findall(r"^#SBATCH --([\w-]+)=(.*)$", fake_slurm.read_text(), re.M))
    assert flags["gpus-per-node"] == "8" and flags["ntasks-per-node"] == "8"  # one process per GPU
    assert flags["time"] == "1440" and "array" not in flags  # a single job is not an array
