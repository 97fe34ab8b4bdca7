"""The compressed checkpoint (elsa.artifacts.compressed) and sparse inference (elsa.artifacts.linear) on tiny models."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import REPO, read_results, run_pipeline

from elsa.artifacts import compressed as S
from elsa.errors import ElsaError

SMALL = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=96, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _tiny(family: str):
    if family == "llama":
        from elsa.model.structure import TinyLlamaSource

        return TinyLlamaSource().load()[0]
    cfg = {"mixtral": lambda: transformers.MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2),
           "gpt2": lambda: transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                                   bos_token_id=1, eos_token_id=2)}[family]()
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def _prune_by_hand(model, ratio=0.7, nm=None):
    """Zeros in every >= 2-D tensor inside the blocks (Linear, Conv1D [in, out], fused experts [E, out, in]),
    plus a -0.0 kept as a value: the format must not know any layout to round-trip them bit for bit."""
    g = torch.Generator().manual_seed(1)
    emb = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.dim() < 2 or id(p) in emb:
                continue
            if nm:
                n, m = nm
                groups = p.data.reshape(-1, m)
                drop = groups.abs().argsort(dim=1)[:, : m - n]
                groups.scatter_(1, drop, 0.0)
            else:
                p[torch.rand(p.shape, generator=g) < ratio] = 0.0
            flat = p.data.view(-1)
            flat[int(torch.nonzero(flat)[0])] = -0.0     # sign bit only: a value, not a zero
    return model


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8) if t.is_floating_point() else t


def _assert_bit_identical(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        assert torch.equal(_bits(sa[k]), _bits(sb[k])), k


@pytest.mark.parametrize("family", ["llama", "mixtral", "gpt2"])
def test_round_trip_is_bit_identical(tmp_path, family):
    model = _prune_by_hand(_tiny(family))
    if family == "mixtral":   # transformers 5 holds its experts fused, 3-D
        assert any(p.dim() == 3 and (p == 0).any() for p in model.parameters())
    if family == "gpt2":      # Conv1D, stored [in, out]
        assert any(type(m).__name__ == "Conv1D" for m in model.modules())
    model.save_pretrained(tmp_path / "hf")
    index = S.compress_dir(tmp_path / "hf", tmp_path / "c")
    assert index["encodings"].get("bitmask", 0) > 0
    _assert_bit_identical(model, S.load_compressed(tmp_path / "c"))
    S.expand(tmp_path / "c", tmp_path / "e")
    for f in (tmp_path / "hf").glob("*.safetensors"):       # the same files save_pretrained wrote
        assert (tmp_path / "e" / f.name).read_bytes() == f.read_bytes()
    _assert_bit_identical(model, transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "e"))


def test_nm_values_and_indices(tmp_path):
    """2:4 along the last dim: values + 2-bit positions (the same size as a bitmask at exactly 50%, so the tie
    goes to nm); 1:4 is smaller than a bitmask; a pattern that does not hold falls back to the bitmask."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 16, generator=g)
    groups = w.view(-1, 4)
    groups.scatter_(1, groups.abs().argsort(1)[:, :2], 0.0)
    stored, meta = S.encode("w", w, nm=(2, 4))
    assert meta["encoding"] == "nm" and set(stored) == {"w::values", "w::indices"}
    assert stored["w::values"].numel() == w.numel() // 2
    assert torch.equal(_bits(S.decode("w", stored, meta)), _bits(w))
    groups[0] = 0.0                                            # a group with fewer than N non-zeros
    groups[1, 0] = -0.0
    assert S.encode("w", w, nm=(2, 4))[1]["encoding"] == "bitmask"    # now the bitmask is smaller
    stored, meta = S.encode("w", w, nm=(2, 4), encoding="nm")
    assert torch.equal(_bits(S.decode("w", stored, meta)), _bits(w))
    one = torch.randn(8, 16, generator=g)
    one.view(-1, 4).scatter_(1, one.view(-1, 4).abs().argsort(1)[:, :3], 0.0)
    sizes = S.encoded_bytes(one, nm=(1, 4))
    assert sizes["nm"] < sizes["bitmask"] < sizes["dense"]
    stored, meta = S.encode("w", one, nm=(1, 4))
    assert meta["encoding"] == "nm" and torch.equal(S.decode("w", stored, meta), one)
    many = torch.randn(64, 64, generator=g)
    many[many < 0.5] *= 0.0                                     # ~69% zeros, most of them -0.0
    stored, meta = S.encode("w", many)
    assert "w::negzero_bitmask" in stored and meta["negzeros"] > 1000
    assert torch.equal(_bits(S.decode("w", stored, meta)), _bits(many))
    dense_row = torch.randn(4, 8, generator=g)              # 4 non-zeros in a group of 4: not 2:4
    assert not S.nm_holds(dense_row, 2, 4)
    assert "nm" not in S.encoded_bytes(dense_row, nm=(2, 4))


