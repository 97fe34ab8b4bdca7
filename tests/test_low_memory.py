"""hardware.low_memory and method.train_dense_params=false: what makes the 7B-shaped cells of issue 27 fit,
with the same pruned weights (layer-wise: fused experts one at a time, the dense copy on disk) and a plan
that follows each change."""
from __future__ import annotations

import pytest
import torch

from conftest import TINY, compose, run_pipeline
from test_families import tiny

from elsa.engines.layerwise import LayerwiseEngine
from elsa.sparsity.plan import PruningPlan
from elsa.sparsity.patterns import Sparsity


def _walk(family, method, low_memory):
    model = tiny(family)
    method.validate(PruningPlan.build(model, Sparsity(0.5)))
    ids = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    summary = LayerwiseEngine(model, "cpu", batch_size=2, low_memory=low_memory).run(method, ids, Sparsity(0.5))
    return model, summary


@pytest.mark.parametrize("family", ["mixtral", "qwen3-moe", "qwen2-moe", "gpt-oss", "llama"])
@pytest.mark.parametrize("name", ["sparsegpt", "wanda", "sparsellm-fallback"])
def test_low_memory_walk_prunes_the_same_weights(family, name):
    """Experts collected and pruned one at a time (a shared expert and attention last), the dense copy on disk:
    every parameter bit-identical to the usual walk's, the same reconstruction errors, and the summary says
    the walk was lean. gpt-oss: [experts, in, out] storage; qwen2-moe: a shared expert beside the routed ones."""
    from elsa.methods.sparsegpt import SparseGPT
    from elsa.methods.sparsellm import SparseLLM
    from elsa.methods.wanda import Wanda

    if name == "sparsellm-fallback" and family == "llama":
        pytest.skip("a dense MLP: SparseLLM models it (no fallback)")
    make = {"sparsegpt": lambda: SparseGPT(batch_size=2), "wanda": lambda: Wanda(batch_size=2),
            "sparsellm-fallback": lambda: SparseLLM(batch_size=2, iterations=1, fallback="sparsegpt")}[name]
    usual, s_usual = _walk(family, make(), False)
    lean, s_lean = _walk(family, make(), True)
    for (n, a), (_m, b) in zip(usual.state_dict().items(), lean.state_dict().items()):
        assert torch.equal(a, b), n
    # qwen2-moe's shared expert is an MLP SparseLLM models: those blocks couple their matrices, walked as usual
    coupled = name == "sparsellm-fallback" and family == "qwen2-moe"
    assert (s_lean["low_memory"]["blocks"], s_lean["low_memory"]["of"]) == (0 if coupled else 4, 4)
    assert "low_memory" not in s_usual
    errors = s_usual["reconstruction"]["per_matrix"] if "per_matrix" in s_usual["reconstruction"] else None
    if errors is not None:
        assert errors == pytest.approx(s_lean["reconstruction"]["per_matrix"], rel=1e-6)
    assert s_usual["reconstruction"]["mean"] == pytest.approx(s_lean["reconstruction"]["mean"], rel=1e-6)


def test_low_memory_walk_keeps_the_weights_outside_the_blocks_on_disk():
    """During the walk the embeddings and head are empty (on disk); after it they are the same tensors' values."""
    from elsa.methods.wanda import Wanda

    sizes = []

    class Watching(Wanda):
        def prune_linear(self, name, linear, stats, target):
            sizes.append((model.get_input_embeddings().weight.numel(), model.get_output_embeddings().weight.numel()))
            return super().prune_linear(name, linear, stats, target)

    model = tiny("mixtral")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "layers" not in n}
    ids = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    LayerwiseEngine(model, "cpu", batch_size=2, low_memory=True).run(Watching(batch_size=2), ids, Sparsity(0.5))
    assert sizes and set(sizes) == {(0, 0)}
    for n, p in model.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n


def test_low_memory_leaves_a_coupled_method_as_it_walks_and_says_so():
    from elsa.methods.sparsellm import SparseLLM

    _model, summary = _walk("llama", SparseLLM(batch_size=2, iterations=1), True)
    assert summary["low_memory"]["blocks"] == 0 and "SparseLLM couples" in summary["low_memory"]["what"]


