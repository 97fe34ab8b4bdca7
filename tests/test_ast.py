"""AST: masks valid at every step, SR-STE, straight-through gradients, training, the pipeline, resume, bad input."""
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, read_results, run_cli, run_pipeline

from elsa.errors import ElsaError
from elsa.methods.ast import Ast, SparseMasks, annealed_decay
from elsa.model.structure import Weight
from elsa.methods.base import PruneContext
from elsa.model.structure import prunable_matrices
from elsa.sparsity.patterns import Sparsity, nm_violations

AST_FAST = ["method=ast", "method.steps=6", "method.batch_size=1", "method.grad_accum=2", "method.mask_interval=2",
            "method.warmup_steps=1", "method.increase_step=3", "method.lr=1e-3", "method.srste_decay=1e-2",
            "method.eval_initial=false", "method.checkpoint_every=0"]
FAST_KW = dict(steps=6, batch_size=1, grad_accum=2, mask_interval=2, warmup_steps=1, increase_step=3, lr=1e-3,
               srste_decay=1e-2, eval_initial=False, checkpoint_every=0)


def _context(tmp_path, tiny_model, target: str) -> PruneContext:
    from elsa.data.corpora import EmbeddedCorpus

    model, tok = tiny_model
    return PruneContext(model=model, tokenizer=tok, target=Sparsity.parse(target), dataset=EmbeddedCorpus("wiki", "wiki"),
                        seqlen=64, seed=0, output_dir=tmp_path)


