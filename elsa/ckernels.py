"""Small C kernels compiled from the system compiler at first use (``-O3 -march=native -fopenmp``), cached per
source and CPU under ``$ELSA_CACHE/kernels`` and loaded with ctypes; None (with the reason) where no compiler
is found or the build fails, so every caller keeps a pure-torch path."""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from elsa.machine import cpu_flags

log = logging.getLogger(__name__)
_LOADED: dict[str, tuple] = {}


def load(name: str, source: str, signatures: dict) -> tuple[ctypes.CDLL | None, str | None]:
    """(library, None) or (None, reason). ``signatures``: function name -> ctypes argtypes (restype void)."""
    key = hashlib.sha256((source + cpu_flags() + os.uname().machine).encode()).hexdigest()[:16]
    if key in _LOADED:
        return _LOADED[key]
    from elsa.assets import cache_dir

    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    target = cache_dir() / "kernels" / f"{name}-{key}.so"
    try:
        if not target.exists():
            if not cc:
                raise OSError("no C compiler (cc/gcc) on PATH")
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                src, out = Path(tmp) / f"{name}.c", Path(tmp) / f"{name}.so"
                src.write_text(source)
                proc = subprocess.run([cc, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-o", str(out),
                                       str(src), "-lm"], capture_output=True, text=True, timeout=120)
                if proc.returncode:
                    raise OSError(f"{cc} failed: {proc.stderr.strip()[:300]}")
                os.replace(out, target)
        lib = ctypes.CDLL(str(target))
        for fn, argtypes in signatures.items():
            getattr(lib, fn).argtypes = argtypes
            getattr(lib, fn).restype = None
        _LOADED[key] = (lib, None)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("elsa: the C kernel %s is not available (%s); the torch path runs instead", name, exc)
        _LOADED[key] = (None, str(exc))
    return _LOADED[key]
