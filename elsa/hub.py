"""Fail fast, in one line, when a hub-backed model or dataset is asked for without a reachable Hub."""
from __future__ import annotations

import os
import socket
from functools import lru_cache
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


def require_hub(what: str, alternative: str) -> None:
    """Raise a one-line error unless the Hub can be reached (or offline mode with a local cache is asked)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        return  # the user promises a populated local cache
    if not hub_reachable():
        raise ElsaError(f"cannot reach the Hugging Face Hub to load {what}; {alternative}")
