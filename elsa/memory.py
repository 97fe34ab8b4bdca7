"""A job's memory: its peak resident memory (reset per job, so the jobs of one sweep process each report their
own), the memory it starts with, and the accelerator's peak allocation."""
from __future__ import annotations

import ctypes
import gc
import resource

import torch


def _release_freed_memory() -> None:
    """Hand memory that earlier jobs freed back to the OS (glibc keeps freed heap otherwise), so that it does
    not count in the next job's resident memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_memory(device: str) -> float | None:
    """Start this job's peak-memory window: Linux resets the process's peak RSS (VmHWM) on "5" written to
    /proc/self/clear_refs, so the jobs of one sweep process each report their own peak. Returns the resident
    memory (MB) the job starts with: what the process still holds from before (Python, torch, caches)."""
    _release_freed_memory()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    return _status_mb("VmRSS")


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_memory_mb(device: str, start_mb: float | None = None) -> dict:
    """Peak resident memory of this job (since :func:`reset_peak_memory`; the process's lifetime peak where
    the kernel cannot reset it), the resident memory it started with, and the accelerator's peak allocation."""
    hwm = _status_mb("VmHWM")
    out = {"cpu_rss": hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if start_mb is not None:
        out["cpu_rss_at_start"] = start_mb
    if str(device).startswith("cuda") and torch.cuda.is_available():
        out["gpu"] = torch.cuda.max_memory_allocated() / 2**20
    return out