def test_low_memory_plan_holds_one_experts_statistics_and_no_dense_copy():
    """The plan follows the walk: Mixtral-8x7B shapes at 16 x 2048, SparseGPT holds the attention's Hessians
    and ONE expert's (gate_up 4096^2, down 14336^2) instead of eight's, no 5.6 GB dense copy of the block, and
    seven more forwards of the block."""
    from elsa.plan import Plan, setting
    from elsa.run.recipe import build

    def plan(*extra):
        cfg = compose(["model=shapes", "model.like=mixtral-8x7b", "model.blocks=1", "nsamples=16", "seqlen=2048",
                       "method=sparsegpt", "method.batch_size=2", "hardware.threads=1", *extra])
        st = setting(cfg, build(cfg.model, "model"), build(cfg.method, "method"), None)
        st.load = 0.0
        return Plan(st, base_gb=0.5).build()

    usual, lean = plan(), plan("hardware.low_memory=true")
    usual_block, lean_block = (next(p for p in x.phases if "block(s)" in p.name) for x in (usual, lean))
    expert = 4.0 * (4096 ** 2 + 14336 ** 2)
    block = lean.S.block_params * 4
    saved = (usual_block.cpu_gb - lean_block.cpu_gb) * 1024 ** 3
    outside = 4.0 * lean.S.outside              # the embeddings and head wait on disk during the walk
    assert saved - outside == pytest.approx(7 * expert + block - 4.0 * 2 * 14336 * 4096, rel=1e-6)
    assert lean_block.seconds > usual_block.seconds
    # on a GPU the block itself is still on the device; only the copy and seven experts' Hessians leave it
    gpu, gpu_lean = (next(p for p in x.phases if "block(s)" in p.name).gpu_gb
                     for x in (plan("hardware=gpu"), plan("hardware=gpu", "hardware.low_memory=true")))
    assert (gpu - gpu_lean) * 1024 ** 3 == pytest.approx(saved - outside, rel=1e-6)
    assert gpu_lean * 1024 ** 3 > block


def test_train_dense_params_false_plan_drops_the_outside_weights_state():
    """method.train_dense_params=false: no gradient, AdamW state or step temporaries for the embeddings, norms
    and head; hardware.low_memory: AdamW steps one tensor at a time (no temporaries over every weight) and the
    KL teacher of budget=demo shares those frozen weights with the student (no copy of the 128k vocabulary's
    embedding and head)."""
    from elsa.plan import Plan, setting
    from elsa.run.recipe import build

    def peak(*extra):
        cfg = compose(["model=shapes", "model.like=llama3-8b", "model.blocks=1", "seqlen=2048", "method=elsa",
                       "budget=demo", "hardware.threads=1", "eval.max_tokens=4096", *extra])
        st = setting(cfg, build(cfg.model, "model"), build(cfg.method, "method"), None)
        st.load = 0.0
        p = Plan(st, base_gb=0.5).build()
        return next(x for x in p.phases if x.name == "training").cpu_gb * 1024 ** 3, p.S

    full, S = peak()
    frozen, _ = peak("method.train_dense_params=false")
    assert full - frozen == pytest.approx((S.params - S.prunable) * (4 + 8 + 12), rel=1e-6)
    lean, _ = peak("method.train_dense_params=false", "hardware.low_memory=true")
    largest = max(o * i for _n, o, i, _s in S.matrices)
    assert frozen - lean == pytest.approx(12 * (S.prunable - largest) + 4 * (S.params - S.prunable), rel=1e-6)


def test_train_dense_params_false_trains_only_the_pruned_matrices(tmp_path):
    """ELSA with the embeddings, norms and head frozen: they stay bit-identical to the dense model, the pruned
    matrices trained; hardware.low_memory (per-tensor AdamW, a teacher sharing the frozen weights) gives the
    weights of the usual run bit for bit."""
    from elsa.model.structure import prunable_weights

    base = [*TINY, "method=elsa", "budget=demo", "method.steps=3", "method.eval_initial=false",
            "method.train_dense_params=false", "hardware.threads=1", "save_model=true",
            "method.autocast_bf16=false", "method.checkpoint_every=0"]
    r = run_pipeline(tmp_path / "a", *base)
    assert r["status"] == "done" and r["method_stats"]["trained_params"]["train_dense_params"] is False
    assert r["method_stats"]["optimizer_impl"] == "torch.optim.AdamW (foreach)"
    r_lean = run_pipeline(tmp_path / "b", *base, "hardware.low_memory=true")
    assert r_lean["method_stats"]["optimizer_impl"] == "torch.optim.AdamW (per tensor)"
    # budget=demo distils (loss=kl): the lean teacher shares the frozen embeddings and norms, the same values
    assert r_lean["method_stats"]["trained_params"]["teacher_shares_frozen"] is True
    assert r["method_stats"]["trained_params"]["teacher_shares_frozen"] is False
    from safetensors.torch import load_file

    from elsa.model.structure import TinyLlamaSource

    a, b = (load_file(next((tmp_path / d).rglob("*.safetensors"))) for d in ("a", "b"))
    model = TinyLlamaSource().load()[0]
    dense = model.state_dict()
    pruned = {f"{n}.weight" for n in prunable_weights(model)} | set(prunable_weights(model))
    assert r["method_stats"]["trained_params"]["count"] == sum(dense[n].numel() for n in pruned if n in dense)
    for n, t in a.items():
        assert torch.equal(t, b[n]), n
        if n in dense and n not in pruned:
            assert torch.equal(t, dense[n]), f"{n} trained with train_dense_params=false"
    assert any(not torch.equal(a[n], dense[n]) for n in pruned if n in a)


