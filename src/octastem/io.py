"""File contracts between pipeline stages (see DESIGN.md), written atomically.

- 4D-STEM: HDF5 dataset ``data`` shaped (scan_y, scan_x, k_y, k_x) with calibration attributes.
- Images (phase, projected potential): HDF5 dataset ``image`` (y, x) float32 with ``sampling_A``,
  ``kind`` and ``provenance``.

Every writer goes through :func:`atomic_path`: the file is written under a temporary name in the
same folder and renamed into place only when complete, so an interrupted job never leaves a file
that looks finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

#: Calibration attributes every internal 4D-STEM file must carry.
STEM_ATTRS = (
    "energy_eV",
    "semiangle_mrad",
    "scan_step_A",
    "k_sampling_mrad",
    "dose_e_per_A2",
    "scan_rotation_deg",
    "source",
    "provenance",
)


def import_abtem():
    """abTEM configured for reproducible results: FFTW plans by estimate, not by measurement.

    A measured FFTW plan (abTEM's default) is chosen anew in every process and its float results
    differ in the last bits between plans, so two runs of the same stage would differ.
    """
    import abtem

    abtem.config.set({"fftw.planning_effort": "FFTW_ESTIMATE"})
    return abtem


class InputError(ValueError):
    """A file or setting is not what a stage expects; the message names file, field and expectation."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` only if the block succeeds.

    The temporary name is hidden and keeps the suffix, so writers that infer the format from
    the extension (matplotlib, ASE) still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.part.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        # mkstemp creates 0600; give the output the permissions a plain open() would (umask)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (numpy scalars and arrays converted)."""
    write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


#: Run context merged into every :func:`provenance` record of the current process: the pipeline
#: rule, its wildcards and params (seeds included), the config hash and the input checksums.
#: Set by :func:`octastem.stages.logged` when a stage runs under Snakemake.
RUN_CONTEXT: dict[str, Any] = {}


def sha256_file(path: str | os.PathLike, block: int = 8 * 2**20) -> str:
    """Hex sha256 of a file, streamed."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def config_hash(config: dict) -> str:
    """sha256 of the (validated) workflow config, key order independent."""
    import hashlib

    return hashlib.sha256(json.dumps(config, sort_keys=True, default=_json_default).encode()).hexdigest()


def machine_info(**extra: Any) -> dict:
    """The machine a measurement ran on: platform, CPU model, visible cores, memory, load, Python/numpy."""
    cpu = platform.processor()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus_visible": len(os.sched_getaffinity(0)),
        "memory_GiB": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "load_average_at_start": list(os.getloadavg()),
    }
    info.update(extra)
    return info


def provenance(**extra: Any) -> str:
    """JSON string recording software versions, the run context and extra key/values (seeds, settings)."""
    import importlib.metadata as md

    versions = {}
    for pkg in ("octastem", "numpy", "abtem", "ase", "mace-torch", "torch", "lmfit", "h5py", "snakemake"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    record = {"python": platform.python_version(), "versions": versions}
    if RUN_CONTEXT:
        record["run"] = RUN_CONTEXT
    record.update(extra)
    return json.dumps(record, sort_keys=True, default=_json_default)


# ----------------------------------------------------------------------------------------------
# 4D-STEM
# ----------------------------------------------------------------------------------------------


@dataclass
class Stem4D:
    """A 4D-STEM dataset in memory: ``data`` (scan_y, scan_x, k_y, k_x) and its calibration."""

    data: np.ndarray
    energy_eV: float
    semiangle_mrad: float
    scan_step_A: float
    k_sampling_mrad: float
    dose_e_per_A2: float
    scan_rotation_deg: float = 0.0
    source: str = "simulated"
    provenance: str = "{}"
    extra: dict = field(default_factory=dict)

    @property
    def attrs(self) -> dict:
        d = {k: getattr(self, k) for k in STEM_ATTRS}
        d.update(self.extra)
        return d


def write_4dstem(path: str | os.PathLike, stem: Stem4D, chunks: bool = True) -> None:
    """Write the internal 4D-STEM HDF5 format atomically."""
    data = np.asarray(stem.data)
    if data.ndim != 4:
        raise InputError(f"{path}: field 'data' must be 4D (scan_y, scan_x, k_y, k_x), got shape {data.shape}")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        ds = f.create_dataset(
            "data",
            data=data,
            chunks=(1, data.shape[1], data.shape[2], data.shape[3]) if chunks else None,
            compression="gzip" if chunks else None,
            compression_opts=1 if chunks else None,
        )
        for k, v in stem.attrs.items():
            ds.attrs[k] = v
            f.attrs[k] = v


def read_4dstem(path: str | os.PathLike) -> Stem4D:
    """Read the internal 4D-STEM HDF5 format, checking rank and calibration."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise InputError(f"{path}: not a readable HDF5 file ({e})") from e
    with f:
        if "data" not in f:
            raise InputError(f"{path}: missing dataset 'data' (scan_y, scan_x, k_y, k_x)")
        ds = f["data"]
        if ds.ndim != 4:
            raise InputError(f"{path}: field 'data' must be 4D (scan_y, scan_x, k_y, k_x), got shape {ds.shape}")
        missing = [k for k in STEM_ATTRS if k not in ds.attrs]
        if missing:
            raise InputError(f"{path}: dataset 'data' lacks calibration attribute(s) {missing}")
        attrs = {k: _plain(v) for k, v in ds.attrs.items()}
        data = ds[()]
    extra = {k: v for k, v in attrs.items() if k not in STEM_ATTRS}
    return Stem4D(data=data, extra=extra, **{k: attrs[k] for k in STEM_ATTRS})


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------


def write_image(path: str | os.PathLike, image: np.ndarray, sampling_A: float, kind: str, **attrs: Any) -> None:
    """Write a 2D image (y, x) as float32 with its sampling (A/pixel), kind and attributes."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise InputError(f"{path}: field 'image' must be 2D (y, x), got shape {image.shape}")
    attrs.setdefault("provenance", provenance())
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        ds = f.create_dataset("image", data=image)
        ds.attrs["sampling_A"] = float(sampling_A)
        ds.attrs["kind"] = kind
        for k, v in attrs.items():
            ds.attrs[k] = v


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """Read an image file: returns (image, attrs) with attrs including sampling_A and kind."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    with h5py.File(path, "r") as f:
        if "image" not in f:
            raise InputError(f"{path}: missing dataset 'image'")
        ds = f["image"]
        if "sampling_A" not in ds.attrs:
            raise InputError(f"{path}: dataset 'image' lacks attribute 'sampling_A'")
        return ds[()], {k: _plain(v) for k, v in ds.attrs.items()}


def _plain(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.ndarray):
        return v.tolist() if v.ndim else v.item()
    if isinstance(v, np.generic):
        return v.item()
    return v
