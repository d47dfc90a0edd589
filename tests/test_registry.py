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


def _archive_registry(tmp_path, payload: bytes, member_sha=None):
    """A registry entry for a tar.gz in a mirror folder, used through its member ``model.bin``."""
    import io
    import tarfile

    mirror = tmp_path / "mirror"
    mirror.mkdir(parents=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("model.bin")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    (mirror / "thing.tar.gz").write_bytes(buf.getvalue())
    entry = {
        "url": "https://example.invalid/thing.tar.gz",
        "sha256": hashlib.sha256(buf.getvalue()).hexdigest(),
        "mirror_path": "thing.tar.gz",
        "member": "model.bin",
    }
    if member_sha is not False:
        entry["member_sha256"] = member_sha or hashlib.sha256(payload).hexdigest()
    path = tmp_path / "external.yaml"
    path.write_text(yaml.safe_dump({"thing": entry}))
    return path, mirror


def test_unpacked_member_is_verified_on_every_use(tmp_path, monkeypatch):
    path, mirror = _archive_registry(tmp_path, b"the archived model")
    monkeypatch.setenv("OCTASTEM_MIRROR", str(mirror))
    monkeypatch.setenv("OCTASTEM_CACHE", str(tmp_path / "cache"))
    got = fetch("thing", registry=path)
    assert got.name == "model.bin" and got.read_bytes() == b"the archived model"
    assert fetch("thing", registry=path) == got  # the cached copy, verified again
    got.write_bytes(b"a replaced model")  # the archive in the cache is untouched
    with pytest.raises(InputError, match=r"unpacked copy .*model.bin has sha256 .* changed after unpacking"):
        fetch("thing", registry=path)
    got.unlink()  # the remedy the message names: unpacked again from the verified archive
    assert fetch("thing", registry=path).read_bytes() == b"the archived model"


def test_member_with_wrong_or_missing_sha256_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("OCTASTEM_CACHE", str(tmp_path / "cache"))
    path, mirror = _archive_registry(tmp_path / "a", b"payload", member_sha="0" * 64)
    monkeypatch.setenv("OCTASTEM_MIRROR", str(mirror))
    with pytest.raises(InputError, match="member_sha256 0000"):
        fetch("thing", registry=path)
    path, _ = _archive_registry(tmp_path / "b", b"payload", member_sha=False)
    with pytest.raises(InputError, match="entry 'thing' lacks field 'member_sha256'"):
        load_registry(path)


def test_project_registry_records_the_unpacked_reference():
    entry = load_registry()["reference_mace"]
    assert entry["member"] == "psiflow3_model.model" and len(entry["member_sha256"]) == 64
