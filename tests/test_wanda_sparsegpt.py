"""Wanda and SparseGPT on single Linear layers with synthetic correlated inputs."""
import logging

import pytest
import torch
from torch import nn

from elsa.sparsity.plan import PruningPlan
from elsa.errors import ElsaError
from elsa.methods.sparsegpt import Hessian, SparseGPT, inverse_cholesky, sparsegpt_prune
from elsa.methods.wanda import InputNorms, Wanda
from elsa.sparsity.patterns import Sparsity, mask_from_scores, nm_violations


def correlated_inputs(tokens=2048, features=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, features, generator=g)
    mix = torch.eye(features) + 0.6 * torch.randn(features, features, generator=g) / features ** 0.5
    scales = torch.logspace(-1, 1, features)[torch.randperm(features, generator=g)]
    return (z @ mix) * scales           # correlated features with very different norms


def layer(rows=32, features=64, seed=1):
    torch.manual_seed(seed)
    lin = nn.Linear(features, rows, bias=False)
    return lin


def prune_with(method, lin, x, target, batch=512):
    stats = method.stats_init("lin", lin)
    for i in range(0, len(x), batch):
        stats = method.accumulate(stats, x[i:i + batch])
    method.prune_linear("lin", lin, stats, target)
    return lin.weight.detach().clone()


def recon_error(w, w_hat, x):
    return float(torch.linalg.norm(x @ w.T - x @ w_hat.T))


def test_wanda_mask_equals_score_definition():
    x, lin = correlated_inputs(), layer()
    w = lin.weight.detach().clone()
    pruned = prune_with(Wanda(), lin, x, Sparsity(0.5))
    score = w.abs() * x.pow(2).sum(0).sqrt()
    kth = score.sort(dim=1).values[:, score.shape[1] // 2 - 1:score.shape[1] // 2]  # 32nd lowest per row
    expected_keep = score > kth
    assert torch.equal(pruned != 0, expected_keep)
    assert torch.equal(pruned[expected_keep], w[expected_keep])          # no weight update


def test_wanda_nm_keeps_highest_scores_per_group():
    x, lin = correlated_inputs(), layer()
    w = lin.weight.detach().clone()
    pruned = prune_with(Wanda(), lin, x, Sparsity.parse("2:4"))
    score = (w.abs() * x.pow(2).sum(0).sqrt()).reshape(32, 16, 4)
    top2 = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, score.topk(2, dim=-1).indices, True)
    assert torch.equal(pruned != 0, top2.reshape(32, 64))


def test_input_norms_and_hessian_are_batch_invariant():
    x = correlated_inputs(tokens=300)
    a, b = InputNorms(64, "cpu"), InputNorms(64, "cpu")
    a.add(x)
    for i in range(0, 300, 7):
        b.add(x[i:i + 7])
    assert torch.allclose(a.norms(), b.norms(), rtol=1e-5)
    h1, h2 = Hessian(64, "cpu"), Hessian(64, "cpu")
    h1.add(x)
    for i in range(0, 300, 64):
        h2.add(x[i:i + 64])
    assert torch.allclose(h1.matrix(), h2.matrix(), rtol=1e-4, atol=1e-4)
    assert torch.allclose(h1.matrix(), 2 / 300 * x.T @ x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sparsity", ["0.5", "2:4"])
def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude(sparsity):
    x, target = correlated_inputs(), Sparsity.parse(sparsity)
    w = layer().weight.detach().clone()
    sparsegpt = recon_error(w, prune_with(SparseGPT(), layer(), x, target), x)
    wanda = recon_error(w, prune_with(Wanda(), layer(), x, target), x)
    magnitude = recon_error(w, w * mask_from_scores(w.abs(), target, "layer"), x)
    assert sparsegpt < wanda < magnitude, (sparsegpt, wanda, magnitude)


@pytest.mark.parametrize("sparsity", ["0.5", "2:4", "0.7"])
def test_sparsegpt_update_is_close_to_least_squares_on_its_mask(sparsity):
    """The OBS updates must nearly reach the best reconstruction for the support they chose."""
    x, target = correlated_inputs(), Sparsity.parse(sparsity)
    w = layer().weight.detach().clone()
    out, _ = sparsegpt_prune(w, 2 / len(x) * x.T @ x, target, blocksize=32)
    best = torch.zeros_like(w)
    for r in range(w.shape[0]):
        keep = out[r] != 0
        best[r, keep] = torch.linalg.lstsq(x[:, keep], (x @ w[r]).unsqueeze(1)).solution.squeeze(1)
    assert recon_error(w, best, x) <= recon_error(w, out, x) < 1.2 * recon_error(w, best, x)


@pytest.mark.parametrize("sparsity", ["0.5", "0.7", "0.37", "0.9", "2:4", "1:4", "4:8"])
@pytest.mark.parametrize("blocksize", [128, 16, 24, 6])
def test_sparsegpt_exact_sparsity_and_nm(sparsity, blocksize, request):
    target = Sparsity.parse(sparsity)
    if target.is_nm and blocksize % target.m:   # blocksize 6 with M = 4 or 8: refused before any pruning
        with pytest.raises(ElsaError, match=rf"^method.blocksize={blocksize} is not allowed: a multiple of M="):
            model = request.getfixturevalue("tiny_model")[0]
            SparseGPT(blocksize=blocksize).validate(PruningPlan.build(model, target))
        return
    x, lin = correlated_inputs(features=96), layer(features=96)
    pruned = prune_with(SparseGPT(blocksize=blocksize), lin, x, target)
    assert int((pruned == 0).sum()) == round(pruned.numel() * target.ratio)
    assert torch.isfinite(pruned).all()
    if target.is_nm:
        assert nm_violations(pruned, target.n, target.m) == 0


def test_sparsegpt_dense_target_is_identity_and_dead_inputs_are_zeroed():
    x = correlated_inputs()
    x[:, 5] = 0.0
    w = layer().weight.detach()
    h = 2 / len(x) * x.T @ x
    out, info = sparsegpt_prune(w, h, Sparsity(0.0))
    assert info["dead_inputs"] == 1 and (out[:, 5] == 0).all()
    keep = torch.ones_like(w, dtype=torch.bool)
    keep[:, 5] = False
    assert torch.allclose(out[keep], w[keep], atol=1e-5)
    out, _ = sparsegpt_prune(w, h, Sparsity(0.5))
    assert int((out == 0).sum()) == w.numel() // 2 and (out[:, 5] == 0).all()


def test_cholesky_retries_with_more_damping_and_warns(caplog):
    h = torch.tensor([[1.0, 2.0], [2.0, 1.0]])    # indefinite: needs damping >= ~1x mean diag
    with caplog.at_level(logging.WARNING):
        u, retries = inverse_cholesky(h, 0.01, "toy")
    assert retries >= 2 and "toy" in caplog.text and "retrying" in caplog.text
    assert torch.isfinite(u).all()
    with pytest.raises(ElsaError, match="percdamp"):
        inverse_cholesky(-torch.eye(3), 0.01, "neg", retries=2)


def test_sparsegpt_config_errors():
    with pytest.raises(ElsaError, match=r"method.percdamp=-1"):
        SparseGPT(percdamp=-1)
    with pytest.raises(ElsaError, match=r"method.blocksize=0"):
        SparseGPT(blocksize=0)
    with pytest.raises(ElsaError, match=r"method.group=col"):
        Wanda(group="col")
