"""SparseLLM's `mode=reference` (the algorithm of BaiTheBest/SparseLLM's code) and its knobs, on model=tiny and
small synthetic MLPs: it runs at the exact target, the skip list gives plain SparseGPT on the blocks it names,
each of its steps does what the reference's does, and every bad knob is one line."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import compose, run_cli, run_pipeline
from elsa.sparsity.plan import PruningPlan
from elsa.errors import ElsaError
from elsa.methods.base import PruneContext
from elsa.methods.sparsellm import MLPProblem, Recipe, SparseLLM, sparsellm_mlp
from elsa.model.structure import TinyLlamaSource, blocks_and_prefix
from elsa.run.recipe import build
from elsa.sparsity.patterns import Sparsity

REFERENCE = Recipe(refit="reference", s_update="gradient", literal=True)


def _pruned(model, tok, *overrides, target=Sparsity(0.5)):
    """``model`` pruned in place by the composed method; returns the method's statistics."""
    pruner = build(compose(list(overrides)).method, "method")
    pruner.validate(PruningPlan.build(model, target))
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(3, len(tok), (4, 32), generator=g)
    return pruner.prune(PruneContext(model=model, tokenizer=tok, target=target, calibration=calib))


def _mlp(seed=0, hidden=32, inner=64):
    torch.manual_seed(seed)
    gate, up = nn.Linear(hidden, inner, bias=False), nn.Linear(hidden, inner, bias=False)
    down = nn.Linear(inner, hidden, bias=False)
    x = torch.randn(512, hidden)
    with torch.no_grad():
        y = down(nn.functional.silu(gate(x)) * up(x))
    return gate, up, down, x, y


@pytest.mark.parametrize("sparsity", ["0.5", "2:4"])
def test_reference_mode_runs_at_the_exact_target(tmp_path, sparsity):
    res = run_pipeline(tmp_path, "method=sparsellm", "method.mode=reference", "method.skip=[]",
                       f"sparsity={sparsity}", "save_model=false")
    assert res["status"] == "done"
    assert res["sparsity"]["measured"] == pytest.approx(0.5, abs=1e-9)
    assert all(v == pytest.approx(0.5) for v in res["sparsity"]["per_layer"].values())
    stats = res["method_stats"]
    recipe = stats["recipe"]
    assert (recipe["mode"], recipe["down_input"], recipe["refit"], recipe["s_update"], recipe["literal"]) == \
        ("reference", "auxiliary", "reference", "gradient", True)
    assert list(recipe["alpha_beta_gamma"]["gated"]) == [5.0, 5.0, 5.0]
    assert len(stats["mlp_error"]) == 2 and all(len(e) == 4 for e in stats["mlp_error"].values())
    assert "skipped" not in stats


def test_skipped_blocks_are_plain_sparsegpt_and_the_default_skip_is_second_and_last_two():
    """On tiny's 2 blocks the reference's default skip [1, -2, -1] names both: the whole model is then
    bit-identical to method=sparsegpt's. skip=[-1] names block 1 only: block 0 gets the alternations."""
    model, tok = TinyLlamaSource().load()
    dense = copy.deepcopy(model)
    sgpt, ref, last = model, copy.deepcopy(dense), copy.deepcopy(dense)
    _pruned(sgpt, tok, "method=sparsegpt")
    stats = _pruned(ref, tok, "method=sparsellm", "method.mode=reference")
    _blocks, prefix = blocks_and_prefix(ref)
    assert stats["skipped"]["blocks"] == [f"{prefix}.0", f"{prefix}.1"] and stats["mlp_error"] == {}
    for (n, a), (_, b) in zip(sgpt.named_parameters(), ref.named_parameters()):
        assert torch.equal(a, b), n
    stats = _pruned(last, tok, "method=sparsellm", "method.mode=reference", "method.skip=[-1]")
    assert stats["skipped"]["blocks"] == [f"{prefix}.1"]
    assert list(stats["mlp_error"]) == [f"{prefix}.0.mlp"]
    mlp_a = blocks_and_prefix(last)[0][0].mlp.down_proj.weight
    mlp_b = blocks_and_prefix(sgpt)[0][0].mlp.down_proj.weight
    assert not torch.equal(mlp_a, mlp_b)                     # block 0 ran the alternations


def test_the_reference_first_alternation_is_plain_sparsegpt_and_later_ones_move():
    gate, up, down, x, y = _mlp()
    out = sparsellm_mlp(gate, up, down, nn.SiLU(), x, y, Sparsity(0.7), 5.0, 5.0, 5.0, iterations=3,
                        down_input="auxiliary", recipe=REFERENCE)
    assert out["mlp_error"][0] == pytest.approx(out["mlp_error_sparsegpt"], rel=1e-6)
    assert out["mlp_error"][1] != pytest.approx(out["mlp_error"][0], rel=1e-4)
    for lin in (gate, up, down):
        assert int((lin.weight == 0).sum()) == round(0.7 * lin.weight.numel())       # the exact count


