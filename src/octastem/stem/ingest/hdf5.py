"""Generic HDF5 files: the configured dataset, or the only 4D one (``data`` first), with its attributes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import h5py

from octastem import io
from octastem.io import InputError

from .calibration import hdf5_attrs_calibration
from .source import Source, array_source


@contextlib.contextmanager
def open_hdf5(path: Path, dataset: str | None, scan_shape) -> Iterator[Source]:
    """The 4D-STEM array of an HDF5 file; its calibration from attributes with the internal names."""
    with io.open_hdf5(path, damaged=", truncated or corrupt") as f:
        if dataset is None:
            found = []
            f.visititems(
                lambda name, obj: found.append(name) if isinstance(obj, h5py.Dataset) and obj.ndim == 4 else None
            )
            if "data" in f and isinstance(f["data"], h5py.Dataset):
                dataset = "data"
            elif len(found) == 1:
                dataset = found[0]
            else:
                raise InputError(
                    f"{path}: field 'dataset' (HDF5 path of the 4D-STEM array) must be configured; "
                    f"the file holds {len(found)} 4D datasets {found[:5]}"
                )
        if dataset not in f or not isinstance(f[dataset], h5py.Dataset):
            raise InputError(f"{path}: field 'dataset' = {dataset!r} is not a dataset in the file")
        ds = f[dataset]
        cal = hdf5_attrs_calibration(ds.attrs)
        rows = ds.chunks[0] if ds.chunks and ds.ndim == 4 else None
        yield array_source(path, ds, "hdf5", scan_shape, cal, rows)
