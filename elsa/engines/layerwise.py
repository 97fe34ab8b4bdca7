"""The layer-wise one-shot engine shared by every layer-wise method (Wanda, SparseGPT, ...).

The walk, as in the published one-shot methods:

1. run the model on the calibration windows and capture what the blocks receive: block 0's hidden states
   and every keyword argument the model passes EACH block (attention mask, position ids, rotary
   ``position_embeddings``...; models with mixed layer types give sliding and full layers different ones).
   Nothing is model-specific: the capture is a forward pre-hook on every block, and each block is re-run
   with its own captured kwargs;
2. for each block in order: run it over all calibration batches with hooks on its weight matrices
   (Linear, Conv1D, and every expert of a fused expert tensor: see :class:`elsa.model.structure.Weight`) that feed
   the method's statistics, let the method prune (and update) every matrix from those statistics (all
   matrices of a block see the dense block's inputs, the standard of SparseGPT/Wanda), then re-run the
   pruned block to produce the next block's inputs. An expert's statistics come from exactly the tokens its
   router sends it (read from the expert computation itself); an expert that receives no calibration token
   is pruned by magnitude within that expert, logged and counted (``experts_without_tokens``). A method that couples the Linears of a block (SparseLLM's
   MLP) overrides ``prune_block``, which gets the block's captured inputs too.

Only one block's inputs, statistics and (on an accelerator) weights are alive at a time: with a CUDA device
the model stays on the CPU and one block at a time moves to the device.

Linear layers that receive the *same* input tensor (q/k/v, gate/up in Llama blocks) share one statistics
object, found structurally on the first batch; methods must treat ``stats`` as read-only.
"""
from __future__ import annotations

import inspect
import logging
import math
import os
import tempfile
import time
from torch.overrides import TorchFunctionMode
from typing import Annotated, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from elsa.methods.base import PruneContext, Pruner
from elsa.methods.registry import LAYER_WISE, Number
from elsa.errors import ElsaError
from elsa.eval.memory import phase_window
from elsa.methods import notes
from elsa.model.structure import Matrix, Weight, decoder_blocks, expert_tensors, in_moe
from elsa.sparsity.plan import BlockPlan, MatrixId, PruningPlan
from elsa.sparsity.patterns import Sparsity, mask_from_scores

log = logging.getLogger(__name__)


class _Captured(Exception):
    """Raised by the last block's pre-hook to stop the model's forward once every block's inputs are captured."""


BATCH = Number(gt=0, whole=True, paper="8")   # calibration windows per block forward
NO_TOKENS = object()      # the stats of a matrix that saw no calibration token (an expert nobody routed to)


def prune_by_magnitude(matrix: Matrix, target: Sparsity) -> None:
    """The rule for an expert that received no calibration token: magnitude within that expert."""
    matrix.weight.mul_(mask_from_scores(matrix.weight.abs(), target, "layer").to(matrix.weight.dtype))


def reconstruction_summary(errors: dict[str, float]) -> dict:
    """results.json's ``method_stats.reconstruction``: per-matrix relative output errors and their spread."""
    values = list(errors.values())
    return {"measure": "||x (W - W_dense)^T|| / ||x W_dense^T|| per matrix, over the tokens it receives in the "
                       "pruned model's walk", "per_matrix": errors,
            "mean": sum(values) / len(values) if values else None, "max": max(values, default=None)}


