"""A raw 4D-STEM array read lazily, a few scan rows at a time, whatever the file format.

Every reader (:mod:`.hdf5`, :mod:`.arina`, :mod:`.npy`, :mod:`.emd`, :mod:`.mib`, :mod:`.rsciio`)
yields a :class:`Source`: the 4D shape and dtype, ``read(r0, r1)`` for scan rows r0..r1 and the
calibration found in the file. A 3D stack of frames becomes 4D with the scan shape (scan_y,
scan_x): the frames fill the scan row by row, and their number must be scan_y x scan_x.
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
    notes: dict = field(default_factory=dict)  # what the reader did beyond copying (recorded in the output)


def check_frame_count(path: Path, frames: int, scan_shape) -> tuple[int, int]:
    """(scan_y, scan_x) of ``scan_shape``; :class:`InputError` unless scan_y x scan_x = ``frames``."""
    if scan_shape is None:
        raise InputError(
            f"{path}: field 'data' must be 4D (scan_y, scan_x, k_y, k_x); it is a stack of {frames} frames: "
            f"set calibration field 'scan_shape' (scan_y, scan_x), with scan_y x scan_x = {frames}, to arrange "
            "them into a 4D scan"
        )
    ny, nx = (int(v) for v in scan_shape)
    if ny * nx != frames:
        raise InputError(
            f"{path}: field 'scan_shape' = ({ny}, {nx}) needs {ny} x {nx} = {ny * nx} frames, the file holds "
            f"{frames} (truncated acquisition or wrong scan shape)"
        )
    return ny, nx


def stack_reader(path: Path, shape: tuple[int, ...], getter: Callable[[slice], Any], scan_shape) -> tuple:
    """Turn a 3D frame stack (n, k_y, k_x) into a row reader given the scan shape (scan_y, scan_x)."""
    ny, nx = check_frame_count(path, shape[0], scan_shape)

    def read(r0: int, r1: int) -> np.ndarray:
        return np.asarray(getter(slice(r0 * nx, r1 * nx))).reshape(r1 - r0, nx, shape[1], shape[2])

    return (ny, nx, shape[1], shape[2]), read


def array_source(
    path: Path, arr: Any, fmt: str, scan_shape, calibration: dict, preferred_rows=None, notes=None
) -> Source:
    """A :class:`Source` over an array-like ``arr`` (h5py dataset, memory map, dask array): 4D, or a 3D stack."""
    shape = tuple(int(n) for n in arr.shape)
    if len(shape) == 4:
        if scan_shape is not None and tuple(int(v) for v in scan_shape) != shape[:2]:
            raise InputError(
                f"{path}: field 'scan_shape' = {tuple(int(v) for v in scan_shape)} contradicts the scan of the 4D "
                f"data, {shape[:2]} (scan_y, scan_x); expected it unset or equal"
            )

        def read(r0: int, r1: int) -> np.ndarray:
            return np.asarray(arr[r0:r1])

    elif len(shape) == 3:
        shape, read = stack_reader(path, shape, lambda s: arr[s], scan_shape)
    else:
        raise InputError(
            f"{path}: field 'data' must be 4D (scan_y, scan_x, k_y, k_x) or a 3D frame stack with "
            f"'scan_shape', got rank {len(shape)} with shape {shape}"
        )
    return Source(shape, np.dtype(arr.dtype), read, fmt, calibration, preferred_rows, dict(notes or {}))
