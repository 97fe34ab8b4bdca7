"""Sweeps (`python run.py -m ...`): skip finished jobs on a rerun, report each job's outcome.

How a sweep behaves (Hydra 1.3):
- every job writes ``<sweep dir>/<job num>/results.json`` with ``status`` done or failed;
- a job that raises is recorded by Hydra as FAILED and the launcher goes on with the other jobs; once
  the batch is over Hydra re-raises the first failure, so the sweep exits non-zero (``elsa.run.recipe.main``
  re-raises user errors in a sweep instead of calling ``sys.exit``, which would stop the whole sweep);
- rerunning the same command with ``hydra.sweep.dir=<that dir>`` returns the stored results of every
  job whose results.json says done (before any model is loaded) and reruns the others.

``SweepCallback`` (registered under ``hydra.callbacks`` in conf/config.yaml) logs one line per job and,
at the end of the sweep, the jobs' table (dense first, perplexity and time per job:
``elsa.report.tables.summary``) and the report command.
"""
from __future__ import annotations

import logging
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from elsa.errors import ElsaError
from elsa.report.results import RESULTS, RunRecord, read_record, read_results  # noqa: F401 - older callers import these here

log = logging.getLogger(__name__)
# overrides that change where or how a job runs, not what it computes: a rerun may change them freely
_NEUTRAL = ("hardware", "logger", "skip_done", "hydra/launcher")


def _job_identity(overrides) -> list[str]:
    keys = [(o.split("=", 1)[0].lstrip("+~"), o) for o in overrides]
    return sorted(o for k, o in keys if k.split(".", 1)[0] not in _NEUTRAL)


def finished_result(out: Path, overrides: list[str]) -> dict | None:
    """The stored results when ``out`` already holds this job's finished run, else None.

    A done results.json written by a job with other overrides means the sweep dir is being reused for a
    different grid (job numbers shifted): refuse rather than return another job's numbers. Overrides of
    hardware and logger do not count (a killed local sweep may be finished on SLURM).
    """
    data = read_results(out)
    rec = None if data is None else RunRecord.from_dict(data)
    if rec is None or rec.status != "done":
        return None
    stored = rec.overrides
    if stored is not None and _job_identity(stored) != _job_identity(overrides):
        raise ElsaError(
            f"{Path(out) / RESULTS} holds a finished job with other overrides ({' '.join(stored)}); "
            "rerun a sweep with the same command and hydra.sweep.dir, or use a new hydra.sweep.dir")
    return data


def sweep_results(sweep_dir: Path) -> list[tuple[Path, RunRecord | None]]:
    """(job dir, its record or None) for every job dir Hydra made under ``sweep_dir``."""
    dirs = sorted({p.parent.parent for p in Path(sweep_dir).glob("**/.hydra/overrides.yaml")})
    return [(d, read_record(d)) for d in dirs]


class SweepCallback(Callback):
    """One log line per finished job; a summary at the end of a successful sweep. The sweep owns the memo of its
    last layer-wise solution (elsa.run.memo), which a later job's start stage reuses."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        from elsa.run.memo import open_for_sweep

        self.memo = open_for_sweep()

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        if config.hydra.mode.name != "MULTIRUN":
            return
        out = Path(config.hydra.runtime.output_dir)
        rec = read_record(out)
        status = rec.status if rec is not None else job_return.status.name.lower()
        line = f"job {config.hydra.job.num} [{' '.join(job_return.overrides or [])}]: {status}"
        if status != "done":
            line += f": {(rec.error if rec is not None else None) or ''}"
            log.error(line)
        else:
            log.info(line)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from elsa.run.memo import close_for_sweep

        close_for_sweep()
        self.memo = None
        sweep_dir = Path(config.hydra.sweep.dir)
        counts: dict[str, int] = {}
        for _, rec in sweep_results(sweep_dir):
            status = rec.status if rec is not None else "missing"
            counts[status] = counts.get(status, 0) + 1
        summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        from elsa.report.tables import collect, summary as table  # pandas: imported only when a sweep ends

        df = collect(sweep_dir) if counts else None
        if df is not None and not df.empty:
            print("\n" + table(df) + "\n", flush=True)
        log.info("sweep %s finished: %s; table and plots: python -m elsa.report %s", sweep_dir, summary,
                 sweep_dir)
