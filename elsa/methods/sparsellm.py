"""SparseLLM (Bai et al., 2024, "SparseLLM: Towards Global Pruning of Pre-trained Language Models").

Attention Linears are pruned by SparseGPT. The MLP is pruned jointly: its intermediate activations become
auxiliary variables, so that the coupled layers decompose into subproblems solved alternately in closed form.
Two MLP shapes, both found from the block's structure (:func:`mlp_structure`, by tracing which Linear feeds
which through which elementwise activation module; no module names):

- plain (the paper's OPT): ``fc2(act(fc1 x))``, any elementwise activation;
- gated (Llama family): ``down(act(gate x) ⊙ up x)``.

With X the MLP's input tokens (rows), Y the dense MLP's output (biases kept fixed and folded into the
targets), and auxiliaries S (pre-activation: fc1's / gate's output), U (up's output; gated only, else 1) and
P (the activation output, i.e. the input of fc2 / down), the objective (per token) is

    L = γ ||P W_dᵀ - Y||² + β ||P - act(S) ⊙ U||² + α (||S - X W_1ᵀ||² + ||U - X W_uᵀ||²)

(the paper's two linear-fit terms, with the dense input X and the dense output Y fixed because the MLP is
pruned module by module, and its activation term). Initialised at the dense values (L = 0), each of
``iterations`` alternations updates, in order:

  - P  ← (γ Y W_d + β act(S)⊙U) (γ W_dᵀ W_d + β I)⁻¹                  (ridge, closed form; W_d pruned)
  - U  ← (β act(S)⊙P + α X W_uᵀ) / (β act(S)² + α)                    (gated only; elementwise, closed form)
  - S  ← argmin_S β (P - act(S)⊙U)² + α (S - X W_1ᵀ)²                   (elementwise: for ReLU the paper's
        closed form, the better of the two branches S >= 0 / S < 0; for any other activation a few
        safeguarded Gauss-Newton steps that never raise an element's loss)
  - W_1 (and W_u) ← least squares onto S (U) from X, re-pruned by SparseGPT with H = 2/n XᵀX: SparseGPT on the
        least-squares solution minimises ||S - X Ŵᵀ||² on the fixed inputs up to a constant;
  - W_d ← least squares onto Y from A = act(X Ŵ_1ᵀ) ⊙ (X Ŵ_uᵀ), the activations the re-pruned W_1, W_u
        actually produce, re-pruned by SparseGPT with H = 2/n AᵀA.

Why the last step reads A and not the auxiliary P (``down_input``): solving W_d's subproblem on P (the
literal block-coordinate step, ``down_input: auxiliary``) fits W_d to inputs that the pruned first layer(s) do
not produce. P is a ridge compromise tailored to the previous W_d, and the equal weights α = β = γ make a
deviation of P from act(S)⊙U cheap in L while W_d amplifies it in the real output (its squared singular values
reach ~500 on the default model). On SmolLM2-135M L then fell 30x while the real MLP error rose (with the
re-fits' old zero-centred damping; with the current one it falls, but block 5 at 50% ends at 62.1 against 44.2
for A after 5 alternations; docs/results.md, SparseLLM). With W_d fitted to A, the auxiliaries serve as what
the paper uses them for, targets that coordinate W_1/W_u with W_d, and the real MLP error falls over the
alternations. The first
alternation is SparseGPT on W_1/W_u and SparseGPT with the least-squares target Y on W_d (its inputs are the
pruned first layers' activations, as in SparseGPT's sequential mode).

L (``objective``) and the real MLP error ||mlp(X) - Y||² / n with the pruned weights (``mlp_error``) are
recorded after every alternation, with the error of
plain SparseGPT on the same MLP (``mlp_error_sparsegpt``: every Linear pruned from its dense weights and dense
inputs, what method=sparsegpt does) as the yardstick.

The per-token variables (X, Y, S, U, P and the first layers' outputs, for every calibration token) are held in
chunks of :data:`TOKEN_CHUNK` tokens and every update runs chunk by chunk; ``hardware.low_memory`` keeps the chunks
on disk, one of each resident, with the same pruned weights (:class:`MLPProblem`).

All Linears see the dense block's inputs (the engine's convention). A block whose MLP has neither shape
(fused gate_up_proj, MoE experts, GPT-2's Conv1D) makes the run refuse right after the model loads
(``validate``), before any calibration; with ``fallback: sparsegpt`` such blocks are pruned by SparseGPT alone,
and the fallback is recorded in the method statistics (``fallback``), printed in the summary and carried into
the report row's label.

``mode: reference`` is the algorithm of the reference code (BaiTheBest/SparseLLM @27fe26a, read, not copied),
each of its differences a knob of its own (null: the mode's value; README, SparseLLM, says why the project
differs): α = β = γ = 5.0 on a gated MLP (its Llama path; 0.1 on a plain one, its OPT path); ``down_input:
auxiliary``; ``refit: reference`` (the undamped pseudo-inverse for the first layer(s) and the gated down; a plain
MLP's fc2 by 10 gradient steps of 0.01 on the mean squared error from the current weights); ``s_update:
gradient`` (``s_steps`` = 2 gradient steps of ``s_lr`` = 0.01 on S's summed loss, for a non-ReLU activation);
``skip`` = [1, -2, -1] on gated MLPs (its Llama path runs one alternation, i.e. plain SparseGPT, on its layers 1,
30 and 31 of 32: generalised as the second and the last two blocks); and its bookkeeping (``Recipe.literal``):
the first alternation is plain SparseGPT on the dense weights and inputs, the auxiliaries are updated after each
prune, and gate/up's damping accumulates over the alternations as its in-place damping does. ``half: true``
rounds to fp16 where it holds fp16 values. Not reproduced: its SparseGPT's ``<=`` threshold, which prunes at
least one weight more per column block than asked (the counts here are exact).
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from elsa.methods import notes
from elsa.errors import ElsaError, config_error
from elsa.engines.layerwise import BATCH, LayerwisePruner
from elsa.methods.base import Annotated, Choice, Flag, Number
from elsa.methods.registry import Rule
from elsa.methods.sparsegpt import PERCDAMP, SparseGPT, sparsegpt_prune
from elsa.model.structure import block_weights, blocks_and_prefix
from elsa.sparsity.plan import BlockPlan, MatrixId, PruningPlan
from elsa.sparsity.patterns import Sparsity

log = logging.getLogger(__name__)

ROUNDING = 1 + 1e-6   # an element's S-loss "rose" only above this factor: below it is float32 rounding noise


# ---------------------------------------------------------------------------------------------------------
# structure: which Linear feeds which, through which elementwise activation


@dataclass
class MLPStructure:
    """One MLP of a block, by block-relative module names: ``first`` is fc1 (plain) or gate (gated)."""
    kind: str                     # "plain" or "gated"
    first: str
    up: str | None
    down: str
    act: nn.Module
    relu: bool                    # act is ReLU (checked numerically): the S update takes the paper's closed form

    def names(self) -> list[str]:
        return [n for n in (self.first, self.up, self.down) if n is not None]


_PROBE = torch.linspace(-4.0, 4.0, 81)


def _activations(block: nn.Module) -> list[nn.Module]:
    """Parameter-free leaf modules of ``block`` that are not the identity on a probe (activation modules)."""
    out = []
    for mod in block.modules():
        if next(mod.children(), None) is not None or next(mod.parameters(recurse=False), None) is not None:
            continue
        try:
            val = mod(_PROBE.clone())
        except Exception:           # noqa: BLE001 - a module that is no elementwise function of one tensor
            continue
        if isinstance(val, torch.Tensor) and val.shape == _PROBE.shape and not torch.allclose(val, _PROBE):
            out.append(mod)
    return out


def _is_relu(act: nn.Module) -> bool:
    return bool(torch.equal(act(_PROBE.clone()), _PROBE.clamp(min=0)))


def _linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The block's plain Linears that elsa prunes (not routers, not experts) by block-relative name."""
    return {n: w.module for n, w in block_weights(block).items()
            if w.experts is None and isinstance(w.module, nn.Linear)}


