"""Vendor formats through rosettasciio, read lazily as dask arrays: EMPAD ``.xml`` + ``.raw``, Velox
EMD and any other rosettasciio format that yields a 4D array (or a 3D stack of frames with a
configured scan shape); Merlin ``.mib`` files are checked first by :mod:`.mib`. Calibration from
the axes and the HyperSpy metadata."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from octastem.io import InputError

from .calibration import axes_calibration
from .source import FORMATS, Source, array_source

#: rosettasciio plugin of each named format ("rsciio": the plugin of the file extension).
PLUGINS = {"mib": "QuantumDetector", "empad": "EMPAD", "emd": "EMD"}


def rsciio_api(path: Path, fmt: str):
    """The rosettasciio reader module for ``fmt`` (or, for "rsciio", the file's extension)."""
    import importlib

    import rsciio

    ext = path.suffix.lower().lstrip(".")
    for plugin in rsciio.IO_PLUGINS:
        if (fmt in PLUGINS and plugin["name"] == PLUGINS[fmt]) or (
            fmt == "rsciio" and ext in [e.lower() for e in plugin["file_extensions"]]
        ):
            return importlib.import_module(plugin["api"])
    raise InputError(f"{path}: field 'fmt': no rosettasciio reader for '.{ext}'; expected one of {FORMATS}")


@contextlib.contextmanager
def open_rsciio(path: Path, fmt: str, scan_shape, energy_eV: float | None) -> Iterator[Source]:
    """The first 4D signal of the file (or a 3D stack with ``scan_shape``), read lazily."""
    api = rsciio_api(path, fmt)
    kwargs: dict[str, Any] = {"lazy": True}
    try:
        signals = api.file_reader(str(path), **kwargs)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure means a bad file; keep the cause
        raise InputError(
            f"{path}: rosettasciio ({api.__name__}) cannot read the file, truncated or corrupt? "
            f"({type(e).__name__}: {e})"
        ) from e
    chosen = None
    for s in signals:
        if np.ndim(s["data"]) == 4 or (np.ndim(s["data"]) == 3 and scan_shape is not None):
            chosen = s
            break
    if chosen is None:
        shapes = [tuple(np.shape(s["data"])) for s in signals]
        raise InputError(
            f"{path}: field 'data' must be 4D (scan_y, scan_x, k_y, k_x); rosettasciio found arrays {shapes}"
        )
    data = chosen["data"]
    cal = signal_calibration(chosen, energy_eV)
    chunks = getattr(data, "chunks", None)
    rows = int(chunks[0][0]) if chunks and np.ndim(data) == 4 else None
    yield array_source(path, data, fmt, scan_shape, cal, rows)


def signal_calibration(signal: dict, energy_eV: float | None) -> dict:
    """Energy and semi-angle from the HyperSpy metadata, steps and k sampling from the axes of a 4D signal."""
    cal: dict = {}
    md = signal.get("metadata", {}) or {}
    tem = md.get("Acquisition_instrument", {}).get("TEM", {}) if isinstance(md, dict) else {}
    if "beam_energy" in tem:  # keV in HyperSpy metadata
        cal["energy_eV"] = float(tem["beam_energy"]) * 1e3
    if "convergence_angle" in tem:  # mrad
        cal["semiangle_mrad"] = float(tem["convergence_angle"])
    if np.ndim(signal["data"]) == 4:
        axes = sorted(signal.get("axes", []), key=lambda a: a.get("index_in_array", 0))
        if len(axes) == 4:
            steps = [(float(a.get("scale", 1.0)), str(a.get("units") or "")) for a in axes]
            axes_calibration(cal, steps[:2], steps[2:], energy_eV or cal.get("energy_eV"))
    return cal
