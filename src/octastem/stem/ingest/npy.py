"""NumPy ``.npy`` files, memory mapped (no calibration in the file)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from octastem.io import InputError

from .source import Source, array_source


@contextlib.contextmanager
def open_npy(path: Path, scan_shape) -> Iterator[Source]:
    """The array of a ``.npy`` file, memory mapped; the map is closed with the block."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"{path}: not a readable .npy file, truncated or corrupt ({e})") from e
    if not isinstance(arr, np.ndarray):
        raise InputError(f"{path}: expected a single array in the .npy file, got {type(arr).__name__}")
    try:
        yield array_source(path, arr, "npy", scan_shape, {})
    finally:
        mm = getattr(arr, "_mmap", None)
        del arr
        if mm is not None:
            with contextlib.suppress(BufferError):
                mm.close()