def test_gradient_s_update_is_the_reference_step_and_sees_the_weights_scale():
    """Each step is S - lr * d/dS [α ||S - X W_gᵀ||² + β ||P - silu(S) ⊙ U||²] (summed), so unlike the exact
    update it depends on the scale of α, β, γ, not only on their ratios."""
    gate, up, down, x, y = _mlp()
    moved = {}
    for w in (0.1, 5.0):
        prob = MLPProblem(gate, up, down, nn.SiLU(), x, y, w, w, w, recipe=Recipe(s_update="gradient", s_steps=1))
        keep = torch.rand(prob.wg.shape, generator=torch.Generator().manual_seed(1)) > 0.5
        prob.wg = prob.wg * keep                                 # a pruned gate: X W_gᵀ moves away from S
        prob._inputs_changed()
        s0 = prob.s.clone().requires_grad_(True)
        loss = w * (s0 - prob.xg).pow(2).sum() + w * (prob.p - nn.functional.silu(s0) * prob.u).pow(2).sum()
        grad, = torch.autograd.grad(loss, s0)
        prob.update_s()
        torch.testing.assert_close(prob.s, s0.detach() - 0.01 * grad, rtol=1e-5, atol=1e-5)
        moved[w] = float((prob.s - s0.detach()).abs().sum())
    assert moved[5.0] == pytest.approx(50 * moved[0.1], rel=1e-3)
    exact = []
    for w in (0.1, 5.0):                                  # the project's updates: the same for any common scale
        g2, u2, d2, x2, y2 = _mlp()
        exact.append(sparsellm_mlp(g2, u2, d2, nn.SiLU(), x2, y2, Sparsity(0.5), w, w, w, iterations=3)["mlp_error"])
    assert exact[0] == pytest.approx(exact[1], rel=1e-4)


def test_reference_refit_is_the_least_squares_solution_and_half_holds_fp16_values():
    gate, up, down, x, y = _mlp()
    prob = MLPProblem(gate, up, down, nn.SiLU(), x, y, 5.0, 5.0, 5.0, recipe=REFERENCE)
    t = torch.randn(len(x), 64)
    w = prob._xfit(t, 0.01, None, None)
    torch.testing.assert_close(w, torch.linalg.lstsq(x, t).solution.t(), rtol=1e-4, atol=1e-4)
    half = Recipe(refit="reference", s_update="gradient", half=True, literal=True)
    out = sparsellm_mlp(gate, up, down, nn.SiLU(), x, y, Sparsity(0.5), 5.0, 5.0, 5.0, iterations=2,
                        down_input="auxiliary", recipe=half)
    assert len(out["mlp_error"]) == 2
    for lin in (gate, up, down):
        assert torch.equal(lin.weight, lin.weight.half().float())
    g2, u2, d2, x2, y2 = _mlp()
    with pytest.raises(ElsaError, match=r"non-finite values at alternation 2 .*method.half=true"):
        sparsellm_mlp(g2, u2, d2, nn.SiLU(), x2, y2 * 1e5, Sparsity(0.5), 5.0, 5.0, 5.0, iterations=2,
                      down_input="auxiliary", recipe=half)


def test_plain_mlp_reference_path_runs():
    """The reference's OPT path: ReLU's closed-form S, fc1 by the pseudo-inverse, fc2 by gradient steps."""
    torch.manual_seed(0)
    f1, f2 = nn.Linear(32, 64), nn.Linear(64, 32)
    x = torch.randn(512, 32)
    with torch.no_grad():
        y = f2(torch.relu(f1(x)))
    out = sparsellm_mlp(f1, None, f2, nn.ReLU(), x, y, Sparsity(0.5), iterations=3, relu=True,
                        down_input="auxiliary", recipe=REFERENCE)
    assert out["mlp_error"][0] == pytest.approx(out["mlp_error_sparsegpt"], rel=1e-6)
    for lin in (f1, f2):
        assert float((lin.weight == 0).float().mean()) == pytest.approx(0.5, abs=1e-9)


@pytest.mark.parametrize("kw,match", [
    (dict(mode="paper"), r"^method.mode=paper is not allowed: project .* or reference"),
    (dict(refit="lstsq"), r"^method.refit=lstsq is not allowed: ridge"),
    (dict(s_update="adam"), r"^method.s_update=adam is not allowed: exact"),
    (dict(s_steps=0), r"^method.s_steps=0 is not allowed: a whole number > 0"),
    (dict(s_lr=-1.0), r"^method.s_lr=-1.0 is not allowed: a number > 0"),
    (dict(half="yes"), r"^method.half=yes is not allowed: true"),
    (dict(skip="1"), r"^method.skip=1 is not allowed: a list of block indices"),
    (dict(skip=[1.5]), r"^method.skip=\[1.5\] is not allowed: a list of block indices"),
    (dict(mode="reference", alpha=0), r"^method.alpha=0 is not allowed: a number > 0 or null \(the paper: 0.1; "
                                      r"the reference code's Llama path: 5.0\)"),
])
def test_bad_knobs_are_one_line(kw, match):
    with pytest.raises(ElsaError, match=match):
        SparseLLM(**kw)


def test_a_skip_index_outside_the_model_is_one_line_before_calibration(tmp_path):
    model, _tok = TinyLlamaSource().load()
    with pytest.raises(ElsaError, match=r"^method.skip=\[5\] is not allowed: block indices of this model's 2 blocks"):
        SparseLLM(skip=[5]).validate(PruningPlan.build(model, Sparsity(0.5)))
    res = run_cli("model=tiny", "logger=none", "method=sparsellm", "method.skip=[-3]", f"output_dir={tmp_path}")
    errors = [line for line in res.stderr.splitlines() if line.startswith("elsa: error:")]
    assert res.returncode == 2 and len(errors) == 1 and "method.skip=[-3] is not allowed" in errors[0], \
        res.stderr[-2000:]
