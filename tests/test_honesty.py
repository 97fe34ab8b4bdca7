"""A run that did not do what was asked must not say done: weights left dense unasked, and SparseLLM on an MLP it
does not model, are refused with one line before any calibration; the explicit opt-ins are recorded."""
from __future__ import annotations

import pytest
import torch

from conftest import read_results, run_cli, run_pipeline
from elsa.errors import ElsaError
from elsa.model.structure import TinyLlamaSource


def _save(tmp_path, cfg_cls, model_cls, **kw):
    tok = TinyLlamaSource().tokenizer()
    cfg = cfg_cls(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  max_position_embeddings=512, **kw)
    torch.manual_seed(0)
    model = model_cls(cfg).eval()
    path = tmp_path / "ckpt"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def mixtral(tmp_path):
    from transformers import MixtralConfig, MixtralForCausalLM

    return _save(tmp_path, MixtralConfig, MixtralForCausalLM, hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                 num_experts_per_tok=2)


@pytest.fixture
def phi3(tmp_path):
    """Phi-3's MLP fuses gate and up into one Linear (gate_up_proj, chunked in the forward): SparseLLM here
    models separate Linears only."""
    from transformers import Phi3Config, Phi3ForCausalLM

    return _save(tmp_path, Phi3Config, Phi3ForCausalLM, hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)


def _one_error(res):
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("elsa: error:")]
    assert len(errors) == 1, res.stderr[-2000:]
    return errors[0]


def test_weights_nothing_prunes_are_refused_before_calibration(tmp_path):
    """A 2-D weight inside a block that is no Linear, Conv1D or expert tensor (here one added by hand) stays
    dense unasked: refused, naming it; ignore= names it and the run may go on."""
    from elsa.model.structure import check_prunable
    from elsa.sparsity.plan import PruningPlan
    from elsa.sparsity.patterns import Sparsity

    model, _tok = TinyLlamaSource().load()
    model.model.layers[1].mlp.extra = torch.nn.Parameter(torch.ones(8, 8))
    with pytest.raises(ElsaError, match=r"model\.layers\.1\.mlp\.extra \[8, 8\].*ignore="):
        check_prunable(model, PruningPlan.build(model, Sparsity(0.5)))
    acc = check_prunable(model, PruningPlan.build(model, Sparsity(0.5), ignore=[r"mlp\.extra"]))
    assert acc["dense_by_kind"]["ignored"] == 64 and acc["dense_names"]["ignored"] == ["model.layers.1.mlp.extra"]


def test_moe_experts_are_pruned_per_expert(mixtral, tmp_path):
    out = run_pipeline(tmp_path / "out", "model=hf", f"model.path={mixtral}", "method=wanda", "seqlen=64",
                       "nsamples=2", "save_model=false")
    assert out["status"] == "done"
    p = out["params"]
    experts = 2 * (4 * 256 * 64 + 4 * 64 * 128)
    assert p["pruned"] == out["sparsity"]["pruned_params"] == 2 * (64 * 64 * 2 + 32 * 64 * 2) + experts
    assert p["dense_by_kind"]["routers"] == 2 * 4 * 64
    per = out["sparsity"]["per_layer"]
    assert {f"model.layers.{i}.mlp.experts.{t}[{e}]" for i in range(2) for t in ("gate_up_proj", "down_proj")
            for e in range(4)} <= set(per)
    assert all(v == pytest.approx(0.5) for v in per.values())


def test_moe_with_ignore_runs_and_records_what_stayed_dense(mixtral, tmp_path):
    out = run_pipeline(tmp_path / "out", "model=hf", f"model.path={mixtral}", "method=wanda", "seqlen=64",
                       "nsamples=2", "save_model=false", "ignore=[experts]")
    assert out["status"] == "done"
    p = out["params"]
    kinds = p["dense_by_kind"]
    assert kinds["ignored"] == 2 * (4 * 256 * 64 + 4 * 64 * 128)
    assert kinds["routers"] == 2 * 4 * 64                        # the router (4 experts x 64) stays dense
    assert kinds["embeddings"] > 0 and "lm_head" in kinds
    assert all(".mlp.gate." in n for n in p["dense_names"]["routers"])
    assert p["pruned"] == out["sparsity"]["pruned_params"] == 2 * (64 * 64 * 2 + 32 * 64 * 2)  # attention only
    assert p["pruned"] + p["dense"] == p["total"]
    assert out["sparsity"]["measured"] == pytest.approx(0.5)
    assert not any("experts" in n or ".gate" in n for n in out["sparsity"]["per_layer"])


