"""The real pipeline end to end on model=tiny, plus the CLI's handling of bad input."""
import json
import os

import pytest
import torch
from conftest import TINY, read_results, run_cli, run_pipeline

from elsa.model.structure import prunable_matrices
from elsa.sparsity.patterns import nm_violations


@pytest.mark.parametrize("method,sparsity", [("dense", "0.5"), ("magnitude", "0.5"), ("magnitude", "2:4"),
                                             ("magnitude", "0.9")])
def test_end_to_end_tiny(tmp_path, method, sparsity):
    r = run_pipeline(tmp_path, f"method={method}", f"sparsity={sparsity}")
    on_disk = read_results(tmp_path)
    assert on_disk["status"] == "done" and on_disk == json.loads(json.dumps(r, default=str))
    for key in ("model", "method", "seed", "sparsity", "perplexity", "dense_perplexity", "time_s", "peak_memory_mb",
                "overrides", "git_sha"):
        assert key in on_disk, key
    assert set(on_disk["time_s"]) >= {"prune", "eval", "total"}
    # every timed phase also has its CPU seconds (the work done, where the wall time holds a shared machine's waits)
    assert set(on_disk["cpu_s"]) == set(on_disk["time_s"]) and on_disk["cpu_s"]["prune"] > 0
    assert on_disk["cpu_s"]["total"] >= on_disk["cpu_s"]["prune"] + on_disk["cpu_s"]["eval"]
    measured = on_disk["sparsity"]["per_layer"]
    assert len(measured) == 14  # 2 blocks x (q, k, v, o, gate, up, down)
    if method == "dense":
        assert on_disk["sparsity"]["measured"] < 0.01
        assert on_disk["perplexity"]["wiki"] == pytest.approx(on_disk["dense_perplexity"]["wiki"], rel=1e-6)
    else:
        target = 0.5 if sparsity == "2:4" else float(sparsity)
        assert all(abs(v - target) <= 1e-3 for v in measured.values())
        assert abs(on_disk["sparsity"]["measured"] - target) <= 1e-3


def test_saved_model_round_trip_keeps_zeros(tmp_path):
    from transformers import AutoModelForCausalLM

    run_pipeline(tmp_path, "method=magnitude", "sparsity=2:4")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    layers = prunable_matrices(model)
    assert layers
    for name, lin in layers.items():
        assert nm_violations(lin.weight, 2, 4) == 0, name
        assert int((lin.weight == 0).sum()) == lin.weight.numel() // 2
    # embeddings and lm_head stay dense
    assert int((model.get_input_embeddings().weight == 0).sum()) == 0
    per_layer = json.loads((tmp_path / "sparsity_per_layer.json").read_text())
    assert set(per_layer) == set(layers)


def test_dense_perplexity_is_cached(tmp_path, monkeypatch):
    import elsa.eval.perplexity as E

    a = run_pipeline(tmp_path / "a", "method=magnitude")
    computed, real = [], E.perplexity   # the second run must not compute the dense perplexity again

    def counting(*args, desc="", **kwargs):
        computed.append(desc)
        return real(*args, desc=desc, **kwargs)

    monkeypatch.setattr(E, "perplexity", counting)
    b = run_pipeline(tmp_path / "b", "method=magnitude", "sparsity=0.7")
    assert a["dense_perplexity"] == b["dense_perplexity"]
    assert computed and not any(d.startswith("dense") for d in computed), computed


def test_cli_parses_nm_and_writes_results(tmp_path):
    proc = run_cli(*TINY, "method=magnitude", "sparsity=2:4", f"hydra.run.dir={tmp_path}", "save_model=false")
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = read_results(tmp_path)
    assert r["sparsity"]["target"] == "2:4"
    # the job's own overrides, in order (Hydra keeps hydra.* overrides apart)
    assert r["overrides"] == [*TINY, "method=magnitude", "sparsity=2:4", "save_model=false"]
    assert "dense" in proc.stdout and "magnitude 2:4" in proc.stdout


