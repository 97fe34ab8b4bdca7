"""ALPS, L-ADMM and SparseLLM: the property that defines each, on small problems, and end to end on model=tiny."""
import pytest
import torch
from torch import nn

from elsa.errors import ElsaError
from elsa.methods.alps import ALPS, alps_prune
from elsa.methods.ladmm import LADMM, cubic_sparsity, ladmm_prune
from elsa.methods.sparsegpt import sparsegpt_prune
from elsa.methods.sparsellm import GatedMLPProblem, SparseLLM, gated_mlp, sparsellm_mlp
from elsa.sparsity import Sparsity, nm_violations

from conftest import run_pipeline
from test_wanda_sparsegpt import correlated_inputs, layer, prune_with, recon_error

PRUNERS = {"alps": alps_prune, "ladmm": ladmm_prune}


def problem():
    x = correlated_inputs()
    return x, layer().weight.detach().clone(), 2 / len(x) * x.T @ x


@pytest.mark.parametrize("method", ["alps", "ladmm"])
@pytest.mark.parametrize("sparsity", ["0.7", "2:4"])
def test_beats_sparsegpt_reconstruction(method, sparsity):
    x, w, h = problem()
    target = Sparsity.parse(sparsity)
    ours, _ = PRUNERS[method](w, h, target)
    sgpt, _ = sparsegpt_prune(w, h, target)
    assert recon_error(w, ours, x) < recon_error(w, sgpt, x)
    assert int((ours == 0).sum()) == round(w.numel() * target.ratio)
    assert torch.isfinite(ours).all()
    if target.is_nm:
        assert nm_violations(ours, target.n, target.m) == 0


@pytest.mark.parametrize("cls", [ALPS, LADMM])
@pytest.mark.parametrize("sparsity", ["0.5", "0.9", "0.37", "1:4", "4:8"])
def test_exact_sparsity_through_the_hooks(cls, sparsity):
    x, lin, target = correlated_inputs(features=96), layer(features=96), Sparsity.parse(sparsity)
    pruned = prune_with(cls(), lin, x, target)
    assert int((pruned == 0).sum()) == round(pruned.numel() * target.ratio)
    if target.is_nm:
        assert nm_violations(pruned, target.n, target.m) == 0


def test_alps_support_settles_and_pcg_only_lowers_the_error():
    _x, w, h = problem()
    _, info = alps_prune(w, h, Sparsity(0.7))
    assert info["converged"] and info["final_rho"] > 0.1
    assert info["error"] <= info["admm_error"]
    _, no_pcg = alps_prune(w, h, Sparsity(0.7), pcg_iters=0)
    assert no_pcg["error"] == pytest.approx(no_pcg["admm_error"])


def test_ladmm_cubic_schedule_rises_to_the_target():
    target = Sparsity(0.8)
    ratios = [cubic_sparsity(target, t, 10).ratio for t in range(1, 13)]
    assert all(a < b for a, b in zip(ratios[:9], ratios[1:10])) and ratios[9:] == [0.8] * 3
    assert ratios[0] > 0.8 * 0.2                       # cubic: most of the pruning happens early
    assert cubic_sparsity(Sparsity.parse("2:4"), 1, 10) == Sparsity.parse("2:4")