def test_ignore_removes_linears_from_pruning(tmp_path):
    out = run_pipeline(tmp_path, "method=magnitude", "save_model=false", r"ignore=[self_attn\.q_proj]")
    assert out["status"] == "done"
    assert not any("q_proj" in n for n in out["sparsity"]["per_layer"])
    assert out["params"]["dense_by_kind"]["ignored"] == 2 * 64 * 64
    assert out["sparsity"]["measured"] == pytest.approx(0.5)


def test_ignore_pattern_matching_nothing_is_refused(tmp_path):
    with pytest.raises(ElsaError, match="ignore=no_such_module"):
        run_pipeline(tmp_path, "method=magnitude", "ignore=[no_such_module]")


def test_sparsellm_on_a_fused_mlp_refuses_before_calibration(phi3, tmp_path):
    err = _one_error(run_cli("model=hf", f"model.path={phi3}", "method=sparsellm", "logger=none", "eval=quick",
                             "seqlen=64", "nsamples=2", f"output_dir={tmp_path / 'out'}"))
    assert "model.layers.0" in err and "gate_up_proj [256, 64]" in err
    assert "fc2(act(fc1 x))" in err and "method.fallback=sparsegpt" in err
    out = read_results(tmp_path / "out")
    assert out["status"] == "failed" and "calibration" not in out and "prune" not in out["time_s"]


def test_sparsellm_fallback_is_recorded_printed_and_labelled(phi3, tmp_path, capsys):
    from elsa.report.tables import job_row

    out = run_pipeline(tmp_path / "out", "model=hf", f"model.path={phi3}", "method=sparsellm", "seqlen=64",
                       "nsamples=2", "save_model=false", "method.fallback=sparsegpt", "method.iterations=1")
    assert out["status"] == "done"
    fb = out["method_stats"]["fallback"]
    assert fb == {"method": "sparsegpt", "blocks": ["model.layers.0", "model.layers.1"], "of": 2}
    assert "FALLBACK: sparsegpt ran instead of sparsellm on 2/2" in capsys.readouterr().out
    row = job_row(read_results(tmp_path / "out"), tmp_path / "out", tmp_path / "out")
    assert row["method"] == "sparsellm (fallback sparsegpt on 2/2 MLPs)"


def test_sparsellm_fallback_value_is_checked(tmp_path):
    with pytest.raises(ElsaError, match="method.fallback=wanda"):
        run_pipeline(tmp_path, "method=sparsellm", "method.fallback=wanda")


def test_targets_restrict_pruning_and_the_rest_is_recorded_dense(tmp_path):
    out = run_pipeline(tmp_path, "method=wanda", "save_model=false", r"targets=['mlp\.(up|down)_proj']")
    assert out["status"] == "done"
    per = out["sparsity"]["per_layer"]
    assert per and all(".mlp.up_proj" in n or ".mlp.down_proj" in n for n in per)
    assert out["sparsity"]["measured"] == pytest.approx(0.5)
    p = out["params"]
    assert p["dense_by_kind"]["not_targeted"] == 2 * (64 * 64 * 2 + 32 * 64 * 2 + 128 * 64)  # attention + gate
    assert any(n.endswith("mlp.gate_proj.weight") for n in p["dense_names"]["not_targeted"])
    assert out["targets"] == {r"mlp\.(up|down)_proj": [f"model.layers.{i}.mlp.{k}_proj" for i in range(2)
                                                       for k in ("up", "down")]}


@pytest.mark.parametrize("pattern", ["nothing_matches", "lm_head"])
def test_target_that_matches_no_prunable_weight_is_refused(tmp_path, pattern):
    err = _one_error(run_cli("model=tiny", "logger=none", "eval=quick", "seqlen=64", "nsamples=2",
                             f"targets=[{pattern}]", f"output_dir={tmp_path}"))
    assert "targets" in err and pattern in err and "decoder blocks" in err


