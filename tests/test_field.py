"""ALPS, L-ADMM and SparseLLM: the property that defines each, on small problems, and end to end on model=tiny."""
import pytest
import torch
from torch import nn

from elsa.errors import ElsaError
from elsa.methods.alps import ALPS, alps_prune
from elsa.methods.ladmm import LADMM, cubic_sparsity, ladmm_prune
from elsa.methods.sparsegpt import sparsegpt_prune
from elsa.methods import sparsellm
from elsa.methods.sparsellm import MLPProblem, SparseLLM, mlp_structure, sparsellm_mlp, trace_calls
from elsa.sparsity.patterns import Sparsity, nm_violations

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
    """The Llama MLP's shape: c(act(a(x)) * b(x)) (names that say nothing: the structure is traced)."""

    def __init__(self, hidden=64, inner=128, seed=0, down_scale=1.0):
        super().__init__()
        torch.manual_seed(seed)
        self.a, self.b = nn.Linear(hidden, inner, bias=False), nn.Linear(hidden, inner, bias=False)
        self.c, self.act = nn.Linear(inner, hidden, bias=False), nn.SiLU()
        with torch.no_grad():
            self.c.weight.mul_(down_scale)

    def forward(self, x):
        return self.c(self.act(self.a(x)) * self.b(x))

    def run(self, x, target, **kw):
        return sparsellm_mlp(self.a, self.b, self.c, self.act, x, self(x), target, **kw)


class PlainMLP(nn.Module):
    """OPT's shape: f2(act(f1(x))), with biases."""

    def __init__(self, hidden=64, inner=128, seed=0, act=None):
        super().__init__()
        torch.manual_seed(seed)
        self.f1, self.f2, self.act = nn.Linear(hidden, inner), nn.Linear(inner, hidden), act or nn.ReLU()

    def forward(self, x):
        return self.f2(self.act(self.f1(x)))


@pytest.mark.parametrize("sparsity", ["0.7", "2:4"])
def test_sparsellm_objective_and_mlp_error_decrease(sparsity):
    x, mlp, target = correlated_inputs(tokens=1024), GatedMLP(), Sparsity.parse(sparsity)
    with torch.no_grad():
        y = mlp(x)
        out = mlp.run(x, target, iterations=6)
    obj, err = out["objective"], out["mlp_error"]
    assert len(obj) == len(err) == 6
    assert obj[-1] < 0.8 * obj[0], obj
    assert err[-1] < out["mlp_error_sparsegpt"], (err, out["mlp_error_sparsegpt"])
    with torch.no_grad():
        assert float((mlp(x) - y).pow(2).sum()) / len(x) == pytest.approx(err[-1], rel=1e-4)
    for lin in (mlp.a, mlp.b, mlp.c):
        assert int((lin.weight == 0).sum()) == round(lin.weight.numel() * target.ratio)
        if target.is_nm:
            assert nm_violations(lin.weight, target.n, target.m) == 0


def zero_centred_ridge(gram, xt, percdamp, prior=None):
    """The re-fit before the damping fix: one λ = percdamp · mean diag(XᵀX), centred on zero (``prior`` unused),
    from the sums over tokens the MLP problem adds (XᵀX, XᵀT)."""
    g = gram.clone()
    g += percdamp * float(torch.diagonal(g).mean()) * torch.eye(g.shape[0])
    return torch.cholesky_solve(xt, torch.linalg.cholesky(g)).t()


def test_sparsellm_down_fitted_to_the_pruned_activations_beats_the_auxiliary(monkeypatch):
    """A down projection with the default model's gain (largest singular value ~27; SmolLM2-135M's reach 22).
    Fitted to the activations the re-pruned gate/up produce (the default), the real MLP error falls at every
    alternation and stays below the literal block-coordinate step's (down fitted to the auxiliary P), whose
    objective falls 100x while its real error barely moves. With the re-fits' damping centred on zero (the code
    before the damping fix) that step's real error rose over the alternations."""
    x, target = correlated_inputs(tokens=2048), Sparsity(0.5)

    def run(mode):
        with torch.no_grad():
            return GatedMLP(inner=192, down_scale=30.0).run(x, target, iterations=5, down_input=mode)

    good, aux = run("pruned"), run("auxiliary")
    err, aerr = good["mlp_error"], aux["mlp_error"]
    assert all(b < a for a, b in zip(err, err[1:])), err
    assert all(g < a for g, a in zip(err, aerr)), (err, aerr)
    assert err[-1] < good["mlp_error_sparsegpt"]
    assert aux["objective"][-1] < 0.01 * aux["objective"][0]

    monkeypatch.setattr(sparsellm, "ridge", zero_centred_ridge)
    old = run("auxiliary")["mlp_error"]
    assert any(b > a for a, b in zip(old, old[1:])), old


