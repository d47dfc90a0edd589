import hashlib

import pytest
import yaml

from octastem.io import InputError
from octastem.registry import fetch, load_registry


def _registry(tmp_path, content: bytes, sha=None):
    mirror = tmp_path / "mirror"
    (mirror / "sub").mkdir(parents=True)
    (mirror / "sub" / "thing.bin").write_bytes(content)
    reg = {
        "thing": {
            "url": "https://example.invalid/thing.bin",
            "sha256": sha or hashlib.sha256(content).hexdigest(),
            "mirror_path": "sub/thing.bin",
        }
    }
    path = tmp_path / "external.yaml"
    path.write_text(yaml.safe_dump(reg))
    return path, mirror


def test_fetch_from_mirror_verifies_hash(tmp_path, monkeypatch):
    path, mirror = _registry(tmp_path, b"octastem test payload")
    monkeypatch.setenv("OCTASTEM_MIRROR", str(mirror))
    monkeypatch.setenv("OCTASTEM_CACHE", str(tmp_path / "cache"))
    got = fetch("thing", registry=path)
    assert got.read_bytes() == b"octastem test payload"
    assert got.parent == tmp_path / "cache"


def test_fetch_rejects_wrong_hash(tmp_path, monkeypatch):
    path, mirror = _registry(tmp_path, b"tampered", sha="0" * 64)
    monkeypatch.setenv("OCTASTEM_MIRROR", str(mirror))
    monkeypatch.setenv("OCTASTEM_CACHE", str(tmp_path / "cache"))
    with pytest.raises(InputError, match="thing"):
        fetch("thing", registry=path)
    assert not (tmp_path / "cache" / "thing.bin").exists()


def test_offline_without_mirror_names_the_remedy(tmp_path, monkeypatch):
    path, _ = _registry(tmp_path, b"x")
    monkeypatch.delenv("OCTASTEM_MIRROR", raising=False)
    monkeypatch.setenv("OCTASTEM_CACHE", str(tmp_path / "cache"))
    with pytest.raises(InputError, match="OCTASTEM_MIRROR"):
        fetch("thing", registry=path)


def test_unknown_entry_and_project_registry():
    reg = load_registry()
    assert len(reg["reference_mace"]["sha256"]) == 64
    with pytest.raises(InputError, match="no entry"):
        fetch("nonexistent")