def test_ignoring_a_container_leaves_everything_inside_it_dense():
    """ignore=[layers$] names only the ModuleList of blocks: every block inside it stays dense too."""
    from elsa.sparsity.plan import PruningPlan
    from elsa.sparsity.patterns import Sparsity

    model, _tok = TinyLlamaSource().load()
    plan = PruningPlan.build(model, Sparsity(0.5), ignore=[r"layers$"])
    assert plan.weights == {} and plan.targets == {}
    assert plan.kept_dense() >= {id(p) for p in model.model.layers.parameters()}


@pytest.fixture
def falcon_h1(tmp_path):
    """A hybrid block (attention + a Mamba-2 mixer, as Falcon-H1): its depthwise ``conv1d`` weight is 3-D
    [channels, 1, width], a convolution kernel, not a fused expert tensor."""
    from transformers import FalconH1Config, FalconH1ForCausalLM

    return _save(tmp_path, FalconH1Config, FalconH1ForCausalLM, hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, mamba_d_ssm=64,
                 mamba_n_heads=4, mamba_d_head=16, mamba_d_state=16)


def test_a_convolution_kernel_is_not_taken_for_experts(falcon_h1, tmp_path):
    """Before, every 3-D parameter counted as experts: the conv1d kernel [96, 1, 4] was pruned as 96 'expert'
    matrices of [1, 4]. Now it is no prunable weight: the run refuses naming it, and ignore= lets it go on with
    the kernel dense and recorded."""
    from transformers import AutoModelForCausalLM

    from elsa.model.structure import prunable_weights

    model = AutoModelForCausalLM.from_pretrained(falcon_h1)
    names = prunable_weights(model)
    assert names and not any("conv1d" in n for n in names)
    assert all(w.experts is None for w in names.values())
    err = _one_error(run_cli("model=hf", f"model.path={falcon_h1}", "method=wanda", "logger=none", "eval=quick",
                             "seqlen=64", "nsamples=2", f"output_dir={tmp_path / 'refused'}"))
    assert "conv1d.weight [96, 1, 4]" in err and "ignore=" in err
    out = run_pipeline(tmp_path / "out", "model=hf", f"model.path={falcon_h1}", "method=wanda", "seqlen=64",
                       "nsamples=2", "save_model=false", "ignore=[conv1d]")
    assert out["status"] == "done"
    assert out["params"]["dense_by_kind"]["ignored"] == 2 * (96 * 4 + 96)      # the kernel and its bias
    assert not any("conv1d" in n for n in out["sparsity"]["per_layer"])
    assert out["sparsity"]["measured"] == pytest.approx(0.5)


def test_a_projection_that_keeps_too_few_weights_is_recorded_printed_and_labelled(tmp_path, monkeypatch, capsys):
    """Fewer non-zeros than the target asks (a projection that kept exact zeros, as the Taylor score once did):
    the run records by how much, prints an OVER TARGET line, and the report row says so."""
    from elsa.report import tables as report
    from elsa.methods.magnitude import Magnitude
    from elsa.model.structure import prunable_matrices

    prune = Magnitude.prune

    def overshoot(self, ctx):
        out = prune(self, ctx)
        with torch.no_grad():
            for m in prunable_matrices(ctx.model).values():
                m.weight[: m.weight.shape[0] // 10].zero_()      # a tenth of every matrix's rows zeroed as well
        return out

    monkeypatch.setattr(Magnitude, "prune", overshoot)
    r = run_pipeline(tmp_path, "method=magnitude", "sparsity=0.5", "save_model=false", "eval.dense=false")
    assert r["status"] == "done" and r["sparsity"]["measured"] > 0.52
    assert r["sparsity"]["over_target"] == pytest.approx(r["sparsity"]["measured"] - 0.5, abs=1e-6)
    assert "OVER TARGET:" in capsys.readouterr().out
    assert r["sparsity"]["notes"] == [{"kind": "over_target", "label": f"over target: {r['sparsity']['measured']:.3f}",
                                       "text": r["sparsity"]["notes"][0]["text"],
                                       "data": {"measured": r["sparsity"]["measured"],
                                                "over": r["sparsity"]["over_target"], "target": "0.5"}}]
    assert report.collect(tmp_path)["method"].tolist() == [f"magnitude (over target: {r['sparsity']['measured']:.3f})"]