class LayerwisePruner(Pruner):
    """A method driven by :class:`LayerwiseEngine`. Subclasses implement the three per-Linear hooks below
    (and may override the per-block ``prune_block``)."""

    family = LAYER_WISE     # calibration; offload: the engine moves one block at a time to the device
    spill: str | None = None   # hardware.low_memory: the walk's folder on disk, for what a method streams itself
    square_stats = False    # statistics of in_features² per matrix (a Hessian): hardware.low_memory collects
                            # them one fused expert at a time; per-feature ones (Wanda's norms) all at once

    def __init__(self, batch_size: Annotated[int, BATCH] = 8):
        self.batch_size = int(batch_size)
        self.without_tokens: list[str] = []      # the matrices the no-token rule pruned in the last run

    def stats_init(self, name: MatrixId, linear: nn.Linear) -> Any:
        """A fresh statistics object for one matrix ``name`` (or a group of matrices sharing one input)."""
        return None

    def accumulate(self, stats: Any, x: torch.Tensor) -> Any:
        """Add one batch of inputs ``x`` (tokens, in_features) to ``stats``; return the new stats."""
        return stats

    def prune_linear(self, name: str, linear: nn.Linear, stats: Any, target: Sparsity) -> dict | None:
        """Prune ``linear`` in place to ``target``; optional per-layer statistics for results.json."""
        raise NotImplementedError

    def prune_block(self, block: BlockPlan, stats: dict[MatrixId, Any],
                    inputs: list[tuple[torch.Tensor, dict]], only: set[MatrixId] | None = None) -> dict[str, dict]:
        """Prune every planned matrix of ``block`` (each to its target in the plan); by default one
        :meth:`prune_linear` each, named by its full name.

        ``inputs`` are the (hidden states, kwargs) batches the block receives, for methods that need more than
        per-Linear statistics (SparseLLM re-runs the block to read its MLP's input and dense output).
        ``only``: the matrices to prune this call (``hardware.low_memory`` prunes a block in groups; a method
        that overrides this walks as usual, see :meth:`separable`).
        Returns the per-layer dicts for :meth:`summarize`."""
        per_layer = {}
        for mid, lin in block.matrices().items():
            if only is not None and mid not in only:
                continue
            name = block.name(mid)
            if stats[mid] is NO_TOKENS:
                prune_by_magnitude(lin, block.target(mid))
                self.without_tokens.append(name)
                continue
            out = self.prune_linear(name, lin, stats[mid], block.target(mid))
            if out:
                per_layer[name] = out
        return per_layer

    def summarize(self, per_layer: dict[str, dict]) -> dict:
        """Method statistics for results.json from the per-layer dicts ``prune_linear`` returned."""
        return {}

    def separable(self, block: BlockPlan, inputs) -> bool:
        """Whether ``block``'s matrices are each pruned from their own statistics alone (the base
        ``prune_block``), so that ``hardware.low_memory`` may collect and prune them in groups with the same
        result; a method that overrides it (SparseLLM's coupled MLP, SAFE, DSnoT) says no and walks as usual."""
        return type(self).prune_block is LayerwisePruner.prune_block

    def prune(self, ctx: PruneContext) -> dict:
        engine = LayerwiseEngine(ctx.model, ctx.device, self.batch_size, ctx.extras.get("low_memory", False))
        return engine.run(self, ctx.calibration, ctx.plan)


class _DenseCopy:
    """A block's dense weights before pruning, for the re-run's error measure, by the path of each weight of
    the block's plan and expert: in memory, or on disk under ``spill`` (``hardware.low_memory``: one file per
    matrix, each expert's its own, read back when used)."""

    def __init__(self, weights: dict[str, Weight], spill: str | None = None):
        self.weights, self.spill, self.tensors, self.files = weights, spill, {}, {}
        for path, w in weights.items():
            if spill is None:
                self.tensors[path] = w.param.detach().clone()
                continue
            for e in (range(w.experts) if w.experts is not None else [None]):
                self.files[path, e] = os.path.join(spill, f"{len(self.files)}.pt")
                torch.save(w.view(w.param.detach(), e).clone(), self.files[path, e])

    def matrix(self, path: str, expert: int | None = None) -> torch.Tensor:
        """The dense ``[out, in]`` matrix (an expert's) of the weight at ``path``."""
        if self.spill is None:
            return self.weights[path].view(self.tensors[path], expert)
        return torch.load(self.files[path, expert], weights_only=True)

    def close(self) -> None:
        for path in self.files.values():
            os.remove(path)
        self.tensors, self.files = {}, {}


