"""The run record: what a job's results.json holds, written by the pipeline and read by the report, the sweep
and the printed summary.

:class:`RunRecord` names every key a run writes. ``schema`` is its version: 1 since the record got a type;
results.json files written before carry no ``schema`` and read as version 0. Older files (before the start /
budget / allocation choices existed, with keys since renamed such as ``method_stats.init``, or written by a
later version with keys this one does not know) are accepted: a missing key reads as None, an unknown one is
kept in ``extra`` and written back unchanged.

:attr:`RunRecord.notes` are the run's notes (:mod:`elsa.methods.notes`): those stored in the ``notes`` lists of
``method_stats`` and ``sparsity``, and those older files (and methods that still write them) record under their
own keys, converted here and nowhere else (:func:`legacy_notes`). The old keys are still written, for readers
outside this repo.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, fields
from pathlib import Path

from elsa.methods import notes as N
from elsa.methods.notes import Note

log = logging.getLogger(__name__)

RESULTS = "results.json"
SCHEMA_VERSION = 1
STATUSES = ("running", "done", "failed")
NOTE_HOLDERS = ("method_stats", "sparsity")   # the records whose ``notes`` list holds notes
# what a job's results.json holds from its first write (before validation), also when it fails
ALWAYS = ("schema", "status", "model", "method", "start", "budget", "allocation", "sparsity", "overrides",
          "job_name", "group", "output_dir")


@dataclass
class RunRecord:
    """One job's results.json. Nested records stay dicts (their keys are the method's or the evaluation's)."""

    status: str = "running"                  # running | done | failed
    model: str | None = None                 # the model config's name
    method: str | None = None                # the method config's name
    start: dict | None = None                # {name, skipped?, time_s?, method_stats?, perplexity?, reused_from?}
    budget: str | None = None                # the budget that set the method's steps (None: it has none)
    allocation: dict | None = None           # {name, per_layer?, per_matrix?, ...}
    sparsity: dict | None = None             # {target, target_ratio, measured, per_layer, pruned_params, ...}
    overrides: list | None = None
    job_name: str | None = None
    group: str | None = None
    output_dir: str | None = None
    seed: int | None = None
    git_sha: str | None = None
    ignore: dict | None = None               # {pattern: [names left dense]}
    targets: dict | None = None              # {pattern: [names pruned]}
    budget_not_applicable: dict | None = None   # training keys a method that does not train was given
    calibration: dict | None = None          # {dataset, nsamples, seqlen, starts}
    dense_perplexity: dict | None = None     # {corpus: perplexity}
    dense_zero_shot: dict | None = None
    method_stats: dict | None = None
    params: dict | None = None               # {total, nonzero, pruned, dense, dense_by_kind, dense_names}
    perplexity: dict | None = None           # {corpus: perplexity}
    zero_shot: dict | None = None            # {tasks: {...}, mean_acc}
    save_format: str | None = None
    model_dir: str | None = None
    compressed: dict | None = None           # {dir, mb, hf_mb, shards_mb, ...}
    inference: dict | None = None            # {decode_speedup, ...}
    compute: dict | None = None              # {phase: {tokens, flops, wall_s, rule}, total} (elsa.eval.compute)
    rehearsal: dict | None = None            # model=shapes: {like, blocks, ...}; random weights, not a model's ppl
    plan: dict | None = None                 # elsa.plan's forecast, made before the run
    time_s: dict | None = None               # {phase: seconds, total}
    cpu_s: dict | None = None                # the same phases' CPU seconds, all the process's threads: on a
                                             # shared machine the work done, where time_s holds the waits too
    peak_memory_mb: dict | None = None       # {cpu_rss, cpu_rss_at_start?, gpu?}
    error: str | None = None
    traceback: str | None = None
    schema: int = SCHEMA_VERSION
    extra: dict = field(default_factory=dict)   # keys of another version, kept as they are
    given: frozenset = field(default=frozenset(), repr=False, compare=False)   # keys read (kept also when null)

    @classmethod
    def from_dict(cls, data: dict) -> "RunRecord":
        known = {f.name for f in fields(cls)} - {"extra", "given"}
        rec = cls(**{k: v for k, v in data.items() if k in known},
                  extra={k: v for k, v in data.items() if k not in known}, given=frozenset(data))
        if "schema" not in data:
            rec.schema = 0          # written before the record had a version
        elif not isinstance(rec.schema, int) or rec.schema > SCHEMA_VERSION:
            log.warning("results.json schema %s is newer than this elsa's %s; reading the keys it knows",
                        rec.schema, SCHEMA_VERSION)
        return rec

    def to_dict(self) -> dict:
        """What results.json holds: the keys set or read (and those every record has), then the extra ones."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("extra", "given")}
        out = {k: v for k, v in out.items() if v is not None or k in ALWAYS or k in self.given}
        for holder in NOTE_HOLDERS:       # notes as made are written as dicts
            if isinstance(out.get(holder), dict) and out[holder].get("notes"):
                out[holder] = {**out[holder], "notes": [n.to_dict() if isinstance(n, Note) else n
                                              for n in out[holder]["notes"]]}
        return {**out, **self.extra}

    # -- what the report and the summary read ---------------------------------------------------------
    @property
    def stats(self) -> dict:
        return self.method_stats or {}

    @property
    def target(self) -> str | None:
        return (self.sparsity or {}).get("target")

    @property
    def notes(self) -> list[Note]:
        """Every note of the run in the report label's order: the stored ones, then those of the old keys whose
        kind no stored note has."""
        stored = [N.as_note(n) for h in NOTE_HOLDERS for n in (getattr(self, h) or {}).get("notes") or []
                  if isinstance(n, (dict, Note))]     # anything else (another version's form) is not read
        kinds = {n.kind for n in stored}
        return N.ordered(stored + [n for n in legacy_notes(self) if n.kind not in kinds])

    def phase_time(self, phase: str) -> float | None:
        return (self.time_s or {}).get(phase)

    def memory(self, key: str) -> float | None:
        return (self.peak_memory_mb or {}).get(key)


def legacy_notes(rec: RunRecord) -> list[Note]:
    """The notes results.json recorded under keys of their own before notes existed (SparseLLM still writes
    ``method_stats.fallback`` only): the same notes, with the labels and lines the report and summary made."""
    stats, sp, out = rec.stats, rec.sparsity or {}, []
    fb = stats.get("fallback")
    if isinstance(fb, dict) and fb.get("blocks"):
        out.append(N.fallback(fb.get("method"), rec.method, fb["blocks"], fb.get("of")))
    if sp.get("over_target"):
        out.append(N.over_target(sp.get("measured"), sp["over_target"], sp.get("target")))
    if sp.get("lowrank_params"):
        out.append(N.lowrank(sp["lowrank_params"], sp.get("pruned_params"), sp.get("measured"), sp.get("effective")))
    none = stats.get("experts_without_tokens")
    if isinstance(none, dict) and none.get("count"):
        out.append(N.experts_without_tokens(none.get("names") or [], none.get("rule", "magnitude"), none["count"]))
    return out


def read_record(out: Path) -> RunRecord | None:
    """The record of one job dir, or None when its results.json is missing or unreadable (a killed job)."""
    data = read_results(out)
    return None if data is None else RunRecord.from_dict(data)


def read_results(out: Path) -> dict | None:
    """The results.json of one job dir as stored, or None when missing or unreadable (e.g. a killed job)."""
    path = Path(out) / RESULTS
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable %s (%s)", path, exc)
        return None
    return data if isinstance(data, dict) else None


def record_dict(results: dict) -> dict:
    """``results`` as the record writes it (with its schema version): what the pipeline stores and returns."""
    rec = RunRecord.from_dict(results)
    if rec.status not in STATUSES:
        raise ValueError(f"internal: results.json status {rec.status!r} is not one of {', '.join(STATUSES)}")
    rec.schema = SCHEMA_VERSION
    return rec.to_dict()
