"""Where a run is: its dir name (outputs/<overrides>: the same command line always maps to the same run dir),
the Hydra context it runs in (a single run or a sweep's job) and the code's git commit."""
from __future__ import annotations

import subprocess
from pathlib import Path

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[2]


def dirname(overrides: str | None, limit: int = 200) -> str:
    """A run dir's name from its command line's overrides; a name over ``limit`` characters (file systems take
    255) keeps its first characters and a hash of the whole, so it stays one per distinct command line."""
    import hashlib

    name = (overrides or "default").replace("/", "_")
    if len(name) <= limit:
        return name
    return f"{name[:limit - 17]}...{hashlib.sha1(name.encode()).hexdigest()[:14]}"


OmegaConf.register_new_resolver("elsa_dirname", dirname, replace=True)


def git_sha() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized() and HydraConfig.get().mode.name == "MULTIRUN"


def hydra_info() -> tuple[Path | None, list[str], str | None, str | None]:
    """(output dir, overrides, job name, sweep group) when running under Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None, [], None, None
    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    group = str(hc.sweep.dir)[-128:] if in_multirun() else None  # W&B: the runs of one sweep share a group
    return Path(hc.runtime.output_dir), overrides, ",".join(overrides) or "default", group