def _planned_linears(view: BlockPlan) -> dict[str, nn.Linear]:
    """The plain Linears of one block that the plan prunes (not ignored, not experts) by block-relative name:
    the only ones traced, so the MLP is found among them."""
    return {n: w.module for n, w in view.weights.items() if w.experts is None and isinstance(w.module, nn.Linear)}


def trace_calls(modules: dict[str, nn.Module], run: Callable[[], Any]) -> dict[str, tuple]:
    """(input, output) of the first call of each module in ``modules`` while ``run()`` runs (float32)."""
    calls: dict[str, tuple] = {}

    def hook(name):
        def fn(_m, args, out):
            if name not in calls and args and isinstance(args[0], torch.Tensor):
                calls[name] = (args[0].detach().float(), out.detach().float())
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return calls


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5))


def mlp_structure(block: nn.Module, calls: dict[str, tuple]) -> MLPStructure | None:
    """The block's MLP from the traced calls of its Linears (:func:`trace_calls`): gated if some Linear's input
    equals act(G x) ⊙ (U x) for two Linears G, U applied to the same input and one of the block's activation
    modules; else plain if some Linear's input equals act(F x). None if neither is found."""
    lins = {n: m for n, m in _linears(block).items() if n in calls}
    acts = _activations(block)
    if not acts:
        return None

    def bias_free(name):                      # the Linear's output as the traced value
        return calls[name][1]

    gated, plain = None, None
    for d, dmod in lins.items():
        d_in = calls[d][0]
        for g, gmod in lins.items():
            if g == d or gmod.out_features != dmod.in_features:
                continue
            for act in acts:
                a = act(bias_free(g))
                if gated is None:
                    for u, umod in lins.items():
                        if u in (g, d) or umod.out_features != dmod.in_features or \
                                not torch.equal(calls[u][0], calls[g][0]):
                            continue
                        if _close(a * bias_free(u), d_in):
                            gated = MLPStructure("gated", g, u, d, act, _is_relu(act))
                            break
                if plain is None and _close(a, d_in):
                    plain = MLPStructure("plain", g, None, d, act, _is_relu(act))
    return gated or plain


def model_mlp_structures(plan: PruningPlan) -> list[MLPStructure | None]:
    """Every block's MLP, from one forward of the model on a few tokens (hooks on every planned Linear)."""
    model, blocks = plan.model, plan.blocks
    planned = [_planned_linears(plan.block(i)) for i in range(len(blocks))]
    per_block = [{f"{i}.{n}": m for n, m in linears.items()} for i, linears in enumerate(planned)]
    modules = {k: m for d in per_block for k, m in d.items()}
    device = next(model.parameters()).device
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 16
    ids = (torch.arange(3, 11, device=device) * 7919 % max(int(vocab), 2)).reshape(1, -1)
    was_training = model.training
    model.eval()
    try:
        calls = trace_calls(modules, lambda: model(input_ids=ids, use_cache=False))
    except Exception as e:                   # noqa: BLE001
        raise ElsaError(f"method=sparsellm could not trace the model's MLPs on a few tokens ({type(e).__name__}: "
                        f"{e}); set method.fallback=sparsegpt to prune by SparseGPT") from e
    finally:
        model.train(was_training)
    out = []
    for i, b in enumerate(blocks):
        mine = {n: calls[f"{i}.{n}"] for n in planned[i] if f"{i}.{n}" in calls}
        out.append(mlp_structure(b, mine))
    return out


# ---------------------------------------------------------------------------------------------------------
# the problem of one MLP


def least_squares(x: torch.Tensor, t: torch.Tensor, percdamp: float, gram: torch.Tensor | None = None,
                  prior: torch.Tensor | None = None) -> torch.Tensor:
    """W (out, in) minimising ||X Wᵀ - T||² + Σ_j λ_j ||W[:, j] - W₀[:, j]||², λ_j = percdamp · (XᵀX)_jj (floored
    at 1e-6 of the mean diagonal), W₀ = ``prior`` (the dense weight; zero if None); ``gram`` is XᵀX when the
    caller has it already.

    The damping is centred on the dense weight, as SparseGPT's own damping is (its λ||W - Ŵ||² keeps Ŵ near the
    dense W where the inputs do not determine it), and scaled per input channel (Marquardt's scaling), so that
    it is the same fraction of every channel's energy. Centred on zero with one λ from the mean diagonal, it
    shrinks every weight whose input is small next to one massive-activation channel: in block 11 of
    SmolLM2-135M the down projection's inputs have one channel of mean square 18,347 against a median of 0.022,
    λ is ~6x the typical channel's own energy, and the re-fit of down was 4.8x worse than plain SparseGPT on that
    MLP (536 vs 113 at 50%); in block 29 at 2:4 the real error rose over the alternations (docs/results.md)."""
    return ridge(x.t() @ x if gram is None else gram, x.t() @ t, percdamp, prior)


def ridge(gram: torch.Tensor, xt: torch.Tensor, percdamp: float, prior: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`least_squares`'s W from the sums over tokens alone: ``gram`` = XᵀX and ``xt`` = XᵀT (the MLP
    problem adds them chunk by chunk)."""
    g = gram.clone()
    diag = torch.diagonal(g)
    lam = percdamp * diag.clamp_min(1e-6 * float(diag.mean().clamp_min(1e-12)))
    g += torch.diag(lam)
    chol = torch.linalg.cholesky(g)
    rhs = xt if prior is None else xt + lam[:, None] * prior.t()
    return torch.cholesky_solve(rhs, chol).t()


def hessian(x: torch.Tensor) -> torch.Tensor:
    return x.t() @ x * (2.0 / len(x))


def _weights(lin: nn.Linear | None):
    if lin is None:
        return None, None
    b = lin.bias.detach().float().clone() if lin.bias is not None else None
    return lin.weight.detach().float().clone(), b


def _affine(x, w, b):
    out = x @ w.t()
    return out if b is None else out + b


DOWN_INPUTS = ("pruned", "auxiliary")
REFITS = ("ridge", "reference")
S_UPDATES = ("exact", "gradient")


@dataclass(frozen=True)
class Recipe:
    """How the alternations are carried out, beyond α, β, γ and ``down_input``: the project's (these defaults)
    or the reference code's (``method.mode=reference``, :meth:`SparseLLM._recipe`; README, SparseLLM)."""
    refit: str = "ridge"       # ridge: least squares damped per channel towards the dense weights; reference:
    #                            the undamped pseudo-inverse (a plain MLP's fc2: 10 gradient steps, lr 0.01)
    s_update: str = "exact"    # exact: S's elementwise minimiser; gradient: s_steps plain gradient steps of s_lr
    s_steps: int = 2           # (ReLU takes the closed form either way: the reference's OPT path does too)
    s_lr: float = 0.01
    half: bool = False         # round what the reference holds in fp16 (X, Y, weights, auxiliaries, inverses)
    literal: bool = False      # the reference's bookkeeping: the first alternation prunes the weights as they are
    #                            (no re-fit, no auxiliary update before it), and gate/up's SparseGPT damping
    #                            accumulates over the alternations (its in-place damping of one kept Hessian)


