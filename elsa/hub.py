"""Fail fast, in one line, when a hub-backed model or dataset is asked for without a reachable Hub."""
from __future__ import annotations

import os
import socket
from functools import lru_cache
from typing import Callable
from urllib.parse import urlparse

from elsa.errors import ElsaError


@lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")


def require_hub(what: str, alternative: str, cached: Callable[[], bool] | None = None) -> None:
    """Raise a one-line error unless the Hub can be reached. With HF_HUB_OFFLINE set the user promises a local
    cache: ``cached()`` (when given) says whether it holds ``what``, and the same line is raised when not."""
    if offline():
        if cached is None or cached():
            return
        raise ElsaError(f"cannot reach the Hugging Face Hub to load {what} (HF_HUB_OFFLINE is set and the local "
                        f"cache does not hold it); {alternative}")
    if not hub_reachable():
        raise ElsaError(f"cannot reach the Hugging Face Hub to load {what}; {alternative}")


def offline_errors() -> tuple[type[BaseException], ...]:
    """What huggingface_hub raises when a file is neither reachable nor cached (datasets wraps them in a
    ConnectionError), for the one-line error at load time."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    return OfflineModeIsEnabled, LocalEntryNotFoundError


def model_cached(repo: str, revision: str | None) -> bool:
    """Whether the local Hugging Face cache holds ``repo``'s config.json (what loading reads first)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo, "config.json", revision=revision), str)
