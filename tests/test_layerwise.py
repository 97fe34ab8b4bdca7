"""The layer-wise engine on model=tiny: capture/re-run plumbing, shared statistics, end-to-end runs, bad input."""
from pathlib import Path

import pytest
import torch

from elsa.errors import ElsaError
from elsa.engines.layerwise import LayerwiseEngine, LayerwisePruner
from elsa.model.structure import block_matrices, decoder_blocks, prunable_matrices
from elsa.sparsity.patterns import Sparsity, nm_violations

from conftest import read_results, run_pipeline


class NoOp(LayerwisePruner):
    """Records what the engine hands it and prunes nothing."""

    def __init__(self, batch_size=3):
        super().__init__(batch_size)
        self.seen, self.tokens = [], {}

    def stats_init(self, name, linear):
        return {"owner": name, "tokens": 0}

    def accumulate(self, stats, x):
        stats["tokens"] += x.shape[0]
        return stats

    def prune_linear(self, name, linear, stats, target):
        self.seen.append(name)
        self.tokens[name] = (stats["owner"], stats["tokens"])


def calibration(tok_model, n=5, seqlen=32, seed=0):
    model, _ = tok_model
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (n, seqlen), generator=g)


@torch.no_grad()
def last_block_outputs(model, ids):
    out = []
    handle = decoder_blocks(model)[-1].register_forward_hook(
        lambda _m, _a, o: out.append(o[0] if isinstance(o, tuple) else o))
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return out[0]


@pytest.mark.parametrize("offload", [False, True])
def test_noop_engine_matches_plain_forward(tiny_model, offload):
    model, _ = tiny_model
    ids = calibration(tiny_model)
    before = {n: lin.weight.clone() for n, lin in prunable_matrices(model).items()}
    engine = LayerwiseEngine(model, "cpu", batch_size=2)          # 5 windows: batches of 2, 2, 1
    engine.offload = offload     # the one-block-at-a-time moves, exercised on the CPU (no GPU in CI)
    method = NoOp()
    engine.run(method, ids, Sparsity(0.5), keep_outputs=True)
    got = torch.cat(engine.outputs)
    want = last_block_outputs(model, ids)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), float((got - want).abs().max())
    assert all(torch.equal(before[n], lin.weight) for n, lin in prunable_matrices(model).items())
    # every Linear of every block, in the block's own order
    assert method.seen == list(prunable_matrices(model))


def test_linears_fed_the_same_tensor_share_statistics(tiny_model):
    model, _ = tiny_model
    ids = calibration(tiny_model, n=4, seqlen=16)
    method = NoOp()
    LayerwiseEngine(model, "cpu", batch_size=3).run(method, ids, Sparsity(0.5))
    names = list(block_matrices(decoder_blocks(model)[0]))
    owners = {n.split(".", 3)[-1]: method.tokens[n][0].local for n in method.tokens if n.split(".")[2] == "0"}
    assert set(owners) == set(names)
    # q/k/v see one tensor, gate/up another: 4 distinct inputs in a Llama block (attn in, o in, mlp in, down in)
    assert len(set(owners.values())) == 4, owners
    assert {t for _o, t in method.tokens.values()} == {4 * 16}          # every token, counted once


def test_engine_prunes_sparsegpt_nm_and_returns_method_stats(tiny_model):
    from elsa.methods.sparsegpt import SparseGPT

    model, _ = tiny_model
    stats = LayerwiseEngine(model, "cpu", 4).run(SparseGPT(), calibration(tiny_model, n=4, seqlen=64),
                                                 Sparsity.parse("2:4"))
    assert stats["cholesky_retries"] == 0 and "engine_s" in stats
    for name, lin in prunable_matrices(model).items():
        assert nm_violations(lin.weight, 2, 4) == 0, name
        assert int((lin.weight == 0).sum()) == lin.weight.numel() // 2, name


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("sparsity", ["0.5", "2:4"])
def test_end_to_end(tmp_path, method, sparsity):
    res = run_pipeline(tmp_path, f"method={method}", f"sparsity={sparsity}", "save_model=false")
    assert res["status"] == "done"
    assert res["sparsity"]["measured"] == pytest.approx(0.5, abs=1e-9)
    assert all(v == pytest.approx(0.5) for v in res["sparsity"]["per_layer"].values())
    assert res["calibration"]["nsamples"] == 4 and len(res["calibration"]["starts"]) == 4
    assert res["perplexity"]["wiki"] > 1.0
    assert read_results(tmp_path)["status"] == "done"