class GatedMLP(nn.Module):
    """The Llama MLP's shape: down(act(gate(x)) * up(x))."""

    def __init__(self, hidden=64, inner=128, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.gate_proj, self.up_proj = nn.Linear(hidden, inner, bias=False), nn.Linear(hidden, inner, bias=False)
        self.down_proj, self.act_fn = nn.Linear(inner, hidden, bias=False), nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


@pytest.mark.parametrize("sparsity", ["0.7", "2:4"])
def test_sparsellm_objective_and_mlp_error_decrease(sparsity):
    x, mlp, target = correlated_inputs(tokens=1024), GatedMLP(), Sparsity.parse(sparsity)
    with torch.no_grad():
        y = mlp(x)
    out = sparsellm_mlp(mlp, x, y, target, iterations=6)
    obj, err = out["objective"], out["mlp_error"]
    assert len(obj) == len(err) == 6
    assert obj[-1] < 0.8 * obj[0] and all(b <= a * 1.001 for a, b in zip(obj, obj[1:])), obj
    assert err[-1] < err[0], err                     # the real MLP output improves on alternation 1 (= SparseGPT)
    with torch.no_grad():
        assert float((mlp(x) - y).pow(2).sum()) / len(x) == pytest.approx(err[-1], rel=1e-4)
    for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        assert int((lin.weight == 0).sum()) == round(lin.weight.numel() * target.ratio)
        if target.is_nm:
            assert nm_violations(lin.weight, target.n, target.m) == 0


def test_sparsellm_best_keeps_the_alternation_with_the_lowest_mlp_error():
    x, target = correlated_inputs(tokens=512), Sparsity(0.5)
    mlp = GatedMLP()
    with torch.no_grad():
        y = mlp(x)
    out = sparsellm_mlp(mlp, x, y, target, iterations=4, select="best")
    assert out["kept"] == out["mlp_error"].index(min(out["mlp_error"]))
    with torch.no_grad():
        assert float((mlp(x) - y).pow(2).sum()) / len(x) == pytest.approx(min(out["mlp_error"]), rel=1e-4)
    with pytest.raises(ElsaError, match="method.select=first"):
        SparseLLM(select="first")


def test_sparsellm_s_update_never_raises_an_element_and_chunking_only_moves_the_early_stop():
    x, mlp = correlated_inputs(tokens=300), GatedMLP()
    with torch.no_grad():
        y = mlp(x)
    problems = [GatedMLPProblem(mlp, x, y, 0.1, 0.1, 0.1, chunk=c) for c in (7, 512)]
    keep = torch.rand_like(problems[0].wg) > 0.7
    for prob in problems:                            # a pruned gate/up moves X W_gᵀ away from S: work to do
        prob.wg, prob.wu = prob.wg * keep, prob.wu * keep
        prob._inputs_changed()
        prob.update_p()
        prob.update_u()
    before = problems[0]._s_loss(problems[0].s, problems[0].p, problems[0].u, problems[0].xg)
    for prob in problems:
        prob.update_s()
    after = problems[0]._s_loss(problems[0].s, problems[0].p, problems[0].u, problems[0].xg)
    assert bool((after <= before).all()) and float(after.sum()) < 0.5 * float(before.sum())
    other = problems[1]._s_loss(problems[1].s, problems[1].p, problems[1].u, problems[1].xg)
    assert float(other.sum()) == pytest.approx(float(after.sum()), rel=1e-4)
    torch.testing.assert_close(problems[0].s, problems[1].s, rtol=1e-3, atol=1e-3)


def test_gated_mlp_is_found_structurally():
    block = nn.Module()
    block.attn, block.ffn = nn.Linear(4, 4), GatedMLP(8, 16)
    assert gated_mlp(block) == ("ffn", block.ffn)
    assert gated_mlp(nn.Sequential(nn.Linear(4, 4))) is None


@pytest.mark.parametrize("make,match", [
    (lambda: SparseLLM(alpha=0), r"^method.alpha=0 is not allowed"),
    (lambda: SparseLLM(gamma=-0.1), r"^method.gamma=-0.1 is not allowed"),
    (lambda: SparseLLM(iterations=0), r"^method.iterations=0 is not allowed"),
    (lambda: ALPS(rho=0), r"^method.rho=0 is not allowed"),
    (lambda: ALPS(rho=-1.0), r"^method.rho=-1.0 is not allowed"),
    (lambda: ALPS(max_iters=0), r"^method.max_iters=0 is not allowed"),
    (lambda: ALPS(pcg_iters=-1), r"^method.pcg_iters=-1 is not allowed"),
    (lambda: ALPS(rho_growth=[0.9, 1.2, 1.1]), r"^method.rho_growth="),
    (lambda: LADMM(rho=0), r"^method.rho=0 is not allowed"),
    (lambda: LADMM(iters=0), r"^method.iters=0 is not allowed"),
    (lambda: LADMM(iters=10, grow_iters=20), r"^method.grow_iters=20 is not allowed"),
])
def test_bad_hyperparameters_raise_config_errors(make, match):
    with pytest.raises(ElsaError, match=match):
        make()


@pytest.mark.parametrize("method", ["alps", "ladmm", "sparsellm"])
@pytest.mark.parametrize("sparsity", ["0.5", "2:4"])
def test_end_to_end(tmp_path, method, sparsity):
    res = run_pipeline(tmp_path, f"method={method}", f"sparsity={sparsity}", "save_model=false")
    assert res["status"] == "done"
    assert all(v == pytest.approx(0.5) for v in res["sparsity"]["per_layer"].values())
    assert res["sparsity"]["measured"] == pytest.approx(0.5, abs=1e-9)
    assert res["perplexity"]["wiki"] > 1.0
    stats = res["method_stats"]
    if method == "sparsellm":
        assert len(stats["mlp_objective"]) == 2 and stats["cholesky_retries"] == 0     # one per block
        assert all(len(v) == 10 and v[-1] < v[0] for v in stats["mlp_objective"].values()), stats["mlp_objective"]
    else:
        assert len(stats["layer_error"]) == 14                                        # 7 Linears x 2 blocks
