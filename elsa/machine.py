"""What CPU this is, read once from /proc/cpuinfo: the keys under which measurements of it are cached (the plan's
rates, the bf16 decision, the compiled kernels and their decode plans), so that a cache dir shared by different
CPUs (a home dir mounted on a cluster's nodes) never hands one CPU's measurements to another."""

from __future__ import annotations

import functools
import hashlib
import os
import platform
from pathlib import Path


@functools.cache
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _field(name: str) -> str:
    return next((ln for ln in _cpuinfo().splitlines() if ln.split(":")[0].strip() == name), "")


def cpu_flags() -> str:
    """The first processor's ``flags`` line as /proc/cpuinfo prints it ("" where there is none)."""
    return _field("flags")


def cpu_name() -> str:
    """The CPU's model name, family and model where /proc/cpuinfo has them (a VM may print only a vendor name:
    "AMD EPYC", family 25 model 17), else what ``platform`` says."""
    name = _field("model name").partition(":")[2].strip()
    family, model = (_field(f).partition(":")[2].strip() for f in ("cpu family", "model"))
    if not name:
        return platform.processor() or platform.machine()
    return f"{name} (family {family} model {model})" if family and model else name


def cpu_id() -> str:
    """12 hex digits for this kind of CPU: its name, flags, architecture and core count."""
    return hashlib.md5(f"{cpu_name()}|{cpu_flags()}|{platform.machine()}|{os.cpu_count()}".encode()).hexdigest()[:12]


def last_level_cache_bytes() -> int:
    """The largest CPU cache's size (sysfs; 32 MiB when it cannot be read)."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = f.read_text().strip()
            unit = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}.get(text[-1:], 1)
            sizes.append(int(text.rstrip("KMG")) * unit)
        except (OSError, ValueError):
            continue
    return max(sizes, default=32 * 1024 ** 2)
