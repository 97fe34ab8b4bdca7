"""SAFE / SAFE+: beats the no-training projection on a real block, exact sparsity, the SAM and proximal terms,
bad hyperparameters, and end to end on model=tiny."""
import copy

import pytest
import torch

from conftest import TINY, run_cli, run_pipeline

from elsa.errors import ElsaError
from elsa.engines.layerwise import LayerwiseEngine, _hidden
from elsa.methods.safe import SAFE
from elsa.model.structure import TinyLlamaSource, block_matrices
from elsa.sparsity.plan import MatrixId, PruningPlan
from elsa.sparsity.patterns import Sparsity, mask_from_scores, nm_violations, project

FAST = ["method=safe", "method.epochs=2", "method.warmup_epochs=1", "method.batch_size=2", "method.interval=2"]


@pytest.fixture(scope="module")
def block_and_inputs():
    """Block 0 of the tiny model and the (hidden, kwargs) batches it receives: 8 windows of 64 tokens."""
    model, _tok = TinyLlamaSource().load()
    ids = torch.randint(0, 500, (8, 64), generator=torch.Generator().manual_seed(0))
    engine = LayerwiseEngine(model, "cpu", batch_size=2)
    hiddens, kwargs = engine.capture(ids)
    batches = list(zip(hiddens, kwargs[0]))
    block = engine.blocks[0]
    with torch.no_grad():
        dense = [_hidden(block(h, **kw)) for h, kw in batches]
    return block, batches, dense


def mse(block, batches, dense):
    with torch.no_grad():
        err = sum(float((_hidden(block(h, **kw)) - y).square().sum()) for (h, kw), y in zip(batches, dense))
    return err / sum(y.numel() for y in dense)


def input_norms(block, batches):
    """||X_j||² per Linear of ``block`` over ``batches`` (what the engine's hooks hand SAFE+)."""
    sums, handles = {}, []
    for name, lin in block_matrices(block).items():
        def hook(_m, args, _out, name=name):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.square().sum(0)
        handles.append(lin.source.module.register_forward_hook(hook))
    with torch.no_grad():
        for h, kw in batches:
            block(h, **kw)
    for handle in handles:
        handle.remove()
    return sums


def block_plan(block, target):
    """A plan over ``block`` alone, which it names ``layers.0`` (SAFE's seed and messages read the name)."""
    holder = torch.nn.Module()
    holder.layers = torch.nn.ModuleList([block])
    return PruningPlan.build(holder, target).block(0)


def block_stats(block, batches, weighted):
    """What the engine hands SAFE: per matrix id, ||X_j||² (SAFE+) or None."""
    norms = input_norms(block, batches) if weighted else {}
    return {MatrixId(0, n): norms.get(n) for n in block_matrices(block)}


def run_safe(block, batches, target, **kw):
    pruned = copy.deepcopy(block)
    method = SAFE(batch_size=2, **kw)
    stats = block_stats(pruned, batches, method.activation_weighted)
    with torch.no_grad():                                   # the engine's context
        info = method.prune_block(block_plan(pruned, target), stats, batches)["layers.0"]
    return pruned, info


@pytest.mark.parametrize("sparsity", ["0.5", "2:4"])
@pytest.mark.parametrize("plus", [False, True])
def test_beats_the_no_training_projection_with_exact_sparsity(block_and_inputs, sparsity, plus):
    block, batches, dense = block_and_inputs
    target = Sparsity.parse(sparsity)
    baseline = copy.deepcopy(block)                         # the same projection, no training
    norms = input_norms(block, batches)
    with torch.no_grad():
        for name, lin in block_matrices(baseline).items():
            scores = lin.weight.abs() * norms[name].float().sqrt() if plus else lin.weight.abs()
            lin.weight.mul_(mask_from_scores(scores, target, "layer"))
    pruned, info = run_safe(block, batches, target, epochs=10, warmup_epochs=1, activation_weighted=plus)
    base_mse, safe_mse = mse(baseline, batches, dense), mse(pruned, batches, dense)
    assert info["mse_initial"] == pytest.approx(base_mse, rel=1e-5)
    assert info["mse_final"] == pytest.approx(safe_mse, rel=1e-5)
    assert safe_mse < 0.95 * base_mse, (safe_mse, base_mse)
    assert info["steps"] == 10 * len(batches) and len(info["train_loss"]) == 10
    for lin in block_matrices(pruned).values():
        assert int((lin.weight == 0).sum()) == round(lin.weight.numel() * target.ratio)
        if target.is_nm:
            assert nm_violations(lin.weight, target.n, target.m) == 0
    assert all(not p.requires_grad or p.requires_grad == q.requires_grad
               for p, q in zip(pruned.parameters(), block.parameters()))


def test_sam_gradient_is_taken_at_the_perturbed_point_and_w_is_restored(block_and_inputs):
    block, batches, dense = block_and_inputs
    (h, kw), y = batches[0], dense[0]
    b = copy.deepcopy(block)
    with torch.no_grad():                                   # pruned, so that the loss (and g) are not zero
        for lin in block_matrices(b).values():
            lin.weight.copy_(project(lin.weight, Sparsity(0.5)))
    params = list(b.parameters())
    for p in params:
        p.requires_grad_(True)
    before = [p.detach().clone() for p in params]

    def grads(rho):
        method = SAFE(rho=rho, lam=0.0)
        for p in params:
            p.grad = None
        method._sam_step(b, params, None, {}, h, kw, y, "layers.0", 0)
        return [p.grad.clone() for p in params]

    plain, sam = grads(0.0), grads(0.05)
    assert all(torch.equal(p, q) for p, q in zip(params, before))          # w is back where it was
    # the reference: the gradient at w + rho g/||g||, computed here independently
    loss = torch.nn.functional.mse_loss(_hidden(b(h, **kw)), y)
    g = torch.autograd.grad(loss, params)
    norm = torch.sqrt(sum(x.square().sum() for x in g))
    with torch.no_grad():
        for p, x in zip(params, g):
            p.add_(0.05 * x / norm)
    ref = torch.autograd.grad(torch.nn.functional.mse_loss(_hidden(b(h, **kw)), y), params)
    assert all(torch.allclose(a, r, rtol=1e-4, atol=1e-9) for a, r in zip(sam, ref))
    assert any(not torch.allclose(a, p, rtol=1e-3, atol=0) for a, p in zip(sam, plain))  # SAM changes the step


