"""Shared test helpers: compose the real configs, run the real pipeline / CLI on model=tiny."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"

# Tests never touch the network: W&B offline, and any Hub access is pointed at a closed local port.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Each test session gets its own ELSA_CACHE, so that no test reads a result (a dense perplexity, a dense zero-shot
# score) cached by an earlier session or another checkout. The inputs that are slow to prepare and depend only on
# their pinned sources (the converted model, the wheels, the prepared corpora and tasks, the tokenizers, the
# compiled kernels, keyed by their source) are symlinked from the user's cache, which they fill on first use.
SHARED_CACHE = ("corpora", "models", "tokenizers", "wheels", "tasks", "task_data", "kernels")


def _session_cache() -> Path:
    import atexit
    import shutil
    import tempfile

    user = Path(os.environ.get("ELSA_CACHE", Path.home() / ".cache" / "elsa")).expanduser()
    session = Path(tempfile.mkdtemp(prefix="elsa-test-cache-"))
    for name in SHARED_CACHE:
        (user / name).mkdir(parents=True, exist_ok=True)
        (session / name).symlink_to(user / name, target_is_directory=True)
    atexit.register(shutil.rmtree, session, ignore_errors=True)   # removes the links, not what they point to
    return session


os.environ["ELSA_CACHE"] = str(_session_cache())   # the CLI tests' subprocesses inherit it

# `make test` runs the suite in two pytest-xdist workers, one per core of the 2-core machine it is sized for: each
# worker, and every subprocess it starts (the CLI tests, torchrun's ranks), at one torch thread, since two workers
# at two threads each would oversubscribe the cores. A test that needs more threads sets them for itself.
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

TINY = ["model=tiny", "logger=none", "eval=quick", "eval.max_tokens=2048", "seqlen=128", "nsamples=4"]


def compose(overrides=()):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def run_pipeline(tmp_path: Path, *overrides: str) -> dict:
    """Compose with the tiny defaults plus ``overrides`` and run elsa.run.recipe.run in-process."""
    from elsa.run.recipe import run

    cfg = compose([*TINY, f"output_dir={tmp_path}", *overrides])
    return run(cfg)


def run_cli(*args: str, cwd: Path = REPO, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HYDRA_FULL_ERROR="0", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def read_results(path: Path) -> dict:
    return json.loads((Path(path) / "results.json").read_text())


@pytest.fixture
def tiny_model():
    from elsa.model.structure import TinyLlamaSource

    return TinyLlamaSource().load()
