"""The streamed copy of an ingest: scan rows read, converted to electrons, checked and written.

Detector counts become electrons (``counts / counts_per_electron``, float32); every chunk is
checked (finite, non-negative), and the measured dose, total electrons / (positions * step_x *
step_y), is checked against the configured one. The output attributes are those of
:func:`octastem.io.write_4dstem` plus the record of the ingest.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from octastem.io import InputError, provenance

from .source import Source

#: Default chunk size (bytes of float32 output) when ``chunk_positions`` is not given.
DEFAULT_CHUNK_BYTES = 64 * 2**20


def read_rows(path, src, r0: int, r1: int) -> np.ndarray:
    """Scan rows r0..r1 of ``src`` as stored; a read failure is an InputError naming the file and rows."""
    try:
        return src.read(r0, r1)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - a read failure mid-file means a damaged file
        raise InputError(
            f"{path}: field 'data': reading scan rows {r0}..{r1 - 1} failed, file truncated or "
            f"corrupt? ({type(e).__name__}: {e})"
        ) from e


def check_settings(path: Path, output: Path, counts_per_electron: float, dose_e_per_A2, dose_rtol: float) -> None:
    """Raise :class:`InputError` for a bad conversion, dose or tolerance, or an output that is the input."""
    if not (math.isfinite(counts_per_electron) and counts_per_electron > 0):
        raise InputError(f"{path}: field 'counts_per_electron' must be a positive number, got {counts_per_electron}")
    if dose_e_per_A2 is not None and not (math.isfinite(dose_e_per_A2) and dose_e_per_A2 > 0):
        raise InputError(f"{path}: field 'dose_e_per_A2' must be a positive number or unset, got {dose_e_per_A2}")
    if not dose_rtol > 0:
        raise InputError(f"{path}: field 'dose_rtol' must be positive, got {dose_rtol}")
    if output.resolve() == path.resolve():
        raise InputError(f"{path}: output must differ from the input file")


def check_source(path: Path, src: Source) -> None:
    """Raise :class:`InputError` for an empty scan, patterns under 2x2 or counts that are not numbers."""
    ny, nx, nky, nkx = src.shape
    if min(src.shape) < 1 or nky < 2 or nkx < 2:
        raise InputError(f"{path}: field 'data' has an empty scan or patterns smaller than 2x2: shape {src.shape}")
    if not (np.issubdtype(src.dtype, np.integer) or np.issubdtype(src.dtype, np.floating)):
        raise InputError(f"{path}: field 'data' must hold integer or real counts, got dtype {src.dtype}")


def chunk_rows(path: Path, shape: tuple[int, int, int, int], chunk_positions: int | None) -> int:
    """Scan rows per chunk: ``chunk_positions`` rounded to whole rows, default :data:`DEFAULT_CHUNK_BYTES`."""
    ny, nx, nky, nkx = shape
    if chunk_positions is None:
        rows = max(1, DEFAULT_CHUNK_BYTES // (nx * nky * nkx * 4))
    else:
        if int(chunk_positions) < 1:
            raise InputError(f"{path}: field 'chunk_positions' must be >= 1, got {chunk_positions}")
        rows = max(1, int(chunk_positions) // nx)
    return min(rows, ny)


def check_chunk(path: Path, chunk: np.ndarray, r0: int) -> float:
    """Total electrons of a chunk (float64); raises if it holds NaN/inf or negative values."""
    total = float(chunk.sum(dtype=np.float64))
    if not math.isfinite(total):
        bad = np.argwhere(~np.isfinite(chunk))[0]
        raise InputError(
            f"{path}: field 'data' holds NaN or infinite values (first at scan position "
            f"({r0 + bad[0]}, {bad[1]}), pixel ({bad[2]}, {bad[3]})); expected finite counts"
        )
    if chunk.size and float(chunk.min()) < 0:
        bad = np.argwhere(chunk < 0)[0]
        raise InputError(
            f"{path}: field 'data' holds negative counts (first at scan position ({r0 + bad[0]}, {bad[1]}), "
            f"pixel ({bad[2]}, {bad[3]}), value {chunk[tuple(bad)]}); expected counts >= 0"
        )
    return total


def read_electrons(path: Path, src: Source, r0: int, r1: int, counts_per_electron: float) -> np.ndarray:
    """Scan rows r0..r1 in electrons (float32), checked finite and non-negative."""
    raw = read_rows(path, src, r0, r1)
    chunk = raw.astype(np.float32, copy=not raw.flags.writeable or raw.dtype != np.float32)
    del raw
    if counts_per_electron != 1.0:
        chunk /= np.float32(counts_per_electron)
    check_chunk(path, chunk, r0)
    return chunk


def copy_rows(
    path: Path, src: Source, ds, rows: int, counts_per_electron: float, progress: bool, transform=None
) -> tuple[float, int]:
    """Copy the scan into the output dataset ``ds``, ``rows`` rows at a time; returns (electrons, bytes read).

    ``transform(chunk, r0)``: applied to each chunk (in electrons) before it is written (the
    resampling of :class:`octastem.stem.origin.Alignment`); the electrons counted are those read."""
    from tqdm.auto import tqdm

    ny = src.shape[0]
    total = 0.0
    nbytes = 0
    bar = tqdm(total=ny, desc=f"ingest {path.name}", unit="row", disable=not progress)
    try:
        for r0 in range(0, ny, rows):
            r1 = min(ny, r0 + rows)
            raw = read_rows(path, src, r0, r1)
            nbytes += raw.nbytes
            chunk = raw.astype(np.float32, copy=not raw.flags.writeable or raw.dtype != np.float32)
            del raw
            if counts_per_electron != 1.0:
                chunk /= np.float32(counts_per_electron)
            total += check_chunk(path, chunk, r0)
            if transform is not None:
                chunk = transform(chunk, r0)
            ds[r0:r1] = chunk
            del chunk
            bar.update(r1 - r0)
    finally:
        bar.close()
    return total, nbytes


def measured_dose(
    path: Path, total: float, n_pos: int, cal: dict, dose_e_per_A2, dose_rtol: float, counts_per_electron: float
) -> float:
    """Electrons per A^2 of the scan; raises if it differs from a configured dose by more than ``dose_rtol``."""
    step_x, step_y = cal["scan_step_x_A"], cal["scan_step_y_A"]
    measured = total / (n_pos * step_x * step_y)
    if dose_e_per_A2 is not None:
        rel = abs(measured - dose_e_per_A2) / dose_e_per_A2
        if rel > dose_rtol:
            raise InputError(
                f"{path}: field 'dose_e_per_A2': configured {dose_e_per_A2:g} e/A^2 but the data hold "
                f"{measured:.4g} e/A^2 (total electrons {total:.6g} / ({n_pos} positions x "
                f"{step_x:g} A x {step_y:g} A), counts_per_electron={counts_per_electron:g}); expected "
                f"agreement within {dose_rtol:.0%}: check counts_per_electron, scan_step_A or the dose"
            )
    return measured


def output_attrs(
    path: Path,
    src: Source,
    cal: dict,
    cal_origin: dict,
    *,
    measured: float,
    total: float,
    dataset: str | None,
    dose_e_per_A2,
    counts_per_electron: float,
    dose_rtol: float,
    alignment: dict | None = None,
) -> dict:
    """Attributes of the ingested file: the calibration, the scan and the record of the ingest
    (with ``alignment``, the record of :func:`octastem.stem.ingest.align.measure_alignment`)."""
    ny, nx = src.shape[:2]
    attrs = {
        "energy_eV": cal["energy_eV"],
        "semiangle_mrad": cal["semiangle_mrad"],
        "scan_step_A": cal["scan_step_A"],
        "k_sampling_mrad": cal["k_sampling_mrad"],
        "dose_e_per_A2": measured,
        "scan_rotation_deg": cal["scan_rotation_deg"],
        "source": str(path),
        "scan_step_x_A": cal["scan_step_x_A"],
        "scan_step_y_A": cal["scan_step_y_A"],
        "k_sampling_x_mrad": cal["k_sampling_x_mrad"],
        "k_sampling_y_mrad": cal["k_sampling_y_mrad"],
        "scan_shape": [ny, nx],
        "electrons_per_position": total / (ny * nx),
        "counts_per_electron": float(counts_per_electron),
        "dose_configured_e_per_A2": float("nan") if dose_e_per_A2 is None else float(dose_e_per_A2),
        "intensity_unit": "counts",
        "format": src.fmt,
    }
    if alignment is not None:
        attrs.update(alignment["attrs"])
    attrs["provenance"] = provenance(
        stage="ingest",
        source=str(path),
        format=src.fmt,
        dataset=dataset,
        calibration_origin=cal_origin,
        reader_notes=src.notes,
        counts_per_electron=float(counts_per_electron),
        dose_rtol=float(dose_rtol),
        alignment=None if alignment is None else alignment["record"],
    )
    return attrs