def test_lean_teacher_shares_only_frozen_weights_outside_the_pruned_matrices():
    from elsa.engines.training import make_teacher
    from elsa.model.structure import TinyLlamaSource, prunable_weights

    model = TinyLlamaSource().load()[0]
    pruned = {id(w.param) for w in prunable_weights(model).values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in pruned)       # method.train_dense_params=false
    teacher = make_teacher(model, share_frozen=True)
    shared = {id(p) for p in teacher.parameters()} & {id(p) for p in model.parameters()}
    outside = {id(p) for p in model.parameters() if id(p) not in pruned}
    assert shared == outside and shared
    assert not {id(p) for p in make_teacher(model).parameters()} & {id(p) for p in model.parameters()}
    assert all(p.requires_grad for p in model.parameters() if id(p) in pruned)


@pytest.mark.parametrize("like,method,limit,named", [
    ("mixtral-8x7b", ["method=sparsegpt", "method.batch_size=2"], 16, "hardware.low_memory=true ("),
    ("llama2-7b", ["method=elsa", "budget=demo"], 12,
     "hardware.low_memory=true method.train_dense_params=false ("),
])
def test_refusal_names_the_lean_setting_that_fits(tmp_path, like, method, limit, named):
    """A run whose plan exceeds hardware.memory_gb refuses before loading and names hardware.low_memory (with
    method.train_dense_params=false for a training method) when that fits."""
    from elsa.errors import ElsaError

    with pytest.raises(ElsaError) as err:
        run_pipeline(tmp_path, "model=shapes", f"model.like={like}", "model.blocks=1", "nsamples=16",
                     "seqlen=2048", "hardware.threads=1", f"hardware.memory_gb={limit}", *method)
    msg = str(err.value)
    assert f"what fits: {named}" in msg, msg


SPARSELLM_MODES = {"project": {}, "auxiliary": {"down_input": "auxiliary"},
                   "reference": {"mode": "reference", "skip": []},
                   "reference-half": {"mode": "reference", "skip": [], "half": True}}


@pytest.mark.parametrize("family", ["llama", "qwen2-moe", "opt"])
@pytest.mark.parametrize("mode", list(SPARSELLM_MODES))
def test_low_memory_streams_sparsellm_variables_with_the_same_weights(monkeypatch, family, mode):
    """SparseLLM's MLP problem with its per-token variables on disk, one chunk of 48 tokens resident (128
    calibration tokens: chunks of 48, 48, 32): every parameter bit-identical to the variables held in memory
    (the same chunks, the same order of the sums), the same objective, MLP errors and reconstruction errors;
    results.json's low_memory entry says what streamed and its bytes on disk. Llama: gated SiLU; qwen2-moe: the
    shared expert (routed experts by the SparseGPT fallback); OPT: plain ReLU with biases."""
    import os

    from elsa.methods import sparsellm
    from elsa.methods.sparsellm import SparseLLM

    monkeypatch.setattr(sparsellm, "TOKEN_CHUNK", 48)
    folders = []
    real = sparsellm.sparsellm_mlp

    def watched(*args, folder=None, **kw):
        if folder is not None:           # the previous block's folder is gone, this one holds the chunks
            assert all(not os.path.exists(f) for f in folders) and os.listdir(folder)
            folders.append(folder)
        return real(*args, folder=folder, **kw)

    monkeypatch.setattr(sparsellm, "sparsellm_mlp", watched)
    make = lambda: SparseLLM(batch_size=2, iterations=2, fallback="sparsegpt", **SPARSELLM_MODES[mode])  # noqa: E731
    usual, s_usual = _walk(family, make(), False)
    lean, s_lean = _walk(family, make(), True)
    for (n, a), (_m, b) in zip(usual.state_dict().items(), lean.state_dict().items()):
        assert torch.equal(a, b), n
    for key in ("mlp_objective", "mlp_error", "mlp_error_sparsegpt"):
        assert s_usual[key] == s_lean[key] and s_usual[key], key
    assert s_usual["reconstruction"] == s_lean["reconstruction"]
    streamed = s_lean["low_memory"]["streamed"]
    assert streamed["blocks"] == len(s_lean["mlp_error"]) == len(folders) == 4 and streamed["chunk_tokens"] == 48
    assert all(b > 4 * 128 * 64 * 2 for b in streamed["disk_bytes"].values())      # at least X and Y
    assert not any(os.path.exists(f) for f in folders)
    assert "low_memory" not in s_usual


