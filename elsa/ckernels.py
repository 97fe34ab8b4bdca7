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

from elsa.machine import cpu_id

log = logging.getLogger(__name__)
_LOADED: dict[str, tuple] = {}


def key(source: str) -> str:
    """A key for one source on this kind of CPU (elsa.machine.cpu_id: its name, flags, architecture, cores): a
    library built from it, or a plan timed with it, is valid here and nowhere else."""
    return hashlib.sha256((source + cpu_id()).encode()).hexdigest()[:16]


def _compiler(env: str, names: tuple[str, ...], what: str) -> str:
    """``$env`` or the first of ``names`` on PATH; OSError naming ``what`` when there is none."""
    found = os.environ.get(env) or next((shutil.which(n) for n in names if shutil.which(n)), None)
    if not found or not (shutil.which(found) or Path(found).is_file()):
        raise OSError(f"no {what} compiler ({found or '/'.join(names)}) on PATH")
    return found


def _build(target: Path, compiler: str, suffix: str, source: str, args, timeout: int) -> Path:
    """``source`` built by ``compiler`` (``args(src, out)``: its arguments) into ``target``, replaced at once
    (a failed or concurrent build never leaves half a library there); OSError with the compiler's message."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, out = Path(tmp) / f"source{suffix}", Path(tmp) / "lib.so"
        src.write_text(source)
        try:
            proc = subprocess.run([compiler, *args(str(src), str(out))], capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.SubprocessError as exc:
            raise OSError(f"{compiler} failed: {exc}") from None
        if proc.returncode:
            raise OSError(f"{compiler} failed: {proc.stderr.strip()[-300:]}")
        os.replace(out, target)
    return target


def compile_library(name: str, source: str, flags: tuple[str, ...] = ()) -> Path:
    """``source`` compiled once per source, flags and CPU into ``$ELSA_CACHE/kernels/<name>-<key>.so``; OSError
    (with the compiler's message) when there is no compiler or it fails. ``flags``: added to the compiler's."""
    from elsa.assets import cache_dir

    target = cache_dir() / "kernels" / f"{name}-{key(source + ' '.join(flags))}.so"
    if target.exists():
        return target
    cc = _compiler("CC", ("cc", "gcc"), "C")
    return _build(target, cc, ".c", source, lambda src, out: ["-O3", "-march=native", *flags, "-fopenmp", "-shared",
                                                             "-fPIC", "-o", out, src, "-lm"], 120)


def compile_torch_op(name: str, source: str) -> Path:
    """A C++ source that registers torch ops (``TORCH_LIBRARY_IMPL``) compiled once per source, CPU and torch
    build into ``$ELSA_CACHE/kernels/<name>-<key>.so`` against the installed torch's headers and libraries
    (torch.utils.cpp_extension's paths), for ``torch.ops.load_library``; OSError (with the compiler's message)
    when there is no C++ compiler, no torch headers, or the build fails."""
    import torch
    from torch.utils import cpp_extension

    from elsa.assets import cache_dir

    includes, libs = cpp_extension.include_paths(), cpp_extension.library_paths()
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    target = cache_dir() / "kernels" / f"{name}-{key(source + torch.__version__ + str(includes) + str(abi))}.so"
    if target.exists():
        return target
    cxx = _compiler("CXX", ("c++", "g++"), "C++")
    if not (Path(includes[0]) / "torch" / "library.h").is_file():
        raise OSError(f"torch's C++ headers are not installed ({includes[0]})")
    return _build(target, cxx, ".cpp", source, lambda src, out: [
        "-O2", "-std=c++20", "-shared", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *(f"-I{p}" for p in includes),
        "-o", out, src, *(f"-L{p}" for p in libs), *(f"-Wl,-rpath,{p}" for p in libs), "-lc10", "-ltorch_cpu"], 300)


def load(name: str, source: str, signatures: dict) -> tuple[ctypes.CDLL | None, str | None]:
    """(library, None) or (None, reason). ``signatures``: function name -> ctypes argtypes (restype void)."""
    k = key(source)
    if k in _LOADED:
        return _LOADED[k]
    try:
        lib = ctypes.CDLL(str(compile_library(name, source)))
        for fn, argtypes in signatures.items():
            getattr(lib, fn).argtypes = argtypes
            getattr(lib, fn).restype = None
        _LOADED[k] = (lib, None)
    except OSError as exc:
        log.warning("elsa: the C kernel %s is not available (%s); the torch path runs instead", name, exc)
        _LOADED[k] = (None, str(exc))
    return _LOADED[k]
