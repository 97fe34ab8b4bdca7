"""Experiment tracking (W&B or nothing) and the run's results.json."""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=False, default=str)
        fh.write("\n")
    os.replace(tmp, path)


class NullTracker:
    """logger=none: records nothing."""

    def start(self, config: dict, output_dir: Path, name: str | None = None, group: str | None = None) -> None:
        pass

    def log(self, metrics: dict, step: int | None = None) -> None:
        pass

    def summary(self, metrics: dict) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = v
    return out


class WandbTracker(NullTracker):
    """Weights & Biases. ``mode`` null: WANDB_MODE if set, else online with an API key, else offline."""

    def __init__(self, project: str = "elsa", entity: str | None = None, mode: str | None = None,
                 tags: list | None = None):
        self.project, self.entity, self.mode, self.tags = project, entity, mode, list(tags or [])
        self.run = None

    def resolved_mode(self) -> str:
        if self.mode:
            return self.mode
        if os.environ.get("WANDB_MODE"):
            return os.environ["WANDB_MODE"]
        has_key = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").exists() and \
            "api.wandb.ai" in (Path.home() / ".netrc").read_text(errors="ignore")
        return "online" if has_key else "offline"

    def start(self, config, output_dir, name=None, group=None):
        import wandb

        mode = self.resolved_mode()
        try:
            self.run = wandb.init(project=self.project, entity=self.entity, mode=mode, dir=str(output_dir),
                                  config=config, name=name, group=group, tags=self.tags, reinit="finish_previous")
        except Exception as exc:  # never let tracking kill an experiment
            log.warning("W&B init failed in mode %s (%s); falling back to offline", mode, exc)
            self.run = wandb.init(project=self.project, mode="offline", dir=str(output_dir), config=config,
                                  name=name, group=group, reinit="finish_previous")
        log.info("W&B run %s (mode %s) in %s", self.run.id, mode, output_dir)

    def log(self, metrics, step=None):
        if self.run is not None:
            self.run.log(_flatten(metrics), step=step)

    def summary(self, metrics):
        if self.run is not None:
            self.run.summary.update(_flatten(metrics))

    def finish(self, exit_code=0):
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None
