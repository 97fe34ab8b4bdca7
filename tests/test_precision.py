"""bf16 training on the CPU (issue 26): the auto decision, the fast path's pieces against the plain ones, and
the fp32 path unchanged bit for bit (the stored digests of e43c12b's tiny ELSA and AST runs)."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, TINY, run_pipeline

from elsa.engines import precision
from elsa.errors import ElsaError
from elsa.engines.losses import kl_loss, kl_loss_chunked, lm_loss, lm_loss_chunked

STORED = json.loads((REPO / "tests" / "data" / "fp32_training_e43c12b.json").read_text())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_losses_equal_the_plain_ones(dtype):
    torch.manual_seed(0)
    s = (torch.randn(2, 33, 300) * 3).to(dtype).requires_grad_()
    t = torch.randn(2, 33, 300).to(dtype)
    ids = torch.randint(0, 300, (2, 33))
    for plain, chunked in ((lambda: kl_loss(s, t, 2.0), lambda: kl_loss_chunked(s, t, 2.0, chunk=7)),
                           (lambda: lm_loss(s, ids), lambda: lm_loss_chunked(s, ids, chunk=7))):
        a, b = plain(), chunked()
        ga, = torch.autograd.grad(a, s)
        gb, = torch.autograd.grad(b, s)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gb.float(), ga.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                                   atol=1e-4 if dtype == torch.bfloat16 else 1e-7)


def test_bf16_teacher_weights_give_the_autocast_logits_bit_for_bit(tiny_model):
    model, _tok = tiny_model
    teacher = copy.deepcopy(model).eval()
    precision.bf16_linear_weights(teacher)
    ids = torch.randint(0, 100, (2, 16))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model(input_ids=ids).logits, teacher(input_ids=ids).logits)
    # a tied embedding keeps its fp32 tensor; only the Linear got a bf16 copy
    assert teacher.get_input_embeddings().weight.dtype == torch.float32


def test_auto_decides_by_measurement_and_records_it():
    used, record = precision.resolve("auto", "cpu")
    assert record["setting"] == "auto" and record["used"] is used
    assert used == (record["bf16_matmul_speedup"] >= precision.MIN_SPEEDUP)
    assert precision.resolve(False, "cpu") == (False, {"setting": False, "used": False})
    with pytest.raises(ElsaError, match="method.autocast_bf16"):
        precision.check_setting("maybe")


def _digests(path):
    from safetensors.torch import load_file

    w = load_file(str(path / "model" / "model.safetensors"))
    return {k: hashlib.sha256(v.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
            for k, v in sorted(w.items())}


def _reference_digests(name: str, tmp_path) -> dict:
    """e43c12b's digests of the tiny run on this CPU. Bit-for-bit results depend on the CPU (its matmul kernels:
    e43c12b's own code gives other digests on an AMD EPYC than on the Intel CPU they were first recorded on), so
    they are stored per CPU (``elsa.machine.cpu_id``); for a CPU with none stored, e43c12b's own run.py makes them
    here, from ``git archive`` of that commit."""
    from elsa.machine import cpu_id

    for entry in STORED["machines"]:
        if entry["cpu_id"] == cpu_id():
            return entry["digests"][name]
    commit, tree = STORED["commit"], tmp_path / "reference"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], capture_output=True)
    if archive.returncode:
        pytest.skip(f"no digests stored for this CPU ({cpu_id()}) and no git history to make them from {commit}: "
                    f"{archive.stderr.decode().strip()[:200]}")
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    out = tmp_path / "reference_run"
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1", WANDB_MODE="disabled", HYDRA_FULL_ERROR="1")
    done = subprocess.run([sys.executable, "run.py", *TINY, *STORED["args"][name], "hardware.threads=1",
                           f"output_dir={out}"], cwd=tree, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{commit}'s run failed: {done.stderr[-2000:]}"
    return _digests(out)


@pytest.mark.parametrize("name", ["elsa", "ast"])
def test_fp32_training_is_bit_identical_to_e43c12b(tmp_path, name):
    """autocast_bf16=false is the step before issue 26: every tensor of the tiny runs equals e43c12b's on this CPU
    (hardware.threads=1, as they were made)."""
    r = run_pipeline(tmp_path / "run", *STORED["args"][name], "method.autocast_bf16=false", "hardware.threads=1")
    assert r["method_stats"]["autocast_bf16"] == {"setting": False, "used": False}
    assert _digests(tmp_path / "run") == _reference_digests(name, tmp_path)


def test_the_probe_leaves_the_random_stream_alone_and_is_decided_once_per_machine(monkeypatch):
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    precision._CACHE.clear()
    first = precision.bf16_speedup("cpu")
    assert torch.equal(torch.rand(3), expected)          # the measurement drew from its own generator
    precision._CACHE.clear()                              # a new process: the disk cache gives the same decision
    monkeypatch.setattr(precision, "_rate", lambda *a, **k: pytest.fail("measured again"))
    assert precision.bf16_speedup("cpu") == first


def test_a_resumed_run_keeps_the_precision_it_started_with(tmp_path, monkeypatch):
    """auto decided bf16 when the run started; resumed where the measurement says fp32 (another machine), the run
    keeps bf16 (the checkpoint's record), so one run never changes precision halfway."""
    from test_elsa import ELSA_FAST

    args = [*ELSA_FAST, "method.autocast_bf16=auto", "method.checkpoint_every=2", "method.keep_checkpoint=true",
            "save_model=false", "skip_done=false"]
    decided = []
    resolve = precision.resolve
    monkeypatch.setattr(precision, "resolve", lambda *a: decided.append(resolve(*a)) or decided[-1])
    monkeypatch.setattr(precision, "_decide", lambda device: (True, {"setting": "auto", "used": True, "rule": "x"}))
    run_pipeline(tmp_path, *args)
    monkeypatch.setattr(precision, "_decide", lambda device: (False, {"setting": "auto", "used": False, "rule": "y"}))
    r = run_pipeline(tmp_path, *args)                       # resumes from the step-6 checkpoint it kept
    assert [d[0] for d in decided] == [True, True]
    assert "kept from the checkpoint" in decided[1][1]["rule"]
    assert r["method_stats"]["autocast_bf16"]["used"] is True
    fresh = run_pipeline(tmp_path / "other", *args)          # no checkpoint there: the measurement decides
    assert decided[-1][0] is False and fresh["method_stats"]["autocast_bf16"]["used"] is False
