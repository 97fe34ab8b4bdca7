"""A job's memory: its peak resident memory (reset per job, so the jobs of one sweep process each report their
own), the memory it starts with, and the accelerator's peak allocation."""
from __future__ import annotations

import contextlib
import ctypes
import gc
import resource
import time

import torch


def _release_freed_memory() -> None:
    """Hand memory that earlier jobs freed back to the OS (glibc keeps freed heap otherwise), so that it does
    not count in the next job's resident memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# the job's peaks before the last per-phase reset (phase_window), so the job's own peak survives the resets
_CARRIED: dict[str, float] = {}


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def reset_peak_memory(device: str) -> float | None:
    """Start this job's peak-memory window: Linux resets the process's peak RSS (VmHWM) on "5" written to
    /proc/self/clear_refs, so the jobs of one sweep process each report their own peak. Returns the resident
    memory (MB) the job starts with: what the process still holds from before (Python, torch, caches)."""
    _release_freed_memory()
    _CARRIED.clear()
    _reset_hwm()
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    return _status_mb("VmRSS")


@contextlib.contextmanager
def phase_window(device: str, record: dict):
    """Measure one phase of a job (a decoder block of the layer-wise walk): fills ``record`` with its wall and
    CPU seconds and its own peak resident memory (``peak_rss_mb``; ``peak_gpu_mb`` on CUDA). The kernel's peak
    counter is reset for the phase where Linux allows it (else ``peak_rss_mb`` is the job's peak so far,
    ``peak_rss_scope: job``); the job's peak before the reset is carried, so :func:`peak_memory_mb` still
    reports the whole job's."""
    cuda = str(device).startswith("cuda") and torch.cuda.is_available()
    _carry(cuda)
    per_phase = _reset_hwm()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield record
    finally:
        record["wall_s"] = round(time.perf_counter() - wall, 3)
        record["cpu_s"] = round(time.process_time() - cpu, 3)
        record["peak_rss_mb"] = _status_mb("VmHWM")
        if not per_phase:
            record["peak_rss_scope"] = "job"
        if cuda:
            record["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        _carry(cuda)


def _carry(cuda: bool) -> None:
    hwm = _status_mb("VmHWM")
    if hwm is not None:
        _CARRIED["cpu_rss"] = max(_CARRIED.get("cpu_rss", 0.0), hwm)
    if cuda:
        _CARRIED["gpu"] = max(_CARRIED.get("gpu", 0.0), torch.cuda.max_memory_allocated() / 2**20)


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
    hwm = hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {"cpu_rss": max(hwm, _CARRIED.get("cpu_rss", 0.0))}
    if start_mb is not None:
        out["cpu_rss_at_start"] = start_mb
    if str(device).startswith("cuda") and torch.cuda.is_available():
        out["gpu"] = max(torch.cuda.max_memory_allocated() / 2**20, _CARRIED.get("gpu", 0.0))
    return out