def test_size_is_the_floor(tmp_path):
    """Bitmask shards within 1% of one bit per position + non-zeros + dense tensors (headers aside)."""
    model = _prune_by_hand(_tiny("llama"), ratio=0.9)
    model.save_pretrained(tmp_path / "hf")
    index = S.compress_dir(tmp_path / "hf", tmp_path / "c")
    floor = S.floor_bytes(index)
    assert floor <= index["compressed_bytes"] <= 1.01 * floor + 8192
    assert index["compressed_bytes"] < 0.6 * index["dense_bytes"]


@pytest.fixture
def compressed(tmp_path):
    model = _prune_by_hand(_tiny("llama"))
    model.save_pretrained(tmp_path / "hf")
    S.compress_dir(tmp_path / "hf", tmp_path / "c", shard_bytes=50_000)   # several shards
    assert len(json.loads((tmp_path / "c" / S.INDEX).read_text())["shards"]) > 1
    return tmp_path / "c"


def _expand_cli(src: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "elsa.sparse", "expand", str(src), str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def _one_error_line(proc, *words):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("elsa: error: "), proc.stderr[-2000:]
    for w in words:
        assert w in lines[0], lines[0]


def _break(kind: str, c: Path) -> None:
    index = json.loads((c / S.INDEX).read_text())
    shard = c / sorted(index["shards"])[1]
    if kind == "missing":
        shard.unlink()
    elif kind == "flipped":
        data = bytearray(shard.read_bytes())
        data[-10] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif kind == "truncated":
        shard.write_bytes(shard.read_bytes()[:100])
    elif kind == "version":
        index["version"] = 99
        (c / S.INDEX).write_text(json.dumps(index))
    elif kind == "index":
        (c / S.INDEX).write_text("{not json")
    elif kind == "not compressed":
        (c / S.INDEX).unlink()


@pytest.mark.parametrize("kind,words", [("missing", ["is missing"]), ("flipped", ["corrupt", "SHA-256"]),
                                        ("truncated", ["corrupt"]), ("version", ["version 99", "version 1"]),
                                        ("index", ["corrupt"]), ("not compressed", ["not a compressed model dir"])])
def test_bad_dirs_are_one_line(compressed, tmp_path, kind, words):
    _break(kind, compressed)
    with pytest.raises(ElsaError):
        S.load_compressed(compressed)
    _one_error_line(_expand_cli(compressed, tmp_path / "out"), *words)
    assert not (tmp_path / "out").exists()


def test_expand_cli_writes_a_dir_from_pretrained_loads(compressed, tmp_path):
    proc = _expand_cli(compressed, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-2000:]
    _assert_bit_identical(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf"),
                          transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out"))
    _one_error_line(_expand_cli(tmp_path / "nowhere", tmp_path / "out2"), "not a directory")


def test_save_format_both_through_the_pipeline(tmp_path):
    r = run_pipeline(tmp_path, "method=magnitude", "sparsity=0.9", "save_format=both")
    assert read_results(tmp_path)["compressed"] == json.loads(json.dumps(r["compressed"]))
    c = r["compressed"]
    assert Path(c["dir"]) == tmp_path / "model_compressed" and r["model_dir"] == str(tmp_path / "model")
    assert c["floor_mb"] <= c["shards_mb"] <= 1.01 * c["floor_mb"] + 0.01 and c["mb"] < c["hf_mb"]
    assert c["floor_mb"] < 0.75 * c["dense_shards_mb"]        # 90% of the block weights at 1 bit + 4 bytes each
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    model, tok = S.load_any(tmp_path / "model_compressed")
    _assert_bit_identical(hf, model)
    assert tok("hello world")["input_ids"]                     # the tokenizer travels with the compressed dir


def test_save_format_compressed_only_and_bad_value(tmp_path):
    r = run_pipeline(tmp_path / "a", "method=magnitude", "sparsity=2:4", "save_format=compressed")
    assert not (tmp_path / "a" / "model").exists() and (tmp_path / "a" / "model_compressed").is_dir()
    assert "model_dir" not in r and r["compressed"]["encodings"].get("nm", 0) == 14
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".model")]   # no temporary HF dir left
    with pytest.raises(ElsaError, match="save_format=zip is not allowed"):
        run_pipeline(tmp_path / "b", "save_format=zip")