def _check_mask(keep: torch.Tensor, target: Sparsity) -> None:
    rows, cols = keep.shape
    if target.is_nm:
        per_group = keep.reshape(rows, cols // target.m, target.m).sum(-1)
        assert bool((per_group == target.n).all())
    else:  # group=row: the same exact count in every row
        assert bool((keep.sum(-1) == cols - round(cols * target.ratio)).all())


class CheckedAst(Ast):
    """AST that checks, after every optimizer step and every mask update, that each Linear computes with an
    exactly sparse w * m."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.checked = []

    def _check(self, run, where):
        masks = run.state.masks
        x = torch.randn(3, next(iter(masks.linears.values())).in_features)
        for name, lin in masks.linears.items():
            keep = masks.keep[name]
            _check_mask(keep, run.plan.target)
            w = lin.weight.detach()
            effective = w * keep
            if run.plan.target.is_nm:
                assert nm_violations(effective, run.plan.target.n, run.plan.target.m) == 0
            if lin.in_features == x.shape[1]:
                with torch.no_grad():
                    torch.testing.assert_close(lin(x), F.linear(x, effective, lin.bias))
        self.checked.append(where)

    def after_optimizer(self, run, step):
        super().after_optimizer(run, step)
        self._check(run, ("step", step))

    def periodic(self, run, done):
        record = super().periodic(run, done)
        self._check(run, ("periodic", done))
        return record


@pytest.mark.parametrize("target", ["2:4", "0.5"])
def test_mask_exact_at_every_step_and_final_weights_exact(tmp_path, tiny_model, target):
    ast = CheckedAst(**FAST_KW)
    stats = ast.prune(_context(tmp_path, tiny_model, target))
    assert [w for w in ast.checked if w[0] == "step"] == [("step", s) for s in range(6)]
    t = Sparsity.parse(target)
    model = tiny_model[0]
    for name, lin in prunable_matrices(model).items():
        w = lin.weight.detach()
        if t.is_nm:
            assert nm_violations(w, t.n, t.m) == 0, name
        assert int((w == 0).sum()) >= round(w.numel() * t.ratio), name
        assert "forward" not in vars(lin), "masked forward left installed"
    flips = [r["mask_flips_prev"] for r in stats["history"] if "mask_flips_prev" in r]
    assert flips and all(0.0 <= f <= 1.0 for f in flips)
    assert stats["state_bytes_per_param"]["masks"] == 1.0


def test_training_loss_decreases(tmp_path, tiny_model):
    # next-token loss only: the tiny model's teacher is random, so the KL part carries little signal
    ast = Ast(**{**FAST_KW, "steps": 24, "mask_interval": 1, "lr": 3e-3, "warmup_steps": 0, "task_weight": 1.0,
                 "kl_weight": 0.0})
    stats = ast.prune(_context(tmp_path, tiny_model, "2:4"))
    losses = [r["loss"] for r in stats["history"]]
    assert len(losses) == 23
    assert sum(losses[-4:]) / 4 < 0.9 * sum(losses[:4]) / 4, losses


def test_srste_decay_pulls_pruned_weights_to_zero():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 4, bias=False)
    masks = SparseMasks({"l": Weight(lin)}, Sparsity.parse("2:4"), "magnitude", "row")
    masks.update()
    keep = masks.keep["l"]
    w0 = lin.weight.detach().clone()
    lin.weight.grad = torch.zeros_like(w0)
    masks.decay_gradients(0.5)
    torch.testing.assert_close(lin.weight.grad, 0.5 * w0 * ~keep)  # only pruned weights get the decay term
    opt = torch.optim.SGD([lin.weight], lr=0.5)
    for _ in range(20):  # a zero task gradient: the decay alone shrinks the pruned weights geometrically
        lin.weight.grad = torch.zeros_like(w0)
        masks.decay_gradients(0.5)
        opt.step()
    w = lin.weight.detach()
    assert torch.equal(w[keep], w0[keep])
    assert float(w[~keep].abs().max()) <= 0.75 ** 20 * float(w0[~keep].abs().max()) * 1.0001


def test_straight_through_gradient_reaches_pruned_weights():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 4, bias=False)
    masks = SparseMasks({"l": Weight(lin)}, Sparsity.parse("2:4"), "magnitude", "row")
    masks.update()
    masks.install()
    try:
        x = torch.randn(5, 8)
        lin(x).square().sum().backward()
    finally:
        masks.remove()
    keep = masks.keep["l"]
    assert float(lin.weight.grad[~keep].abs().sum()) > 0
    w = lin.weight.detach()
    expected = 2 * (x @ (w * keep).T).T @ x  # d/dW of ||x (W*m)^T||^2, passed through the mask
    torch.testing.assert_close(lin.weight.grad, expected)


def test_annealed_decay_ramps_then_stays():
    assert [annealed_decay(s, 1e-4, 10) for s in (0, 5, 10, 50)] == pytest.approx([0.0, 5e-5, 1e-4, 1e-4])
    assert annealed_decay(0, 1e-4, 0) == 1e-4


def test_wanda_metric_uses_observed_input_norms():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]]))
    masks = SparseMasks({"l": Weight(lin)}, Sparsity.parse("2:4"), "wanda", "row")
    masks.install()
    try:
        lin(torch.tensor([[10.0, 10.0, 0.1, 0.1]]))  # inputs 0, 1 are large: wanda keeps them in every row
    finally:
        masks.remove()
    masks.update()
    assert masks.keep["l"].tolist() == [[True, True, False, False]] * 2


@pytest.mark.parametrize("sparsity,ratio", [("2:4", 0.5), ("0.5", 0.5)])
def test_pipeline_end_to_end(tmp_path, sparsity, ratio):
    from transformers import AutoModelForCausalLM

    r = run_pipeline(tmp_path, *AST_FAST, f"sparsity={sparsity}")
    assert r["status"] == "done" and r["method"] == "ast"
    assert all(abs(v - ratio) <= 1e-3 for v in r["sparsity"]["per_layer"].values())
    assert {"mask_flips_prev", "mask_flips_init", "srste_decay", "loss"} <= set(r["method_stats"]["history"][-1])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    for name, lin in prunable_matrices(model).items():
        if sparsity == "2:4":
            assert nm_violations(lin.weight, 2, 4) == 0, name


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model" / "model.safetensors"))


def test_resume_from_checkpoint_matches_uninterrupted(tmp_path):
    """A run that stops after its step-4 checkpoint and is started again ends with the same weights as a run
    that never stopped (wanda metric: the collected input norms are part of the checkpoint)."""
    args = [*AST_FAST, "method.steps=8", "method.mask_interval=3", "method.mask_metric=wanda", "sparsity=2:4"]
    run_pipeline(tmp_path / "ref", *args)
    run_pipeline(tmp_path / "cut", *args, "method.checkpoint_every=4", "method.keep_checkpoint=true")
    ckpt = tmp_path / "cut" / "checkpoints" / "ast.pt"
    assert ckpt.exists()
    state = torch.load(ckpt, weights_only=False)
    assert state["step"] == 4 and state["masks"]["act_sq"], "the step-4 checkpoint holds the wanda statistics"
    (tmp_path / "cut" / "model" / "model.safetensors").unlink()
    r = run_pipeline(tmp_path / "cut", *args, "method.checkpoint_every=4", "method.keep_checkpoint=true")
    assert r["method_stats"]["resumed_from_step"] == 4
    a, b = _weights(tmp_path / "ref"), _weights(tmp_path / "cut")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_bad_mask_interval_is_one_line_error(tmp_path):
    proc = run_cli(*TINY, *AST_FAST, "method.mask_interval=0", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("elsa: error: method.mask_interval=0 is not allowed"), proc.stderr[-2000:]
    assert read_results(tmp_path)["status"] == "failed"


@pytest.mark.parametrize("override,needle", [
    ("method.slorb_init=xavier", "method.slorb_init=xavier"),
    ("method.slorb_k=0", "method.slorb_k=0"),
    ("method.slorb=true method.slorb_k=48", "method.slorb_k=48 is not allowed: a divisor"),
    ("method.slorb=true method.mask_metric=wanda", "method.mask_metric=wanda is not allowed: magnitude with"),
    ("method.mask_metric=sparsegpt", "method.mask_metric=sparsegpt"),
    ("method.srste_decay=-1", "method.srste_decay=-1"),
    ("method.lr_schedule=step", "method.lr_schedule=step"),
])
def test_bad_hyperparameters_fail_before_training(tmp_path, override, needle):
    with pytest.raises(ElsaError, match=needle.replace(".", r"\.")):
        run_pipeline(tmp_path, *AST_FAST, *override.split())


# -- AST-Boosted: SLoRB and SquareHead ------------------------------------------------------------------------
def test_slorb_branch_is_the_group_sum_bypass_initialised_from_the_pruned_weights():
    from elsa.methods.slorb import SLoRB, init_from_pruned

    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 8, generator=g)
    keep = torch.rand(6, 8, generator=g) > 0.5
    x = torch.randn(3, 8, generator=g)
    for trainable in (False, True):
        b = SLoRB(8, 6, 4, trainable)
        init_from_pruned(b, w, keep, "mean")
        pruned = (w * ~keep).reshape(6, 2, 4)
        assert torch.equal(b.weight, pruned.mean(-1))
        want = x.reshape(3, 2, 4).sum(-1) @ pruned.mean(-1).t()           # S (P x), P the group sums
        assert torch.allclose(b(x), want, atol=1e-6)
        assert (b.proj is not None) == trainable
    assert torch.equal(SLoRB(8, 6, 4, True).proj, torch.tensor([[1.0] * 4 + [0.0] * 4, [0.0] * 4 + [1.0] * 4]))
    b = SLoRB(8, 6, 4, False)
    init_from_pruned(b, w, keep, "sum")
    assert torch.equal(b.weight, (w * ~keep).reshape(6, 2, 4).sum(-1))


def test_squarehead_is_zero_on_the_teacher_and_normalised_per_block():
    from elsa.engines.losses import squarehead_loss

    t = [torch.full((1, 2, 3), 2.0), torch.full((1, 2, 3), 4.0)]
    assert float(squarehead_loss(t, t)) == 0.0
    s = [t[0] + 1.0, t[1] + 2.0]          # 1/4 + 4/16, each denominator + bf16's eps (the reference's guard)
    eps = torch.finfo(torch.bfloat16).eps
    assert float(squarehead_loss(s, t)) == pytest.approx(1 / (4 + eps) + 4 / (16 + eps), rel=1e-6)


def _perplexity(model, tok, seqlen=128, max_tokens=2048):
    from elsa.eval.perplexity import PerplexityEval
    from elsa.run.recipe import dataset_by_name

    return PerplexityEval({"wiki": dataset_by_name("wiki")}, seqlen, max_tokens, 4, True, "cpu").run(model, tok, "x")


def _slorb_count(model_dir, k=16):
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(model_dir)
    return sum(m.weight.shape[0] * m.weight.shape[1] // k + (m.weight.shape[1] // k) * m.weight.shape[1]
               for m in prunable_matrices(dense).values())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_ast_boosted_trains_counts_saves_and_reloads_its_bypass(tmp_path, family):
    """method=ast_boosted on a tiny Llama and a tiny GPT-2 (Conv1D, the paper's model): exact 2:4 masks, the SLoRB
    parameters counted as their own dense kind, the saved dir reloaded by elsa.methods.slorb.from_pretrained computes the
    perplexity the run measured (plain from_pretrained, which drops the branches, does not)."""
    from test_families import _checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from elsa.methods.slorb import SLoRB, from_pretrained

    model_args = ["model=tiny"]
    if family == "gpt2":
        model_args = ["model=hf", f"model.path={_checkpoint('gpt2', tmp_path)}"]
    fast = [a.replace("method=ast", "method=ast_boosted") for a in AST_FAST]
    out = run_pipeline(tmp_path / "run", *model_args, *fast, "sparsity=2:4", "save_model=true", "eval.dense=false")
    assert out["status"] == "done" and out["sparsity"]["measured"] == pytest.approx(0.5)
    extra = _slorb_count(out["model_dir"])
    assert out["params"]["dense_by_kind"]["slorb"] == extra == out["method_stats"]["slorb"]["params"]
    assert out["method_stats"]["slorb"]["k"] == 16 and out["method_stats"]["slorb"]["trainable_projection"]
    back = from_pretrained(out["model_dir"])
    assert sum(isinstance(m, SLoRB) for m in back.modules()) == len(prunable_matrices(back))
    for name, m in prunable_matrices(back).items():
        assert nm_violations(m.weight, 2, 4) == 0, name
    tok = AutoTokenizer.from_pretrained(out["model_dir"])
    got = _perplexity(back, tok)["wiki"]
    assert got == pytest.approx(out["perplexity"]["wiki"], rel=1e-6)
    plain = _perplexity(AutoModelForCausalLM.from_pretrained(out["model_dir"]), tok)["wiki"]
    assert plain != pytest.approx(got, rel=1e-6)


def test_ast_boosted_with_squarehead_and_its_refusal_of_expert_tensors(tmp_path):
    from test_families import _checkpoint

    out = run_pipeline(tmp_path / "sq", *[a.replace("method=ast", "method=ast_boosted") for a in AST_FAST],
                       "method.squarehead_weight=1.0", "method.trainable_projection=false", "sparsity=2:4",
                       "save_model=false", "eval.dense=false")
    assert out["status"] == "done" and out["method_stats"]["slorb"]["trainable_projection"] is False
    ckpt = _checkpoint("mixtral", tmp_path)
    with pytest.raises(ElsaError, match=r"method\.slorb=true: SLoRB bypasses Linear and Conv1D matrices"):
        run_pipeline(tmp_path / "moe", "model=hf", f"model.path={ckpt}", *AST_FAST, "method.slorb=true",
                     "seqlen=32", "eval.max_tokens=256")
