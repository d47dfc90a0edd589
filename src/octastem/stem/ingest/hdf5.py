"""Generic HDF5 files: the configured dataset, or the one 4D scan (``data`` first), with its attributes.

The datasets of a file are listed through its external links (a NeXus master file's frames live
in linked data files), and compressed datasets are read with the HDF5 filters of ``hdf5plugin``
(bitshuffle/LZ4 of DECTRIS detectors, Blosc, Zstd ...). A DECTRIS ARINA master file without a
configured dataset is read as a whole acquisition by :mod:`.arina`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py

from octastem import io
from octastem.io import InputError

from .calibration import hdf5_attrs_calibration
from .source import Source, array_source

#: Datasets named in a message, at most.
LISTED = 12


def load_filter_plugins() -> bool:
    """Register the HDF5 compression filters of ``hdf5plugin`` with h5py; False if it is not installed."""
    try:
        import hdf5plugin  # noqa: F401 - registers the filters on import
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class Entry:
    """A dataset of a file, found by following its links: path, shape, dtype, and the file holding it."""

    name: str
    shape: tuple[int, ...] | None
    dtype: str
    target: str = ""  # the linked file (external links), or why the link is broken

    def describe(self) -> str:
        where = f" -> {self.target}" if self.target else ""
        if self.shape is None:
            return f"{self.name}{where}"
        return f"{self.name} {self.shape} {self.dtype}{where}"


def list_datasets(f: h5py.File) -> list[Entry]:
    """Every dataset of ``f``, external links followed (each linked group once); broken links listed too."""
    found: list[Entry] = []
    seen: set[tuple[str, str]] = set()

    def walk(group: h5py.Group, prefix: str, target: str, depth: int) -> None:
        for key in group:
            name = f"{prefix}{key}"
            link = group.get(key, getlink=True)
            here = f"{link.filename}:{link.path}" if isinstance(link, h5py.ExternalLink) else target
            try:
                obj = group[key]
            except (KeyError, OSError):
                found.append(Entry(name, None, "", f"{here} (broken link: target missing)"))
                continue
            if isinstance(obj, h5py.Dataset):
                found.append(Entry(name, tuple(int(n) for n in obj.shape), str(obj.dtype), here))
            elif isinstance(obj, h5py.Group) and depth < 16:
                ident = (obj.file.filename, obj.name)
                if ident not in seen:
                    seen.add(ident)
                    walk(obj, f"{name}/", here, depth + 1)

    walk(f, "", "", 0)
    return found


def candidates(entries: list[Entry]) -> list[Entry]:
    """The entries that can hold a 4D-STEM scan: 4D arrays first, then 3D frame stacks."""
    four = [e for e in entries if e.shape is not None and len(e.shape) == 4]
    three = [e for e in entries if e.shape is not None and len(e.shape) == 3 and min(e.shape[1:]) >= 2]
    return four + three


def describe(entries: list[Entry]) -> str:
    """The first :data:`LISTED` entries, one per item, with the count of the others."""
    text = "; ".join(e.describe() for e in entries[:LISTED])
    if len(entries) > LISTED:
        text += f"; ... and {len(entries) - LISTED} more"
    return text or "none"


def holdings(f: h5py.File) -> str:
    """What ``f`` holds, for a message: its candidate datasets with shapes, then the names of the others."""
    entries = list_datasets(f)
    found = candidates(entries)
    others = [e.name for e in entries if e not in found]
    text = f"it holds {len(found)} candidate dataset(s) (4D scans and 3D frame stacks): {describe(found)}"
    if others:
        more = f", ... ({len(others) - LISTED} more)" if len(others) > LISTED else ""
        text += f"; other datasets: {', '.join(others[:LISTED])}{more}"
    return text


def missing_filters(ds: h5py.Dataset) -> list[str]:
    """The HDF5 filters of ``ds`` that this installation cannot decode, as 'id (name)'."""
    plist = ds.id.get_create_plist()
    missing = []
    for i in range(plist.get_nfilters()):
        fid, _, _, name = plist.get_filter(i)
        if not h5py.h5z.filter_avail(fid):
            label = name.decode(errors="replace").split(";")[0].strip() if isinstance(name, bytes) else str(name)
            missing.append(f"{fid} ({label or 'unnamed'})")
    return missing


def check_filters(path: Path, name: str, ds: h5py.Dataset) -> None:
    """Raise :class:`InputError` if ``ds`` is compressed with a filter that cannot be decoded here."""
    missing = missing_filters(ds)
    if missing:
        raise InputError(
            f"{path}: field 'dataset' = {name!r} is compressed with HDF5 filter {', '.join(missing)}, which this "
            "installation cannot decode; expected the filters of hdf5plugin (pip install hdf5plugin, pinned in "
            "envs/requirements.txt)"
        )


def choose_dataset(path: Path, f: h5py.File) -> str:
    """The dataset to read when none is configured: ``data``, else the one 4D array, else the one 3D stack."""
    if isinstance(f.get("data"), h5py.Dataset):
        return "data"
    entries = list_datasets(f)
    found = candidates(entries)
    four = [e for e in found if len(e.shape) == 4]
    if len(four) == 1:
        return four[0].name
    if not four and len(found) == 1:
        return found[0].name  # a lone frame stack: its scan_shape is checked by the reader
    if found:
        raise InputError(f"{path}: field 'dataset' (HDF5 path of the 4D-STEM data) must be configured: {holdings(f)}")
    groups = sorted(k for k in f if isinstance(f.get(k), h5py.Group))
    hint = ""
    if "STEM Metadata" in f:
        master = path.with_name(f"{path.stem}_master{path.suffix}")
        hint = f"; this looks like the scan metadata of a DECTRIS acquisition: give its master file {master.name}"
    raise InputError(
        f"{path}: field 'data' not found: the file holds no 4D scan and no 3D frame stack (datasets: "
        f"{describe(entries)}; groups: {groups}){hint}"
    )


@contextlib.contextmanager
def open_hdf5(path: Path, dataset: str | None, scan_shape, energy_eV: float | None = None) -> Iterator[Source]:
    """The 4D-STEM array of an HDF5 file; its calibration from attributes with the internal names."""
    from .arina import close_linked, is_arina, open_arina

    load_filter_plugins()
    with io.open_hdf5(path, damaged=", truncated or corrupt") as f:
        if dataset is None and is_arina(f):
            f.close()
            with open_arina(path, scan_shape, energy_eV) as src:
                yield src
            return
        if dataset is None:
            dataset = choose_dataset(path, f)
        try:
            ds = f[dataset]
        except (KeyError, OSError, ValueError):
            ds = None
        if not isinstance(ds, h5py.Dataset):
            raise InputError(f"{path}: field 'dataset' = {dataset!r} is not a dataset in the file; {holdings(f)}")
        try:
            check_filters(path, dataset, ds)
            cal = hdf5_attrs_calibration(ds.attrs)
            rows = ds.chunks[0] if ds.chunks and ds.ndim == 4 else None
            yield array_source(path, ds, "hdf5", scan_shape, cal, rows)
        finally:
            close_linked(f, [ds])