TOKEN_CHUNK = 2048   # token rows per chunk of the MLP problem's per-token variables, on both paths: the sums over
#                      tokens (Gram matrices, XᵀT) add chunk by chunk in this order whether the chunks are in
#                      memory or on disk (hardware.low_memory), so both prune the same bits (a multiple of the S
#                      update's 512-row chunks, so those fall where they did)


class Chunks:
    """One per-token variable of the MLP problem as chunks of token rows, each a contiguous float32 tensor: in
    memory, or with ``folder`` (``hardware.low_memory``) one file per chunk, read back when used."""

    def __init__(self, folder: str | None = None, name: str = "v"):
        self.folder, self.name = folder, name
        self.mem: dict[int, torch.Tensor] = {}
        self.shapes: dict[int, tuple] = {}

    @classmethod
    def of(cls, t: torch.Tensor, rows: int, folder: str | None = None, name: str = "v") -> "Chunks":
        """``t``'s rows in chunks of ``rows`` (in memory: views of ``t``, no copy)."""
        out = cls(folder, name)
        for i, lo in enumerate(range(0, len(t), rows)):
            out.put(i, t[lo:lo + rows])
        return out

    def __len__(self) -> int:
        return len(self.shapes)

    def _path(self, i: int) -> str:
        return os.path.join(self.folder, f"{self.name}.{i}.pt")

    def put(self, i: int, t: torch.Tensor) -> None:
        t = t.detach().contiguous()
        self.shapes[i] = tuple(t.shape)
        if self.folder is None:
            self.mem[i] = t
        else:       # a view saves its whole storage: a copy of the chunk alone
            torch.save(t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone(),
                       self._path(i))

    def get(self, i: int) -> torch.Tensor:
        return self.mem[i] if self.folder is None else torch.load(self._path(i), weights_only=True)

    def full(self) -> torch.Tensor:
        parts = [self.get(i) for i in range(len(self))]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @property
    def rows(self) -> int:
        return sum(s[0] for s in self.shapes.values())

    @property
    def disk_bytes(self) -> int:
        return 0 if self.folder is None else sum(4 * math.prod(s) for s in self.shapes.values())

    def drop(self) -> None:
        if self.folder is not None:
            for i in self.shapes:
                os.remove(self._path(i))
        self.mem, self.shapes = {}, {}


class _Rows:
    """Token rows appended batch by batch into ``out``'s chunks of ``rows`` rows (:func:`mlp_io` on disk)."""

    def __init__(self, out: Chunks, rows: int):
        self.out, self.rows, self.buf, self.n = out, rows, [], 0

    def add(self, t: torch.Tensor) -> None:
        self.buf.append(t)
        self.n += len(t)
        while self.n >= self.rows:
            self._flush(self.rows)

    def _flush(self, k: int) -> None:
        rows = torch.cat(self.buf) if len(self.buf) > 1 else self.buf[0]
        self.out.put(len(self.out), rows[:k])
        rest = rows[k:]
        self.buf, self.n = ([rest] if len(rest) else []), len(rest)

    def close(self) -> Chunks:
        if self.n:
            self._flush(self.n)
        return self.out


class _Mapped:
    """``chunks`` read through ``fn`` (a target less its fixed bias)."""

    def __init__(self, chunks: Chunks, fn):
        self.chunks, self.fn = chunks, fn

    def __len__(self) -> int:
        return len(self.chunks)

    def get(self, i: int) -> torch.Tensor:
        return self.fn(self.chunks.get(i))


def _variable(name: str) -> property:
    def get(self):
        return self.v[name].full() if name in self.v else None

    def put(self, t):          # a whole variable set at once (tests, benches)
        self.v[name] = Chunks.of(t, self.token_chunk, self.folder, name)
    return property(get, put, doc=f"the per-token variable {name}, whole (rows: tokens)")


def _add(total, t):
    return t if total is None else total + t


