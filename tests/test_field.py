"""ALPS, L-ADMM and SparseLLM: the property that defines each, on small problems, and end to end on model=tiny."""
import pytest
import torch

from elsa.errors import ElsaError
from elsa.methods.alps import ALPS, alps_prune
from elsa.methods.ladmm import LADMM, cubic_sparsity, ladmm_prune
from elsa.methods.sparsegpt import sparsegpt_prune
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


@pytest.mark.parametrize("make,match", [
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


@pytest.mark.parametrize("method", ["alps", "ladmm"])
@pytest.mark.parametrize("sparsity", ["0.5", "2:4"])
def test_end_to_end(tmp_path, method, sparsity):
    res = run_pipeline(tmp_path, f"method={method}", f"sparsity={sparsity}", "save_model=false")
    assert res["status"] == "done"
    assert all(v == pytest.approx(0.5) for v in res["sparsity"]["per_layer"].values())
    assert res["sparsity"]["measured"] == pytest.approx(0.5, abs=1e-9)
    assert res["perplexity"]["wiki"] > 1.0
    assert res["method_stats"]["layer_error"]