@pytest.mark.parametrize("overrides,match", [
    (["method=wanda", "nsamples=0"], r"^nsamples=0 is not allowed: a whole number > 0"),
    (["method=sparsegpt", "nsamples=0"], r"^nsamples=0 is not allowed"),
    (["method=wanda", "seqlen=4096"], r"^seqlen=4096 is not allowed: at most the model's context length 1024"),
    (["method=wanda", "sparsity=1:3"], r"^sparsity=1:3 is not allowed: layer .* has 64 inputs, which 3 does not"),
    (["method=sparsegpt", "sparsity=3:6"], r"^sparsity=3:6 is not allowed"),
    (["method=sparsegpt", "sparsity=2:4", "method.blocksize=6"], r"^method.blocksize=6 is not allowed: a multiple of M=4"),
    (["method=sparsegpt", "method.percdamp=0"], r"^method.percdamp=0 is not allowed"),
])
def test_bad_input_is_one_clear_line(tmp_path, overrides, match):
    with pytest.raises(ElsaError, match=match) as err:
        run_pipeline(tmp_path, *overrides, "save_model=false")
    assert "\n" not in str(err.value)
    res = read_results(tmp_path)
    assert res["status"] == "failed" and "prune" not in res.get("time_s", {})


def test_constructor_errors_surface_as_elsa_errors(tmp_path):
    with pytest.raises(ElsaError, match=r"^method.group=col is not allowed: one of row, layer, column$"):
        run_pipeline(tmp_path, "method=wanda", "method.group=col")


def test_cli_bad_input_prints_one_line(tmp_path):
    from conftest import TINY, run_cli

    proc = run_cli(*TINY, "method=sparsegpt", "sparsity=2:4", "method.blocksize=6", f"output_dir={tmp_path}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("elsa: error:")]
    assert errors == ["elsa: error: method.blocksize=6 is not allowed: a multiple of M=4 for sparsity=2:4"]


def test_every_matrix_records_its_relative_output_error(tiny_model):
    """method_stats.reconstruction: ||x (W - W_dense)^T|| / ||x W_dense^T|| per matrix over the tokens it
    receives in the pruned walk, checked for block 0's q_proj (whose inputs are the embeddings' normed)."""
    import copy

    from elsa.methods.wanda import Wanda
    from elsa.report.tables import job_row

    model, ids = tiny_model[0], torch.randint(0, 500, (4, 64), generator=torch.Generator().manual_seed(3))
    dense = copy.deepcopy(model)
    summary = LayerwiseEngine(model, "cpu", 2).run(Wanda(), ids, Sparsity(0.5))
    rec = summary["reconstruction"]
    assert set(rec["per_matrix"]) == set(prunable_matrices(model))
    assert 0 < rec["mean"] <= rec["max"] < 1.5
    xs = []
    handle = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda _m, a, _o: xs.append(a[0]))
    with torch.no_grad():
        for i in range(0, 4, 2):
            model(ids[i:i + 2])
    handle.remove()
    x = torch.cat(xs).reshape(-1, 64).double()
    w, wd = (m.model.layers[0].self_attn.q_proj.weight.double() for m in (model, dense))
    want = float((x @ (w - wd).T).norm() / (x @ wd.T).norm())
    assert rec["per_matrix"]["model.layers.0.self_attn.q_proj"] == pytest.approx(want, rel=1e-6)
    assert job_row({"method_stats": summary}, Path("."), Path("."))["recon_error_mean"] == rec["mean"]


def test_every_block_records_its_time_memory_and_tokens(tmp_path, tiny_model):
    """Issue 27: per block, results.json holds the wall and CPU seconds, the block's own peak resident memory and
    the calibration tokens it saw; the job's peak stays the whole job's (the per-block windows reset the kernel's
    counter and carry the peak)."""
    res = run_pipeline(tmp_path, "method=sparsegpt", "sparsity=0.5", "save_model=false")
    blocks = res["method_stats"]["per_block"]
    cfg_blocks = len(decoder_blocks(tiny_model[0]))
    assert [b["block"] for b in blocks] == list(range(cfg_blocks))
    assert all(b["tokens"] == 4 * 128 for b in blocks)            # nsamples x seqlen (TINY)
    assert all(b["wall_s"] > 0 and b["cpu_s"] > 0 and b["peak_rss_mb"] > 0 for b in blocks)
    assert res["peak_memory_mb"]["cpu_rss"] >= max(b["peak_rss_mb"] for b in blocks)
    assert read_results(tmp_path)["method_stats"]["per_block"] == blocks