def test_rho_changes_the_trained_block(block_and_inputs):
    block, batches, _dense = block_and_inputs
    a, _ = run_safe(block, batches, Sparsity(0.5), epochs=1, warmup_epochs=0, rho=0.0)
    b, _ = run_safe(block, batches, Sparsity(0.5), epochs=1, warmup_epochs=0, rho=0.05)
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_proximal_term_is_lambda_times_w_minus_z_plus_u(block_and_inputs):
    block, batches, dense = block_and_inputs
    from elsa.engines.admm import AdmmState, Fp32Codec

    b = copy.deepcopy(block)
    params = list(b.parameters())
    for p in params:
        p.requires_grad_(True)
    weights = {n: lin.weight for n, lin in block_matrices(b).items()}
    admm = AdmmState(weights, Sparsity(0.5), "layer", Fp32Codec(), Fp32Codec())
    admm.init(Sparsity(0.5))
    ids = {id(w): n for n, w in weights.items()}
    (h, kw), y = batches[0], dense[0]
    out = {}
    for lam in (0.0, 0.5):
        SAFE(rho=0.0, lam=lam)._sam_step(b, params, admm, ids, h, kw, y, "layers.0", 0)
        out[lam] = {n: w.grad.clone() for n, w in weights.items()}
    for n, w in weights.items():
        expected = 0.5 * (w.detach() - project(w.detach(), Sparsity(0.5)))        # u = 0 after init
        assert torch.allclose(out[0.5][n] - out[0.0][n], expected, atol=1e-7)


def test_non_finite_loss_names_the_block_and_step(block_and_inputs):
    block, batches, _dense = block_and_inputs
    b = copy.deepcopy(block)
    method = SAFE(batch_size=2, epochs=1, warmup_epochs=0, lr=1e30, rho=0.0)      # diverges in a step or two
    with pytest.raises(ElsaError, match=r"block layers\.0 is (nan|inf|-inf) at step [0-9]+"), torch.no_grad():
        method.prune_block(block_plan(b, Sparsity(0.5)), block_stats(b, batches, False), batches)


@pytest.mark.parametrize("kwargs,match", [
    ({"lr": 0}, r"^method.lr=0 is not allowed"),
    ({"lr": -1e-4}, r"^method.lr=-0.0001 is not allowed"),
    ({"epochs": 0}, r"^method.epochs=0 is not allowed"),
    ({"epochs": 1.5}, r"^method.epochs=1.5 is not allowed"),
    ({"interval": 0}, r"^method.interval=0 is not allowed"),
    ({"lam": -1.0}, r"^method.lam=-1.0 is not allowed"),
    ({"rho": -0.1}, r"^method.rho=-0.1 is not allowed"),
    ({"batch_size": 0}, r"^method.batch_size=0 is not allowed"),
    ({"epochs": 2, "warmup_epochs": 3}, r"^method.warmup_epochs=3 is not allowed"),
    ({"betas": [0.9, 1.0]}, r"^method.betas="),
])
def test_bad_hyperparameters_raise_config_errors(kwargs, match):
    with pytest.raises(ElsaError, match=match):
        SAFE(**kwargs)


def test_zero_lambda_and_rho_are_allowed():
    SAFE(lam=0.0, rho=0.0)


@pytest.mark.parametrize("sparsity", ["0.5", "2:4"])
def test_end_to_end(tmp_path, sparsity):
    res = run_pipeline(tmp_path, *FAST, f"sparsity={sparsity}", "save_model=false")
    assert res["status"] == "done"
    assert all(v == pytest.approx(0.5) for v in res["sparsity"]["per_layer"].values())
    assert res["sparsity"]["measured"] == pytest.approx(0.5, abs=1e-9)
    stats = res["method_stats"]
    assert set(stats["block_mse_final"]) == set(stats["block_mse_initial"]) == {"model.layers.0", "model.layers.1"}
    assert stats["steps_per_block"] == 4 and stats["variant"] == "safe"           # 2 epochs x 2 batches of 2
    assert all(v > 0 for v in stats["block_mse_final"].values())


def test_end_to_end_safe_plus(tmp_path):
    res = run_pipeline(tmp_path, *FAST, "method.activation_weighted=true", "sparsity=0.5", "save_model=false")
    assert res["status"] == "done" and res["method_stats"]["variant"] == "safe+"
    assert res["sparsity"]["measured"] == pytest.approx(0.5, abs=1e-9)


def test_cli_bad_lr_prints_one_line(tmp_path):
    proc = run_cli(*TINY, "method=safe", "method.lr=0", f"output_dir={tmp_path}", timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("elsa: error:")]
    assert errors == ["elsa: error: method.lr=0 is not allowed: a number > 0 (the paper: 2e-4)"], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