BAD = [
    (["sparsity=1.2"], "sparsity=1.2"),
    (["sparsity=-0.1"], "sparsity=-0.1"),
    (["sparsity=3:2"], "sparsity=3:2"),
    (["sparsity=abc"], "sparsity=abc"),
    (["model=smollm2-135m", "model.path=/does/not/exist"], "model.path=/does/not/exist"),
    (["model=hf", "model.path=/does/not/exist"], "model.path=/does/not/exist"),
    (["model=hf"], "model.path is not set: model=hf needs model.path=<a local checkpoint directory"),
    (["model=hf", "model.path=./docs"], "model.path=./docs is not allowed: a checkpoint directory holding config.json"),
    (["model=llama2-7b"], "cannot reach the Hugging Face Hub"),
    (["dataset=wikitext2", "method=magnitude", "eval.corpora=[wikitext2]"], "cannot reach the Hugging Face Hub"),
    (["seqlen=0"], "seqlen=0"),
    (["eval.corpora=[nope]"], "eval.corpora=nope"),
    (["sparsity=3:7"], "sparsity=3:7"),  # 7 divides no layer of the tiny model
]


@pytest.mark.parametrize("overrides,needle", BAD)
def test_bad_input_one_line_error(tmp_path, overrides, needle):
    proc = run_cli(*TINY, *overrides, f"hydra.run.dir={tmp_path}", timeout=60)
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert err and err[-1].startswith("elsa: error:") and needle in err[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    if (tmp_path / "results.json").exists():
        assert read_results(tmp_path)["status"] == "failed"
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("overrides,needle", [(["method=nope"], "method"), (["model=nope"], "model"),
                                              (["dataset=nope"], "dataset")])
def test_unknown_group_option_lists_choices(tmp_path, overrides, needle):
    proc = run_cli(*overrides, f"hydra.run.dir={tmp_path}", timeout=60)
    assert proc.returncode != 0
    assert f"Could not find '{needle}/nope'" in proc.stderr and "Available options" in proc.stderr
    assert not (tmp_path / "results.json").exists()


def test_nan_model_fails_clearly(tmp_path, monkeypatch):
    """A diverged model is reported as failed, never as done."""
    from elsa.methods import magnitude

    def poison(self, ctx):
        for lin in prunable_matrices(ctx.model).values():
            lin.weight.data.fill_(float("nan"))
        return {}

    monkeypatch.setattr(magnitude.Magnitude, "prune", poison)
    from elsa.errors import ElsaError

    with pytest.raises(ElsaError, match="perplexity on wiki is nan"):
        run_pipeline(tmp_path, "method=magnitude")
    assert read_results(tmp_path)["status"] == "failed"
    assert not (tmp_path / "model").exists()


def test_wandb_offline_run_lands_in_output_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    r = run_pipeline(tmp_path, "method=magnitude", "logger=wandb", "save_model=false")
    assert r["status"] == "done"
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux peak-RSS reset")
def test_peak_memory_is_the_jobs_own():
    """Jobs of one sweep share a process: each reports the peak since its own start, not the process's."""
    from elsa.run.recipe import peak_memory_mb, reset_peak_memory

    big = torch.ones(64 * 2**20)          # 256 MB, touched
    before = peak_memory_mb("cpu")["cpu_rss"]
    del big
    start = reset_peak_memory("cpu")
    peak = peak_memory_mb("cpu", start)
    assert peak["cpu_rss"] < before - 200
    assert 0 < peak["cpu_rss_at_start"] <= peak["cpu_rss"] + 1


def test_a_long_command_line_gets_a_run_dir_name_a_file_system_takes(tmp_path):
    """outputs/<overrides>: a command line of many overrides made a name over 255 characters (OSError before any
    work); a long name keeps its start and a hash of the whole, distinct per command line."""
    from elsa.run.recipe import dirname

    long = ",".join(f"model.key_{i}={i}" for i in range(40))
    other = long.replace("key_39=39", "key_39=40")
    assert dirname("method=wanda,sparsity=0.5") == "method=wanda,sparsity=0.5" and dirname(None) == "default"
    assert len(dirname(long)) <= 200 and dirname(long).startswith("model.key_0=0,")
    assert dirname(long) != dirname(other) and dirname(long) == dirname(long)
    (tmp_path / dirname(long)).mkdir()