class _Outside:
    """``hardware.low_memory``: the parameters outside the decoder blocks (embeddings, head, final norm) wait on
    disk while the walk prunes the blocks (it reads only the captured hidden states and arguments); restored bit
    for bit after the walk, errors included."""

    def __init__(self, model: nn.Module, blocks: nn.ModuleList, spill: str):
        inside = {id(p) for b in blocks for p in b.parameters()}
        self.saved: list[tuple[nn.Parameter, str]] = []
        for p in {id(p): p for p in model.parameters() if id(p) not in inside}.values():   # tied: once
            path = os.path.join(spill, f"outside-{len(self.saved)}.pt")
            torch.save(p.data, path)
            self.saved.append((p, path))
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)

    def restore(self) -> None:
        for p, path in self.saved:
            p.data = torch.load(path, weights_only=True)
            os.remove(path)
        self.saved = []


_LINEAR = {torch.nn.functional.linear, torch._C._nn.linear}
_MATMUL = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm}


class _ExpertInputs(TorchFunctionMode):
    """Sees, during a block's forward, the input of every expert matrix of the block's fused expert tensors:
    the model slices a tensor (``w[e]``) and applies the slice to the tokens routed to expert ``e``, with
    ``F.linear(x, w[e])`` (storage ``[out, in]``) or ``x @ w[e]`` (storage ``[in, out]``). Structural: it
    follows the parameter objects, whatever the module or model is called."""

    def __init__(self, weights: dict[str, Weight], on_call):
        """``on_call(name, expert, x, out)`` for every application of expert ``expert`` of weight ``name`` to
        tokens ``x`` (2-D) with result ``out`` (2-D, without any bias)."""
        super().__init__()
        self.params = {id(w.param): (name, w) for name, w in weights.items()}
        self.views: dict[int, tuple[str, Weight, int, torch.Tensor]] = {}
        self.on_call = on_call

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.Tensor.__getitem__ and id(args[0]) in self.params:
            index = args[1]
            if isinstance(index, torch.Tensor) and index.numel() == 1 and not index.is_floating_point():
                index = int(index)
            if isinstance(index, int):
                name, w = self.params[id(args[0])]
                self.views[id(out)] = (name, w, index, out)     # the view is kept: its id stays unique
        elif len(args) > 1 and id(args[1]) in self.views and (func in _LINEAR or func in _MATMUL):
            name, w, expert, _ = self.views[id(args[1])]
            transposed = func in _MATMUL
            if transposed != w.transposed:
                raise ElsaError(f"expert tensor {name} is applied as {'x @ w' if transposed else 'F.linear(x, w)'}, "
                                f"but its module says is_transposed={w.transposed}: its layout is ambiguous")
            x = args[0]
            self.on_call(name, expert, x.reshape(-1, x.shape[-1]), out.reshape(-1, out.shape[-1]))
        return out


def _check_experts_seen(view: BlockPlan, seen: set[MatrixId]) -> None:
    """Refuse a fused expert tensor none of whose experts was seen applied to tokens."""
    for path, w in view.weights.items():
        if w.experts is not None and not any(MatrixId(view.index, path, e) in seen for e in range(w.experts)):
            raise ElsaError(f"no expert of {path} {list(w.param.shape)} was seen applied to the tokens (elsa "
                            "reads w[e] followed by F.linear or @); this model computes its experts another way")


def _move_outside_blocks(model: nn.Module, blocks: nn.ModuleList, device) -> None:
    """Move every parameter and buffer that is not inside a decoder block (embeddings, rotary, norm, head)."""
    inside = {id(m) for b in blocks for m in b.modules()} | {id(blocks)}
    for mod in model.modules():
        if id(mod) in inside:
            continue
        for key, p in mod._parameters.items():
            if p is not None and p.device != torch.device(device):
                p.data = p.data.to(device)
        for key, b in mod._buffers.items():
            if b is not None:
                mod._buffers[key] = b.to(device)


