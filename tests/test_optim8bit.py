"""elsa.engines.optim8bit: torchao's 8-bit AdamW state format stepped by one C pass per block on the CPU (ELSA-L's
optimizer there): the same weights and moments as torchao's AdamW8bit to float rounding, the torch path equal to
the kernel, a checkpoint round trip that continues identically, and ELSA-L running on it."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import run_pipeline

from elsa.engines.optim8bit import AdamW8bitCPU, Quantized


def _run(opt_cls, w0, grads, kernel=True, **kw):
    p = torch.nn.Parameter(w0.clone())
    small = torch.nn.Parameter(torch.ones(10))   # under 4096 values: fp32 moments
    opt = opt_cls([p, small], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01, **kw)
    if not kernel:
        opt.lib = None
    for g in grads:
        p.grad, small.grad = g.clone(), g.reshape(-1)[:10].clone()
        opt.step()
    m = opt.state[p]["exp_avg"]
    return p.detach().clone(), small.detach().clone(), m.dequantize(), opt


def test_matches_torchao_and_the_torch_path():
    torchao = pytest.importorskip("torchao.optim")
    torch.manual_seed(0)
    w0 = torch.randn(64, 512) * 0.02
    grads = [torch.randn_like(w0) * 1e-3 for _ in range(5)]
    pa, sa, ma, _ = _run(torchao.AdamW8bit, w0, grads)
    pb, sb, mb, opt = _run(AdamW8bitCPU, w0, grads)
    assert opt.lib is not None, opt.kernel_missing          # this machine has a C compiler
    pc, sc, mc, _ = _run(AdamW8bitCPU, w0, grads, kernel=False)
    moved = float((pa - w0).abs().max())
    for p, s, m in ((pb, sb, mb), (pc, sc, mc)):
        # equal to float rounding, except where a moment sits on a code boundary (a tie resolved the other way)
        off = (p - pa).abs() > 1e-3 * moved
        assert float(off.float().mean()) < 1e-3 and float((p - pa).abs().max()) < 0.02 * moved
        torch.testing.assert_close(s, sa)
        assert float(((m - ma).abs() > 1e-3 * float(ma.abs().max())).float().mean()) < 1e-3
    assert isinstance(opt.state[next(iter(opt.state))]["exp_avg"], Quantized)


def test_checkpoint_round_trip_continues_identically():
    torch.manual_seed(1)
    w0 = torch.randn(8, 1024)
    grads = [torch.randn_like(w0) for _ in range(4)]
    p, _, _, opt = _run(AdamW8bitCPU, w0, grads[:2])
    saved = copy.deepcopy(opt.state_dict())
    assert isinstance(opt.state[opt.param_groups[0]["params"][0]]["exp_avg"], Quantized)   # live state untouched
    q = torch.nn.Parameter(p.clone())
    small = torch.nn.Parameter(opt.param_groups[0]["params"][1].detach().clone())
    other = AdamW8bitCPU([q, small], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01)
    other.load_state_dict(saved)
    live = opt.param_groups[0]["params"]
    for g in grads[2:]:
        for a, b in ((live[0], q), (live[1], small)):
            a.grad = b.grad = None
        live[0].grad, q.grad = g.clone(), g.clone()
        live[1].grad, small.grad = g[0, :10].clone(), g[0, :10].clone()
        opt.step()
        other.step()
    assert torch.equal(live[0], q)


def test_elsa_l_trains_with_it(tmp_path):
    r = run_pipeline(tmp_path, "method=elsa_l", "budget=demo", "method.steps=4", "method.eval_initial=false",
                     "sparsity=0.7")
    assert r["method_stats"]["optimizer_impl"].startswith("elsa.engines.optim8bit.AdamW8bitCPU")
    assert abs(r["sparsity"]["measured"] - 0.7) < 1e-3
    assert r["method_stats"]["state_bytes_per_param"]["optimizer"] < 3.0   # 2 x (1 byte + scale), not 8
