"""The pruning plan saved beside the weights (elsa.artifacts.plan_record): the compressed format encodes each
tensor by its planned target and the sparse kernels pick the planned matrices, instead of guessing from zeros."""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import run_pipeline

from elsa.artifacts import compressed as S
from elsa.artifacts import kernels as SK
from elsa.artifacts import linear as SL
from elsa.artifacts import plan_record as R
from elsa.model.structure import TinyLlamaSource
from elsa.sparsity.patterns import Sparsity
from elsa.sparsity.plan import PruningPlan

needs_lib = pytest.mark.skipif(SK.library() is None, reason=f"no compressed kernels: {SK._LIB.get('reason')}")
IGNORED = "model.layers.0.mlp.down_proj"


def _bits(t):
    return t.contiguous().view(torch.uint8) if t.is_floating_point() else t


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(_bits(sa[k]), _bits(sb[k])) for k in sa)


def _no_clock(fns, tokens):
    return {k: 0.5 if k != "dense" else 1.0 for k in fns}


@pytest.fixture(scope="module")
def nm_run(tmp_path_factory):
    """A 2:4 magnitude run that leaves one matrix dense (ignore), saved in both formats."""
    out = tmp_path_factory.mktemp("nm_run")
    r = run_pipeline(out, "method=magnitude", "sparsity=2:4", "save_format=both", f"ignore=[{IGNORED}]",
                     "hardware.threads=1")
    return out, r


def test_a_run_records_its_plan_and_the_encodings_follow_it(nm_run):
    out, r = nm_run
    index = S.read_index(out / "model_compressed")
    plan = index["plan"]
    assert plan["target"] == "2:4" and index["plan_fallback"] == {} and "plan_fallback" not in r["compressed"]
    assert plan["tensors"][f"{IGNORED}.weight"] == {"dense": "ignored"}
    assert index["tensors"][f"{IGNORED}.weight"]["encoding"] == "dense"
    planned = [k for k, e in plan["tensors"].items() if "target" in e]
    assert len(planned) == 13 and all(plan["tensors"][k] == {"target": "2:4"} for k in planned)
    assert all(index["tensors"][k]["encoding"] == "nm" and index["tensors"][k]["n"] == 2 for k in planned)
    unlisted = set(index["tensors"]) - set(plan["tensors"])          # embeddings, norms: not prunable
    assert unlisted and all(index["tensors"][k]["encoding"] == "dense" for k in unlisted)
    assert plan["matrices"]["model.layers.1.mlp.down_proj"] == "2:4" and IGNORED not in plan["matrices"]
    # the HF dir holds the same record; from_pretrained loads it as it did; both dirs give the same weights
    assert json.loads((out / "model" / R.FILE).read_text()) == plan == S.read_plan(out / "model")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "model")
    _same_weights(hf, S.load_compressed(out / "model_compressed"))