def _split_arguments(module: nn.Module, args: tuple, kw: dict) -> tuple[torch.Tensor, dict]:
    """A block's call as (hidden states, every other argument by keyword): models that pass arguments
    positionally (GPT-2 passes the cache, cache position and mask so) are re-run with the same values."""
    kw = dict(kw)
    if len(args) <= 1:
        return (args[0] if args else kw.pop("hidden_states")), kw
    sig = inspect.signature(module.forward)
    bound = sig.bind_partial(*args, **kw).arguments
    names = list(sig.parameters)
    hidden = bound.pop(names[0])
    for name, param in sig.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD and name in bound:
            bound.update(bound.pop(name))
        elif param.kind is inspect.Parameter.VAR_POSITIONAL and bound.get(name):
            raise RuntimeError(f"{type(module).__name__} takes extra positional arguments (*{name}); the engine "
                               "cannot re-run it by keyword")
    return hidden, bound


def _hidden(out):
    """A block returns its hidden states, or a tuple starting with them (older transformers)."""
    return out[0] if isinstance(out, (tuple, list)) else out


class LayerwiseEngine:
    """Walks the decoder blocks of ``model`` once; see the module docstring."""

    def __init__(self, model: nn.Module, device: str = "cpu", batch_size: int = 8, low_memory: bool = False):
        """``low_memory`` (hardware.low_memory): a block's fused experts are collected and pruned one at a time
        (one forward over the calibration batches each; the same statistics, so the same pruned weights) and
        its dense copy waits on disk, in the blocks the method calls separable (:meth:`LayerwisePruner.separable`)."""
        self.model, self.device, self.batch_size = model, torch.device(device), max(1, int(batch_size))
        self.low_memory = bool(low_memory)
        self.blocks = decoder_blocks(model)
        self.offload = self.device.type != "cpu"

    # -- capture ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def capture(self, calibration: torch.Tensor) -> tuple[list[torch.Tensor], list[list[dict]]]:
        """The hidden states block 0 receives (one entry per calibration batch) and the keyword arguments the
        model passes to EVERY block, ``kwargs[block][batch]``.

        Models with mixed layer types hand each block its own attention mask and rotary embeddings
        (sliding vs full attention), so every block is re-run with its own arguments, never block 0's.
        The dense forward runs once per batch through all blocks but the last (a pre-hook on the last block
        stops it); the kwargs are kept by reference, so tensors the model shares between blocks are stored once.
        """
        hiddens: list[torch.Tensor] = []
        kwargs: list[list[dict]] = [[] for _ in self.blocks]
        last = len(self.blocks) - 1

        def grab(index):
            def fn(module, args, kw):
                hidden, kw = _split_arguments(module, args, kw)
                if index == 0:
                    hiddens.append(hidden)
                kwargs[index].append(kw)
                if index == last:
                    raise _Captured
            return fn

        handles = [b.register_forward_pre_hook(grab(i), with_kwargs=True) for i, b in enumerate(self.blocks)]
        try:
            for i in range(0, len(calibration), self.batch_size):
                ids = calibration[i:i + self.batch_size].to(self.device)
                try:
                    self.model(input_ids=ids, use_cache=False)
                except _Captured:
                    pass
        finally:
            for handle in handles:
                handle.remove()
        expected = -(-len(calibration) // self.batch_size)
        if any(len(k) != expected for k in kwargs):
            raise RuntimeError("the decoder blocks were not all reached by the model's forward")
        return hiddens, kwargs

    # -- the walk --------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, method: LayerwisePruner, calibration: torch.Tensor, plan: PruningPlan | Sparsity,
            keep_outputs: bool = False) -> dict:
        """Prune every block with ``method`` as ``plan`` says (a target alone: every matrix of the model at it).
        With ``keep_outputs`` the last block's (pruned) outputs are kept in ``self.outputs`` (the tests compare
        them with a plain forward)."""
        t0 = time.perf_counter()
        if isinstance(plan, Sparsity):
            plan = PruningPlan.build(self.model, plan)
        was_training = self.model.training
        self.model.eval()
        method.without_tokens = []
        experts_impl = self._eager_experts()
        spill = tempfile.TemporaryDirectory(prefix="elsa-dense-") if self.low_memory else None
        method.spill = spill and spill.name
        outside = None
        if self.offload:
            self.model.to("cpu")
            _move_outside_blocks(self.model, self.blocks, self.device)
        try:
            hiddens, block_kwargs = self.capture(calibration)
            if self.offload:
                _move_outside_blocks(self.model, self.blocks, "cpu")
            if spill is not None:
                outside = _Outside(self.model, self.blocks, spill.name)
            found = {"per_layer": {}, "errors": {}, "lean": 0}
            last = len(self.blocks) - 1
            per_block: list[dict] = []
            for index, block in enumerate(tqdm(self.blocks, desc=f"{type(method).__name__.lower()} blocks",
                                               unit="block", leave=False)):
                record = {"block": index, "tokens": sum(int(h.shape[:-1].numel()) for h in hiddens)}
                with phase_window(str(self.device), record):
                    if self.offload:
                        block.to(self.device)
                    batches = list(zip(hiddens, block_kwargs[index]))
                    outputs = self._prune_one(method, plan.block(index), batches, spill and spill.name, found)
                    if index < last or keep_outputs:
                        hiddens = outputs
                    block_kwargs[index] = None       # this block's arguments are no longer needed
                    if self.offload:
                        block.to("cpu")
                per_block.append(record)
            self.outputs = hiddens if keep_outputs else None
        finally:
            if outside is not None:
                outside.restore()
            if self.offload:
                self.model.to("cpu")
            self.model.train(was_training)
            if experts_impl is not None:
                self.model.set_experts_implementation(experts_impl)
            if spill is not None:
                spill.cleanup()
            method.spill = None
        return self._summary(method, found, per_block, time.perf_counter() - t0)

    def _prune_one(self, method: LayerwisePruner, view: BlockPlan, batches, spill: str | None, found: dict):
        """Prune one block (collect its statistics, prune, re-run measuring each matrix's error); its per-layer
        dicts, errors and whether it walked lean go into ``found``. Returns the block's outputs. With ``spill``
        (hardware.low_memory) and a block the method calls separable: the lean walk, dense copy on disk."""
        if spill is not None and method.separable(view, batches):
            found["lean"] += 1
            dense = _DenseCopy(view.weights, spill)
            found["per_layer"].update(self._prune_lean(method, view, batches))
        else:
            stats = self._collect(method, view, batches)
            dense = _DenseCopy(view.weights)
            found["per_layer"].update(method.prune_block(view, stats, batches))
            del stats
        outputs, block_errors = self._rerun_measuring(view, batches, dense)
        found["errors"].update({view.name(mid): e for mid, e in block_errors.items()})
        dense.close()
        return outputs

    def _summary(self, method: LayerwisePruner, found: dict, per_block: list[dict], seconds: float) -> dict:
        """results.json's method_stats of the walk: the method's summary and the engine's records."""
        summary = method.summarize(found["per_layer"])
        own = summary.pop("low_memory", {})     # what the method streamed itself (SparseLLM's MLP variables)
        summary["engine_s"] = seconds
        summary["per_block"] = per_block     # time, CPU time, peak memory and calibration tokens of each block
        if self.low_memory:
            what = "the weights outside the blocks on disk during the walk; in the lean blocks the Hessians of " \
                   "fused experts collected one expert at a time (one forward each) and the dense copy on disk"
            if found["lean"] < len(self.blocks):
                what += f"; the other blocks walked as usual ({type(method).__name__} couples their matrices)"
            summary["low_memory"] = {"blocks": found["lean"], "of": len(self.blocks), "what": what, **own}
        summary["reconstruction"] = reconstruction_summary(found["errors"])
        if method.without_tokens:
            log.warning("%d expert matrices received no calibration token; pruned by magnitude within the expert: %s",
                        len(method.without_tokens), ", ".join(method.without_tokens[:4]))
            note = notes.experts_without_tokens(list(method.without_tokens), "magnitude within the expert")
            summary.setdefault("notes", []).append(note)
            summary["experts_without_tokens"] = {k: note.data[k] for k in ("rule", "count", "names")}  # the old key
        return summary

    def _rerun_measuring(self, view: BlockPlan, batches, dense: _DenseCopy):
        """Re-run the pruned block (its outputs feed the next block) and measure, for every matrix and expert,
        the relative output error ||x (W - W_dense)^T|| / ||x W_dense^T|| over the tokens it receives in the
        pruned model: the common yardstick of every layer-wise method (llm-compressor reports one per layer)."""
        block, weights = view.module, view.weights
        hooked = {name: w for name, w in weights.items() if w.experts is None}
        stacked = {name: w for name, w in weights.items() if w.experts is not None}
        sums: dict[MatrixId, list[float]] = {}

        def add(name, x, y, delta_w, branch=None):
            delta = torch.nn.functional.linear(x, delta_w)          # x (W - W_dense)^T
            if branch is not None:                                  # a dense branch added to the output (OATS)
                delta = delta + branch(x)
            acc = sums.setdefault(name, [0.0, 0.0])
            # squared norms accumulated in float64 without a float64 copy of the outputs (1.8x faster at 7B
            # widths: these sums were ~8% of a llama2-7b block's Wanda walk)
            acc[0] += float(torch.linalg.vector_norm(delta, dtype=torch.float64)) ** 2
            acc[1] += float(torch.linalg.vector_norm(y - delta, dtype=torch.float64)) ** 2    # x W_dense^T

        def hook(name, w):
            def fn(module, inputs, output):
                x = inputs[0].reshape(-1, inputs[0].shape[-1])
                y = output.reshape(-1, output.shape[-1])
                bias = getattr(module, "bias", None)
                if bias is not None:
                    y = y - bias
                add(MatrixId(view.index, name), x, y, w.view(w.param) - dense.matrix(name),
                    getattr(module, "lowrank", None))
            return fn

        def expert_call(name, expert, x, out):
            w = stacked[name]
            if x.shape[0]:
                add(MatrixId(view.index, name, expert), x, out, w.view(w.param, expert) - dense.matrix(name, expert))

        handles = [w.module.register_forward_hook(hook(name, w)) for name, w in hooked.items()]
        try:
            if stacked:
                with _ExpertInputs(stacked, expert_call):
                    outputs = [_hidden(block(h, **kw)) for h, kw in batches]
            else:
                outputs = [_hidden(block(h, **kw)) for h, kw in batches]
        finally:
            for handle in handles:
                handle.remove()
        return outputs, {name: math.sqrt(e / r) if r > 0 else 0.0 for name, (e, r) in sums.items()}

    def _eager_experts(self):
        """Fused expert tensors are read expert by expert (w[e] applied to its routed tokens): run the walk with
        transformers' eager experts implementation (the same math as grouped_mm). Returns what to restore."""
        if not any(expert_tensors(m) for b in self.blocks for m in b.modules()):
            return None
        get = getattr(self.model, "get_experts_implementation", None)
        if get is None:
            return None
        before = get()
        self.model.set_experts_implementation("eager")
        return before

    def _prune_lean(self, method: LayerwisePruner, view: BlockPlan, batches) -> dict:
        """``low_memory``: one forward per fused expert collects that expert's statistics (the first also the
        rest's; a method whose statistics are small collects all at once), then prunes that expert; the
        matrices outside the experts are pruned last. An expert's inputs depend on the matrices before its MoE
        layer and the router, never on another expert's weights, so every matrix sees the statistics of the
        usual walk (the dense block's inputs)."""
        matrices = view.matrices()
        experts = sorted({mid.expert for mid in matrices if mid.expert is not None})
        rest = {mid for mid in matrices if mid.expert is None}
        if not experts or not method.square_stats:
            return method.prune_block(view, self._collect(method, view, batches), batches)
        per_layer, kept, seen = {}, {}, set()
        for e in experts:
            own = {mid for mid in matrices if mid.expert == e}
            stats = self._collect(method, view, batches, only=own | rest if e == experts[0] else own)
            if e == experts[0]:
                kept = {mid: stats.pop(mid) for mid in rest}
            seen |= {mid for mid, st in stats.items() if st is not NO_TOKENS}
            per_layer.update(method.prune_block(view, stats, batches, only=own))
            del stats
        _check_experts_seen(view, seen)
        per_layer.update(method.prune_block(view, kept, batches, only=rest))
        return per_layer

    def _collect(self, method: LayerwisePruner, view: BlockPlan, batches,
                 only: set[MatrixId] | None = None) -> dict[MatrixId, Any]:
        """Run the block over every batch with hooks on its matrices; Linears fed the same tensor share stats.
        Expert matrices of fused tensors get their routed tokens from :class:`_ExpertInputs`; a matrix inside
        an MoE layer that no token reached gets ``NO_TOKENS``. ``only``: the matrices to collect (all)."""
        block, weights, matrices = view.module, view.weights, view.matrices()
        if only is not None:
            matrices = {mid: m for mid, m in matrices.items() if mid in only}
        hooked = {name: w for name, w in weights.items()
                  if w.experts is None and MatrixId(view.index, name) in matrices}
        stacked = {name: w for name, w in weights.items() if w.experts is not None}
        stats: dict[MatrixId, Any] = {}
        leader: dict[MatrixId, MatrixId] = {}   # matrix -> the matrix whose stats it shares (decided on batch 0)
        seen: list[tuple[torch.Tensor, MatrixId]] = []
        first = [True]

        def hook(name):
            def fn(_module, inputs, _output):
                x = inputs[0]
                if first[0]:
                    owner = next((n for t, n in seen if t is x), None)
                    if owner is not None:
                        leader[name] = owner
                        return
                    seen.append((x, name))
                    leader[name] = name
                    stats[name] = method.stats_init(name, matrices[name])
                elif leader[name] != name:
                    return
                stats[name] = method.accumulate(stats[name], x.reshape(-1, x.shape[-1]))
            return fn

        def expert_input(weight_name, expert, x, _out):
            name = MatrixId(view.index, weight_name, expert)
            if name not in matrices:
                return
            if name not in leader:
                leader[name] = name
                stats[name] = method.stats_init(name, matrices[name])
            if x.shape[0]:
                stats[name] = method.accumulate(stats[name], x)

        handles = [w.module.register_forward_hook(hook(MatrixId(view.index, name))) for name, w in hooked.items()]
        try:
            for h, kw in batches:
                if stacked:
                    with _ExpertInputs(stacked, expert_input):
                        block(h, **kw)
                else:
                    block(h, **kw)
                first[0] = False
                seen.clear()
        finally:
            for handle in handles:
                handle.remove()
        if only is None:
            _check_experts_seen(view, set(leader))
        missing = [n for n in matrices if n not in leader]
        unrouted = [n for n in missing if in_moe(block, n.path, n.expert)]
        if len(unrouted) < len(missing):
            raise RuntimeError(f"weight matrices {[n for n in missing if n not in unrouted]} were not called by "
                               "the block's forward")
        out = {name: stats[leader[name]] for name in matrices if name in leader}
        out.update({name: NO_TOKENS for name in unrouted})
        return out
