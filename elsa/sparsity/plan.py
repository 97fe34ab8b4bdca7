"""The pruning plan: which matrices a run prunes, each to what target, and what stays dense and why.

Built once after the model is loaded, from ``ignore`` / ``targets`` (what stays dense) and the allocation (each
matrix's ratio). Every method, both engines, the sparsity report and the compressed format read it:

- a matrix is a typed :class:`MatrixId` (its decoder block, its path within the block, its expert in a fused
  expert tensor), never a name string parsed back;
- each matrix has one target, a :class:`elsa.sparsity.patterns.Sparsity` (a ratio or an N:M pattern): the run's target
  (uniform allocation) or its allocated ratio, whose count is exact (``exact=True``);
- each prunable parameter (a Linear's weight, a fused expert tensor) is a :class:`elsa.model.structure.Weight` view,
  keyed by the id of its matrix (``expert=None`` for the whole tensor);
- the parameters that ``ignore`` and ``targets`` leave dense, by full name, with the reason (``ignored`` /
  ``not_targeted``), for the training engines (they stay bit-identical) and the weight accounting.

Names (``model.layers.0.mlp.down_proj``, an expert ``...experts.down_proj[3]``) are made from the ids for
results.json and logs; a profile's names are looked up among them (:meth:`PruningPlan.id_of`).
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from elsa.errors import config_error, nothing_to_prune
from elsa.model.structure import Matrix, Weight, block_weights, blocks_and_prefix, routers
from elsa.sparsity.patterns import Sparsity, mask_from_scores


@dataclass(frozen=True, order=True)
class MatrixId:
    """One prunable matrix: decoder block ``block``, module (or ``<module>.<parameter>`` for a fused expert
    tensor) ``path`` within the block, and ``expert`` (None: not an expert slice; for a weight: the whole
    parameter)."""

    block: int
    path: str
    expert: int | None = None

    @property
    def local(self) -> str:
        """The name within the block (``mlp.down_proj``, an expert ``mlp.experts.down_proj[3]``)."""
        return self.path if self.expert is None else f"{self.path}[{self.expert}]"

    @property
    def weight(self) -> "MatrixId":
        """The id of the parameter this matrix is part of."""
        return MatrixId(self.block, self.path) if self.expert is not None else self


def _search(patterns) -> list[tuple[str, re.Pattern]]:
    return [(p, re.compile(p)) for p in patterns or []]


def ignored(model: nn.Module, patterns) -> tuple[dict[str, list[str]], dict[str, str]]:
    """({pattern: [matched module / parameter names]}, {module or parameter name: "ignored"}) of the ``ignore``
    regexes (``re.search``, llm-compressor's convention): a matched module stays dense with everything inside
    it; a parameter whose full name matches (a fused expert tensor) stays dense alone. A pattern that matches
    nothing is an error."""
    matched, dense = {}, {}
    for pat, rx in _search(patterns):
        names = [n for n, _m in model.named_modules() if n and rx.search(n)]
        params = [n for n, _p in model.named_parameters() if rx.search(n) and
                  not any(n.startswith(m + ".") for m in names)]
        if not names and not params:
            example = next(iter(_weight_names(model, dense)), "model.layers.0.mlp")
            raise config_error("ignore", pat, "a regex that matches a module or parameter name of the model (it "
                               f"matches none; e.g. {example})")
        for n in names + params:
            dense.setdefault(n, "ignored")
        matched[pat] = names + params
    return matched, dense


def _weight_names(model: nn.Module, dense: dict[str, str] | None = None) -> dict[str, tuple[MatrixId, Weight]]:
    """{full weight name: (its id, its view)} of every prunable weight of the decoder blocks outside ``dense``."""
    blocks, prefix = blocks_and_prefix(model)
    out = {}
    for i, block in enumerate(blocks):
        for path, w in block_weights(block).items():
            name = f"{prefix}.{i}.{path}"
            if dense and _covered(name if w.experts is not None else f"{name}.{w.attr}", dense):
                continue
            out[name] = (MatrixId(i, path), w)
    return out


def untargeted(weights: dict[str, tuple[MatrixId, Weight]], patterns) -> tuple[dict[str, list[str]], set[str]]:
    """({pattern: [matched weight names]}, the weight names no pattern matches) of the ``targets`` regexes;
    empty: every weight. A pattern that matches no prunable weight is an error."""
    if not patterns:
        return {}, set()
    matched = {pat: [n for n in weights if rx.search(n)] for pat, rx in _search(patterns)}
    for pat, names in matched.items():
        if not names:
            raise config_error("targets", pat, "a regex that matches a prunable weight inside the decoder blocks "
                               f"(it matches none; e.g. {next(iter(weights), 'model.layers.0.mlp')})")
    hit = {n for names in matched.values() for n in names}
    return matched, {n for n in weights if n not in hit}


class PruningPlan:
    """Every prunable matrix of a model (its :class:`MatrixId`, weight view and target), in block order, and
    what stays dense. Built by :meth:`build`; :meth:`with_ratios` (the allocation) and :meth:`scaled` (a
    schedule's ramp) make new plans; nothing mutates one."""

    def __init__(self, model: nn.Module, target: Sparsity, weights: dict[MatrixId, Weight],
                 targets: dict[MatrixId, Sparsity], dense: dict[str, str], matched: dict[str, dict]):
        self.model, self.target = model, target
        self.blocks, self.prefix = blocks_and_prefix(model)
        self.weights = weights              # {weight id (expert None): view}, in block order
        self.targets = targets              # {matrix id: its target}, in block order (experts in order)
        self.dense = dense                  # {module or parameter name: "ignored" / "not_targeted"}
        self.matched = matched              # {"ignore": {pattern: names}, "targets": {pattern: names}}
        self.allocated = any(t is not target for t in targets.values())
        self._ids = {self.name(i): i for i in (*weights, *targets)}

    @classmethod
    def build(cls, model: nn.Module, target: Sparsity, ignore=(), targets=()) -> "PruningPlan":
        """The plan of ``model`` at ``target`` with what ``ignore`` / ``targets`` leave dense; every matrix at
        the target (an allocation then sets each one's ratio: :meth:`with_ratios`)."""
        matched_ignore, dense = ignored(model, ignore)
        weights = _weight_names(model, dense)
        matched_targets, left = untargeted(weights, targets)
        for name in left:
            mid, w = weights[name]
            dense[name if w.experts is not None else f"{name}.{w.attr}"] = "not_targeted"
        views = {mid: w for name, (mid, w) in weights.items() if name not in left}
        per = {m: target for wid, w in views.items() for m in _matrices(wid, w)}
        return cls(model, target, views, per, dense, {"ignore": matched_ignore, "targets": matched_targets})

    def _derive(self, targets: dict[MatrixId, Sparsity], target: Sparsity | None = None) -> "PruningPlan":
        return PruningPlan(self.model, target or self.target, self.weights, targets, self.dense, self.matched)

    def with_ratios(self, ratios: dict[MatrixId, float]) -> "PruningPlan":
        """Every matrix at its own allocated ratio (exact counts: Sparsity.exact)."""
        return self._derive({m: Sparsity(ratio=ratios[m], exact=True) for m in self.targets})

    def scaled(self, fraction: float) -> "PruningPlan":
        """Every ratio times ``fraction`` (a schedule's ramp towards the target; N:M: the target itself)."""
        if self.target.is_nm:
            return self
        overall = Sparsity(ratio=self.target.ratio * fraction)
        if not self.allocated:
            return self._derive({m: overall for m in self.targets}, overall)
        return self._derive({m: Sparsity(ratio=t.ratio * fraction, exact=True) for m, t in self.targets.items()},
                            overall)

    def refuse_if_empty(self, ignore, targets) -> "PruningPlan":
        """The one-line refusal of a plan that prunes nothing (it would report the dense model)."""
        if not self.targets:
            raise nothing_to_prune(list(ignore or ()), list(targets or ()))
        return self

    def on(self, model: nn.Module) -> "PruningPlan":
        """The same plan over ``model``, a copy of the planned model (the training engine's sharded copy):
        its weight views are rebound to the copy's modules by their position in the blocks."""
        if model is self.model:
            return self
        blocks, _ = blocks_and_prefix(model)
        where = [{id(m): n for n, m in b.named_modules()} for b in self.blocks]
        weights = {wid: Weight(blocks[wid.block].get_submodule(where[wid.block][id(w.module)]), w.attr, w.transposed)
                   for wid, w in self.weights.items()}
        return PruningPlan(model, self.target, weights, self.targets, self.dense, self.matched)

    def allocated_ratios(self) -> dict[str, float] | None:
        """{full matrix name: ratio} where an allocation set each matrix's ratio; None: every one at the
        target (what a checkpoint's signature and a sweep's solution memo compare)."""
        return {self.name(m): t.ratio for m, t in self.targets.items()} if self.allocated else None

    # -- reading ---------------------------------------------------------------------------------------
    def name(self, mid: MatrixId) -> str:
        """The full name of a matrix or weight (``model.layers.0.mlp.experts.down_proj[3]``)."""
        return f"{self.prefix}.{mid.block}.{mid.local}"

    def id_of(self, name: str) -> MatrixId | None:
        """The matrix or weight a full name (as :meth:`name` writes it) stands for; None: not in the plan."""
        return self._ids.get(name)

    def matrix(self, mid: MatrixId) -> Matrix:
        return Matrix(self.weights[mid.weight], mid.expert)

    def matrices(self) -> Iterator[tuple[MatrixId, Matrix, Sparsity]]:
        """(id, matrix view, target) of every planned matrix, in block order."""
        for mid, t in self.targets.items():
            yield mid, self.matrix(mid), t

    def named_weights(self) -> dict[str, Weight]:
        return {self.name(wid): w for wid, w in self.weights.items()}

    def named_matrices(self) -> dict[str, Matrix]:
        return {self.name(mid): m for mid, m, _t in self.matrices()}

    def weight_targets(self, wid: MatrixId) -> list[Sparsity]:
        """The targets of a weight's matrices: one for a 2-D weight, one per expert for a fused tensor."""
        w = self.weights[wid]
        return [self.targets[m] for m in _matrices(wid, w)]

    def mask(self, wid: MatrixId | str, scores: torch.Tensor, group: str = "layer") -> torch.Tensor:
        """The keep-mask of a whole parameter (its id, or its full name) from its scores (shaped like the
        parameter): each matrix (each expert of a fused tensor) to its own target."""
        wid = self._ids[wid] if isinstance(wid, str) else wid
        return weight_mask(self.weights[wid], scores, self.weight_targets(wid), group)

    @property
    def is_nm(self) -> bool:
        return self.target.is_nm

    @property
    def ratio(self) -> float:
        """The overall target ratio."""
        return self.target.ratio

    def block(self, index: int) -> "BlockPlan":
        return BlockPlan(self, index)

    def kept_dense(self, root: nn.Module | None = None, base: str | None = None) -> set[int]:
        """ids of the parameters under ``root`` (the model, default, or one of its blocks, named ``base``) that
        must stay bit-identical to the dense model whatever a method trains: MoE routers, and what ``ignore``
        and ``targets`` leave dense."""
        root = self.model if root is None else root
        if base is None:
            base = next((n for n, m in self.model.named_modules() if m is root), "")
        ids = {id(p) for r in routers(root).values() for p in r.parameters()}
        for name, mod in root.named_modules():
            full = ".".join(p for p in (base, name) if p)
            for attr, p in mod.named_parameters(recurse=False):
                if _covered(f"{full}.{attr}" if full else attr, self.dense):
                    ids.add(id(p))
        return ids

    def parameters(self) -> dict[str, tuple[MatrixId, Weight]]:
        """{full parameter name: (weight id, view)} of every prunable parameter of the blocks, planned or left
        dense (a planned one's id is a key of :attr:`weights`)."""
        return {name if w.experts is not None else f"{name}.{w.attr}": (mid, w)
                for name, (mid, w) in _weight_names(self.model).items()}

    def dense_reason(self, param_name: str) -> str | None:
        """Why a parameter (by full name) stays dense: "ignored", "not_targeted", or None."""
        return dense_reason_in(self.dense, param_name)


def dense_reason_in(dense: dict[str, str], param_name: str) -> str | None:
    """The reason ``dense`` ({module or parameter name: reason}) gives for a parameter, by its full name: its own,
    or that of the innermost module holding it; None: not dense."""
    parts = param_name.split(".")
    return next((dense[".".join(parts[:k])] for k in range(len(parts), 0, -1) if ".".join(parts[:k]) in dense), None)


def mask_of(target, name: str, scores: torch.Tensor, group: str = "layer", transposed: bool = False) -> torch.Tensor:
    """The keep-mask of the weight ``name`` from its (parameter-shaped) scores: by ``target``, a plan (or one
    block's part of it) whose name it is, or one Sparsity for a plain matrix outside any plan (``transposed``:
    its storage is ``[in, out]``)."""
    if isinstance(target, Sparsity):
        return mask_from_scores(scores, target, group, transposed)
    return target.mask(name, scores, group)


def _covered(param_name: str, dense: dict[str, str]) -> bool:
    parts = param_name.split(".")
    return any(".".join(parts[:k]) in dense for k in range(1, len(parts) + 1))


def _matrices(wid: MatrixId, w: Weight) -> list[MatrixId]:
    if w.experts is None:
        return [wid]
    return [MatrixId(wid.block, wid.path, e) for e in range(w.experts)]


def weight_mask(w: Weight, scores: torch.Tensor, targets: list[Sparsity], group: str = "layer") -> torch.Tensor:
    """The keep-mask of the parameter of ``w`` (its storage layout) from scores of its shape."""
    if w.experts is None:
        return mask_from_scores(scores, targets[0], group, w.transposed)
    s = scores.transpose(-1, -2) if w.transposed else scores
    mask = torch.stack([mask_from_scores(x, t, group) for x, t in zip(s, targets)])
    return mask.transpose(-1, -2).contiguous() if w.transposed else mask


class BlockPlan:
    """One decoder block's part of a plan: its module, its weights by path and its matrices by id."""

    def __init__(self, plan: PruningPlan, index: int):
        self.plan, self.index = plan, index
        self.module = plan.blocks[index]
        self.prefix = f"{plan.prefix}.{index}"
        self.weights = {wid.path: w for wid, w in plan.weights.items() if wid.block == index}
        self.ids = [m for m in plan.targets if m.block == index]

    def matrices(self) -> dict[MatrixId, Matrix]:
        return {m: Matrix(self.weights[m.path], m.expert) for m in self.ids}

    def target(self, mid: MatrixId) -> Sparsity:
        return self.plan.targets[mid]

    def name(self, mid: MatrixId) -> str:
        return self.plan.name(mid)

    def mask(self, path: str, scores: torch.Tensor, group: str = "layer") -> torch.Tensor:
        """The keep-mask of the block's weight ``path`` (see :meth:`PruningPlan.mask`)."""
        return self.plan.mask(MatrixId(self.index, path), scores, group)

    @property
    def is_nm(self) -> bool:
        return self.plan.target.is_nm

    def scaled(self, fraction: float) -> "BlockPlan":
        return BlockPlan(self.plan.scaled(fraction), self.index).on(self.module)

    def kept_dense(self) -> set[int]:
        """ids of the block's parameters that stay as they are (PruningPlan.kept_dense)."""
        return self.plan.kept_dense(self.module, self.prefix)

    def on(self, module: nn.Module) -> "BlockPlan":
        """The same part of the plan over ``module``, a copy of this block (a benchmark prunes copies)."""
        if module is self.module:
            return self
        where = {id(m): n for n, m in self.module.named_modules()}
        view = copy.copy(self)
        view.module = module
        view.weights = {p: Weight(module.get_submodule(where[id(w.module)]), w.attr, w.transposed)
                        for p, w in self.weights.items()}
        return view
