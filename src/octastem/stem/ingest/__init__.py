"""Raw 4D-STEM files -> the internal HDF5 format (``io.write_4dstem`` layout), streamed in chunks.

One reader module per kind of file behind :func:`open_source`, which picks it from ``fmt`` or,
for "auto", from the extension (:func:`guess_format`):

- source: :class:`Source`, the lazily read 4D array every reader yields, and :data:`FORMATS`;
- hdf5: generic HDF5 (dataset path given, or the only 4D dataset, or the only 3D frame stack;
  external links followed, compressed datasets read with the filters of hdf5plugin);
- arina: DECTRIS ARINA master file + data files (+ scan metadata file), found by :mod:`.hdf5`;
- npy: NumPy ``.npy`` (memory mapped);
- emd: EMD 1.0 (py4DSTEM/emdfile and Berkeley EMD, read with h5py; Velox EMD through rsciio);
- mib: Quantum Detectors Merlin ``.mib`` (+ ``.hdr``) through rosettasciio, frame count, RAW
  data and scan rows checked against the file;
- rsciio: vendor formats through rosettasciio read lazily as dask arrays (EMPAD ``.xml`` +
  ``.raw``, and any other rosettasciio format that yields a 4D array, or a 3D stack of frames
  with a configured scan shape);
- calibration: the calibration a file holds, in the internal names and units, merged with the
  configured fallback (:func:`resolve_calibration`);
- stream: the chunked copy, counts to electrons, the data and dose checks, the output attributes;
- align: the bright-field disc, descan and rotation measured from the data
  (:mod:`octastem.stem.origin`) and the resampling plan of the copy.

The data are read a few scan rows at a time, converted from detector counts to electrons
(``counts / counts_per_electron``), checked (finite, non-negative) and written to a temporary
file that is renamed into place only when everything, including the dose check, has passed:
memory stays at about two chunks whatever the size of the dataset, and a failed ingest leaves
no output behind.

With ``origin`` set (the pipeline's default, ``samples.<name>.raw.origin: plane``), the patterns
are put into the frame every detector and reconstruction assumes before anything else sees them:
the disc centre is measured per scan position and fitted over the scan (descan), the rotation and
flip of the detector against the scan are measured from the curl of the COM field (or, when
configured, checked against the measurement), and every pattern is resampled with the disc at
pixel (n // 2) and its axes along the scan axes (output ``scan_rotation_deg`` 0; what was
measured and applied is recorded in the attributes, the provenance and the summary). The disc
radius must agree with semiangle / k-sampling, and the disc must lie whole on the detector.
Without ``origin`` (None or "off") the patterns are copied as stored.

Calibration comes from the file where it holds one (HDF5 attributes in the internal naming, EMD
dimension vectors, rosettasciio axes and metadata), otherwise from the ``calibration`` mapping:
``energy_eV``, ``semiangle_mrad``, ``scan_step_A`` (or ``scan_step_x_A`` and ``scan_step_y_A``),
``k_sampling_mrad`` (or ``k_sampling_x_mrad`` and ``k_sampling_y_mrad``) and
``scan_rotation_deg`` (None or left out: measured from the data); optional ``scan_shape`` (scan_y,
scan_x) for 3D frame stacks. A frame stack
fills the scan row by row and must hold exactly scan_y x scan_x frames; a scan shape the file
records itself (4D arrays, Merlin rows, ARINA scan metadata) must agree with the configured one.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import h5py
import numpy as np

from octastem.io import InputError, atomic_path

from .align import measure_alignment
from .calibration import REQUIRED_CALIBRATION, resolve_calibration
from .emd import is_emd, open_emd
from .hdf5 import open_hdf5
from .mib import open_mib
from .npy import open_npy
from .rsciio import open_rsciio
from .source import FORMATS, Source
from .stream import (
    DEFAULT_CHUNK_BYTES,
    check_settings,
    check_source,
    chunk_rows,
    copy_rows,
    measured_dose,
    output_attrs,
)

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "FORMATS",
    "REQUIRED_CALIBRATION",
    "Source",
    "guess_format",
    "ingest",
    "open_source",
    "resolve_calibration",
]


#: Formats stored as a directory (zarr stores through rosettasciio); any other directory is refused.
DIRECTORY_FORMATS = (".zspy", ".zarr")


def guess_format(path: Path, dataset: str | None = None) -> str:
    """The format of ``path`` from its extension (an HDF5 file holding an EMD array is "emd")."""
    ext = path.suffix.lower()
    if ext == ".npy":
        return "npy"
    if ext == ".emd":
        return "emd"
    if ext == ".mib":
        return "mib"
    if ext == ".xml":
        return "empad"
    if ext in (".h5", ".hdf5", ".hdf", ".he5", ".nxs"):
        if dataset is None and is_emd(path):
            return "emd"
        return "hdf5"
    return "rsciio"


@contextlib.contextmanager
def open_source(
    path: str | os.PathLike,
    fmt: str = "auto",
    dataset: str | None = None,
    scan_shape=None,
    energy_eV: float | None = None,
) -> Iterator[Source]:
    """Open a raw 4D-STEM file lazily; yields a source with ``shape``, ``dtype``, ``read(r0, r1)``, ``calibration``."""
    path = Path(path)
    if fmt not in FORMATS:
        raise InputError(f"{path}: field 'fmt' = {fmt!r}; expected one of {FORMATS}")
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if path.is_dir() and path.suffix.lower() not in DIRECTORY_FORMATS:
        files = sorted(p.name for p in path.iterdir() if p.is_file())
        shown = ", ".join(files[:6]) + (f" ... ({len(files)} files)" if len(files) > 6 else "")
        holds = f": it holds {shown}" if files else ""
        raise InputError(f"{path}: is a directory; expected the data file itself (field 'path'){holds}")
    if path.suffix.lower() == ".hdr" and path.with_suffix(".mib").is_file():
        raise InputError(
            f"{path}: the header file of a Merlin acquisition; expected its frames, {path.with_suffix('.mib').name}"
        )
    if fmt == "auto":
        fmt = guess_format(path, dataset)
    if fmt == "hdf5":
        ctx = open_hdf5(path, dataset, scan_shape, energy_eV)
    elif fmt == "mib" or (fmt == "rsciio" and path.suffix.lower() == ".mib"):
        ctx = open_mib(path, scan_shape, energy_eV)
    elif fmt == "npy":
        ctx = open_npy(path, scan_shape)
    elif fmt == "emd":
        ctx = open_emd(path, dataset, scan_shape, energy_eV)
    else:
        ctx = open_rsciio(path, fmt, scan_shape, energy_eV)
    with ctx as src:
        yield src


def ingest(
    path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    fmt: str = "auto",
    dataset: str | None = None,
    calibration: Mapping | None = None,
    dose_e_per_A2: float | None = None,
    counts_per_electron: float = 1.0,
    dose_rtol: float = 0.2,
    chunk_positions: int | None = None,
    progress: bool = True,
    compression: str | None = "gzip",
    origin: str | None = None,
) -> dict:
    """Stream the raw 4D-STEM file ``path`` into the internal HDF5 file ``output``; return a summary.

    ``fmt``: one of :data:`FORMATS` ("auto" guesses from the extension). ``dataset``: HDF5/EMD
    path of the array. ``calibration``: fallback calibration (see module docstring; units eV, mrad,
    A, deg). ``counts_per_electron``: detector counts per incident electron; the output holds
    electrons (float32). ``dose_e_per_A2``: configured dose; the measured dose, total electrons /
    (positions * step_x * step_y), must agree within ``dose_rtol`` (relative) or the ingest fails.
    ``chunk_positions``: scan positions per chunk (rounded to whole scan rows); default about
    64 MiB of float32. ``compression``: HDF5 filter of the output ("gzip" level 1, or None).
    ``origin``: the descan fit ("plane", "parabola", "constant"; see the module docstring), or
    None / "off" to copy the patterns as stored.

    The summary holds the shape, the measured and configured dose, the calibration with the origin
    of each field ("file", "config" or "measured"), the alignment (disc, descan, rotation), bytes
    read, seconds and MB/s.
    """
    path = Path(path)
    output = Path(output)
    config = dict(calibration or {})
    check_settings(path, output, counts_per_electron, dose_e_per_A2, dose_rtol)
    t0 = time.perf_counter()
    with open_source(path, fmt, dataset, config.get("scan_shape"), config.get("energy_eV")) as src:
        check_source(path, src)
        ny, nx, nky, nkx = src.shape
        cal, cal_origin = resolve_calibration(path, src.calibration, config)
        rows = chunk_rows(path, src.shape, chunk_positions)
        plan, alignment = None, None
        if origin not in (None, "off"):
            plan, alignment = measure_alignment(path, src, rows, cal, cal_origin, origin, counts_per_electron, progress)
            cal.update(alignment["calibration"])
        elif cal["scan_rotation_deg"] is None:
            raise InputError(
                f"{path}: calibration field 'scan_rotation_deg' is unset (to be measured from the data), but "
                f"origin = {origin!r} skips the measurement; set scan_rotation_deg or origin: plane"
            )
        mky, mkx = plan.shape if plan is not None else (nky, nkx)
        with atomic_path(output) as tmp, h5py.File(tmp, "w") as f:
            ds = f.create_dataset(
                "data",
                shape=(ny, nx, mky, mkx),
                dtype=np.float32,
                chunks=(1, nx, mky, mkx),
                compression=compression,
                compression_opts=1 if compression == "gzip" else None,
            )
            transform = None if plan is None else plan.resample
            total, nbytes = copy_rows(path, src, ds, rows, counts_per_electron, progress, transform)
            n_pos = ny * nx
            measured = measured_dose(path, total, n_pos, cal, dose_e_per_A2, dose_rtol, counts_per_electron)
            attrs = output_attrs(
                path,
                src,
                cal,
                cal_origin,
                measured=measured,
                total=total,
                dataset=dataset,
                dose_e_per_A2=dose_e_per_A2,
                counts_per_electron=counts_per_electron,
                dose_rtol=dose_rtol,
                alignment=alignment,
            )
            for k, v in attrs.items():
                ds.attrs[k] = v
                f.attrs[k] = v
    seconds = time.perf_counter() - t0
    return {
        "source": str(path),
        "output": str(output),
        "format": src.fmt,
        "shape": [ny, nx, mky, mkx],
        "shape_raw": [ny, nx, nky, nkx],
        "dtype_in": str(src.dtype),
        "n_positions": n_pos,
        "total_electrons": total,
        "electrons_per_position": total / n_pos,
        "dose_e_per_A2": measured,
        "dose_configured_e_per_A2": dose_e_per_A2,
        "calibration": cal,
        "calibration_origin": cal_origin,
        "reader_notes": src.notes,
        "alignment": None if alignment is None else alignment["record"],
        "chunk_rows": rows,
        "bytes_read": nbytes,
        "seconds": seconds,
        "MB_per_s": nbytes / 1e6 / seconds if seconds > 0 else float("inf"),
    }