class MLPProblem:
    """The auxiliary-variable problem of one MLP (plain when ``up`` is None); weights are float32 (out, in)
    copies, biases stay fixed. ``xg`` = X W_1ᵀ + b_1 and ``xu`` = X W_uᵀ + b_u are kept for the current weights.

    The per-token variables (X, Y, xg, xu, S, U, P; :data:`TOKEN_CHUNK` token rows a chunk, :class:`Chunks`) are
    in memory, or with ``folder`` (``hardware.low_memory``) on disk, one chunk of each read at a time: every
    update is row by row or a sum over tokens, done chunk by chunk in the same order either way. What is not
    token-separable is formed whole as before: ``refit: reference``'s pseudo-inverses of X and of the down
    projection's input."""

    x, y, xg, xu, s, u, p = (_variable(n) for n in ("x", "y", "xg", "xu", "s", "u", "p"))

    def __init__(self, first: nn.Linear, up: nn.Linear | None, down: nn.Linear, act, x, y, alpha: float,
                 beta: float, gamma: float, relu: bool = False, chunk: int = 512, down_input: str = "pruned",
                 recipe: Recipe | None = None, token_chunk: int | None = None, folder: str | None = None):
        self.act, self.relu = act, relu
        self.recipe = recipe or Recipe()
        self.token_chunk, self.folder = int(token_chunk or TOKEN_CHUNK), folder
        self.wg, self.bg = _weights(first)
        self.wu, self.bu = _weights(up)
        self.wd, self.bd = _weights(down)
        if self.recipe.half:
            self.wg, self.wu, self.wd = (None if w is None else self._half(w) for w in (self.wg, self.wu, self.wd))
        self.dense = (self.wg, self.wu, self.wd)             # the least-squares re-fits' damping centre
        self.alpha, self.beta, self.gamma = alpha, beta, gamma
        self.chunk = chunk
        self.down_input = down_input
        self.gated = self.wu is not None
        self.v: dict[str, Chunks] = {}
        self.hx = self._start(x, y)                        # X is fixed: its Gram matrix is computed once
        self._xinv = None                                  # refit=reference: X's pseudo-inverse, computed once
        self.name, self.alternation = "mlp", 0             # for the errors of the reference's re-fits

    def _start(self, x, y) -> torch.Tensor:
        """The variables at the dense values (S = X W_1ᵀ, U = X W_uᵀ, P = act(S) ⊙ U, Y less down's bias; so
        L = 0), a chunk at a time; returns H = 2/n XᵀX."""
        xs = x if isinstance(x, Chunks) else Chunks.of(x, self.token_chunk)
        ys = y if isinstance(y, Chunks) else Chunks.of(y, self.token_chunk)
        keep_x = not self.recipe.half                      # X and Y as given unless they change
        keep_y = keep_x and self.bd is None
        names = ("xg", "s", "p", "xu", "u") if self.gated else ("xg", "s", "p")
        self.v = {"x": xs if keep_x else Chunks(self.folder, "x"), "y": ys if keep_y else Chunks(self.folder, "y"),
                  **{n: Chunks(self.folder, n) for n in names}}
        gram = None
        for i in range(len(xs)):
            xc, yc = self._half(xs.get(i)), ys.get(i)
            if not keep_x:
                self.v["x"].put(i, xc)
            if not keep_y:
                self.v["y"].put(i, self._half(yc if self.bd is None else yc - self.bd))
            xg, xu = self._affines(xc)
            s = self._half(xg.clone())
            u = self._half(xu.clone()) if self.gated else None
            self._put(i, xg=xg, xu=xu, s=s, u=u, p=self._half(self.activation(s, u)))
            gram = _add(gram, xc.t() @ xc)
        for given, kept in ((xs, keep_x), (ys, keep_y)):
            if not kept and given.folder is not None:       # the MLP's inputs as read, now copied
                given.drop()
        self.n = self.v["x"].rows
        return gram * (2.0 / self.n)

    @property
    def chunks(self) -> range:
        return range(len(self.v["x"]))

    def _get(self, i: int, *names: str) -> list:
        return [self.v[n].get(i) if n in self.v else None for n in names]

    def _put(self, i: int, **values) -> None:
        for n, t in values.items():
            if t is not None:
                self.v[n].put(i, t)

    def _affines(self, xc: torch.Tensor):
        return _affine(xc, self.wg, self.bg), (_affine(xc, self.wu, self.bu) if self.gated else None)

    def disk_bytes(self) -> int:
        """Bytes of the variables on disk (``folder``; 0 in memory)."""
        return sum(c.disk_bytes for c in self.v.values()) + (self._xinv.disk_bytes if self._xinv else 0)

    def _half(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` rounded to fp16 where the reference holds it in fp16 (``recipe.half``); else ``t`` itself."""
        return t.half().float() if self.recipe.half else t

    def _inputs_changed(self) -> None:
        for i in self.chunks:
            xg, xu = self._affines(self.v["x"].get(i))
            self._put(i, xg=xg, xu=xu)

    def activation(self, s, u):
        a = self.act(s)
        return a if u is None else a * u

    def measures(self) -> tuple[float, float]:
        """(L, the real MLP error ||mlp(X) - Y||² / n with the current weights) in one pass over the chunks."""
        a, b, g = self.alpha, self.beta, self.gamma
        objective = error = None
        for i in self.chunks:
            y, xg, xu, s, u, p = self._get(i, "y", "xg", "xu", "s", "u", "p")
            total = (g * (p @ self.wd.t() - y).pow(2).sum()
                     + b * (p - self.activation(s, u)).pow(2).sum()
                     + a * (s - xg).pow(2).sum())
            if self.gated:
                total = total + a * (u - xu).pow(2).sum()
            objective = _add(objective, total)
            error = _add(error, (self.activation(xg, xu) @ self.wd.t() - y).pow(2).sum())
        return float(objective) / self.n, float(error) / self.n

    def objective(self) -> float:
        return self.measures()[0]

    def mlp_error(self) -> float:
        return self.measures()[1]

    # -- activation updates (closed form / elementwise), row by row: a chunk of tokens at a time ------------
    def update_activations(self, which: tuple = ("p", "u", "s"), **s_options) -> None:
        """P, then U, then S (those in ``which``), each from the others' newest values, in one pass."""
        inv = self._p_inverse() if "p" in which else None
        for i in self.chunks:
            y, xg, xu, s, u, p = self._get(i, "y", "xg", "xu", "s", "u", "p")
            if "p" in which:
                p = self._p_rows(y, s, u, inv)
            if "u" in which and self.gated:
                u = self._u_rows(s, p, xu)
            if "s" in which:
                s = self._s_rows(s, p, u, xg, **s_options)
            self._put(i, **{n: t for n, t in (("p", p), ("u", u), ("s", s)) if n in which})

    def update_p(self) -> None:
        self.update_activations(("p",))

    def update_u(self) -> None:
        self.update_activations(("u",))

    def update_s(self, steps: int = 5, halvings: int = 6, rtol: float = 1e-5) -> None:
        self.update_activations(("s",), steps=steps, halvings=halvings, rtol=rtol)

    def _p_inverse(self) -> torch.Tensor:
        b, g = self.beta, self.gamma
        lhs = g * self.wd.t() @ self.wd + b * torch.eye(self.wd.shape[1], device=self.wd.device)
        return self._half(torch.cholesky_inverse(torch.linalg.cholesky(lhs)))   # small and well conditioned

    def _p_rows(self, y, s, u, inv) -> torch.Tensor:
        """P ← (γ Y W_d + β act(S)⊙U) (γ W_dᵀ W_d + β I)⁻¹ on these rows."""
        rhs = self.gamma * y @ self.wd + self.beta * self.activation(s, u)
        return self._half(self._half(rhs) @ inv)

    def _u_rows(self, s, p, xu) -> torch.Tensor:
        sig = self.act(s)
        return self._half((self.beta * sig * p + self.alpha * xu) / (self.beta * sig * sig + self.alpha))

    def _s_loss(self, s, p, u, g):
        a = self.act(s)
        return self.beta * (p - (a if u is None else a * u)).pow(2) + self.alpha * (s - g).pow(2)

    def _s_rows(self, s, p, u, xg, steps: int = 5, halvings: int = 6, rtol: float = 1e-5) -> torch.Tensor:
        """Each element of S on these rows, ``chunk`` rows at a time (the tensors of one stay in cache)."""
        out = torch.empty_like(s)
        for lo in range(0, len(s), self.chunk):
            rows = slice(lo, lo + self.chunk)
            ur = u[rows] if self.gated else None
            if self.relu:
                out[rows] = self._relu_s_rows(p[rows], ur, xg[rows])
            elif self.recipe.s_update == "gradient":
                out[rows] = self._gradient_s_rows(s[rows], p[rows], ur, xg[rows])
            else:
                out[rows] = self._update_s_rows(s[rows], p[rows], ur, xg[rows], steps, halvings, rtol)
        return out

    def _relu_s_rows(self, p, u, m) -> torch.Tensor:
        """The exact minimiser for ReLU (the paper's closed form): on S >= 0 the quadratic's minimiser clipped at
        0, on S < 0 min(m, 0) (there the activation term is constant); the better of the two per element."""
        a, b = self.alpha, self.beta
        uu = torch.ones_like(p) if u is None else u
        pos = ((b * uu * p + a * m) / (b * uu * uu + a)).clamp(min=0)
        neg = m.clamp(max=0)
        return torch.where(self._s_loss(pos, p, u, m) <= self._s_loss(neg, p, u, m), pos, neg)

    def _gradient_s_rows(self, s, p, u, g) -> torch.Tensor:
        """The reference's S update for a non-ReLU activation: ``recipe.s_steps`` plain gradient steps of size
        ``recipe.s_lr`` on α (S - X W_1ᵀ)² + β (P - act(S)⊙U)² (summed, so the step scales with α and β), each
        step's S rounded to fp16 with ``recipe.half``."""
        uu = torch.ones_like(p) if u is None else u
        for _ in range(self.recipe.s_steps):
            with torch.enable_grad():
                sv = s.detach().requires_grad_(True)
                a = self.act(sv)
                da, = torch.autograd.grad(a.sum(), sv)     # elementwise activation: its derivative
            grad = -2 * self.beta * (p - a.detach() * uu) * uu * da + 2 * self.alpha * (s - g)
            s = self._half(s - self.recipe.s_lr * grad)
        return s

    def _update_s_rows(self, s, p, u, g, steps: int, halvings: int, rtol: float) -> torch.Tensor:
        """Safeguarded Gauss-Newton on each element; a step is halved only where it raised that element's loss,
        and kept only where the loss did not rise. Stops once a step lowers the chunk's loss by less than
        ``rtol`` relative (then the "rises" are rounding noise, and backtracking on them is all the cost)."""
        uu = torch.ones_like(p) if u is None else u
        for _ in range(steps):
            with torch.enable_grad():
                sv = s.detach().requires_grad_(True)
                a = self.act(sv)
                da, = torch.autograd.grad(a.sum(), sv)     # elementwise activation: its derivative
            a, da = a.detach(), da.detach()
            r = p - a * uu
            base = self.beta * r.pow(2) + self.alpha * (s - g).pow(2)
            grad = -2 * self.beta * r * uu * da + 2 * self.alpha * (s - g)
            curv = 2 * self.beta * (uu * da).pow(2) + 2 * self.alpha
            step = grad / curv
            cand = s - step
            loss = self._s_loss(cand, p, u, g)
            worse = (loss > base * ROUNDING).nonzero(as_tuple=True)
            t = torch.ones_like(step[worse])
            for _ in range(halvings):                     # per-element backtracking on the elements that rose
                if len(t) == 0:
                    break
                t = t * 0.5
                c = s[worse] - t * step[worse]
                lc = self._s_loss(c, p[worse], None if u is None else u[worse], g[worse])
                cand[worse], loss[worse] = c, lc
                still = lc > base[worse] * ROUNDING
                worse, t = tuple(w[still] for w in worse), t[still]
            keep = loss <= base
            s = torch.where(keep, cand, s)
            before = float(base.sum())
            if before - float(torch.where(keep, loss, base).sum()) <= rtol * before:
                break
        return s

    # -- weight updates: least squares, then SparseGPT --------------------------------------------------
    def update_weights(self, target, blocksize: int, percdamp: float, name: str, alternation: int = 0) -> None:
        """``target``: one Sparsity for the MLP's matrices, or {first, up, down: Sparsity} (an allocation's
        per-matrix ratios). ``alternation`` (from 0) matters only to ``recipe.literal``."""
        n = self.n
        gx = self.hx * (n / 2)
        self.name, self.alternation = name, alternation
        literal = self.recipe.literal
        fit = not (literal and alternation == 0)     # the reference's first alternation: SparseGPT as it is
        # the reference damps gate/up's one kept Hessian in place at every prune: after k + 1 prunes its diagonal
        # carries d (1 + (1 + d) + ... + (1 + d)^k) of the original mean diagonal (d itself at the first)
        damp_first = percdamp * sum((1 + percdamp) ** j for j in range(alternation + 1)) if literal else percdamp

        def refit(var, b, label, part, prior, w):
            if fit:
                w = self._xfit(self.v[var] if b is None else _Mapped(self.v[var], lambda t: t - b), percdamp, gx,
                               prior)
            w, _ = sparsegpt_prune(w, self.hx, _part(target, part), blocksize, damp_first, label)
            return self._half(w)

        self.wg = refit("s", self.bg, f"{name}.first", "first", self.dense[0], self.wg)
        if self.gated:
            self.wu = refit("u", self.bu, f"{name}.up", "up", self.dense[1], self.wu)
        ridge_fit = fit and self.recipe.refit == "ridge"
        gram, aty = self._down_sums(check=fit and not ridge_fit, rhs=ridge_fit)
        ha = gram * (2.0 / n)
        w = self._down_fit(percdamp, ha * (n / 2), aty) if fit else self.wd
        self.wd, _ = sparsegpt_prune(w, ha, _part(target, "down"), blocksize, percdamp, f"{name}.down")
        self.wd = self._half(self.wd)

    def _down_input(self, i: int, xg=None, xu=None) -> torch.Tensor:
        """Chunk ``i`` of the down projection's input A: the auxiliary P, or the activations of the current
        first layer(s) (``down_input``)."""
        if self.down_input == "auxiliary":
            return self.v["p"].get(i)
        if xg is None:
            xg, xu = self._get(i, "xg", "xu")
        return self.activation(xg, xu)

    def _down_sums(self, check: bool, rhs: bool):
        """One pass: xg, xu for the re-pruned first layer(s), then AᵀA and (``rhs``) AᵀY of the down projection's
        input A; ``check``: A must be finite (the reference's pseudo-inverse)."""
        gram = aty = None
        for i in self.chunks:
            xg, xu = self._affines(self.v["x"].get(i))
            self._put(i, xg=xg, xu=xu)
            a = self._down_input(i, xg, xu)
            if check:
                self._finite(a, "the down projection's input")
            gram = _add(gram, a.t() @ a)
            if rhs:
                aty = _add(aty, a.t() @ self.v["y"].get(i))
        return gram, aty

    def _xfit(self, t, percdamp: float, gx, prior) -> torch.Tensor:
        """A first-layer re-fit onto ``t`` (whole, or chunks) from X: the project's damped least squares, or the
        reference's pseudo-inverse of X (computed once per MLP, held in fp16 with ``recipe.half``)."""
        t = Chunks.of(t, self.token_chunk) if isinstance(t, torch.Tensor) else t
        xs = self.v["x"]
        if self.recipe.refit == "ridge":
            xt = gram = None
            for i in self.chunks:
                xc = xs.get(i)
                xt = _add(xt, xc.t() @ t.get(i))
                gram = _add(gram, xc.t() @ xc) if gx is None else gx
            return ridge(gram, xt, percdamp, prior=prior)
        if self._xinv is None:     # not token-separable: X whole, once per MLP
            xinv = self._half(torch.pinverse(self._finite(xs.full(), "the MLP input X")))
            self._xinv, lo = Chunks(self.folder, "xinv"), 0
            for i in self.chunks:
                rows = xs.shapes[i][0]
                self._xinv.put(i, xinv[:, lo:lo + rows])
                lo += rows
            del xinv
        out = None
        for i in self.chunks:
            out = _add(out, self._xinv.get(i) @ t.get(i))
        return self._half(out).t()

    def _down_fit(self, percdamp: float, gram, aty) -> torch.Tensor:
        """The down projection's re-fit onto Y from A: the project's damped least squares (from AᵀA and AᵀY);
        the reference's pseudo-inverse of A (gated, its Llama path; A whole: not token-separable), or 10
        gradient steps of 0.01 on the mean squared error from the current weights (plain, its OPT path)."""
        if self.recipe.refit == "ridge":
            return ridge(gram, aty, percdamp, prior=self.dense[2])
        if self.gated:
            a = [self._down_input(i) for i in self.chunks]
            rows = [len(c) for c in a]
            pinv = self._half(torch.pinverse(a[0] if len(a) == 1 else torch.cat(a)))
            del a
            out, lo = None, 0
            for i in self.chunks:
                out = _add(out, pinv[:, lo:lo + rows[i]] @ self.v["y"].get(i))
                lo += rows[i]
            return self._half(out).t()
        w = self.wd.clone()
        for _ in range(10):
            grad = None
            for i in self.chunks:
                a = self._down_input(i)
                grad = _add(grad, (a @ w.t() - self.v["y"].get(i)).t() @ a)
            w -= 0.01 * (2.0 / (self.n * self.wd.shape[0])) * grad
        return self._half(w)

    def _finite(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """``t`` if finite; else the one-line error (the reference's pseudo-inverse fails on such values)."""
        if not bool(torch.isfinite(t).all()):
            raise ElsaError(f"{self.name}: {what} has non-finite values at alternation {self.alternation + 1} "
                            f"(method.refit=reference{', method.half=true' if self.recipe.half else ''}); the "
                            "reference's pseudo-inverse fails on them too; run with method.half=false or "
                            "method.refit=ridge")
        return t

    def sparsegpt_error(self, target, blocksize: int, percdamp: float) -> float:
        """The real MLP error of plain SparseGPT on this MLP (every Linear from its dense weights and dense
        inputs), computed from the initial (dense) state; changes nothing."""
        wg, _ = sparsegpt_prune(self.wg, self.hx, _part(target, "first"), blocksize, percdamp)
        wu = sparsegpt_prune(self.wu, self.hx, _part(target, "up"), blocksize, percdamp)[0] if self.gated else None
        gram = None
        for i in self.chunks:
            p = self.v["p"].get(i)
            gram = _add(gram, p.t() @ p)
        wd, _ = sparsegpt_prune(self.wd, gram * (2.0 / self.n), _part(target, "down"), blocksize, percdamp)
        error = None
        for i in self.chunks:
            x, y = self._get(i, "x", "y")
            a = self.activation(_affine(x, wg, self.bg), _affine(x, wu, self.bu) if self.gated else None)
            error = _add(error, (a @ wd.t() - y).pow(2).sum())
        return float(error) / self.n


def _part(target, key: str) -> Sparsity:
    """One matrix's target: the MLP's one target, or its entry of an allocation's {first, up, down}."""
    return target if isinstance(target, Sparsity) else target[key]


SELECT = ("last", "best")
FALLBACKS = (None, "sparsegpt")
MODES = ("project", "reference")
REFERENCE_SKIP = (1, -2, -1)   # the reference's Llama path runs one alternation on its layers 1, 30 and 31 of 32


@torch.no_grad()
def sparsellm_mlp(first: nn.Linear, up: nn.Linear | None, down: nn.Linear, act, x: torch.Tensor, y: torch.Tensor,
                  target: Sparsity, alpha: float = 0.1, beta: float = 0.1, gamma: float = 0.1, iterations: int = 4,
                  blocksize: int = 128, percdamp: float = 0.01, name: str = "mlp", select: str = "last",
                  relu: bool = False, down_input: str = "pruned", baseline: bool = True,
                  recipe: Recipe | None = None, folder: str | None = None) -> dict:
    """Prune the MLP ``down(act(first x) [* up x])`` in place so that it maps X to Y; returns the objective and
    the real MLP error per alternation (and plain SparseGPT's error on the same MLP, ``baseline``).

    ``select="last"`` keeps the last alternation's weights (the paper); ``"best"`` the alternation with the
    lowest real MLP error. ``recipe``: how the steps are carried out (:class:`Recipe`; None: the project's).
    ``x``, ``y``: tensors or :class:`Chunks`; ``folder`` (``hardware.low_memory``): the per-token variables
    wait there on disk, one chunk resident (the same pruned weights; the bytes are recorded, ``streamed``)."""
    prob = MLPProblem(first, up, down, act, x, y, alpha, beta, gamma, relu=relu, down_input=down_input,
                      recipe=recipe, folder=folder)
    sgpt = prob.sparsegpt_error(target, blocksize, percdamp) if baseline else None
    objective, error, best = [], [], None
    for k in tqdm(range(iterations), desc=f"sparsellm {name}", unit="alt", leave=False):
        if k > 0 or not prob.recipe.literal:     # the reference prunes first, then updates the auxiliaries
            prob.update_activations()
        prob.update_weights(target, blocksize, percdamp, name, k)
        measured = prob.measures()
        objective.append(measured[0])
        error.append(measured[1])
        if select == "best" and error[-1] <= min(error):   # the update methods rebind the weights: no copy
            best = (prob.wg, prob.wu, prob.wd)
    chosen = best if select == "best" else (prob.wg, prob.wu, prob.wd)
    for lin, w in zip((first, up, down), chosen):
        if lin is not None:
            lin.weight.copy_(w.to(lin.weight.dtype))
    log.debug("%s: objective %s -> %s, MLP error %s -> %s (SparseGPT %s)", name, objective[0], objective[-1],
              error[0], error[-1], sgpt)
    out = {"objective": objective, "mlp_error": error, "mlp_error_sparsegpt": sgpt,
           "kept": error.index(min(error)) if select == "best" else len(error) - 1}
    if folder is not None:
        out["streamed"] = {"variables": sorted(prob.v) + (["xinv"] if prob._xinv is not None else []),
                           "tokens": prob.n, "chunk_tokens": prob.token_chunk, "disk_bytes": prob.disk_bytes()}
    return out


@torch.no_grad()
def mlp_io(block: nn.Module, first: nn.Module, down: nn.Module, inputs, folder: str | None = None):
    """The MLP's input tokens X (``first``'s input) and its dense output Y (``down``'s output, bias included)
    over every batch, float32, (tokens, features); with ``folder`` as :class:`Chunks` on disk there
    (:data:`TOKEN_CHUNK` rows each), the batches written as they come."""
    xs, ys = ([], []) if folder is None else \
        (_Rows(Chunks(folder, "x_in"), TOKEN_CHUNK), _Rows(Chunks(folder, "y_in"), TOKEN_CHUNK))
    add_x, add_y = (xs.append, ys.append) if folder is None else (xs.add, ys.add)
    handles = [first.register_forward_hook(lambda _m, a, _o: add_x(a[0].reshape(-1, a[0].shape[-1]).float())),
               down.register_forward_hook(lambda _m, _a, o: add_y(o.reshape(-1, o.shape[-1]).float()))]
    try:
        for h, kw in inputs:
            block(h, **kw)
    finally:
        for handle in handles:
            handle.remove()
    return (torch.cat(xs), torch.cat(ys)) if folder is None else (xs.close(), ys.close())


@dataclass(frozen=True)
class BlockList(Rule):
    """method.skip: null or a list of block indices (whole numbers, negative ones from the end)."""

    def ok(self, value) -> bool:
        return value is None or isinstance(value, (list, tuple)) and \
            all(isinstance(i, int) and not isinstance(i, bool) for i in value)

    def allowed(self) -> str:
        return ("a list of block indices, negative ones from the end (e.g. [1,-2,-1], the reference's layers 1, 30, "
                "31 of 32), [] for none, or null (the mode's)")


PENALTY = Number(gt=0, also=(None,), paper="0.1; the reference code's Llama path: 5.0")   # alpha, beta, gamma:
#   the weights of the auxiliary variables' penalties (null: the mode's, SparseLLM.weights)


class SparseLLM(SparseGPT, name="sparsellm", position=5):
    def matrix_flops(self, out_features: int, in_features: int, tokens: int) -> float:
        """SparseGPT's count plus, per alternation, a re-fit and a pass over the tokens (4 out in per token)."""
        return super().matrix_flops(out_features, in_features, tokens) + \
            self.iterations * (4.0 * out_features * in_features * tokens + in_features ** 3)

    def __init__(self, alpha: Annotated[float | None, PENALTY] = None, beta: Annotated[float | None, PENALTY] = None,
                 gamma: Annotated[float | None, PENALTY] = None,
                 iterations: Annotated[int, Number(gt=0, whole=True, paper="4")] = 4,
                 percdamp: Annotated[float, PERCDAMP] = 0.01,
                 blocksize: Annotated[int, Number(gt=0, whole=True, paper="128")] = 128,
                 batch_size: Annotated[int, BATCH] = 8,
                 select: Annotated[str, Choice(SELECT, "last (the paper) or best (lowest real MLP error)")] = "last",
                 fallback: Annotated[str | None, Choice(FALLBACKS, "null (refuse a block whose MLP SparseLLM does not "
                                                        "model) or sparsegpt (prune such blocks by SparseGPT, "
                                                        "recorded)")] = None,
                 down_input: Annotated[str | None, Choice((None, *DOWN_INPUTS), "pruned (the activations of the "
                                                          "re-pruned first layer(s)) or auxiliary (the auxiliary P) "
                                                          "or null (the mode's)")] = None,
                 mode: Annotated[str, Choice(MODES, "project (this project's SparseLLM) or reference (the algorithm "
                                             "of BaiTheBest/SparseLLM's code; README, SparseLLM)")] = "project",
                 refit: Annotated[str | None, Choice((None, *REFITS), "ridge (least squares damped per channel "
                                                     "towards the dense weights) or reference (the reference's "
                                                     "undamped pseudo-inverse) or null (the mode's)")] = None,
                 s_update: Annotated[str | None, Choice((None, *S_UPDATES), "exact (S's elementwise minimiser) or "
                                                        "gradient (the reference's method.s_steps gradient steps of "
                                                        "method.s_lr) or null (the mode's)")] = None,
                 s_steps: Annotated[int, Number(gt=0, whole=True, paper="the reference code: 2")] = 2,
                 s_lr: Annotated[float, Number(gt=0, paper="the reference code: 0.01")] = 0.01,
                 half: Annotated[bool, Flag("true (round to fp16 where the reference holds fp16) or false")] = False,
                 skip: Annotated[list[int] | None, BlockList()] = None):
        super().__init__(percdamp, blocksize, batch_size)
        self.fallback = fallback
        self.fallback_blocks: list[str] = []
        self.n_blocks = 0
        self.mode = mode
        ref = mode == "reference"
        self.select = select
        self.down_input = down_input if down_input is not None else ("auxiliary" if ref else "pruned")
        self.alpha, self.beta, self.gamma, self.iterations = alpha, beta, gamma, int(iterations)
        self.recipe = Recipe(refit if refit is not None else ("reference" if ref else "ridge"),
                             s_update if s_update is not None else ("gradient" if ref else "exact"),
                             int(s_steps), float(s_lr), half, literal=ref)
        self.skip = None if skip is None else [int(i) for i in skip]
        self.block_index: dict[str, int] = {}
        self.skipped_blocks: list[str] = []

    def weights(self, kind: str) -> tuple[float, float, float]:
        """α, β, γ for an MLP of ``kind``: as set, else the mode's (the reference: 5.0 on its gated Llama path,
        0.1 on its plain OPT path; the project: 0.1, only their ratios enter its updates)."""
        default = 5.0 if self.mode == "reference" and kind == "gated" else 0.1
        return tuple(default if v is None else float(v) for v in (self.alpha, self.beta, self.gamma))

    def skipped(self, kind: str) -> set[int]:
        """Indices of the blocks whose MLP gets no alternation beyond the first (plain SparseGPT): method.skip,
        else the mode's (the reference: the second and the last two blocks on its gated Llama path)."""
        skip = self.skip if self.skip is not None else \
            (REFERENCE_SKIP if self.mode == "reference" and kind == "gated" else ())
        n = self.n_blocks
        if skip and not n:
            raise ElsaError("method=sparsellm: method.skip needs the model's blocks (validate() first)")
        return {i % n for i in skip if -n <= i < n}

    def validate(self, plan) -> None:
        """Right after load, before any calibration: every block's MLP must be one SparseLLM models (traced on
        a few tokens), or the user asked for the SparseGPT fallback."""
        model = plan.model
        super().validate(plan)
        blocks, prefix = blocks_and_prefix(model)
        self.n_blocks = len(blocks)
        self.block_index = {f"{prefix}.{i}": i for i in range(len(blocks))}
        bad_skip = [i for i in self.skip or () if not -len(blocks) <= i < len(blocks)]
        if bad_skip:
            raise config_error("method.skip", list(self.skip), f"block indices of this model's {len(blocks)} blocks "
                               f"(0 to {len(blocks) - 1}, or -{len(blocks)} to -1 from the end)")
        found = model_mlp_structures(plan)
        bad = [i for i, s in enumerate(found) if s is None]
        self.fallback_blocks = [f"{prefix}.{i}" for i in bad]
        self.skipped_blocks = []
        skip = sorted({i for st in found if st is not None for i in self.skipped(st.kind)})
        if skip:
            log.warning("sparsellm: one alternation (plain SparseGPT) on the MLP of block(s) %s of %d (method.skip%s)",
                        ", ".join(map(str, skip)), len(blocks), "" if self.skip is not None else
                        ": the reference's second and last two blocks")
        if bad and self.fallback is None:
            lins = ", ".join(f"{m.local} {list(lin.weight.shape)}" for m, lin in plan.block(bad[0]).matrices().items())
            raise ElsaError(f"method=sparsellm cannot model the MLP of block {prefix}.{bad[0]} ({len(bad)}/"
                            f"{len(blocks)} blocks): its weight matrices are {lins or 'none'}; SparseLLM here "
                            "supports fc2(act(fc1 x)) and the gated down(act(gate x) * up x) with separate Linears "
                            "and an elementwise activation module. Set method.fallback=sparsegpt to prune such "
                            "blocks by SparseGPT (recorded in results.json and the report)")
        if bad:
            log.warning("sparsellm: SparseGPT fallback on %d/%d blocks (method.fallback=sparsegpt): %s",
                        len(bad), len(blocks), ", ".join(self.fallback_blocks))

    def _structure(self, view: BlockPlan, inputs):
        """The MLP SparseLLM models in the block (traced on its first batch), or None."""
        block, (h0, kw0) = view.module, inputs[0]
        return mlp_structure(block, trace_calls(_planned_linears(view), lambda: block(h0, **kw0)))

    def separable(self, view: BlockPlan, inputs) -> bool:
        """The SparseGPT fallback's blocks (no MLP SparseLLM models, e.g. an MoE's): every matrix from its own
        Hessian, so hardware.low_memory may prune them in groups."""
        return self.fallback == "sparsegpt" and self._structure(view, inputs) is None

    def prune_block(self, view: BlockPlan, stats: dict[MatrixId, Any], inputs,
                    only: set[MatrixId] | None = None) -> dict:
        block, prefix = view.module, view.prefix
        structure = self._structure(view, inputs)
        if only is not None and structure is not None:
            raise RuntimeError(f"sparsellm: block {prefix} couples its MLP; it cannot be pruned in groups")
        if structure is None:
            if self.fallback != "sparsegpt":   # validate() refuses this before any model work
                raise ElsaError(f"method=sparsellm cannot model the MLP of block {prefix} "
                                "(set method.fallback=sparsegpt)")
            if prefix not in self.fallback_blocks:
                self.fallback_blocks.append(prefix)
            return LayerwisePruner.prune_block(self, view, stats, inputs, only)
        skip = self.skipped(structure.kind)
        if skip and prefix not in self.block_index:
            raise ElsaError(f"method=sparsellm: block {prefix} is not one of the blocks validate() found")
        if self.block_index.get(prefix) in skip:   # one alternation only: the reference's opt_epochs = 1
            self.skipped_blocks.append(prefix)
            return LayerwisePruner.prune_block(self, view, stats, inputs)
        return self._prune_mlp(view, stats, inputs, structure)

    def _prune_mlp(self, view: BlockPlan, stats: dict[MatrixId, Any], inputs, structure: MLPStructure) -> dict:
        """The block's other matrices by SparseGPT, its MLP by the alternations. With ``hardware.low_memory``
        (``spill``: the walk's folder) the MLP problem's per-token variables wait on disk in a folder of their
        own, removed after the block, errors included."""
        block, prefix = view.module, view.prefix
        mods = {n: block.get_submodule(n) for n in structure.names()}
        first, up, down = mods[structure.first], mods.get(structure.up), mods[structure.down]
        folder = tempfile.mkdtemp(prefix="sparsellm-", dir=self.spill) if self.spill is not None else None
        try:
            x, y = mlp_io(block, first, down, inputs, folder)    # before any pruning: the dense block's view
            per_layer = {}
            for mid, lin in view.matrices().items():
                if mid.local not in mods:
                    per_layer[view.name(mid)] = self.prune_linear(view.name(mid), lin, stats[mid], view.target(mid))
            # each of the MLP's matrices to its own target in the plan (an allocation's ratios)
            mlp_target = {part: view.target(MatrixId(view.index, path)) if path else None for part, path in
                          (("first", structure.first), ("up", structure.up), ("down", structure.down))}
            out = sparsellm_mlp(first, up, down, structure.act, x, y, mlp_target, *self.weights(structure.kind),
                                self.iterations, self.blocksize, self.percdamp, f"{prefix}.{structure.down}",
                                self.select, structure.relu, self.down_input, recipe=self.recipe, folder=folder)
        finally:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
        out["structure"] = {"kind": structure.kind, "first": structure.first, "up": structure.up,
                            "down": structure.down, "activation": type(structure.act).__name__}
        parents = {n.rpartition(".")[0] for n in structure.names()}
        parent = parents.pop() if len(parents) == 1 else ""
        per_layer[f"{prefix}.{parent}" if parent else f"{prefix}.mlp({structure.first},{structure.down})"] = out
        return per_layer

    def summarize(self, per_layer: dict[str, dict]) -> dict:
        linears = {k: v for k, v in per_layer.items() if "objective" not in v}
        mlps = {k: v for k, v in per_layer.items() if "objective" in v}
        out = super().summarize(linears)
        out["mlp_objective"] = {k: v["objective"] for k, v in mlps.items()}
        out["mlp_error"] = {k: v["mlp_error"] for k, v in mlps.items()}
        out["mlp_error_sparsegpt"] = {k: v["mlp_error_sparsegpt"] for k, v in mlps.items()}
        out["mlp_kept_alternation"] = {k: v["kept"] for k, v in mlps.items()}
        out["mlp_structure"] = {k: v["structure"] for k, v in mlps.items()}
        streamed = {k: v["streamed"] for k, v in mlps.items() if "streamed" in v}
        if streamed:     # hardware.low_memory: the engine's low_memory entry carries it
            out["low_memory"] = {"streamed": {
                "what": "the MLP problem's per-token variables (X, Y, X W_1ᵀ, X W_uᵀ, S, U, P) on disk, one chunk of "
                        "each resident; every update chunk by chunk, the sums over tokens added in the usual order",
                "blocks": len(streamed), "chunk_tokens": max(v["chunk_tokens"] for v in streamed.values()),
                "disk_bytes": {k: v["disk_bytes"] for k, v in streamed.items()},
                "peak_disk_bytes": max(v["disk_bytes"] for v in streamed.values())}}
        rising = [k for k, v in mlps.items() if any(b > a * (1 + 1e-3) for a, b in zip(v["mlp_error"],
                                                                                        v["mlp_error"][1:]))]
        out["mlp_error_rises_in"] = rising
        if mlps:
            out["mlp_error_vs_sparsegpt"] = {
                "measure": "per block: real MLP error ||mlp(X) - Y||^2 / n on the calibration tokens, kept "
                           "alternation / plain SparseGPT on the same MLP",
                "ratio": {k: v["mlp_error"][v["kept"]] / v["mlp_error_sparsegpt"] if v["mlp_error_sparsegpt"]
                          else None for k, v in mlps.items()}}
        of = max(self.n_blocks, len(self.fallback_blocks))
        if self.fallback_blocks:
            out["fallback"] = {"method": self.fallback, "blocks": list(self.fallback_blocks), "of": of}
            out.setdefault("notes", []).append(notes.fallback(self.fallback, "sparsellm", list(self.fallback_blocks), of))
        if mlps:     # its alternations' solves round differently with the thread count (docs/results.md)
            out.setdefault("notes", []).append(notes.thread_dependence("sparsellm", torch.get_num_threads()))
        if self.mode != "project" or self.recipe != Recipe() or self.skip:
            out["recipe"] = {"mode": self.mode, "down_input": self.down_input, **asdict(self.recipe),
                             "alpha_beta_gamma": {k: self.weights(k) for k in ("gated", "plain")}}
        if self.skipped_blocks:
            out["skipped"] = {"blocks": list(self.skipped_blocks), "of": self.n_blocks,
                              "what": "one alternation, i.e. plain SparseGPT on the MLP (method.skip; the "
                                      "reference's opt_epochs = 1)"}
        return out