@needs_lib
def test_sparsify_with_the_saved_plan_picks_only_planned_matrices(nm_run):
    out, _r = nm_run
    model = S.load_compressed(out / "model_compressed")
    dense = S.load_compressed(out / "model_compressed")
    rec = SL.sparsify(model, regimes={"decode": 1}, timer=_no_clock, kernels={"nm"},
                      pruning_plan=S.read_plan(out / "model_compressed"))
    assert rec["pruning_plan"] and rec["chosen"]["decode"] == {"nm": 13, "dense": 1}
    assert rec["matrices"][IGNORED]["note"] == "left dense: ignored"
    assert type(model.get_submodule(IGNORED)) is torch.nn.Linear
    assert isinstance(model.get_submodule("model.layers.1.mlp.down_proj"), SL.SparseLinear)
    ids = torch.randint(0, 500, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = dense(ids[:, :1]).logits, model(ids[:, :1]).logits
    assert torch.allclose(got, want, atol=1e-4 * float(want.abs().max()), rtol=1e-4)


def _two_to_four(model):
    with torch.no_grad():
        for lin in SL.block_linears(model).values():
            groups = lin.weight.data.view(-1, 4)
            groups.scatter_(1, groups.abs().argsort(1)[:, :2], 0.0)
    return model


@needs_lib
def test_the_nm_kernel_follows_the_target_not_the_zeros():
    """Zeros that hold 2:4 in a matrix planned at a ratio: no N:M kernel (the bitmask competes); the run's own
    PruningPlan works as the saved record does; without a plan the zeros decide, as before."""
    model = _two_to_four(TinyLlamaSource().load()[0])
    plan = PruningPlan.build(model, Sparsity.parse(0.5), ignore=[IGNORED])
    rec = SL.sparsify(model, regimes={"decode": 1}, timer=_no_clock, kernels={"nm", "bitmask"}, pruning_plan=plan)
    q = rec["matrices"]["model.layers.0.self_attn.q_proj"]
    assert "ratio" in q["skipped"]["nm"] and q["decode"] == "bitmask"
    assert rec["matrices"][IGNORED]["note"] == "left dense: ignored"
    plain = _two_to_four(TinyLlamaSource().load()[0])
    assert SL.sparsify(plain, regimes={"decode": 1}, timer=_no_clock, kernels={"nm"})["chosen"]["decode"] == {"nm": 14}


def _hand_pruned(tmp_path):
    """A tiny llama whose matrices hold 2:4, 1:4, a ratio, or nothing, saved by save_pretrained."""
    model = TinyLlamaSource().load()[0]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, lin in SL.block_linears(model).items():
            groups = lin.weight.data.view(-1, 4)
            if name.endswith(("q_proj", "v_proj")):
                groups.scatter_(1, groups.abs().argsort(1)[:, :2], 0.0)
            elif name.endswith("k_proj"):
                groups.scatter_(1, groups.abs().argsort(1)[:, :3], 0.0)
            elif not name.endswith("o_proj"):
                lin.weight[torch.rand(lin.weight.shape, generator=g) < 0.7] = 0.0
    model.save_pretrained(tmp_path / "hf")
    return model


def _mixed_record(model, violated: str) -> dict:
    """A record mixing 2:4, 1:4, a ratio and a dense-left matrix; ``violated`` is planned 2:4 but is not."""
    targets = {"q_proj": "2:4", "v_proj": "2:4", "k_proj": "1:4", "gate_proj": 0.7, "up_proj": 0.7, "down_proj": 0.7}
    tensors = {}
    for name in SL.block_linears(model):
        kind = name.rsplit(".", 1)[1]
        tensors[f"{name}.weight"] = {"dense": "ignored"} if kind == "o_proj" else {"target": targets[kind]}
    tensors[f"{violated}.weight"] = {"target": "2:4"}
    return {"version": R.VERSION, "target": "2:4", "matrices": {}, "dense": {}, "tensors": tensors}


def test_a_mixed_plan_encodes_each_tensor_by_its_own_target(tmp_path, capsys):
    """2:4 and 1:4 tensors in their own nm layout, ratio ones as bitmask, dense-left ones dense; a tensor planned
    2:4 that is not gets the size-based choice, recorded in plan_fallback and said on stderr. Read from the HF
    dir's pruning_plan.json by the CLI; weights bit-identical."""
    model = _hand_pruned(tmp_path)
    violated = "model.layers.1.mlp.up_proj"
    R.write_file(tmp_path / "hf", _mixed_record(model, violated))
    assert S.main(["compress", str(tmp_path / "hf"), str(tmp_path / "c")]) == 0
    assert "plan_fallback" in capsys.readouterr().err
    index = S.read_index(tmp_path / "c")
    enc = {k: (m["encoding"], m.get("n"), m.get("m")) for k, m in index["tensors"].items()}
    assert enc["model.layers.0.self_attn.q_proj.weight"] == ("nm", 2, 4)
    assert enc["model.layers.0.self_attn.k_proj.weight"] == ("nm", 1, 4)
    assert enc["model.layers.0.mlp.gate_proj.weight"] == ("bitmask", None, None)
    assert enc["model.layers.0.self_attn.o_proj.weight"] == ("dense", None, None)
    assert list(index["plan_fallback"]) == [f"{violated}.weight"]
    assert "planned 2:4, but" in index["plan_fallback"][f"{violated}.weight"]
    assert enc[f"{violated}.weight"] == ("bitmask", None, None)     # what the size-based choice takes at 70%
    _same_weights(model, S.load_compressed(tmp_path / "c"))
    assert S.read_plan(tmp_path / "c")["tensors"][f"{violated}.weight"] == {"target": "2:4"}
    assert S.main(["info", str(tmp_path / "c")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["pruning_plan"] is True and list(info["plan_fallback"]) == [f"{violated}.weight"]


def test_an_index_without_a_plan_still_loads(tmp_path):
    """A compressed dir written before plans were recorded (no ``plan`` entry, no pruning_plan.json): it loads
    bit-identical, has no plan, and a plain HF dir compresses by size as before."""
    model = _hand_pruned(tmp_path)
    S.compress_dir(tmp_path / "hf", tmp_path / "c", nm=(2, 4))
    index = json.loads((tmp_path / "c" / S.INDEX).read_text())
    assert "plan" not in index and "plan_fallback" not in index and index["version"] == 1
    assert index["tensors"]["model.layers.0.self_attn.k_proj.weight"]["encoding"] == "bitmask"   # 1:4 not asked
    assert index["tensors"]["model.layers.0.self_attn.q_proj.weight"]["encoding"] == "nm"
    assert S.read_plan(tmp_path / "c") is None and S.read_plan(tmp_path / "hf") is None
    _same_weights(model, S.load_compressed(tmp_path / "c"))
    (tmp_path / "c" / S.INDEX).write_text(json.dumps({**index, "plan": {"version": 7}}))
    with pytest.raises(S.ElsaError, match="not a pruning plan record of version 1"):
        S.read_plan(tmp_path / "c")


def test_fused_experts_are_recorded_per_saved_expert_tensor():
    """transformers saves a fused [experts, out, in] tensor per expert (its reverse key conversion): each saved
    key carries its expert's target, an ignored experts module's keys say why they stay dense."""
    cfg = transformers.MixtralConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=96, num_local_experts=4,
                                     num_experts_per_tok=2)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    plan = PruningPlan.build(model, Sparsity.parse(0.5), ignore=["layers.1.mlp.experts"])
    mids = [m for m in plan.targets if m.block == 0 and m.expert is not None and m.path.endswith("down_proj")]
    plan = plan.with_ratios({m: (0.25 if m in mids[:1] else 0.5) for m in plan.targets})
    rec = R.record(plan, model)
    saved = {k: e for k, e in rec["tensors"].items() if "layers.0" in k and "experts" in k}
    assert len(saved) == 12 and "unmapped" not in rec          # 4 experts x (w1, w2, w3)
    assert sorted({json.dumps(e) for e in saved.values()}) == ['{"target": 0.25}', '{"target": 0.5}']
    assert sum(e == {"target": 0.25} for e in saved.values()) == 1
    dense = [e for k, e in rec["tensors"].items() if "layers.1" in k and "experts" in k]
    assert len(dense) == 12 and all(e == {"dense": "ignored"} for e in dense)


@needs_lib
def test_generate_on_a_saved_dir_passes_its_plan(nm_run, monkeypatch, capsys):
    """python -m elsa.generate --sparse on a compressed dir hands the dir's plan record to sparsify."""
    from elsa.artifacts import generate

    out, _r = nm_run
    seen = {}
    real = SL.sparsify_with_plan

    def spy(model, directory, progress=False, remeasure=False, **kw):
        seen.update(kw)
        return real(model, None, regimes={"decode": 1}, timer=_no_clock, verify=False, **kw)

    monkeypatch.setattr(SL, "sparsify_with_plan", spy)
    assert generate.main([str(out / "model_compressed"), "--sparse", "--max-new-tokens", "2"]) == 0
    assert seen["pruning_plan"] == S.read_index(out / "model_compressed")["plan"]
    assert "kernels {'decode': {'nm': 13, 'dense': 1}}" in capsys.readouterr().err   # the ignored one: none


@needs_lib
def test_min_sparsity_compares_the_planned_ratio():
    """A matrix planned at 10% stays as it is even where its zeros reach 50% (2:4 here); one planned at 50% gets
    kernels."""
    model = _two_to_four(TinyLlamaSource().load()[0])
    plan = PruningPlan.build(model, Sparsity.parse(0.5))
    low = "model.layers.0.self_attn.q_proj"
    plan = plan.with_ratios({m: 0.1 if plan.name(m) == low else 0.5 for m in plan.targets})
    rec = SL.sparsify(model, regimes={"decode": 1}, timer=_no_clock, kernels={"bitmask"}, pruning_plan=plan)
    assert rec["matrices"][low]["note"] == "left as it is" and rec["chosen"]["decode"] == {"dense": 1, "bitmask": 13}


@pytest.mark.parametrize("family", ["mixtral", "gpt2"])
def test_a_2_4_plan_of_fused_experts_and_conv1d_saves_and_loads(tmp_path, family):
    """save_model with the plan: Mixtral's experts, saved per expert, each in the nm layout; GPT-2's Conv1D,
    stored [in, out] (its 2:4 groups across the stored rows), stored by size with that reason in plan_fallback.
    Both load bit-identical."""
    if family == "mixtral":
        cfg = transformers.MixtralConfig(vocab_size=128, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=96, num_local_experts=4,
                                         num_experts_per_tok=2)
    else:
        cfg = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=1, n_head=4, n_positions=64,
                                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    plan = PruningPlan.build(model, Sparsity.parse("2:4"))
    with torch.no_grad():
        for wid, w in plan.weights.items():
            w.param.copy_(w.param * plan.mask(wid, w.param.abs()))
    tok = TinyLlamaSource().load()[1]
    rec = S.save_model(model, tok, tmp_path, "compressed", (2, 4), plan=plan)
    index = S.read_index(tmp_path / "model_compressed")
    planned = [k for k, e in index["plan"]["tensors"].items() if "target" in e]
    if family == "mixtral":
        assert len(planned) == 4 + 12 and "plan_fallback" not in rec["compressed"]     # q k v o, 4 x (w1 w2 w3)
        assert all(index["tensors"][k]["encoding"] == "nm" for k in planned)
        loaded = S.load_compressed(tmp_path / "model_compressed")       # every expert matrix is planned
        kernels = SL.sparsify(loaded, regimes={"decode": 1}, timer=_no_clock, kernels={"nm"}, verify=False,
                              pruning_plan=S.read_plan(tmp_path / "model_compressed"))
        assert len(kernels["matrices"]) == 4 + 8 and not any("note" in k for k in kernels["matrices"].values())
    else:
        assert len(planned) == 4 and set(rec["compressed"]["plan_fallback"]) == set(planned)
        assert all("stored [in, out]" in why for why in rec["compressed"]["plan_fallback"].values())
    _same_weights(model, S.load_compressed(tmp_path / "model_compressed"))


def test_an_allocated_run_records_each_matrix_ratio(tmp_path):
    """allocation=owl: each matrix's own ratio in the record (matrices and saved tensors alike), stored as
    bitmask."""
    r = run_pipeline(tmp_path, "method=magnitude", "sparsity=0.7", "allocation=owl", "save_format=compressed",
                     "hardware.threads=1")
    index = S.read_index(tmp_path / "model_compressed")
    plan = index["plan"]
    ratios = {plan["tensors"][f"{n}.weight"]["target"] for n in plan["matrices"]}
    assert r["status"] == "done" and len(ratios) > 1 and ratios == set(plan["matrices"].values())
    assert all(0.0 < t < 1.0 for t in ratios) and "plan_fallback" not in r["compressed"]
    assert all(index["tensors"][f"{n}.weight"]["encoding"] == "bitmask" for n in plan["matrices"])


def test_a_parameter_whose_saved_key_is_not_found_is_said(tmp_path, monkeypatch, capsys):
    """When transformers' reverse conversion fails for a parameter, the record lists it as unmapped, results.json
    and stderr say so, and its saved tensor, unlisted, is stored dense."""
    import transformers.core_model_loading as CML

    real = CML.revert_weight_conversion
    lost = "model.layers.1.mlp.up_proj.weight"

    def failing(model, state_dict):
        if list(state_dict) == [lost]:     # the record's own call (save_pretrained passes them all)
            raise ValueError("needs its siblings")
        return real(model, state_dict)

    monkeypatch.setattr(CML, "revert_weight_conversion", failing)
    model, tok = TinyLlamaSource().load()
    plan = PruningPlan.build(_two_to_four(model), Sparsity.parse("2:4"))
    rec = S.save_model(model, tok, tmp_path, "compressed", (2, 4), plan=plan)
    assert rec["plan_unmapped"] == [lost] and "were not found" in capsys.readouterr().err
    index = S.read_index(tmp_path / "model_compressed")
    assert lost not in index["plan"]["tensors"] and index["tensors"][lost]["encoding"] == "dense"
    _same_weights(model, S.load_compressed(tmp_path / "model_compressed"))
