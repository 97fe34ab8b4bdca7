"""The pruning plan: typed matrix ids, what ignore / targets leave dense and why, the allocation's per-matrix
targets, per-expert masks, and the refusal of a plan with no matrix left."""
import pytest
import torch
import transformers

from elsa.errors import ElsaError
from elsa.model.structure import TinyLlamaSource, prunable_matrices
from elsa.sparsity.plan import MatrixId, PruningPlan
from elsa.sparsity.patterns import Sparsity, mask_from_scores


@pytest.fixture(scope="module")
def tiny():
    return TinyLlamaSource().load()[0]


def mixtral():
    cfg = transformers.MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=3,
                                     num_experts_per_tok=2)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def test_every_matrix_has_a_typed_id_a_view_and_the_target(tiny):
    target = Sparsity(0.5)
    plan = PruningPlan.build(tiny, target)
    ids = list(plan.targets)
    assert ids[0] == MatrixId(0, "self_attn.q_proj") and ids[-1] == MatrixId(1, "mlp.down_proj")
    assert all(plan.targets[m] is target for m in ids) and not plan.allocated
    # the names are made from the ids (never parsed back) and are the structural walk's names, in its order
    assert list(plan.named_matrices()) == list(prunable_matrices(tiny))
    assert plan.id_of("model.layers.1.mlp.up_proj") == MatrixId(1, "mlp.up_proj")
    assert plan.matrix(ids[0]).weight is tiny.model.layers[0].self_attn.q_proj.weight
    assert [m.path for m in plan.block(1).ids] == [m.path for m in ids if m.block == 0]


def test_ignore_and_targets_leave_weights_dense_with_their_reason(tiny):
    plan = PruningPlan.build(tiny, Sparsity(0.5), ignore=[r"layers\.0\.self_attn"], targets=["mlp", "o_proj"])
    names = set(plan.named_matrices())
    assert "model.layers.0.self_attn.o_proj" not in names and "model.layers.1.self_attn.o_proj" in names
    assert "model.layers.1.self_attn.q_proj" not in names and "model.layers.0.mlp.gate_proj" in names
    assert plan.dense_reason("model.layers.0.self_attn.q_proj.weight") == "ignored"
    assert plan.dense_reason("model.layers.1.self_attn.q_proj.weight") == "not_targeted"
    assert plan.dense_reason("model.layers.1.mlp.up_proj.weight") is None
    kept = plan.kept_dense()
    assert id(tiny.model.layers[1].self_attn.k_proj.weight) in kept
    assert id(tiny.model.layers[1].mlp.up_proj.weight) not in kept
    assert plan.matched["ignore"][r"layers\.0\.self_attn"][0] == "model.layers.0.self_attn"
    # nothing is written onto the model: a plan without ignore sees every matrix again
    assert len(PruningPlan.build(tiny, Sparsity(0.5)).targets) == 14


def test_a_plan_with_no_matrix_left_is_refused_in_one_line(tiny):
    plan = PruningPlan.build(tiny, Sparsity(0.5), ignore=["layers"])
    with pytest.raises(ElsaError, match=r"^ignore=\[layers\] leaves no weight to prune"):
        plan.refuse_if_empty(["layers"], [])


def test_allocated_ratios_scale_and_give_each_expert_its_own_mask():
    model = mixtral()
    plan = PruningPlan.build(model, Sparsity(0.5))
    wid = MatrixId(0, "mlp.experts.down_proj")
    experts = [m for m in plan.targets if m.weight == wid]
    assert [m.expert for m in experts] == [0, 1, 2] and plan.id_of(plan.name(experts[2])) == experts[2]
    ratios = {m: 0.5 for m in plan.targets} | {experts[0]: 0.25, experts[2]: 0.75}
    allocated = plan.with_ratios(ratios)
    assert allocated.allocated and allocated.targets[experts[0]].exact
    w = allocated.weights[wid]
    scores = w.param.detach().abs()
    keep = allocated.mask(wid, scores)
    numel = scores[0].numel()
    assert [int((~k).sum()) for k in keep] == [round(numel * r) for r in (0.25, 0.5, 0.75)]
    assert torch.equal(keep[1], mask_from_scores(scores[1], Sparsity(0.5, exact=True)))
    half = allocated.scaled(0.5)
    assert half.targets[experts[2]].ratio == pytest.approx(0.375) and half.ratio == pytest.approx(0.25)
    assert allocated.allocated_ratios()[plan.name(experts[0])] == 0.25 and plan.allocated_ratios() is None
