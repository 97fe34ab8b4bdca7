"""The run record (elsa.results): stored results.json files of earlier versions read as they did.

tests/data/results/ holds
- e43c12b_wanda_tiny.json: written by commit e43c12b's pipeline (run.py model=tiny logger=none eval=quick
  eval.max_tokens=2048 seqlen=128 nsamples=4 method=wanda save_format=compressed measure_speed=true
  eval.zero_shot=[rte_local] eval.zero_shot_limit=8; from a git archive, hence git_sha null): every field the
  report reads (zero-shot, compressed size, decode speedup, reconstruction error, memory, times);
- legacy_elsa_quick.json: the shape the first pipeline wrote (no start, budget or allocation; a preset name in
  its overrides and the old trainer's method_stats.init);
- rows_e43c12b.json: the report rows e43c12b's elsa.report.job_row made of both; summary_e43c12b_wanda_tiny.txt:
  the summary e43c12b's pipeline printed for the first.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from conftest import REPO, run_pipeline
from elsa.results import RESULTS, SCHEMA_VERSION, RunRecord, read_record, record_dict

DATA = REPO / "tests" / "data" / "results"
STORED = ["e43c12b_wanda_tiny", "legacy_elsa_quick"]


def stored(name: str) -> dict:
    return json.loads((DATA / f"{name}.json").read_text())


@pytest.mark.parametrize("name", STORED)
def test_report_rows_of_stored_results_are_unchanged(name):
    """Every field of the row e43c12b's report made, from the record the current reader makes."""
    from elsa.report import job_row

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
    from elsa.pipeline import Run

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
