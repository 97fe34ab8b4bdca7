"""RIA, DSnoT and OATS: their definitions on single layers, their exact budgets, every tiny family (or the
one-line refusal), save + reload, and their bad knobs."""
import pytest
import torch
import transformers

from conftest import compose, read_results, run_cli, run_pipeline, TINY
from elsa.sparsity.plan import PruningPlan
from elsa.errors import ElsaError
from elsa.methods.dsnot import DSnoT, mlp_matrices
from elsa.methods.oats import OATS, LowRank, budget, from_pretrained, oats_decompose
from elsa.methods.ria import RIA, reallocation, ria_scores
from elsa.methods.wanda import Wanda
from elsa.run.recipe import build as build_component
from elsa.sparsity.patterns import Sparsity, mask_from_scores, nm_violations
from test_families import PRUNED, MOE_FAMILIES, build, calibration, _checkpoint
from test_wanda_sparsegpt import correlated_inputs, layer, prune_with, recon_error

from elsa.methods.base import PruneContext
from elsa.model.structure import decoder_blocks, prunable_matrices


def shifted_inputs():
    """Correlated inputs with non-zero means (DSnoT's error is driven by the means)."""
    return correlated_inputs() + torch.linspace(-1.0, 2.0, 64)


# -- RIA ------------------------------------------------------------------------------------------------------
def test_ria_prunes_the_lowest_relative_importance_of_the_whole_matrix():
    x, lin = correlated_inputs(), layer()
    w = lin.weight.detach().clone()
    pruned = prune_with(RIA(), lin, x, Sparsity(0.5))
    a = w.abs()
    score = (a / a.sum(0, keepdim=True) + a / a.sum(1, keepdim=True)) * x.pow(2).sum(0).sqrt().pow(0.5)
    keep = score > score.flatten().kthvalue(w.numel() // 2).values
    assert torch.equal(pruned != 0, keep) and torch.equal(pruned[keep], w[keep])
    rows = prune_with(RIA(group="row", a=1.0), layer(), x, Sparsity(0.5))
    assert ((rows == 0).sum(1) == 32).all()
    assert torch.equal(rows != 0, mask_from_scores(ria_scores(w, x.pow(2).sum(0).sqrt(), 1.0), Sparsity(0.5), "row"))


def test_ria_channel_reallocation_is_nm_after_its_permutation():
    x, lin = correlated_inputs(), layer()
    scores = ria_scores(lin.weight, x.pow(2).sum(0).sqrt(), 0.5)
    perm = reallocation(scores, 4)
    assert torch.equal(perm.sort().values, torch.arange(64))
    rank = torch.empty_like(perm)
    rank[scores.sum(0).sort(stable=True).indices] = torch.arange(64)
    assert sorted((rank[perm[:4]] // 16).tolist()) == [0, 1, 2, 3]     # every group: one channel per quartile
    method = RIA(permute=True)
    pruned = prune_with(method, lin, x, Sparsity.parse("2:4"))
    stored = method.permutations["lin"]
    assert nm_violations(pruned[:, stored], 2, 4) == 0 and int((pruned == 0).sum()) == pruned.numel() // 2


# -- DSnoT ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity", ["0.5", "0.7"])
def test_dsnot_keeps_every_rows_count_and_lowers_the_expected_error(sparsity):
    x, target = shifted_inputs(), Sparsity.parse(sparsity)
    w = layer().weight.detach().clone()
    wanda = prune_with(Wanda(), layer(), x, target)
    method = DSnoT(skip="none")
    refined = prune_with(method, layer(), x, target)
    assert torch.equal((refined == 0).sum(1), (wanda == 0).sum(1))              # exact per-row sparsity
    assert torch.equal(refined[refined != 0], w[refined != 0])                   # no weight update
    assert not torch.equal(refined != 0, wanda != 0)

    def mean_error(p):
        return float(((w - p) * x.mean(0)).sum(1).abs().mean())
    assert mean_error(refined) < 0.5 * mean_error(wanda)
    assert recon_error(w, refined, x) < recon_error(w, wanda, x)


def test_dsnot_nm_swaps_inside_groups_and_sparsegpt_base_keeps_dense_weights():
    x, target = shifted_inputs(), Sparsity.parse("2:4")
    w = layer().weight.detach().clone()
    refined = prune_with(DSnoT(skip="none"), layer(), x, target)
    assert nm_violations(refined, 2, 4) == 0 and int((refined == 0).sum()) == w.numel() // 2
    base = prune_with(DSnoT(base="sparsegpt", skip="none", cycles=1, update_threshold=1e9), layer(), x,
                      Sparsity(0.5))                                             # no cycle runs: the base mask
    from elsa.methods.dsnot import sparsegpt_scores
    h = x.T @ x
    assert torch.equal(base != 0, mask_from_scores(sparsegpt_scores(w, h, len(x), 0.01, "t"), Sparsity(0.5), "row"))
    assert torch.equal(base[base != 0], w[base != 0])


def test_dsnot_skips_the_mlp_found_structurally():
    model, tok = build("llama")
    names = {m.local for m in mlp_matrices(PruningPlan.build(model, Sparsity(0.6)).block(0))}
    assert names == {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    opt, _ = build("opt")
    assert {m.local for m in mlp_matrices(PruningPlan.build(opt, Sparsity(0.6)).block(0))} == {"fc1", "fc2"}
    wanda_model, _ = build("llama")
    ctx = dict(tokenizer=tok, target=Sparsity(0.6), calibration=calibration(tok))
    stats = DSnoT(batch_size=2).prune(PruneContext(model=model, **ctx))
    Wanda(batch_size=2).prune(PruneContext(model=wanda_model, **ctx))
    ours, theirs = prunable_matrices(model), prunable_matrices(wanda_model)
    changed = {n for n in ours if not torch.equal(ours[n].weight != 0, theirs[n].weight != 0)}
    # block 0 sees the same inputs in both walks: its MLP keeps Wanda's mask bit for bit, its attention moves
    assert any(n.startswith("model.layers.0.self_attn") for n in changed)
    assert not any(n.startswith("model.layers.0.mlp") for n in changed)
    assert stats["refined_matrices"] == 8 and len(stats["kept_base_mask"]) == 6 and stats["swaps"] > 0


# -- OATS -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity", ["0.5", "0.7"])
def test_oats_budget_counts_the_low_rank_factors(sparsity):
    target = Sparsity.parse(sparsity)
    rank, sparse = budget(32, 64, target, 0.25)
    keep = 32 * 64 - round(32 * 64 * target.ratio)
    assert rank == int(0.25 * keep / 96) and rank > 0
    x, g = correlated_inputs(), torch.Generator().manual_seed(3)
    # a weight with a low-rank part, the structure OATS models (on a purely random weight Wanda does better)
    w = layer().weight.detach() + 0.1 * torch.randn(32, 3, generator=g) @ torch.randn(3, 64, generator=g)
    norms = x.pow(2).sum(0).sqrt()
    s, up, down, errors = oats_decompose(w, norms, rank, sparse, 20)
    assert int((s != 0).sum()) + rank * 96 == keep
    assert (s != 0).sum(1).max() - (s != 0).sum(1).min() <= 1                  # rows share S's count
    assert errors[-1] < errors[0]
    wanda = w * mask_from_scores(w.abs() * norms, target, "row")
    assert recon_error(w, s + up @ down, x) < recon_error(w, wanda, x)         # at the same non-zeros


def test_oats_subspace_svd_ends_near_the_exact_alternation():
    x, g = correlated_inputs(), torch.Generator().manual_seed(3)
    w = layer().weight.detach() + 0.1 * torch.randn(32, 3, generator=g) @ torch.randn(3, 64, generator=g)
    rank, sparse = budget(32, 64, Sparsity(0.5), 0.25)
    exact = oats_decompose(w, x.pow(2).sum(0).sqrt(), rank, sparse, 30)
    fast = oats_decompose(w, x.pow(2).sum(0).sqrt(), rank, sparse, 30, "subspace")
    assert fast[3][0] == exact[3][0] and fast[3][-1] < fast[3][0]
    assert fast[3][-1] == pytest.approx(exact[3][-1], rel=0.02)
    assert int((fast[0] != 0).sum()) == int((exact[0] != 0).sum())


def test_oats_without_rank_is_wanda_per_row():
    x, lin = correlated_inputs(), layer()
    w = lin.weight.detach().clone()
    s, up, _, _ = oats_decompose(w, x.pow(2).sum(0).sqrt(), 0, budget(32, 64, Sparsity(0.5), 0.0)[1], 80)
    assert up.numel() == 0
    assert torch.equal(s != 0, prune_with(Wanda(), layer(), x, Sparsity(0.5)) != 0)
    assert torch.allclose(s[s != 0], w[s != 0], rtol=1e-6)


def test_oats_run_saves_and_reloads_with_its_low_rank_branches(tmp_path, capsys):
    out = run_pipeline(tmp_path / "run", "method=oats", "method.iters=4", "sparsity=0.5", "save_model=true",
                       "save_format=both", "eval.dense=false")
    assert out["status"] == "done" and "over_target" not in out["sparsity"]
    lowrank = out["params"]["dense_by_kind"]["lowrank"]
    assert lowrank == out["method_stats"]["lowrank_params"] == out["sparsity"]["lowrank_params"] > 0
    assert out["sparsity"]["effective"] == pytest.approx(0.5, abs=1e-9)
    assert out["sparsity"]["measured"] > 0.55
    assert "effective sparsity 0.5000" in capsys.readouterr().out
    note, = out["sparsity"]["notes"]     # the note the pipeline made; the old keys above stay for other readers
    assert note["kind"] == "lowrank" and note["data"]["params"] == lowrank
    assert note["label"] == f"low rank {lowrank / out['sparsity']['pruned_params']:.1%} + sparse " \
                            f"{1 - out['sparsity']['measured']:.1%}"
    back = from_pretrained(out["model_dir"])
    assert sum(isinstance(m, LowRank) for m in back.modules()) == len(prunable_matrices(back))
    from test_ast import _perplexity
    tok = transformers.AutoTokenizer.from_pretrained(out["model_dir"])
    assert _perplexity(back, tok)["wiki"] == pytest.approx(out["perplexity"]["wiki"], rel=1e-6)
    compressed = from_pretrained(out["compressed"]["dir"])
    assert _perplexity(compressed, tok)["wiki"] == pytest.approx(out["perplexity"]["wiki"], rel=1e-6)
    plain = transformers.AutoModelForCausalLM.from_pretrained(out["model_dir"])
    assert _perplexity(plain, tok)["wiki"] != pytest.approx(out["perplexity"]["wiki"], rel=1e-6)


# -- every family -----------------------------------------------------------------------------------------------
def _dense_untouched(model, dense):
    pruned = {id(m.source.param) for m in prunable_matrices(model).values()}
    for name, p in model.named_parameters():
        if id(p) not in pruned and ".lowrank." not in name:
            assert torch.equal(p, dense[name]), f"{name} changed"


@pytest.mark.parametrize("method,sparsity", [("ria", "2:4"), ("dsnot", "2:4"), ("dsnot", "0.6")])
@pytest.mark.parametrize("family", list(PRUNED))
def test_ria_dsnot_nm_and_ratio_on_every_family(family, method, sparsity):
    model, tok = build(family)
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    target = Sparsity.parse(sparsity)
    pruner = build_component(compose([f"method={method}"]).method, "method")
    pruner.validate(PruningPlan.build(model, target))
    pruner.prune(PruneContext(model=model, tokenizer=tok, target=target, calibration=calibration(tok)))
    for name, m in prunable_matrices(model).items():
        if target.is_nm:
            assert nm_violations(m.weight, target.n, target.m) == 0, name
        else:
            counts = (m.weight == 0).sum(1)
            assert (counts == round(m.weight.shape[1] * target.ratio)).all(), name
    _dense_untouched(model, dense)


@pytest.mark.parametrize("family", list(PRUNED))
def test_oats_on_every_family_or_its_refusal(family, tmp_path):
    model, tok = build(family)
    pruner = build_component(compose(["method=oats", "method.iters=3"]).method, "method")
    target = Sparsity(0.5)
    if family in MOE_FAMILIES:
        with pytest.raises(ElsaError, match=r"^method=oats adds a low-rank branch .* fused expert tensors"):
            pruner.validate(PruningPlan.build(model, target))
        return
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    pruner.validate(PruningPlan.build(model, target))
    pruner.prune(PruneContext(model=model, tokenizer=tok, target=target, calibration=calibration(tok)))
    for name, m in prunable_matrices(model).items():
        branch = m.source.module.lowrank
        nonzero = int((m.weight != 0).sum()) + sum(p.numel() for p in branch.parameters())
        assert nonzero == m.weight.numel() - round(m.weight.numel() * 0.5), name
    _dense_untouched(model, dense)
    model.save_pretrained(tmp_path / "m")
    back = from_pretrained(tmp_path / "m").eval()
    ids = calibration(tok, 2, 16)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
    frozen = PruningPlan.build(back, target).kept_dense()
    assert all(torch.equal(p, dense[n]) for n, p in back.named_parameters() if id(p) in frozen)


# -- bad knobs ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override,needle", [
    ("method=ria method.a=-1", "method.a=-1 is not allowed"),
    ("method=ria method.permute=yes", "method.permute=yes is not allowed"),
    ("method=ria method.group=col", "method.group=col is not allowed"),
    ("method=dsnot method.base=magnitude", "method.base=magnitude is not allowed: one of wanda, sparsegpt"),
    ("method=dsnot method.cycles=0", "method.cycles=0 is not allowed"),
    ("method=dsnot method.update_threshold=-0.1", "method.update_threshold=-0.1 is not allowed"),
    ("method=dsnot method.skip=attention", "method.skip=attention is not allowed: one of mlp, none"),
    ("method=oats method.rank_ratio=1", "method.rank_ratio=1 is not allowed: a number in [0, 1)"),
    ("method=oats method.iters=0", "method.iters=0 is not allowed"),
    ("method=oats method.svd=randomized", "method.svd=randomized is not allowed: one of exact, subspace"),
])
def test_bad_knobs_are_one_line_errors(override, needle):
    with pytest.raises(ElsaError, match="^" + needle.replace(".", r"\.").replace("[", r"\[").replace(")", r"\)")):
        build_component(compose(override.split()).method, "method")


def test_ria_permute_without_nm_is_refused_on_the_command_line(tmp_path):
    proc = run_cli(*TINY, "method=ria", "method.permute=true", "sparsity=0.5", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("elsa: error: method.permute=True is not allowed: false for sparsity=0.5"), proc.stderr[-2000:]
    assert read_results(tmp_path)["status"] == "failed"


@pytest.mark.parametrize("name,cls", [("ria", RIA), ("dsnot", DSnoT)])
def test_ria_and_dsnot_are_starts_of_a_training_method(name, cls):
    cfg = compose(["method=elsa", f"start={name}", "start.batch_size=2"])
    stage = build_component(cfg.start, "start")
    assert isinstance(stage, cls) and not stage.takes_start and stage.batch_size == 2
