"""Notes: what in a run did not go as asked or needs saying next to its figures (a fallback to another method,
experts no calibration token reached, fewer non-zeros than the target, dense low-rank factors counted as
non-zeros, weights that depend on the thread count).

A :class:`Note` is made where it happens (a method's statistics or the pipeline's sparsity report append it to
their ``notes`` list) and is stored in results.json as a dict. It carries its own rendering: ``text`` is the line
the printed summary shows, ``label`` (None: nothing) what the report appends to the row's method label, ``data``
the details. So the summary and the report render every note, of any kind, without knowing its kind; a method
that adds a kind adds a function here (or makes a :class:`Note` itself) and nothing else.

results.json written before notes existed recorded them under keys of their own (``method_stats.fallback``,
``method_stats.experts_without_tokens``, ``sparsity.over_target``, ``sparsity.lowrank_params``); the run record
(:attr:`elsa.report.results.RunRecord.notes`) converts those with the functions below, so they read as the same notes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# the order of the parts of a report label (the order the report appended them in before notes existed);
# kinds not listed follow in the order they were made
ORDER = ("fallback", "over_target", "lowrank", "experts_without_tokens", "thread_dependence")


@dataclass(frozen=True)
class Note:
    kind: str                   # what happened: one of ORDER, or a method's own kind
    text: str                   # the printed summary's line
    label: str | None = None    # appended to the report's method label in parentheses (None: the label stays)
    data: dict = field(default_factory=dict)   # the details, kept in results.json

    def to_dict(self) -> dict:
        return {"kind": self.kind, "label": self.label, "text": self.text, "data": self.data}

    @classmethod
    def from_dict(cls, d: dict) -> "Note":
        kind = str(d.get("kind", "note"))
        return cls(kind=kind, text=str(d.get("text") or kind), label=d.get("label"), data=d.get("data") or {})


def as_note(value) -> Note:
    """A note as made (a :class:`Note`) or as stored (its dict)."""
    return value if isinstance(value, Note) else Note.from_dict(value)


def ordered(notes: list[Note]) -> list[Note]:
    """``notes`` in the order of :data:`ORDER` (other kinds after, as they came)."""
    return sorted(notes, key=lambda n: ORDER.index(n.kind) if n.kind in ORDER else len(ORDER))


def _first(names: list[str], n: int) -> str:
    return f"{', '.join(names[:n])}{' ...' if len(names) > n else ''}"


def fallback(method: str, instead_of: str | None, blocks: list[str], of: int | str | None) -> Note:
    """``method`` pruned ``blocks`` (of ``of`` blocks) because ``instead_of`` could not model them."""
    of = "?" if of is None else of
    return Note("fallback", label=f"fallback {method} on {len(blocks)}/{of} MLPs",
                text=f"FALLBACK: {method} ran instead of {instead_of} on {len(blocks)}/{of} MLPs "
                     f"({_first(blocks, 4)})",
                data={"method": method, "blocks": list(blocks), "of": of})


def experts_without_tokens(names: list[str], rule: str, count: int | None = None) -> Note:
    """Expert matrices no calibration token reached, pruned by ``rule`` instead of the method."""
    count = len(names) if count is None else count
    return Note("experts_without_tokens", label=f"{count} experts without tokens: {rule}",
                text=f"NO TOKENS: {count} expert matrices received no calibration token and were pruned by {rule} "
                     f"({', '.join(names[:3])}{' ...' if count > 3 else ''})",
                data={"rule": rule, "count": count, "names": list(names)})


def over_target(measured: float, over: float, target: str | None) -> Note:
    """Fewer non-zeros than the target asks: ``over`` more of the pruned weights are zero."""
    return Note("over_target", label=f"over target: {measured:.3f}",
                text=f"OVER TARGET: {measured:.4f} of the pruned weights are zero, {over:.4f} more than the "
                     f"target {target} asks",
                data={"measured": measured, "over": over, "target": target})


def lowrank(params: int, pruned_params: int | None, measured: float, effective: float | None) -> Note:
    """A method's dense low-rank factors (``params`` parameters) count against the target as non-zeros."""
    label = f"low rank {params / pruned_params:.1%} + sparse {1 - measured:.1%}" if pruned_params else None
    effect = f"; effective sparsity {effective:.4f}" if effective is not None else ""
    return Note("lowrank", label=label,
                text=f"low-rank factors: {params:,} dense parameters counted as non-zeros{effect}",
                data={"params": params, "pruned_params": pruned_params, "measured": measured,
                      "effective": effective})


def thread_dependence(method: str, threads: int) -> Note:
    """``method``'s weights depend on torch's thread count (its solves round differently with more threads): the
    same config with another ``hardware.threads`` gives other weights. No label: the row's figures are real."""
    return Note("thread_dependence",
                text=f"THREADS: {method}'s weights depend on the thread count; this run used {threads} "
                     f"(hardware.threads), another count gives different weights",
                data={"threads": threads})
