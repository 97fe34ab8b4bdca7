"""The run record (elsa.report.results): stored results.json files of earlier versions read as they did.

tests/data/results/ holds
- e43c12b_wanda_tiny.json: written by commit e43c12b's pipeline (run.py model=tiny logger=none eval=quick
  eval.max_tokens=2048 seqlen=128 nsamples=4 method=wanda save_format=compressed measure_speed=true
  eval.zero_shot=[rte_local] eval.zero_shot_limit=8; from a git archive, hence git_sha null): every field the
  report reads (zero-shot, compressed size, decode speedup, reconstruction error, memory, times);
- legacy_elsa_quick.json: the shape the first pipeline wrote (no start, budget or allocation; a preset name in
  its overrides and the old trainer's method_stats.init);
- rows_e43c12b.json: the report rows e43c12b's elsa.report.tables.job_row made of both; summary_e43c12b_wanda_tiny.txt:
  the summary e43c12b's pipeline printed for the first;
- oats_e43c12b.json (run.py model=tiny logger=none eval=quick eval.max_tokens=2048 seqlen=128 nsamples=4
  method=oats sparsity=0.5 hardware.threads=1) and moe_rehearsal_e43c12b.json (model=shapes
  model.like=mixtral-8x7b model.blocks=2 method=wanda nsamples=2 seqlen=64 ...: two experts got no token), both
  written by e43c12b's pipeline: the notes under their old keys (sparsity.lowrank_params,
  method_stats.experts_without_tokens); all_notes_e43c12b.json: the first file with all four old keys added
  (method_stats.fallback and .experts_without_tokens, sparsity.over_target and .lowrank_params) in the shapes
  0e21ae5 wrote them; notes_0e21ae5.json: the method label 0e21ae5's job_row and the lines its summary_lines made
  of each file (before notes existed).
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from conftest import REPO, run_pipeline
from elsa.methods import notes
from elsa.methods.notes import Note
from elsa.report.results import RESULTS, SCHEMA_VERSION, RunRecord, read_record, record_dict

DATA = REPO / "tests" / "data" / "results"
STORED = ["e43c12b_wanda_tiny", "legacy_elsa_quick"]


def stored(name: str) -> dict:
    return json.loads((DATA / f"{name}.json").read_text())


@pytest.mark.parametrize("name", STORED)
def test_report_rows_of_stored_results_are_unchanged(name):
    """Every field of the row e43c12b's report made, from the record the current reader makes."""
    from elsa.report.tables import job_row

    expected = json.loads((DATA / "rows_e43c12b.json").read_text())[name]
    row = json.loads(json.dumps(job_row(read_record_of(name), Path("job"), Path("."))))
    # columns added since may follow; ``order`` is a sort key from the report's method list, which grows with
    # every method added (rows keep their relative order)
    assert {k: row.get(k) for k in expected if k != "order"} == {k: v for k, v in expected.items() if k != "order"}
    assert row["status"] == "done" and row["ppl/wiki"] > 1


def read_record_of(name: str) -> RunRecord:
    rec = RunRecord.from_dict(stored(name))
    assert rec.schema == 0          # written before the record had a version
    return rec


def test_stored_record_reads_every_field_the_report_uses():
    rec = read_record_of("e43c12b_wanda_tiny")
    assert (rec.status, rec.model, rec.method, rec.target, rec.seed) == ("done", "tiny", "wanda", "0.5", 0)
    assert rec.extra == {}          # e43c12b wrote no key the record does not name
    assert rec.compressed["mb"] > 0 and rec.inference["decode_speedup"] > 0
    assert rec.zero_shot["mean_acc"] == pytest.approx(0.375) and rec.stats["reconstruction"]["mean"] > 0
    assert rec.phase_time("total") > rec.phase_time("prune") > 0 and rec.memory("cpu_rss") > 0
    # written back, a stored file keeps every key and value; only the version is added
    assert {k: v for k, v in record_dict(stored("e43c12b_wanda_tiny")).items() if k != "schema"} == \
        stored("e43c12b_wanda_tiny")


def test_legacy_record_keeps_keys_it_does_not_name():
    rec = RunRecord.from_dict({**stored("legacy_elsa_quick"), "renamed_later": {"x": 1}})
    assert rec.start is None and rec.budget is None and rec.extra == {"renamed_later": {"x": 1}}
    assert rec.to_dict()["renamed_later"] == {"x": 1}


def test_summary_of_the_stored_record_is_unchanged():
    from elsa.run.recipe import Run

    run = Run.__new__(Run)
    run.results, run.out = stored("e43c12b_wanda_tiny"), Path("job")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        run.print_summary()
    assert buf.getvalue() == (DATA / "summary_e43c12b_wanda_tiny.txt").read_text()


def test_a_run_writes_a_versioned_record_with_the_stored_fields(tmp_path):
    """Today's results.json holds every key e43c12b's held for the same kind of run, plus the version."""
    res = run_pipeline(tmp_path, "method=wanda", "save_model=false")
    on_disk = json.loads((tmp_path / RESULTS).read_text())
    assert on_disk == res and on_disk["schema"] == SCHEMA_VERSION
    old = stored("e43c12b_wanda_tiny")
    missing = set(old) - set(on_disk) - {"save_format", "compressed", "inference"}   # save_model=false here
    assert not missing, missing
    assert set(on_disk["sparsity"]) == set(old["sparsity"]) and set(on_disk["params"]) == set(old["params"])
    assert read_record(tmp_path).perplexity == res["perplexity"]


