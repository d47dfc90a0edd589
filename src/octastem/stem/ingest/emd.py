"""EMD 1.0 files (py4DSTEM/emdfile and Berkeley EMD) read with h5py; other EMD flavours (Velox)
through rosettasciio. Calibration from the attributes and the dimension vectors of the array."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from octastem.io import InputError

from .calibration import axes_calibration, hdf5_attrs_calibration
from .rsciio import open_rsciio
from .source import Source, array_source


def emd_arrays(f: h5py.File) -> list[str]:
    """Groups holding an EMD array: ``emd_group_type`` 1 (EMD 1.0) or 'array' (emdfile) with ``data``."""
    found = []

    def visit(name, obj):
        if isinstance(obj, h5py.Group) and "emd_group_type" in obj.attrs:
            kind = obj.attrs["emd_group_type"]
            kind = kind.decode() if isinstance(kind, bytes) else kind
            if str(kind) in ("1", "array") and isinstance(obj.get("data"), h5py.Dataset):
                found.append(name)

    f.visititems(visit)
    return found


def is_emd(path: Path) -> bool:
    """Whether an HDF5 file holds an EMD array."""
    try:
        with h5py.File(path, "r") as f:
            return bool(emd_arrays(f))
    except OSError:
        return False


def _dim_step(group: h5py.Group, index: int) -> tuple[float | None, str]:
    """Step and units of EMD dimension ``index`` (dim0.. in emdfile, dim1.. in EMD 1.0)."""
    for key in (f"dim{index}", f"dim{index + 1}"):
        if key in group and isinstance(group[key], h5py.Dataset):
            break
    else:
        return None, ""
    dim = group[key]
    units = dim.attrs.get("units", "")
    units = units.decode() if isinstance(units, bytes) else str(units)
    values = np.asarray(dim[()], dtype=float).ravel()
    if values.size < 2:
        return None, units
    return float(values[1] - values[0]), units


@contextlib.contextmanager
def open_emd(path: Path, dataset: str | None, scan_shape, energy_eV: float | None) -> Iterator[Source]:
    """The one 3D or 4D EMD array of the file (or the configured ``dataset`` group)."""
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise InputError(f"{path}: not a readable EMD/HDF5 file, truncated or corrupt ({e})") from e
    with f:
        groups = emd_arrays(f)
        if dataset is not None:
            name = dataset[:-5] if dataset.endswith("/data") else dataset
            if name not in groups:
                raise InputError(f"{path}: field 'dataset' = {dataset!r} is not an EMD array group; found {groups}")
            groups = [name]
        groups4 = [g for g in groups if f[g]["data"].ndim in (3, 4)]
        if not groups4:
            f.close()
            # not an emdfile/Berkeley EMD: Velox and other EMD flavours through rosettasciio
            with open_rsciio(path, "emd", scan_shape, energy_eV) as src:
                yield src
            return
        if len(groups4) > 1:
            raise InputError(f"{path}: field 'dataset' must name one of the EMD arrays {groups4}")
        group = f[groups4[0]]
        ds = group["data"]
        cal = hdf5_attrs_calibration(ds.attrs)
        if ds.ndim == 4:
            axes_calibration(
                cal,
                [_dim_step(group, i) for i in range(2)],
                [_dim_step(group, i) for i in range(2, 4)],
                energy_eV or cal.get("energy_eV"),
            )
        yield array_source(path, ds, "emd", scan_shape, cal, ds.chunks[0] if ds.chunks and ds.ndim == 4 else None)
