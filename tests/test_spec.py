"""Bad input, tried as a new user would, through the CLI: one `elsa: error:` line, exit 2, before any expensive
work, and no results.json claiming done (issue 28). And the keys of a run: elsa.run.spec.RunSpec and the methods'
keys read from their constructors."""
from __future__ import annotations

import json
import time

import pytest

from conftest import TINY, compose, run_cli, run_pipeline
from elsa.errors import ElsaError

FAST = [*TINY, "save_model=false", "hardware.threads=1"]


def _one_line_refusal(tmp_path, *args, env=None):
    import os

    if env:
        os.environ.update(env)
    try:
        t0 = time.perf_counter()
        proc = run_cli(*FAST, *args, f"output_dir={tmp_path}")
        took = time.perf_counter() - t0
    finally:
        for k in env or {}:
            os.environ.pop(k)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("elsa: error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    results = tmp_path / "results.json"
    assert not results.exists() or json.loads(results.read_text())["status"] == "failed"
    return errors[0], took


@pytest.mark.parametrize("args,env,expected", [
    (["ignore=[.*]"], None, r"ignore=\[\.\*\] leaves no weight to prune"),
    (["ignore=[attn,mlp]"], None, r"ignore=\[attn,mlp\] leaves no weight to prune"),
    (["nsamples=abc"], None, r"nsamples=abc is not allowed: a whole number > 0"),
    (["model=llama2-7b"], None, r"cannot reach the Hugging Face Hub to load model meta-llama/Llama-2-7b-hf"),
    (["model=llama2-7b"], {"HF_HUB_OFFLINE": "1"},
     r"cannot reach the Hugging Face Hub to load model meta-llama/Llama-2-7b-hf \(HF_HUB_OFFLINE is set"),
    (["dataset=c4", "method=wanda"], None, r"cannot reach the Hugging Face Hub to load dataset allenai/c4"),
    (["dataset=c4", "method=wanda"], {"HF_HUB_OFFLINE": "1"},
     r"cannot reach the Hugging Face Hub to load dataset allenai/c4 \(HF_HUB_OFFLINE is set"),
    (["method=wanda", "++method.stepz=4"], None,
     r"method.stepz=4 is not allowed: not a key of method=wanda; its keys: batch_size, group$"),
])
def test_bad_input_is_one_line_through_the_cli(tmp_path, args, env, expected):
    import re

    line, _took = _one_line_refusal(tmp_path, *args, env=env)
    assert re.search(expected, line), line


def test_checkpoint_dir_without_weights_or_tokenizer(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"model_type": "llama"}')
    line, _ = _one_line_refusal(tmp_path / "out", "model=hf", f"model.path={ckpt}")
    assert line.endswith("this one lacks weights (*.safetensors or *.bin) and a tokenizer (tokenizer.json, "
                         "tokenizer.model, tokenizer_config.json, vocab.json, vocab.txt, spiece.model)"), line


def test_every_top_level_key_is_checked_whatever_the_method(tmp_path):
    """nsamples is checked also for magnitude (which does not calibrate); an unknown top-level key is refused."""
    from elsa.run.spec import RunSpec

    for bad, match in ((["nsamples=abc"], r"^nsamples=abc is not allowed"),
                       (["save_model=3"], r"^save_model=3 is not allowed: true or false"),
                       (["skip_done=maybe"], r"^skip_done=maybe is not allowed: true or false"),
                       (["seed=-1"], r"^seed=-1 is not allowed: a whole number >= 0"),
                       (["++nsample=3"], r"^nsample=3 is not allowed: not a key of the config"),
                       (["targets=mlp"], r"^targets=mlp is not allowed: a list of module-name regexes"),
                       (["hardware.threads=abc"], r"^hardware.threads=abc is not allowed: a whole number > 0"),
                       (["++hardware.fsdp=yes"], r"^hardware.fsdp=yes is not allowed: true or false"),
                       (["++hardware.thread=2"], r"^hardware.thread=2 is not allowed: not a key of hardware"),
                       (["eval.batch_size=0"], r"^eval.batch_size=0 is not allowed: a whole number > 0"),
                       (["eval.dense=1"], r"^eval.dense=1 is not allowed: true or false"),
                       (["eval.corpora=wiki"], r"^eval.corpora=wiki is not allowed: a list of corpus names"),
                       (["++eval.max_token=5"], r"^eval.max_token=5 is not allowed: not a key of eval")):
        with pytest.raises(ElsaError, match=match):
            RunSpec.from_cfg(compose(["method=magnitude", *bad]))
    spec = RunSpec.from_cfg(compose([*TINY, "method=magnitude", "hardware.threads=2"]))
    assert (spec.nsamples, spec.seqlen, spec.seed, spec.save_model, spec.ignore) == (4, 128, 0, True, ())
    assert (spec.eval.corpora, spec.eval.max_tokens, spec.eval.add_bos, spec.eval.dense) == (("wiki",), 2048, True, True)
    assert (spec.hardware.device, spec.hardware.threads, spec.hardware.fsdp) == ("cpu", 2, False)
    with pytest.raises(AttributeError):   # frozen
        spec.seed = 1


def test_constructor_keys_follow_the_signatures():
    from elsa.engines.training import TrainSettings
    from elsa.methods.dense import Dense
    from elsa.methods.elsa import ElsaL
    from elsa.methods.wanda import Wanda
    from elsa.run.spec import budget_keys, constructor_keys

    assert constructor_keys(Wanda) == {"group", "batch_size"}
    assert constructor_keys(Dense) == set()
    elsa_l = constructor_keys(ElsaL)
    assert {"optimizer", "lam", "relaxation", "steps", "eval_tokens"} <= elsa_l   # own, Elsa's, TrainSettings'
    assert budget_keys() >= set(TrainSettings.__dataclass_fields__) | {"tokens"}


def test_budget_keys_on_a_one_shot_method_are_dropped_and_recorded(tmp_path):
    res = run_pipeline(tmp_path, "method=magnitude", "++method.steps=2", "++method.lr=0.1", "save_model=false")
    assert res["status"] == "done"
    assert res["budget_not_applicable"] == {"steps": 2, "lr": 0.1}
    plain = run_pipeline(tmp_path / "plain", "method=magnitude", "save_model=false")
    assert "budget_not_applicable" not in plain
    assert res["perplexity"] == plain["perplexity"]
    with pytest.raises(ElsaError, match=r"^method.stepz=2 is not allowed: not a key of method=magnitude"):
        run_pipeline(tmp_path / "bad", "method=magnitude", "++method.stepz=2")


def test_sweep_mixing_one_shot_and_training_methods(tmp_path):
    """-m method=wanda,elsa ++method.steps=2: ELSA trains 2 steps, Wanda records the key it does not take."""
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", *FAST, "method=wanda,elsa", "++method.steps=2", "++method.eval_initial=false",
                   f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {r["method"]: r for r in (json.loads(p.read_text()) for p in sweep.glob("*/results.json"))}
    assert runs["wanda"]["status"] == runs["elsa"]["status"] == "done"
    assert runs["wanda"]["budget_not_applicable"] == {"steps": 2, "eval_initial": False}
    assert "budget_not_applicable" not in runs["elsa"]
    assert runs["elsa"]["method_stats"]["steps"] == 2
    assert (proc.stdout + proc.stderr).count("does not train") == 1