def test_sparsellm_least_squares_damping_is_centred_on_the_dense_weights(monkeypatch):
    """One massive-activation channel (gate and up rows 30x, so the down projection's input has one channel
    ~10^6 times the median's energy, as block 11 of SmolLM2-135M): the re-fits' damping as it was (one λ from
    the mean diagonal, centred on zero) shrinks every other weight, and every alternation is over 3x worse than
    plain SparseGPT; per-channel and centred on the dense weights, SparseLLM starts below SparseGPT and falls."""
    def massive():
        mlp = GatedMLP(inner=128)
        with torch.no_grad():
            mlp.a.weight[0] *= 30
            mlp.b.weight[0] *= 30
            mlp.c.weight[:, 0] /= 30
        return mlp
    x, target = correlated_inputs(tokens=2048), Sparsity(0.5)
    with torch.no_grad():
        good = massive().run(x, target, iterations=4)
    err, sgpt = good["mlp_error"], good["mlp_error_sparsegpt"]
    assert err[0] < sgpt and all(b <= a for a, b in zip(err, err[1:])), (err, sgpt)

    w0 = torch.randn(8, 64)                      # the damping's pull: towards the prior, not towards zero
    far = sparsellm.least_squares(x[:4], torch.zeros(4, 8), 1e6, prior=w0)
    assert torch.allclose(far, w0, rtol=1e-3, atol=1e-3)

    monkeypatch.setattr(sparsellm, "ridge", zero_centred_ridge)
    with torch.no_grad():
        bad = massive().run(x, target, iterations=4)
    assert min(bad["mlp_error"]) > 3 * sgpt, (bad["mlp_error"], sgpt)


@pytest.mark.parametrize("act", [nn.ReLU(), nn.GELU()])
def test_sparsellm_plain_mlp_with_biases(act):
    x, target = correlated_inputs(tokens=1024), Sparsity(0.7)
    mlp = PlainMLP(act=act)
    with torch.no_grad():
        y = mlp(x)
        bias = (mlp.f1.bias.clone(), mlp.f2.bias.clone())
        out = sparsellm_mlp(mlp.f1, None, mlp.f2, mlp.act, x, y, target, iterations=4,
                            relu=isinstance(act, nn.ReLU))
        assert float((mlp(x) - y).pow(2).sum()) / len(x) == pytest.approx(out["mlp_error"][-1], rel=1e-4)
    assert out["mlp_error"][-1] < out["mlp_error_sparsegpt"]
    assert out["objective"][-1] < out["objective"][0]
    assert torch.equal(mlp.f1.bias, bias[0]) and torch.equal(mlp.f2.bias, bias[1])    # biases stay dense
    for lin in (mlp.f1, mlp.f2):
        assert int((lin.weight == 0).sum()) == round(lin.weight.numel() * target.ratio)


def test_sparsellm_relu_update_is_the_exact_elementwise_minimiser():
    x, mlp = correlated_inputs(tokens=64), PlainMLP()
    with torch.no_grad():
        prob = MLPProblem(mlp.f1, None, mlp.f2, mlp.act, x, mlp(x), 0.1, 0.1, 0.1, relu=True)
        prob.p = prob.p + torch.randn_like(prob.p)            # targets that move S to either branch
        s = prob._relu_s_rows(prob.p, None, prob.xg)
        grid = torch.linspace(-8, 8, 16001)
        for i, j in [(0, 0), (3, 7), (10, 100), (63, 127)]:
            p, m = prob.p[i, j], prob.xg[i, j]
            losses = 0.1 * (p - grid.clamp(min=0)).pow(2) + 0.1 * (grid - m).pow(2)
            mine = 0.1 * (p - s[i, j].clamp(min=0)).pow(2) + 0.1 * (s[i, j] - m).pow(2)
            assert float(mine) <= float(losses.min()) + 1e-6


def test_sparsellm_best_keeps_the_alternation_with_the_lowest_mlp_error():
    x, target = correlated_inputs(tokens=512), Sparsity(0.5)
    mlp = GatedMLP()
    with torch.no_grad():
        y = mlp(x)
        out = mlp.run(x, target, iterations=4, select="best")
    assert out["kept"] == out["mlp_error"].index(min(out["mlp_error"]))
    with torch.no_grad():
        assert float((mlp(x) - y).pow(2).sum()) / len(x) == pytest.approx(min(out["mlp_error"]), rel=1e-4)
    with pytest.raises(ElsaError, match="method.select=first"):
        SparseLLM(select="first")
    with pytest.raises(ElsaError, match="method.down_input=dense"):
        SparseLLM(down_input="dense")


def test_sparsellm_s_update_never_raises_an_element_and_chunking_only_moves_the_early_stop():
    x, mlp = correlated_inputs(tokens=300), GatedMLP()
    with torch.no_grad():
        y = mlp(x)
    problems = [MLPProblem(mlp.a, mlp.b, mlp.c, mlp.act, x, y, 0.1, 0.1, 0.1, chunk=c) for c in (7, 512)]
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


def test_mlp_shapes_are_found_by_tracing_not_by_names():
    x = torch.randn(2, 5, 64)
    for mlp, kind in ((GatedMLP(), "gated"), (PlainMLP(), "plain"), (PlainMLP(act=nn.GELU()), "plain")):
        block = nn.Module()
        block.attn, block.ffn = nn.Linear(64, 64), mlp
        block.forward = lambda h, b=block: b.ffn(b.attn(h))
        found = mlp_structure(block, trace_calls(dict(block.named_modules()), lambda: block(x)))
        assert found is not None and found.kind == kind
        names = {"gated": ("ffn.a", "ffn.b", "ffn.c"), "plain": ("ffn.f1", None, "ffn.f2")}[kind]
        assert (found.first, found.up, found.down) == names
        assert found.relu == isinstance(mlp.act, nn.ReLU)
    chain = nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 64))       # no activation between: not an MLP
    assert mlp_structure(chain, trace_calls(dict(chain.named_modules()), lambda: chain(x))) is None


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
        assert all(len(v) == 4 and v[-1] < v[0] for v in stats["mlp_objective"].values()), stats["mlp_objective"]
        assert all(e[-1] < stats["mlp_error_sparsegpt"][k] for k, e in stats["mlp_error"].items())
    else:
        assert len(stats["layer_error"]) == 14                                        # 7 Linears x 2 blocks
