"""External data by URL + sha256 (pooch), with an offline mirror folder.

Entries live in ``resources/external.yaml``. :func:`fetch` returns a local path to the file (or
to ``member`` inside an archive): from the cache when already verified there, else copied from
the mirror folder named by ``OCTASTEM_MIRROR`` when that folder has it, else downloaded from
the URL. Every route checks the sha256 before the file is used; an archive's unpacked ``member``
is checked against the entry's ``member_sha256`` on every call, so a copy changed in the cache
after unpacking is refused.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pooch
import yaml

from octastem.io import InputError

MIRROR_ENV = "OCTASTEM_MIRROR"
CACHE_ENV = "OCTASTEM_CACHE"
DEFAULT_REGISTRY = Path(__file__).resolve().parents[2] / "resources" / "external.yaml"


def load_registry(path: str | os.PathLike | None = None) -> dict:
    """Read the registry YAML; each entry needs url, sha256 and mirror_path (and member_sha256 with member)."""
    path = Path(path or DEFAULT_REGISTRY)
    if not path.exists():
        raise InputError(f"{path}: external-data registry not found")
    reg = yaml.safe_load(path.read_text()) or {}
    for name, entry in reg.items():
        for key in ("url", "sha256", "mirror_path", *(("member_sha256",) if "member" in entry else ())):
            if key not in entry:
                raise InputError(f"{path}: entry '{name}' lacks field '{key}'")
    return reg


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or pooch.os_cache("octastem"))


def _mirror_downloader(mirror_file: Path):
    def download(url, output_file, pooch_obj):  # signature required by pooch
        pooch.get_logger().info("Copying %s from the mirror instead.", mirror_file)
        shutil.copyfile(mirror_file, output_file)

    return download


def fetch(name: str, registry: str | os.PathLike | None = None, progress: bool = False) -> Path:
    """Local path of registry entry ``name``, verified against its sha256."""
    reg = load_registry(registry)
    if name not in reg:
        raise InputError(f"external-data registry: no entry '{name}' (known: {sorted(reg)})")
    entry = reg[name]
    downloader = None
    mirror = os.environ.get(MIRROR_ENV)
    if mirror:
        mirror_file = Path(mirror) / entry["mirror_path"]
        if mirror_file.exists():
            downloader = _mirror_downloader(mirror_file)
    if downloader is None and progress:
        downloader = pooch.HTTPDownloader(progressbar=True)
    member = entry.get("member")
    processor = pooch.Untar(members=[member]) if member else None
    fname = Path(entry["mirror_path"]).name
    try:
        out = pooch.retrieve(
            entry["url"],
            known_hash=f"sha256:{entry['sha256']}",
            fname=fname,
            path=cache_dir(),
            downloader=downloader,
            processor=processor,
            progressbar=False,
        )
    except ValueError as e:  # pooch raises ValueError on a hash mismatch
        raise InputError(f"external data '{name}': {e}") from e
    except Exception as e:  # network or filesystem: name the remedy
        raise InputError(
            f"external data '{name}': could not obtain {entry['url']} ({e}); without internet, set "
            f"{MIRROR_ENV} to a folder holding {entry['mirror_path']}"
        ) from e
    if isinstance(out, list):
        out = out[0]
    out = Path(out)
    if member:
        _check_member(name, entry, out)
    return out


def sha256_of(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file's content, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_member(name: str, entry: dict, path: Path) -> None:
    """The unpacked ``member`` must still hold what the verified archive held (``member_sha256``):
    the archive is verified when it arrives, its unpacked copy on every use."""
    expected = entry["member_sha256"]
    got = sha256_of(path)
    if got != str(expected).lower():
        raise InputError(
            f"external data '{name}': unpacked copy {path} has sha256 {got}, the registry records "
            f"member_sha256 {expected}; it was changed after unpacking and is not used. Delete it "
            "to have it unpacked again from the verified archive"
        )


def is_entry(name: str, registry: str | os.PathLike | None = None) -> bool:
    """Whether ``name`` is an entry of the registry (rather than a path to a local file)."""
    return str(name) in load_registry(registry)


def resolve(name_or_path: str | os.PathLike, registry: str | os.PathLike | None = None, progress: bool = False) -> Path:
    """A registry entry's verified local path (:func:`fetch`), or ``name_or_path`` itself as a file path.

    The one place that decides what a setting such as ``md.potential`` or ``student.reference`` names;
    a path is checked by whoever reads the file."""
    if is_entry(name_or_path, registry):
        return fetch(str(name_or_path), registry, progress=progress)
    return Path(name_or_path)