# -- sparse inference ------------------------------------------------------------------------------------------
from elsa.artifacts import kernels as SK  # noqa: E402
from elsa.artifacts import linear as SL  # noqa: E402


def _fake_timer(table):
    """A timer that returns the given seconds per kernel name (default 1.0): the decision, not the clock."""
    return lambda fns, tokens: {k: table.get((k, tokens), table.get(k, 1.0)) for k in fns}


def test_choose_never_picks_a_slower_or_barely_faster_sparse_kernel():
    assert SL.choose({"dense": 1.0, "csr16": 0.5, "torch_csr": 0.7}) == "csr16"
    assert SL.choose({"dense": 1.0, "csr16": 0.95}) == "dense"              # within the 10% margin
    assert SL.choose({"dense": 1.0, "csr16": 1.5, "torch_csr": 2.0}) == "dense"
    assert SL.choose({"dense": 1.0, "csr16": 1.0}) == "dense"               # a tie stays dense
    assert SL.choose({"dense": 1.0, "csr16": 0.95}, min_gain=1.0) == "csr16"
    assert SL.choose({"dense": 1.0}) == "dense"


def _pruned_matrix(rows=96, cols=80, ratio=0.9, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[torch.rand(rows, cols, generator=g) < ratio] = 0.0
    return w


def test_plan_follows_the_timer_per_regime_and_rejects_wrong_kernels(monkeypatch):
    import torch.nn.functional as F

    w, b = _pruned_matrix(), torch.randn(96)
    fast = {("torch_csr", 1): 0.2, ("dense", 512): 1.0, ("torch_csr", 512): 3.0}
    plan, _fns = SL.plan_matrix(w, b, {"decode": 1, "prefill": 512}, _fake_timer(fast), kernels={"torch_csr"})
    assert plan["decode"] == "torch_csr" and plan["prefill"] == "dense"
    assert plan["times_us"]["decode"]["torch_csr"] == pytest.approx(0.2e6)
    real = SL.candidates

    def with_a_wrong_kernel(weight, bias, **kw):
        fns, skipped = real(weight, bias, **kw)
        fns["broken"] = lambda x: F.linear(x, weight, bias) * 1.01        # fastest, but not the product
        return fns, skipped

    monkeypatch.setattr(SL, "candidates", with_a_wrong_kernel)
    plan, _ = SL.plan_matrix(w, b, {"decode": 1}, _fake_timer({"broken": 0.01, "torch_csr": 2.0}),
                             kernels={"torch_csr", "broken"})
    assert plan["decode"] == "dense" and "broken" in plan["rejected"]


def _pruned_tiny(ratio=0.9):
    from elsa.model.structure import TinyLlamaSource

    model, tok = TinyLlamaSource().load()
    with torch.no_grad():
        for lin in SL.block_linears(model).values():
            lin.weight[lin.weight.abs() < lin.weight.abs().quantile(ratio)] = 0.0
    return model, tok


@pytest.mark.parametrize("kernel", ["torch_csr", "csr16", "csr16_1t", "bitmask", "csr"])
def test_sparse_logits_equal_dense(kernel, request):
    import copy

    if kernel.startswith("csr16") and SL.kernel_library() is None:
        pytest.skip(f"no C kernel: {SL._LIB.get('reason')}")
    if kernel in SL.DECODE_ONLY and SK.unavailable():
        pytest.skip(SK.unavailable())
    if kernel == "csr16_1t":      # the variant exists only with more than one thread: run this test at two
        if (os.cpu_count() or 1) < 2:
            pytest.skip("one core: csr16 is the only variant")
        request.addfinalizer(lambda threads=torch.get_num_threads(): torch.set_num_threads(threads))
        torch.set_num_threads(2)
    dense, _tok = _pruned_tiny()
    sparse = copy.deepcopy(dense)
    plan = SL.sparsify(sparse, timer=_fake_timer({kernel: 0.1}), kernels={kernel})   # every matrix, both regimes
    prefill = "dense" if kernel in SL.DECODE_ONLY else kernel               # the compressed kernels: <= 8 tokens
    assert plan["chosen"] == {"decode": {kernel: 14}, "prefill": {prefill: 14}}
    assert plan["measured"] == 4          # q/o, k/v, gate/up, down: one measurement per shape at 90%
    mods = [m for m in sparse.modules() if isinstance(m, SL.SparseLinear)]
    assert len(mods) == 14 and all((m.weight is None) == (prefill != "dense") for m in mods)  # the dense copy goes
    ids = torch.randint(0, 500, (2, 40), generator=torch.Generator().manual_seed(0))  # prefill regime
    with torch.no_grad():
        want, got = dense(ids).logits, sparse(ids).logits
        assert torch.allclose(got, want, atol=1e-5 * float(want.abs().max()), rtol=1e-4)
        from elsa.artifacts.generate import greedy

        a, _ = greedy(dense, ids[:1, :6], 12)                                  # decode regime, batch 1
        b, _ = greedy(sparse, ids[:1, :6], 12)
    assert torch.equal(a, b)


def _layout_timer(gains: dict):
    """A check_timer stand-in: the transposed layout ``gains[out_features]`` times faster (default 1: as stored)."""
    def timer(fns, tokens, device=None, cold=False):
        assert cold                                  # decode as a model runs it: every matrix from memory
        fns["n"]()                                   # both run once, so a broken layout still fails the test
        y = fns["t"]()
        return {"n": 1.0, "t": 1.0 / gains.get(y.shape[-1], 1.0)}
    return timer


def test_dense_layouts_transpose_where_faster_and_keep_the_tokens():
    """dense_layouts: a dense matrix runs from a transposed copy where that is DENSE_T_GAIN faster (the head of a
    tied model among them: its embedding keeps the original), one measurement per class; the logits and greedy
    tokens are the model's; a saved choice is applied with nothing timed, to a sparse model's dense head too."""
    import copy

    from elsa.artifacts.generate import greedy, layout_summary

    dense, _tok = _pruned_tiny()
    vocab = dense.config.vocab_size
    fast = copy.deepcopy(dense)
    layouts = SL.dense_layouts(fast, timer=_layout_timer({vocab: 2.0, 128: SL.DENSE_T_GAIN - 0.01}))
    assert layouts["lm_head"] == {"layout": "t", "gain": 2.0} and len(layouts) == 15      # head + 14 matrices
    assert {c["layout"] for n, c in layouts.items() if n != "lm_head"} == {"n"}      # 1.24x: under the margin
    assert isinstance(fast.lm_head, SL.TransposedLinear) and torch.equal(fast.lm_head.weight, dense.lm_head.weight)
    assert fast.model.embed_tokens.weight.data_ptr() != fast.lm_head.weight_t.data_ptr()
    ids = torch.randint(0, 500, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = dense(ids).logits, fast(ids).logits
        assert torch.allclose(got, want, atol=1e-5 * float(want.abs().max()), rtol=1e-4)
        assert torch.equal(greedy(dense, ids[:1, :6], 10)[0], greedy(fast, ids[:1, :6], 10)[0])
    assert layout_summary(layouts) == {"transposed": 1, "of": 15, "names": ["lm_head"], "gains": [2.0, 2.0]}
    sparse = copy.deepcopy(dense)
    SL.sparsify(sparse, timer=_fake_timer({"csr": 0.1}), kernels={"csr"} if not SK.unavailable() else {"torch_csr"})
    def no_timer(*a, **k):
        raise AssertionError("a saved layout is not timed")
    applied = SL.dense_layouts(sparse, saved=layouts, timer=no_timer)
    assert applied == {"lm_head": {"layout": "t", "gain": 2.0}} and isinstance(sparse.lm_head, SL.TransposedLinear)
    with torch.no_grad():
        assert torch.equal(greedy(fast, ids[:1, :6], 10)[0], greedy(sparse, ids[:1, :6], 10)[0])


def test_dense_layouts_are_saved_with_the_plan(tmp_path, monkeypatch):
    """sparsify_with_plan: the dense matrices' layouts go into the saved plan and come back from it untimed."""
    import copy

    dense, _tok = _pruned_tiny()
    vocab = dense.config.vocab_size
    monkeypatch.setattr(SL, "check_timer", _layout_timer({vocab: 3.0}))
    first = copy.deepcopy(dense)
    plan = SL.sparsify_with_plan(first, tmp_path, timer=_fake_timer({"torch_csr": 0.1}), kernels={"torch_csr"})
    assert plan["dense_layout"] == {"lm_head": {"layout": "t", "gain": 3.0}}
    assert json.loads(SL.plan_path(tmp_path, dense).read_text())["dense_layout"] == plan["dense_layout"]
    monkeypatch.setattr(SL, "check_timer", lambda *a, **k: pytest.fail("a saved plan is not timed"))
    again = copy.deepcopy(dense)
    plan2 = SL.sparsify_with_plan(again, tmp_path)
    assert plan2["source"] == "saved" and plan2["dense_layout"] == plan["dense_layout"]
    assert isinstance(again.lm_head, SL.TransposedLinear)


@pytest.mark.parametrize("model_says", ["faster", "slower"])
def test_choices_that_do_not_speed_up_the_whole_model_go_back_to_dense(model_says):
    """Per-matrix winners are checked in the whole model: the model's forward with the chosen kernels against
    the same model all dense, per regime; where it is not faster, every matrix of that regime runs dense (the
    dense weight back in place) and the plan says so; outputs equal dense either way."""
    import copy

    dense, _tok = _pruned_tiny()
    sparse = copy.deepcopy(dense)
    seen = []

    def whole_model(run, tokens):     # the decision, not the clock; each side really runs the model once
        seen.append((sorted(run), tokens))
        for fn in run.values():
            fn()
        return {"dense": 1.0, "chosen": 0.5 if model_says == "faster" else 1.2}

    plan = SL.sparsify(sparse, timer=_fake_timer({"torch_csr": 0.1}), verify=True, whole_model_timer=whole_model,
                       kernels={"torch_csr"})
    assert seen == [(["chosen", "dense"], 1), (["chosen", "dense"], 512)]
    mods = [m for m in sparse.modules() if isinstance(m, SL.SparseLinear)]
    if model_says == "faster":
        assert plan["chosen"] == {"decode": {"torch_csr": 14}, "prefill": {"torch_csr": 14}}
        assert all(m.weight is None for m in mods) and all(v["kept"] for v in plan["verified_in_model"].values())
    else:
        assert plan["chosen"] == {"decode": {"dense": 14}, "prefill": {"dense": 14}}
        assert not mods               # dense everywhere: the original nn.Linear modules are back, no wrapper
        assert all(p["reverted"] == ["decode", "prefill"] for p in plan["matrices"].values())
        assert sum(isinstance(m, torch.nn.Linear) for m in sparse.modules()) == 15   # 14 + lm_head
        assert not any(v["kept"] for v in plan["verified_in_model"].values())
    ids = torch.randint(0, 500, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = dense(ids).logits, sparse(ids).logits
    assert torch.allclose(got, want, atol=1e-5 * float(want.abs().max()), rtol=1e-4)


def test_sparsify_keeps_dense_where_dense_wins_and_leaves_dense_matrices():
    model, _ = _pruned_tiny(0.1)       # 10%: under min_sparsity, left as nn.Linear without measuring
    plan = SL.sparsify(model, timer=_fake_timer({"csr16": 0.01, "torch_csr": 0.01}))
    assert not any(isinstance(m, SL.SparseLinear) for m in model.modules())
    assert plan["chosen"]["decode"] == {"dense": 14}
    model, _ = _pruned_tiny(0.9)
    plan = SL.sparsify(model, timer=_fake_timer({"csr16": 2.0, "csr16_1t": 2.0, "torch_csr": 2.0, "bitmask": 2.0,
                                                   "csr": 2.0}))
    assert plan["chosen"] == {"decode": {"dense": 14}, "prefill": {"dense": 14}}
    assert not any(isinstance(m, SL.SparseLinear) for m in model.modules())    # dense everywhere: no wrapper
    model, _ = _pruned_tiny(0.9)      # decode measured only: prefill runs dense
    plan = SL.sparsify(model, regimes={"decode": 1}, timer=_fake_timer({"torch_csr": 0.1}), kernels={"torch_csr"})
    mods = [m for m in model.modules() if isinstance(m, SL.SparseLinear)]
    assert plan["chosen"] == {"decode": {"torch_csr": 14}} and all(m.weight is not None for m in mods)
    ids = torch.randint(0, 500, (1, 20))
    with torch.no_grad():
        assert model(ids).logits.shape == (1, 20, 512) and model(ids[:, :1]).logits.shape == (1, 1, 512)


@pytest.mark.parametrize("rows,cols,batch", [(33, 70, 1), (33, 70, 3), (64, 40000, 2), (40, 70000, 1),
                                             (40, 300, 20), (17, 200, 130)])
def test_c_kernel_shapes(rows, cols, batch):
    """Batch-1..8 (gathers), tiled prefill with a partial tile, columns past int16 (uint16 bits) and past
    uint16 (int32 indices), rows with no non-zero at all."""
    if SL.kernel_library() is None:
        pytest.skip(f"no C kernel: {SL._LIB.get('reason')}")
    w = _pruned_matrix(rows, cols, 0.9, seed=rows)
    w[3] = 0.0
    k = SL.CSR16(w)
    assert k.wide == (cols > 65536)
    x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(1))
    want = x @ w.T
    for threads in (1, 2):
        got = k(x, threads)
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-4, rtol=1e-4)


def test_semi_structured_selection_on_any_device():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(128, 256, generator=g)
    w.view(-1, 4).scatter_(1, w.view(-1, 4).abs().argsort(1)[:, :2], 0.0)
    ok, why = SL.semi_structured_support(w)
    assert not ok and "fp16/bf16" in why
    ok, why = SL.semi_structured_support(w[:100].half())
    assert not ok and "shape 100x256" in why
    dense = torch.randn(128, 256, generator=g).half()
    assert "not 2:4" in SL.semi_structured_support(dense)[1]
    ok, why = SL.semi_structured_support(w.half())
    if not torch.cuda.is_available():
        assert not ok and "CUDA only" in why
        _fns, skipped = SL.candidates(w.half(), None)
        assert "semi_structured" in skipped and "semi_structured" not in _fns
        pytest.skip("no CUDA device: the semi-structured kernel itself is not run")
    wc = w.half().cuda()
    ok, why = SL.semi_structured_support(wc)
    if not ok:
        pytest.skip(why)
    fns, _ = SL.candidates(wc, None)
    x = torch.randn(64, 256, device="cuda", dtype=torch.float16)
    assert torch.allclose(fns["semi_structured"](x), fns["dense"](x), atol=1e-2, rtol=1e-2)


def test_generate_cli_on_a_compressed_dir(compressed, tmp_path):
    from transformers import PreTrainedTokenizerFast

    from elsa.model.structure import TinyLlamaSource

    TinyLlamaSource().tokenizer().save_pretrained(compressed)
    cmd = [sys.executable, "-m", "elsa.generate", str(compressed), "--prompt", "The city", "--max-new-tokens", "6",
           "--compare"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "same tokens: True" in proc.stdout and "plan: measured (no saved plan" in proc.stderr
    assert "; rounds spread " in proc.stdout                 # how steady the machine was while it measured
    again = subprocess.run(cmd[:-1] + ["--sparse"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "plan: saved plan" in again.stderr, again.stderr[-2000:]   # not measured again
    assert isinstance(PreTrainedTokenizerFast.from_pretrained(compressed), PreTrainedTokenizerFast)
    bad = subprocess.run([sys.executable, "-m", "elsa.generate", str(tmp_path / "nowhere")], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    _one_error_line(bad, "not a directory")


def test_generate_compile_needs_compare(capsys):
    """--compile times dense and sparse compiled alike, so it comes with --compare, refused before any loading."""
    from elsa.artifacts import generate

    assert generate.main(["/nowhere", "--sparse", "--compile"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("elsa: error: --compile is allowed with --compare only"), err


def test_measure_speed_through_the_pipeline(tmp_path):
    """measure_speed: dense against sparse side by side, and against dense bf16 (sparse with bf16 values) where
    the CPU has bf16 arithmetic; the plans are saved with the compressed model for elsa.artifacts.generate."""
    from elsa.artifacts.generate import cpu_has_bf16

    r = run_pipeline(tmp_path, "method=magnitude", "sparsity=0.9", "save_format=compressed", "measure_speed=true")
    inf = read_results(tmp_path)["inference"]
    assert inf["same_tokens"] is True and inf["decode_speedup"] > 0
    assert inf["rounds_spread"] >= 1.0                        # how steady the machine was: the report shows it
    assert sum(inf["kernels"]["decode"].values()) == 14 and r["inference"]["threads"] >= 1
    bf16 = cpu_has_bf16()
    assert ("dense_bf16" in inf["decode_tokens_per_s"]) == bf16 and ("decode_speedup_bf16" in inf) == bf16
    assert set(inf["decode_speedup_vs_best_dense"]) == ({"sparse", "sparse_bf16"} if bf16 else {"sparse"})
    assert inf["c_kernels"].startswith("available" if SK.library() is not None else "unavailable")
    saved = sorted(p.name for p in (tmp_path / "model_compressed").glob("elsa_sparse_plan-*.json"))
    assert saved == (["elsa_sparse_plan-bfloat16.json", "elsa_sparse_plan-float32.json"] if bf16 else
                     ["elsa_sparse_plan-float32.json"])
    with pytest.raises(ElsaError, match="measure_speed=maybe"):
        run_pipeline(tmp_path / "b", "measure_speed=maybe")


@pytest.mark.parametrize("kernel", ["torch_csr", "csr16"])
def test_conv1d_matrices_of_gpt2_run_sparse_with_dense_logits(kernel):
    """GPT-2's Conv1D layers (weight stored [in, out]) are replaced too, multiplied as their [out, in] matrix."""
    import copy

    from test_families import build
    from transformers.pytorch_utils import Conv1D

    if kernel == "csr16" and SL.kernel_library() is None:
        pytest.skip(f"no C kernel: {SL._LIB.get('reason')}")
    dense, _tok = build("gpt2")
    convs = SL.block_linears(dense)
    assert convs and all(isinstance(m, Conv1D) for m in convs.values())
    with torch.no_grad():
        for m in convs.values():
            m.weight[m.weight.abs() < m.weight.abs().quantile(0.9)] = 0.0
    sparse = copy.deepcopy(dense)
    plan = SL.sparsify(sparse, timer=_fake_timer({kernel: 0.1}), kernels={kernel})
    n = len(convs)
    assert plan["chosen"] == {"decode": {kernel: n}, "prefill": {kernel: n}}
    mods = [m for m in sparse.modules() if isinstance(m, SL.SparseLinear)]
    assert len(mods) == n and {(m.out_features, m.in_features) for m in mods} == \
        {tuple(m.weight.t().shape) for m in convs.values()}
    ids = torch.randint(0, 500, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = dense(ids).logits, sparse(ids).logits
    assert torch.allclose(got, want, atol=1e-5 * float(want.abs().max()), rtol=1e-4)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])     # [experts, out, in] and [experts, in, out] + biases
def test_fused_expert_tensors_run_sparse_with_dense_logits(family):
    """Every expert of a fused 3-D expert tensor is a matrix with its own kernel; the experts module then runs
    the routed loop over those kernels (elsa.artifacts.linear.sparse_experts_forward), and the logits, prefill and
    greedy decode, equal the dense model's."""
    import copy

    from test_families import build

    dense, _tok = build(family)
    experts = SL.block_experts(dense)
    assert len(experts) == 2                                   # one experts module per block
    with torch.no_grad():
        for mod, params in experts.values():
            for attr in params:
                p = getattr(mod, attr)
                p[p.abs() < p.abs().flatten(1).quantile(0.9, dim=1)[:, None, None]] = 0.0
        for m in SL.block_linears(dense).values():
            m.weight[m.weight.abs() < m.weight.abs().quantile(0.9)] = 0.0
    sparse = copy.deepcopy(dense)
    plan = SL.sparsify(sparse, timer=_fake_timer({"torch_csr": 0.1}), kernels={"torch_csr"})
    n_experts = sum(getattr(mod, a).shape[0] for mod, params in experts.values() for a in params)
    n = len(SL.block_linears(dense)) + n_experts
    assert plan["chosen"] == {"decode": {"torch_csr": n}, "prefill": {"torch_csr": n}}
    names = [k for k in plan["matrices"] if k.endswith("]")]
    assert len(names) == n_experts and any(".down_proj[3]" in k for k in names)
    ids = torch.randint(0, 500, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = dense(ids).logits, sparse(ids).logits
        assert torch.allclose(got, want, atol=1e-5 * float(want.abs().max()), rtol=1e-4)
        from elsa.artifacts.generate import greedy

        a, _ = greedy(dense, ids[:1, :6], 12)
        b, _ = greedy(sparse, ids[:1, :6], 12)
    assert torch.equal(a, b)


def test_experts_without_the_interface_flags_stay_dense_and_say_so():
    from test_families import build

    model, _tok = build("mixtral")
    for mod, _params in SL.block_experts(model).values():
        del mod.has_gate                                      # as a custom experts class would lack it
    plan = SL.sparsify(model, timer=_fake_timer({"torch_csr": 0.1}), min_sparsity=0.0)
    notes = {k: v["note"] for k, v in plan["matrices"].items() if "experts" in k}
    assert notes and all(v.startswith("left dense: no has_gate flag") for v in notes.values())
