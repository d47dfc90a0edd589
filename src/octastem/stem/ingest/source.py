"""A raw 4D-STEM array read lazily, a few scan rows at a time, whatever the file format.

Every reader (:mod:`.hdf5`, :mod:`.npy`, :mod:`.emd`, :mod:`.rsciio`) yields a :class:`Source`:
the 4D shape and dtype, ``read(r0, r1)`` for scan rows r0..r1 and the calibration found in the
file. A 3D stack of frames becomes 4D with the configured ``scan_shape``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from octastem.io import InputError

#: Values of the ``fmt`` setting: "auto" guesses the format from the extension.
FORMATS = ("auto", "hdf5", "npy", "emd", "mib", "empad", "rsciio")


@dataclass
class Source:
    """A lazily read 4D-STEM array: ``read(r0, r1)`` returns scan rows r0..r1 as numpy."""

    shape: tuple[int, int, int, int]
    dtype: np.dtype
    read: Callable[[int, int], np.ndarray]
    fmt: str
    calibration: dict = field(default_factory=dict)  # calibration found in the file (internal names)
    preferred_rows: int | None = None  # rows per storage chunk of the source, if known


def stack_reader(path: Path, shape: tuple[int, ...], getter: Callable[[slice], Any], scan_shape) -> tuple:
    """Turn a 3D frame stack (n, k_y, k_x) into a row reader given the scan shape (scan_y, scan_x)."""
    if scan_shape is None:
        raise InputError(
            f"{path}: field 'data' must be 4D (scan_y, scan_x, k_y, k_x); it is a stack of {shape[0]} frames "
            f"{shape}: set calibration field 'scan_shape' (scan_y, scan_x) to arrange them into a 4D scan"
        )
    ny, nx = (int(v) for v in scan_shape)
    if ny * nx != shape[0]:
        raise InputError(
            f"{path}: field 'scan_shape' = ({ny}, {nx}) needs {ny * nx} frames, the file holds {shape[0]} "
            "(truncated acquisition or wrong scan shape)"
        )

    def read(r0: int, r1: int) -> np.ndarray:
        return np.asarray(getter(slice(r0 * nx, r1 * nx))).reshape(r1 - r0, nx, shape[1], shape[2])

    return (ny, nx, shape[1], shape[2]), read


def array_source(path: Path, arr: Any, fmt: str, scan_shape, calibration: dict, preferred_rows=None) -> Source:
    """A :class:`Source` over an array-like ``arr`` (h5py dataset, memory map, dask array): 4D, or a 3D stack."""
    shape = tuple(int(n) for n in arr.shape)
    if len(shape) == 4:

        def read(r0: int, r1: int) -> np.ndarray:
            return np.asarray(arr[r0:r1])

    elif len(shape) == 3:
        shape, read = stack_reader(path, shape, lambda s: arr[s], scan_shape)
    else:
        raise InputError(
            f"{path}: field 'data' must be 4D (scan_y, scan_x, k_y, k_x) or a 3D frame stack with "
            f"'scan_shape', got rank {len(shape)} with shape {shape}"
        )
    return Source(shape, np.dtype(arr.dtype), read, fmt, calibration, preferred_rows)