def test_a_failed_run_writes_a_record_too(tmp_path):
    from elsa.errors import ElsaError

    with pytest.raises(ElsaError):
        run_pipeline(tmp_path, "sparsity=1.5")
    rec = read_record(tmp_path)
    assert rec.status == "failed" and rec.schema == SCHEMA_VERSION and rec.error.startswith("ElsaError: sparsity=")


# -- notes -------------------------------------------------------------------------------------------------------
NOTED = json.loads((DATA / "notes_0e21ae5.json").read_text())


def _label(data: dict | RunRecord) -> str:
    from elsa.report.tables import job_row

    return job_row(data, Path("job"), Path("."))["method"]


def _summary(data: dict | RunRecord) -> list[str]:
    from elsa.report.summary import summary_lines

    rec = data if isinstance(data, RunRecord) else RunRecord.from_dict(data)
    return summary_lines(rec, Path("job") / RESULTS)


@pytest.mark.parametrize("name", sorted(NOTED))
def test_old_keys_read_as_notes_with_the_labels_and_lines_of_before(name):
    """Files written before notes existed: the row label is what 0e21ae5's report made, character for character;
    the summary has the same lines (the notes' lines now come last, in the label's order)."""
    expected = NOTED[name]
    assert _label(stored(name)) == expected["method"]
    if expected["summary"] is not None:
        lines = _summary(stored(name))
        assert sorted(lines) == sorted(expected["summary"])
        kept = [line for line in expected["summary"] if line not in {n.text for n in RunRecord.from_dict(
            stored(name)).notes}]
        assert lines[:len(kept)] == kept


def test_all_four_old_keys_become_four_typed_notes():
    rec = RunRecord.from_dict(stored("all_notes_e43c12b"))
    assert [n.kind for n in rec.notes] == ["fallback", "over_target", "lowrank", "experts_without_tokens"]
    fb, over, low, none = rec.notes
    assert fb.data == {"method": "sparsegpt", "blocks": rec.stats["fallback"]["blocks"], "of": 30}
    assert over.data["over"] == 0.032117 and over.data["target"] == "0.5"
    assert low.data["params"] == 12288 and none.data["count"] == 4
    assert RunRecord.from_dict(stored("e43c12b_wanda_tiny")).notes == []


def _with_notes(*made: Note, holder: str = "method_stats") -> dict:
    data = stored("e43c12b_wanda_tiny")
    data[holder]["notes"] = list(made)
    return data


def test_a_note_of_a_kind_nobody_knows_is_rendered_by_the_report_and_the_summary():
    """A method's own note in its stats: the report appends its label, the summary prints its line, results.json
    keeps it; neither knows the kind."""
    toy = Note("toy_kind", text="TOY: 3 of 4 toys were left dense", label="toy on 3/4", data={"toys": [1, 2, 3]})
    silent = Note("toy_silent", text="TOY SILENT: a line only")
    data = _with_notes(toy, silent)
    assert _label(data) == "wanda (toy on 3/4)"
    lines = _summary(data)
    assert lines[-2:] == [toy.text, silent.text]
    written = json.loads(json.dumps(record_dict(data)))        # as results.json holds it
    assert written["method_stats"]["notes"][0] == {"kind": "toy_kind", "label": "toy on 3/4",
                                                   "text": toy.text, "data": {"toys": [1, 2, 3]}}
    assert RunRecord.from_dict(written).notes == [toy, silent]
    assert _label(written) == "wanda (toy on 3/4)" and _summary(written) == lines
    assert _label(_with_notes(toy, holder="sparsity")) == "wanda (toy on 3/4)"
    odd = _with_notes("a string", toy)                 # a form this version cannot read: kept, not rendered
    assert _label(odd) == "wanda (toy on 3/4)" and record_dict(odd)["method_stats"]["notes"][0] == "a string"


def test_a_stored_note_is_not_repeated_by_its_old_key():
    """Today's files hold both the notes and the old keys (for other readers): each note is rendered once."""
    data = stored("all_notes_e43c12b")
    old = RunRecord.from_dict(data).notes
    data["method_stats"]["notes"] = [n.to_dict() for n in old if n.kind in ("fallback", "experts_without_tokens")]
    data["sparsity"]["notes"] = [n.to_dict() for n in old if n.kind in ("over_target", "lowrank")]
    assert RunRecord.from_dict(data).notes == old
    assert _label(data) == NOTED["all_notes_e43c12b"]["method"]
    assert sorted(_summary(data)) == sorted(NOTED["all_notes_e43c12b"]["summary"])


def test_thread_dependence_is_printed_and_leaves_the_label():
    note = notes.thread_dependence("sparsellm", 2)
    data = _with_notes(note)
    assert _label(data) == "wanda" and _summary(data)[-1].startswith("THREADS: sparsellm's weights depend on")


def test_the_report_and_the_summary_know_no_note_key():
    """No old key is read by name in either (the report's ``lowrank_params`` column is a figure, not the label)."""
    keys = {"report/tables": ("fallback", "experts_without_tokens", "over_target"),
            "report/summary": ("fallback", "experts_without_tokens", "over_target", "lowrank_params", "effective")}
    for module, names in keys.items():
        src = (REPO / "elsa" / f"{module}.py").read_text()
        for key in names:
            assert f'"{key}"' not in src and f"'{key}'" not in src, (module, key)
