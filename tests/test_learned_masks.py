"""MaskLLM and LEAP: masks learned on frozen weights. Exact N:M / ratio, kept weights bit-identical to the dense
ones, dense parts untouched, reload with the same perplexity, resume, the refusals."""
import pytest
import torch
from conftest import TINY, run_cli, run_pipeline

from elsa.errors import ElsaError
from elsa.methods.leap import Leap
from elsa.methods.maskllm import candidates

FAST = ["method.steps=4", "method.batch_size=1", "method.grad_accum=1", "method.checkpoint_every=0",
        "method.eval_initial=false"]


def _dense():
    from elsa.model.structure import TinyLlamaSource

    model, _tok = TinyLlamaSource().load()
    return {n: p.detach() for n, p in model.named_parameters()}


def _saved(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model" / "model.safetensors"))


def _check_frozen_times_mask(saved: dict, dense: dict, pruned: set) -> None:
    """Pruned matrices: the dense weights where kept, exact zeros elsewhere; every other tensor bit-identical."""
    for name, d in dense.items():
        w = saved.get(name, d if name == "lm_head.weight" else None)   # a tied head is saved once
        assert w is not None, name
        if name in pruned:
            kept = w != 0
            assert torch.equal(w[kept], d[kept]), name
        else:
            assert torch.equal(w, d), f"{name} changed"


def _pruned_names(saved):
    return {n for n, t in saved.items() if t.dim() == 2 and ".layers." in n}


@pytest.mark.parametrize("start", ["dense", "sparsegpt"])
def test_maskllm_exact_2_4_on_frozen_weights_and_reload_gives_the_same_perplexity(tmp_path, start):
    r = run_pipeline(tmp_path / "m", "method=maskllm", "sparsity=2:4", f"start={start}", *FAST)
    assert r["status"] == "done" and r["sparsity"]["measured"] == 0.5
    stats = r["method_stats"]
    assert stats["prior"] == ("magnitude" if start == "dense" else "sparsegpt")
    assert 0.5 < stats["mask_agreement_with_prior"] <= 1.0 and stats["state_bytes_per_param"]["optimizer"] == 0
    saved, dense = _saved(tmp_path / "m"), _dense()
    pruned = _pruned_names(saved)
    assert pruned and not any("elsa_mask" in n for n in saved), "the logits were saved with the model"
    for name in pruned:
        per_group = (saved[name] != 0).reshape(saved[name].shape[0], -1, 4).sum(-1)
        assert bool((per_group == 2).all()), name       # exactly 2 of 4 (the tiny model has no zero weights)
    _check_frozen_times_mask(saved, dense, pruned)
    back = run_pipeline(tmp_path / "back", "model=hf", f"model.path={r['model_dir']}", "method=dense",
                        "eval.dense=false", "save_model=false")
    assert back["perplexity"] == r["perplexity"]


@pytest.mark.parametrize("ratio", ["0.5", "0.7"])
def test_leap_exact_ratio_per_matrix_from_wanda(tmp_path, ratio):
    r = run_pipeline(tmp_path, "method=leap", f"sparsity={ratio}", "start=wanda", *FAST)
    assert r["status"] == "done" and r["method_stats"]["prior"] == "wanda"
    assert {"soft_density", "kept_norm_ratio", "regulariser", "tau", "scale"} <= set(r["method_stats"]["history"][-1])
    saved, dense = _saved(tmp_path), _dense()
    pruned = _pruned_names(saved)
    for name in pruned:
        assert int((saved[name] == 0).sum()) == round(saved[name].numel() * float(ratio)), name
    _check_frozen_times_mask(saved, dense, pruned)


@pytest.mark.parametrize("method,sparsity", [("maskllm", "2:4"), ("leap", "0.6")])
def test_resume_from_checkpoint_matches_uninterrupted(tmp_path, method, sparsity):
    """A run restarted from its step-4 checkpoint (logits, optimizer, RNG for the Gumbel noise, the schedules'
    step) ends with the weights of a run that never stopped."""
    args = [f"method={method}", f"sparsity={sparsity}", *FAST, "method.steps=7"]
    run_pipeline(tmp_path / "ref", *args)
    cut = [*args, "method.checkpoint_every=4", "method.keep_checkpoint=true"]
    run_pipeline(tmp_path / "cut", *cut)
    state = torch.load(tmp_path / "cut" / "checkpoints" / f"{method}.pt", weights_only=False)
    assert state["step"] == 4 and any("elsa_mask.logits" in k for k in state["model"])
    (tmp_path / "cut" / "model" / "model.safetensors").unlink()
    r = run_pipeline(tmp_path / "cut", *cut)
    assert r["method_stats"]["resumed_from_step"] == 4
    a, b = _saved(tmp_path / "ref"), _saved(tmp_path / "cut")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("args,needle", [
    (["method=maskllm", "sparsity=0.5"], "method=maskllm learns N:M masks; sparsity=0.5 is a ratio"),
    (["method=leap", "sparsity=2:4"], "method=leap learns unstructured masks; sparsity=2:4 is an N:M pattern"),
    (["method=maskllm", "sparsity=8:16"], "C(16,8) = 12870 candidate masks"),
    (["method=leap", "method.gumbel_temperature=[4]"], "method.gumbel_temperature=[4] is not allowed"),
    (["method=maskllm", "method.train_dense_params=true"], "method.train_dense_params=True is not allowed"),
])
def test_refusals(tmp_path, args, needle):
    with pytest.raises(ElsaError, match=needle.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        run_pipeline(tmp_path, *args, *FAST)


def test_refusal_is_one_line_on_the_command_line(tmp_path):
    proc = run_cli(*TINY, "method=maskllm", "sparsity=0.5", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("elsa: error: method=maskllm learns N:M masks"), proc.stderr[-2000:]


def test_candidates_are_every_n_of_m_mask():
    c = candidates(2, 4)
    assert c.shape == (6, 4) and bool((c.sum(1) == 2).all()) and len({tuple(r.tolist()) for r in c}) == 6
    assert candidates(4, 8).shape == (70, 8)


def test_gumbel_sigmoid_gate_is_open_with_probability_sigmoid_of_the_scaled_logit():
    """The relaxed gate sigmoid((theta s + L) / tau) exceeds 1/2 with probability sigmoid(theta s): the
    reference's two-way Gumbel-softmax over (0, theta s)."""
    from elsa.model.structure import Weight

    torch.manual_seed(0)
    leap = Leap(steps=10, gumbel_temperature=[0.5, 0.5], gumbel_scale=[2.0, 2.0])
    lin = torch.nn.Linear(4000, 3, bias=False)
    logits = torch.tensor([-0.5, 0.0, 0.8])[:, None].expand(3, 4000).contiguous()
    gate = leap.soft(Weight(lin), logits, 0)
    opened = (gate > 0.5).float().mean(1)
    torch.testing.assert_close(opened, torch.sigmoid(torch.tensor([-1.0, 0.0, 1.6])), atol=0.03, rtol=0)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("method,sparsity,start", [("maskllm", "2:4", "sparsegpt"), ("leap", "0.5", "wanda")])
def test_fsdp_two_ranks_match_single_process(tmp_path, method, sparsity, start):
    """FSDP2 over 2 CPU processes: the logits sharded with their block, the prior from the start stage, the final
    masks from the gathered logits; the same weights as one process with the same global batch."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    args = [*TINY, f"method={method}", f"sparsity={sparsity}", f"start={start}", *FAST, "hardware.threads=1",
            "method.autocast_bf16=false"]   # fp32: the ranks' foreach AdamW and one process's agree exactly
    single = run_cli(*args, "method.batch_size=2", f"hydra.run.dir={tmp_path / 'single'}")
    assert single.returncode == 0, single.stderr[-3000:]
    env = dict(os.environ, HYDRA_FULL_ERROR="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "run.py"), *args, "hardware=fsdp_cpu", f"hydra.run.dir={tmp_path / 'fsdp'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _saved(tmp_path / "single"), _saved(tmp_path / "fsdp")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
