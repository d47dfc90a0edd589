"""Raw 4D-STEM files -> the internal HDF5 format (``io.write_4dstem`` layout), streamed in chunks.

Sources: generic HDF5 (dataset path given, or the only 4D dataset), NumPy ``.npy`` (memory
mapped), EMD 1.0 (py4DSTEM/emdfile and Berkeley EMD, read with h5py; Velox EMD through
rosettasciio) and vendor formats through rosettasciio read lazily as dask arrays (Merlin
``.mib``, EMPAD ``.xml`` + ``.raw``, and any other rosettasciio format that yields a 4D array, or a
3D stack of frames with a configured scan shape).

The data are read a few scan rows at a time, converted from detector counts to electrons
(``counts / counts_per_electron``), checked (finite, non-negative) and written to a temporary
file that is renamed into place only when everything, including the dose check, has passed:
memory stays at about two chunks whatever the size of the dataset, and a failed ingest leaves
no output behind.

Calibration comes from the file where it holds one (HDF5 attributes in the internal naming, EMD
dimension vectors, rosettasciio axes and metadata), otherwise from the ``calibration`` mapping:
``energy_eV``, ``semiangle_mrad``, ``scan_step_A`` (or ``scan_step_x_A`` and ``scan_step_y_A``),
``k_sampling_mrad`` (or ``k_sampling_x_mrad`` and ``k_sampling_y_mrad``) and
``scan_rotation_deg``; optional ``scan_shape`` (scan_y, scan_x) for 3D frame stacks.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from octastem.io import InputError, atomic_path, provenance

FORMATS = ("auto", "hdf5", "npy", "emd", "mib", "empad", "rsciio")

#: Calibration fields every ingested dataset needs, from the file or from the configuration.
REQUIRED_CALIBRATION = ("energy_eV", "semiangle_mrad", "scan_step_A", "k_sampling_mrad", "scan_rotation_deg")

#: Default chunk size (bytes of float32 output) when ``chunk_positions`` is not given.
DEFAULT_CHUNK_BYTES = 64 * 2**20

_LENGTH_TO_A = {
    "m": 1e10,
    "mm": 1e7,
    "um": 1e4,
    "µm": 1e4,
    "μm": 1e4,
    "nm": 10.0,
    "a": 1.0,
    "å": 1.0,
    "angstrom": 1.0,
    "pm": 0.01,
}
_ANGLE_TO_MRAD = {"rad": 1e3, "mrad": 1.0, "urad": 1e-3, "µrad": 1e-3, "μrad": 1e-3}
_RECIPROCAL_TO_INV_A = {"1/m": 1e-10, "1/nm": 0.1, "1/a": 1.0, "1/å": 1.0, "1/angstrom": 1.0, "a^-1": 1.0, "nm^-1": 0.1}


def electron_wavelength_A(energy_eV: float) -> float:
    """Relativistic electron wavelength (A) at kinetic energy ``energy_eV``."""
    h, m0, e, c = 6.62607015e-34, 9.1093837015e-31, 1.602176634e-19, 299792458.0
    p = math.sqrt(2 * m0 * e * energy_eV * (1 + e * energy_eV / (2 * m0 * c**2)))
    return h / p * 1e10


# ----------------------------------------------------------------------------------------------
# Sources: a row reader over a lazily read array plus whatever calibration the file holds
# ----------------------------------------------------------------------------------------------


@dataclass
class _Source:
    """A lazily read 4D-STEM array: ``read(r0, r1)`` returns scan rows r0..r1 as numpy."""

    shape: tuple[int, int, int, int]
    dtype: np.dtype
    read: Callable[[int, int], np.ndarray]
    fmt: str
    calibration: dict = field(default_factory=dict)  # calibration found in the file (internal names)
    preferred_rows: int | None = None  # rows per storage chunk of the source, if known


def _guess_format(path: Path, dataset: str | None) -> str:
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
        if dataset is None and _is_emd(path):
            return "emd"
        return "hdf5"
    return "rsciio"


def _is_emd(path: Path) -> bool:
    try:
        with h5py.File(path, "r") as f:
            return bool(_emd_arrays(f))
    except OSError:
        return False


def _stack_reader(path: Path, shape: tuple[int, ...], getter: Callable[[slice], Any], scan_shape) -> tuple:
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


def _array_source(path: Path, arr: Any, fmt: str, scan_shape, calibration: dict, preferred_rows=None) -> _Source:
    shape = tuple(int(n) for n in arr.shape)
    if len(shape) == 4:

        def read(r0: int, r1: int) -> np.ndarray:
            return np.asarray(arr[r0:r1])

    elif len(shape) == 3:
        shape, read = _stack_reader(path, shape, lambda s: arr[s], scan_shape)
    else:
        raise InputError(
            f"{path}: field 'data' must be 4D (scan_y, scan_x, k_y, k_x) or a 3D frame stack with "
            f"'scan_shape', got rank {len(shape)} with shape {shape}"
        )
    return _Source(shape, np.dtype(arr.dtype), read, fmt, calibration, preferred_rows)


def _hdf5_attrs_calibration(attrs: Mapping) -> dict:
    """Calibration stored as attributes with the internal names (an internal or similar file)."""
    keys = REQUIRED_CALIBRATION + ("scan_step_x_A", "scan_step_y_A", "k_sampling_x_mrad", "k_sampling_y_mrad")
    out = {}
    for k in keys:
        if k in attrs:
            try:
                out[k] = float(np.asarray(attrs[k]).item())
            except (TypeError, ValueError):
                continue
    return out


@contextlib.contextmanager
def _open_hdf5(path: Path, dataset: str | None, scan_shape) -> Iterator[_Source]:
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise InputError(f"{path}: not a readable HDF5 file, truncated or corrupt ({e})") from e
    with f:
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
        cal = _hdf5_attrs_calibration(ds.attrs)
        rows = ds.chunks[0] if ds.chunks and ds.ndim == 4 else None
        yield _array_source(path, ds, "hdf5", scan_shape, cal, rows)


def _emd_arrays(f: h5py.File) -> list[str]:
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
def _open_emd(path: Path, dataset: str | None, scan_shape, energy_eV: float | None) -> Iterator[_Source]:
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise InputError(f"{path}: not a readable EMD/HDF5 file, truncated or corrupt ({e})") from e
    with f:
        groups = _emd_arrays(f)
        if dataset is not None:
            name = dataset[:-5] if dataset.endswith("/data") else dataset
            if name not in groups:
                raise InputError(f"{path}: field 'dataset' = {dataset!r} is not an EMD array group; found {groups}")
            groups = [name]
        groups4 = [g for g in groups if f[g]["data"].ndim in (3, 4)]
        if not groups4:
            f.close()
            # not an emdfile/Berkeley EMD: Velox and other EMD flavours through rosettasciio
            with _open_rsciio(path, "emd", scan_shape, energy_eV) as src:
                yield src
            return
        if len(groups4) > 1:
            raise InputError(f"{path}: field 'dataset' must name one of the EMD arrays {groups4}")
        group = f[groups4[0]]
        ds = group["data"]
        cal = _hdf5_attrs_calibration(ds.attrs)
        if ds.ndim == 4:
            _axes_calibration(
                cal,
                [_dim_step(group, i) for i in range(2)],
                [_dim_step(group, i) for i in range(2, 4)],
                energy_eV or cal.get("energy_eV"),
            )
        yield _array_source(path, ds, "emd", scan_shape, cal, ds.chunks[0] if ds.chunks and ds.ndim == 4 else None)


def _length_A(scale: float, units: str) -> float | None:
    u = (units or "").strip().lower()
    return scale * _LENGTH_TO_A[u] if u in _LENGTH_TO_A else None


def _angle_mrad(scale: float, units: str, energy_eV: float | None) -> float | None:
    u = (units or "").strip().lower().replace(" ", "")
    if u in _ANGLE_TO_MRAD:
        return scale * _ANGLE_TO_MRAD[u]
    if u in _RECIPROCAL_TO_INV_A and energy_eV:
        # spatial frequency k = 1/d (A^-1) -> scattering angle lambda * k (small angle)
        return scale * _RECIPROCAL_TO_INV_A[u] * electron_wavelength_A(energy_eV) * 1e3
    return None


def _axes_calibration(cal: dict, nav: list, sig: list, energy_eV: float | None) -> None:
    """Fill scan steps and k sampling from (step, units) of the navigation (y, x) and signal (y, x) axes."""
    nav_A = [_length_A(s, u) if s else None for s, u in nav]
    if all(v is not None and v > 0 for v in nav_A):
        cal.setdefault("scan_step_y_A", nav_A[0])
        cal.setdefault("scan_step_x_A", nav_A[1])
    sig_mrad = [_angle_mrad(s, u, energy_eV) if s else None for s, u in sig]
    if all(v is not None and v > 0 for v in sig_mrad):
        cal.setdefault("k_sampling_y_mrad", sig_mrad[0])
        cal.setdefault("k_sampling_x_mrad", sig_mrad[1])


def _rsciio_api(path: Path, fmt: str):
    import importlib

    import rsciio

    names = {"mib": "QuantumDetector", "empad": "EMPAD", "emd": "EMD"}
    ext = path.suffix.lower().lstrip(".")
    for plugin in rsciio.IO_PLUGINS:
        if (fmt in names and plugin["name"] == names[fmt]) or (
            fmt == "rsciio" and ext in [e.lower() for e in plugin["file_extensions"]]
        ):
            return importlib.import_module(plugin["api"])
    raise InputError(f"{path}: field 'fmt': no rosettasciio reader for '.{ext}'; expected one of {FORMATS}")


@contextlib.contextmanager
def _open_rsciio(path: Path, fmt: str, scan_shape, energy_eV: float | None) -> Iterator[_Source]:
    api = _rsciio_api(path, fmt)
    kwargs: dict[str, Any] = {"lazy": True}
    if fmt == "mib" and scan_shape is not None:
        kwargs["navigation_shape"] = (int(scan_shape[1]), int(scan_shape[0]))  # rosettasciio order (x, y)
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
    cal: dict = {}
    md = chosen.get("metadata", {}) or {}
    tem = md.get("Acquisition_instrument", {}).get("TEM", {}) if isinstance(md, dict) else {}
    if "beam_energy" in tem:  # keV in HyperSpy metadata
        cal["energy_eV"] = float(tem["beam_energy"]) * 1e3
    if "convergence_angle" in tem:  # mrad
        cal["semiangle_mrad"] = float(tem["convergence_angle"])
    if np.ndim(data) == 4:
        axes = sorted(chosen.get("axes", []), key=lambda a: a.get("index_in_array", 0))
        if len(axes) == 4:
            steps = [(float(a.get("scale", 1.0)), str(a.get("units") or "")) for a in axes]
            _axes_calibration(cal, steps[:2], steps[2:], energy_eV or cal.get("energy_eV"))
    chunks = getattr(data, "chunks", None)
    rows = int(chunks[0][0]) if chunks and np.ndim(data) == 4 else None
    yield _array_source(path, data, fmt, scan_shape, cal, rows)


@contextlib.contextmanager
def _open_npy(path: Path, scan_shape) -> Iterator[_Source]:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"{path}: not a readable .npy file, truncated or corrupt ({e})") from e
    if not isinstance(arr, np.ndarray):
        raise InputError(f"{path}: expected a single array in the .npy file, got {type(arr).__name__}")
    try:
        yield _array_source(path, arr, "npy", scan_shape, {})
    finally:
        mm = getattr(arr, "_mmap", None)
        del arr
        if mm is not None:
            with contextlib.suppress(BufferError):
                mm.close()


@contextlib.contextmanager
def open_source(
    path: str | os.PathLike,
    fmt: str = "auto",
    dataset: str | None = None,
    scan_shape=None,
    energy_eV: float | None = None,
) -> Iterator[_Source]:
    """Open a raw 4D-STEM file lazily; yields a source with ``shape``, ``dtype``, ``read(r0, r1)``, ``calibration``."""
    path = Path(path)
    if fmt not in FORMATS:
        raise InputError(f"{path}: field 'fmt' = {fmt!r}; expected one of {FORMATS}")
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if fmt == "auto":
        fmt = _guess_format(path, dataset)
    if fmt == "hdf5":
        ctx = _open_hdf5(path, dataset, scan_shape)
    elif fmt == "npy":
        ctx = _open_npy(path, scan_shape)
    elif fmt == "emd":
        ctx = _open_emd(path, dataset, scan_shape, energy_eV)
    else:
        ctx = _open_rsciio(path, fmt, scan_shape, energy_eV)
    with ctx as src:
        yield src


# ----------------------------------------------------------------------------------------------
# Calibration
# ----------------------------------------------------------------------------------------------


def resolve_calibration(path: Path, from_file: Mapping, config: Mapping) -> tuple[dict, dict]:
    """Merge calibration from the file (preferred) and the configuration; returns (values, origin per field).

    Per-axis fields (``scan_step_x_A`` / ``_y_A``, ``k_sampling_x_mrad`` / ``_y_mrad``) fill the
    scalar ones with their mean. Raises :class:`InputError` naming the first missing or invalid field.
    """
    pairs = {
        "scan_step_A": ("scan_step_x_A", "scan_step_y_A"),
        "k_sampling_mrad": ("k_sampling_x_mrad", "k_sampling_y_mrad"),
    }

    def complete(src: Mapping) -> dict:
        # a scalar fills missing per-axis values; a full per-axis pair defines the scalar (mean)
        d = {k: v for k, v in src.items() if v is not None}
        for scalar, (px, py) in pairs.items():
            if px in d and py in d:
                with contextlib.suppress(TypeError, ValueError):
                    d[scalar] = 0.5 * (float(d[px]) + float(d[py]))
            elif scalar in d:
                d.setdefault(px, d[scalar])
                d.setdefault(py, d[scalar])
        return d

    sources = (("file", complete(from_file)), ("config", complete(config)))
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    keys = REQUIRED_CALIBRATION + tuple(k for pair in pairs.values() for k in pair)
    for key in keys:
        for where, src in sources:
            if key in src:
                values[key], origin[key] = src[key], where
                break
    # keep a per-axis pair and its scalar from the same origin
    for scalar, pair in pairs.items():
        if scalar in values and any(origin.get(p) != origin[scalar] for p in pair):
            src = dict(sources)[origin[scalar]]
            for p in pair:
                values[p], origin[p] = src[p], origin[scalar]
    for key in REQUIRED_CALIBRATION:
        if key not in values:
            raise InputError(
                f"{path}: calibration field '{key}' is missing: the file does not hold it, so it must be "
                "set in the configuration"
            )
    out = {}
    for key, value in values.items():
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise InputError(
                f"{path}: calibration field '{key}' must be a number, got {value!r} ({origin[key]})"
            ) from None
        ok = math.isfinite(v) and (v > 0 or key == "scan_rotation_deg")
        if not ok:
            raise InputError(
                f"{path}: calibration field '{key}' must be a positive finite number, got {value!r} ({origin[key]})"
            )
        out[key] = v
    return out, origin


# ----------------------------------------------------------------------------------------------
# Ingest
# ----------------------------------------------------------------------------------------------


def _check_chunk(path: Path, chunk: np.ndarray, r0: int) -> float:
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
) -> dict:
    """Stream the raw 4D-STEM file ``path`` into the internal HDF5 file ``output``; return a summary.

    ``fmt``: one of :data:`FORMATS` ("auto" guesses from the extension). ``dataset``: HDF5/EMD
    path of the array. ``calibration``: fallback calibration (see module docstring; units eV, mrad,
    A, deg). ``counts_per_electron``: detector counts per incident electron; the output holds
    electrons (float32). ``dose_e_per_A2``: configured dose; the measured dose, total electrons /
    (positions * step_x * step_y), must agree within ``dose_rtol`` (relative) or the ingest fails.
    ``chunk_positions``: scan positions per chunk (rounded to whole scan rows); default about
    64 MiB of float32. ``compression``: HDF5 filter of the output ("gzip" level 1, or None).

    The summary holds the shape, the measured and configured dose, the calibration with the origin
    of each field ("file" or "config"), bytes read, seconds and MB/s.
    """
    path = Path(path)
    output = Path(output)
    config = dict(calibration or {})
    if not (math.isfinite(counts_per_electron) and counts_per_electron > 0):
        raise InputError(f"{path}: field 'counts_per_electron' must be a positive number, got {counts_per_electron}")
    if dose_e_per_A2 is not None and not (math.isfinite(dose_e_per_A2) and dose_e_per_A2 > 0):
        raise InputError(f"{path}: field 'dose_e_per_A2' must be a positive number or unset, got {dose_e_per_A2}")
    if not dose_rtol > 0:
        raise InputError(f"{path}: field 'dose_rtol' must be positive, got {dose_rtol}")
    if output.resolve() == path.resolve():
        raise InputError(f"{path}: output must differ from the input file")
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    with open_source(path, fmt, dataset, config.get("scan_shape"), config.get("energy_eV")) as src:
        ny, nx, nky, nkx = src.shape
        if min(src.shape) < 1 or nky < 2 or nkx < 2:
            raise InputError(f"{path}: field 'data' has an empty scan or patterns smaller than 2x2: shape {src.shape}")
        if not (np.issubdtype(src.dtype, np.integer) or np.issubdtype(src.dtype, np.floating)):
            raise InputError(f"{path}: field 'data' must hold integer or real counts, got dtype {src.dtype}")
        cal, cal_origin = resolve_calibration(path, src.calibration, config)
        if chunk_positions is None:
            rows = max(1, DEFAULT_CHUNK_BYTES // (nx * nky * nkx * 4))
        else:
            if int(chunk_positions) < 1:
                raise InputError(f"{path}: field 'chunk_positions' must be >= 1, got {chunk_positions}")
            rows = max(1, int(chunk_positions) // nx)
        rows = min(rows, ny)
        total = 0.0
        nbytes = 0
        with atomic_path(output) as tmp, h5py.File(tmp, "w") as f:
            ds = f.create_dataset(
                "data",
                shape=(ny, nx, nky, nkx),
                dtype=np.float32,
                chunks=(1, nx, nky, nkx),
                compression=compression,
                compression_opts=1 if compression == "gzip" else None,
            )
            bar = tqdm(total=ny, desc=f"ingest {path.name}", unit="row", disable=not progress)
            try:
                for r0 in range(0, ny, rows):
                    r1 = min(ny, r0 + rows)
                    try:
                        raw = src.read(r0, r1)
                    except InputError:
                        raise
                    except Exception as e:  # noqa: BLE001 - a read failure mid-file means a damaged file
                        raise InputError(
                            f"{path}: field 'data': reading scan rows {r0}..{r1 - 1} failed, file truncated or "
                            f"corrupt? ({type(e).__name__}: {e})"
                        ) from e
                    nbytes += raw.nbytes
                    chunk = raw.astype(np.float32, copy=not raw.flags.writeable or raw.dtype != np.float32)
                    del raw
                    if counts_per_electron != 1.0:
                        chunk /= np.float32(counts_per_electron)
                    total += _check_chunk(path, chunk, r0)
                    ds[r0:r1] = chunk
                    del chunk
                    bar.update(r1 - r0)
            finally:
                bar.close()

            n_pos = ny * nx
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
            attrs = {
                "energy_eV": cal["energy_eV"],
                "semiangle_mrad": cal["semiangle_mrad"],
                "scan_step_A": cal["scan_step_A"],
                "k_sampling_mrad": cal["k_sampling_mrad"],
                "dose_e_per_A2": measured,
                "scan_rotation_deg": cal["scan_rotation_deg"],
                "source": str(path),
                "scan_step_x_A": step_x,
                "scan_step_y_A": step_y,
                "k_sampling_x_mrad": cal["k_sampling_x_mrad"],
                "k_sampling_y_mrad": cal["k_sampling_y_mrad"],
                "scan_shape": [ny, nx],
                "electrons_per_position": total / n_pos,
                "counts_per_electron": float(counts_per_electron),
                "dose_configured_e_per_A2": float("nan") if dose_e_per_A2 is None else float(dose_e_per_A2),
                "intensity_unit": "counts",
                "format": src.fmt,
            }
            attrs["provenance"] = provenance(
                stage="ingest",
                source=str(path),
                format=src.fmt,
                dataset=dataset,
                calibration_origin=cal_origin,
                counts_per_electron=float(counts_per_electron),
                dose_rtol=float(dose_rtol),
            )
            for k, v in attrs.items():
                ds.attrs[k] = v
                f.attrs[k] = v
    seconds = time.perf_counter() - t0
    return {
        "source": str(path),
        "output": str(output),
        "format": src.fmt,
        "shape": [ny, nx, nky, nkx],
        "dtype_in": str(src.dtype),
        "n_positions": n_pos,
        "total_electrons": total,
        "electrons_per_position": total / n_pos,
        "dose_e_per_A2": measured,
        "dose_configured_e_per_A2": dose_e_per_A2,
        "calibration": cal,
        "calibration_origin": cal_origin,
        "chunk_rows": rows,
        "bytes_read": nbytes,
        "seconds": seconds,
        "MB_per_s": nbytes / 1e6 / seconds if seconds > 0 else float("inf"),
    }
