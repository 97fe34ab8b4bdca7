"""The pruning plan saved beside a model's weights: what the compressed format and the sparse kernels read
instead of guessing from the tensors.

A run's :class:`elsa.sparsity.plan.PruningPlan` is recorded (:func:`record`) in the compressed index's ``plan``
entry and, in an HF dir, as ``pruning_plan.json`` (``from_pretrained`` does not read it). The record holds

- ``target``: the run's target; ``matrices``: {matrix name (``model.layers.0.mlp.down_proj``, an expert
  ``model.layers.0.mlp.experts.down_proj[3]``): its target}, what :func:`elsa.artifacts.linear.sparsify` reads;
- ``dense``: the plan's {module or parameter name: why it stays dense} (``ignored`` / ``not_targeted``);
- ``tensors``: {state-dict key as ``save_pretrained`` writes it: ``{"target": t}`` (``{"targets": [t, ...]}``
  where the experts a saved tensor holds differ), or ``{"dense": why}``; ``"transposed": true`` where the
  matrix is stored ``[in, out]``}, what :func:`elsa.artifacts.compressed.compress_dir` reads. The keys are found
  by running transformers' own reverse key conversion (the one ``save_pretrained`` runs: fused MoE experts are
  saved per expert) on small label tensors, so a saved key knows the parameter and the experts it holds.

A target is an N:M string (``"2:4"``) or a ratio (a number). A tensor the record does not list is not prunable
(embeddings, norms, lm_head, routers).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from elsa.errors import ElsaError
from elsa.sparsity.patterns import Sparsity
from elsa.sparsity.plan import dense_reason_in

FILE = "pruning_plan.json"
VERSION = 1


def target_value(t: Sparsity):
    """A target as the record writes it: "N:M", or the ratio."""
    return str(t) if t.is_nm else t.ratio


def parse_target(value) -> Sparsity:
    try:
        return Sparsity.parse(value, "plan target")
    except ElsaError as exc:
        raise ElsaError(f"pruning plan record: {exc}") from None


def _experts_in(t: torch.Tensor) -> list[int]:
    """The labels (experts) a converted label tensor holds: its stride-0 dims are one value each."""
    r = t[tuple(0 if s == 0 else slice(None) for s in t.stride())]
    lo, hi = int(r.min()), int(r.max())
    return [lo] if lo == hi else sorted(int(v) for v in torch.unique(r))


def saved_keys(model, params: dict[str, int | None]) -> tuple[dict[str, dict[str, list[int] | None]], list[str]]:
    """({parameter name: {saved key: the experts it holds (None: not a fused expert tensor)}}, the parameters whose
    keys could not be found), for ``params`` ({name: experts or None}). Each parameter goes alone through
    transformers' reverse conversion as a label tensor (stride 0 where it can be: the expert index along dim 0)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:      # a transformers without key conversions saves the parameters' own names
        return {n: {n: (list(range(e)) if e else None)} for n, e in params.items()}, []
    found, unmapped = {}, []
    shapes = {n: p.shape for n, p in model.named_parameters()}
    for name, experts in params.items():
        shape = shapes[name]
        dtype = torch.uint8 if (experts or 0) <= 256 else torch.int32
        label = (torch.arange(experts, dtype=dtype).view(-1, *[1] * (len(shape) - 1)) if experts
                 else torch.zeros((), dtype=dtype)).expand(shape)
        try:
            converted = revert_weight_conversion(model, {name: label})
        except Exception:    # noqa: BLE001 - a conversion that needs its sibling tensors: recorded as unmapped
            unmapped.append(name)
            continue
        found[name] = {k: (_experts_in(t) if experts else None) for k, t in converted.items()}
    return found, unmapped


def _entry(parts: list[tuple[Sparsity | None, str | None]], transposed: bool) -> dict:
    """A saved tensor's entry from its parts ((target, None) planned, (None, why) dense), in order."""
    targets = [t for t, _ in parts]
    why = next((w for _t, w in parts if w is not None), None)
    if all(t is None for t in targets):
        return {"dense": why}
    if all(t is not None for t in targets) and len(set(targets)) == 1:
        entry = {"target": target_value(targets[0])}
    else:
        entry = {"targets": [None if t is None else target_value(t) for t in targets]}
        if why is not None:
            entry["dense"] = why
    if transposed:
        entry["transposed"] = True
    return entry


def record(plan, model) -> dict:
    """The record of ``plan`` (a PruningPlan) for ``model`` (the planned model, or a copy of it) as it is saved."""
    plan = plan.on(model)
    params = plan.parameters()
    dense = {n: plan.dense_reason(n) for n, (wid, _w) in params.items() if wid not in plan.weights}
    listed = {n: v for n, v in params.items() if n in dense and dense[n] or v[0] in plan.weights}
    keys, unmapped = saved_keys(model, {n: w.experts for n, (_wid, w) in listed.items()})
    parts: dict[str, list] = {}
    transposed: dict[str, bool] = {}
    for name, (wid, w) in listed.items():
        targets = plan.weight_targets(wid) if wid in plan.weights else None
        for key, experts in keys.get(name, {}).items():
            for e in (experts if experts is not None else [None]):
                t = None if targets is None else targets[e or 0]
                parts.setdefault(key, []).append((t, None if t is not None else dense[name]))
            transposed[key] = transposed.get(key, False) or (w.transposed and targets is not None)
    out = {"version": VERSION, "target": target_value(plan.target),
           "matrices": {plan.name(m): target_value(t) for m, t in plan.targets.items()},
           "dense": dict(plan.dense),
           "tensors": {k: _entry(p, transposed[k]) for k, p in sorted(parts.items())}}
    if unmapped:
        out["unmapped"] = unmapped
    return out


def check(data, where: str) -> dict:
    """A read-back record, checked: one ElsaError line for anything that is not one."""
    version = data.get("version") if isinstance(data, dict) else None
    missing = [k for k in ("matrices", "dense", "tensors") if version == VERSION and not isinstance(data.get(k), dict)]
    if version != VERSION or missing:
        why = f"no {missing[0]!r} table" if missing else f"version={version!r}"
        raise ElsaError(f"{where}: not a pruning plan record of version {VERSION} ({why})")
    return data


def write_file(directory: Path, data: dict) -> Path:
    path = Path(directory) / FILE
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def read_file(directory: Path) -> dict | None:
    """The record of an HF dir (its ``pruning_plan.json``), or None when it has none."""
    path = Path(directory) / FILE
    if not path.is_file():
        return None
    try:
        return check(json.loads(path.read_text()), str(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ElsaError(f"{path} is corrupt: not valid JSON ({exc})") from None


class PlanTargets:
    """What the sparse kernels read of a plan: each matrix's target by name, and why a weight stays dense."""

    def __init__(self, matrices: dict[str, Sparsity], dense: dict[str, str]):
        self.matrices, self.dense = matrices, dense

    @classmethod
    def of(cls, plan) -> "PlanTargets | None":
        """From a PruningPlan, a record (a dict: what :func:`record` wrote) or None (no plan)."""
        if plan is None or isinstance(plan, cls):
            return plan
        if isinstance(plan, dict):
            return cls({n: parse_target(v) for n, v in plan["matrices"].items()}, dict(plan["dense"]))
        return cls({plan.name(m): t for m, t in plan.targets.items()}, dict(plan.dense))

    def target(self, name: str) -> Sparsity | None:
        return self.matrices.get(name)

    def dense_reason(self, param_name: str) -> str:
        """Why a parameter (by full name) is not a planned matrix: the plan's reason, or that it is not in it."""
        return dense_reason_in(self.dense, param_name) or "not in the pruning plan"