def test_sparsellm_chunks_move_only_the_rounding(monkeypatch):
    """The usual path walks the same chunks: above TOKEN_CHUNK tokens its sums add chunk by chunk, which moves
    only float rounding (at or below it, one chunk: the whole tensors as before)."""
    from torch import nn

    from elsa.methods import sparsellm
    from elsa.methods.sparsellm import sparsellm_mlp

    torch.manual_seed(0)
    x = torch.randn(128, 16)
    out = {}
    for chunk in (128, 48):
        torch.manual_seed(1)
        gate, up, down = nn.Linear(16, 32, bias=False), nn.Linear(16, 32, bias=False), nn.Linear(32, 16)
        with torch.no_grad():
            y = down(nn.functional.silu(gate(x)) * up(x))
        monkeypatch.setattr(sparsellm, "TOKEN_CHUNK", chunk)
        out[chunk] = sparsellm_mlp(gate, up, down, nn.SiLU(), x, y, Sparsity(0.5), iterations=3)
    assert out[48]["mlp_error"] == pytest.approx(out[128]["mlp_error"], rel=1e-4)


@pytest.mark.parametrize("like,d,I", [("llama3-8b", 4096, 14336), ("llama2-7b", 4096, 11008)])
def test_low_memory_plan_holds_one_chunk_of_sparsellm_variables(like, d, I):
    """The plan follows SparseLLM's streaming: at 16 x 2048 tokens hardware.low_memory holds one TOKEN_CHUNK of
    the MLP problem's per-token variables (X, Y and 5 T x I, with a chunk's new values and temporaries) instead
    of all 32,768 tokens' (and the embeddings and head on disk), the block well under 20 GB, and the reading
    and writing of the rest in the block's time."""
    from elsa.methods.sparsellm import TOKEN_CHUNK
    from elsa.plan import Plan, setting
    from elsa.run.recipe import build

    def plan(*extra):
        cfg = compose(["model=shapes", f"model.like={like}", "model.blocks=1", "nsamples=16", "seqlen=2048",
                       "method=sparsellm", "hardware.threads=1", *extra])
        st = setting(cfg, build(cfg.model, "model"), build(cfg.method, "method"), None)
        st.load = 0.0
        return Plan(st, base_gb=0.5).build()

    usual, lean = plan(), plan("hardware.low_memory=true")
    usual_block, lean_block = (next(p for p in x.phases if "block(s)" in p.name) for x in (usual, lean))
    T = 16 * 2048
    saved = (usual_block.cpu_gb - lean_block.cpu_gb) * 1024 ** 3 - 4.0 * lean.S.outside
    assert saved == pytest.approx(4.0 * T * (2 * d + 7 * I) - 4.0 * TOKEN_CHUNK * (2 * d + 10 * I), rel=1e-6)
    assert lean_block.cpu_gb < 18 < 20 < usual_block.cpu_gb and lean_block.seconds > usual_block.seconds
    assert "per-token variables on disk" in lean_block.note
    ref = next(p for p in plan("hardware.low_memory=true", "method.mode=reference").phases if "block(s)" in p.name)
    assert (ref.cpu_gb - lean_block.cpu_gb) * 1024 ** 3 == pytest.approx(4.0 * T * (2 * d + 3 * I), rel=1e-6)


def test_sparsellm_streamed_variables_are_removed_on_error(monkeypatch, tmp_path):
    """A block that fails mid-problem leaves no chunk behind: SparseLLM removes its own folder (the walk's
    folder kept here, to see that)."""
    from elsa.engines import layerwise
    from elsa.errors import ElsaError
    from elsa.methods import sparsellm

    class Kept:                       # the walk's folder, not cleaned up by the engine
        def __init__(self, prefix=""):
            self.name = str(tmp_path)

        def cleanup(self):
            pass

    seen = []

    def failing(*args, folder=None, **kw):
        seen.append(sorted(p.name for p in (tmp_path / folder).iterdir()))
        raise ElsaError("stop")

    monkeypatch.setattr(layerwise.tempfile, "TemporaryDirectory", Kept)
    monkeypatch.setattr(sparsellm, "sparsellm_mlp", failing)
    with pytest.raises(ElsaError, match="stop"):
        _walk("llama", sparsellm.SparseLLM(batch_size=2, iterations=1), True)
    assert seen and "x_in.0.pt" in seen[0] and "y_in.0.pt" in seen[0]
    assert list(tmp_path.iterdir()) == []
