"""File contracts between pipeline stages, written atomically.

- 4D-STEM: HDF5 dataset ``data`` shaped (scan_y, scan_x, k_y, k_x) with calibration attributes
  (:data:`STEM_ATTRS`, the per-axis :data:`STEM_AXIS_ATTRS`, then any others), in memory a
  :class:`Stem4D`; :func:`read_4dstem` reads it whole, :func:`open_4dstem` in parts.
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
import re
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


def owner_tag() -> str:
    """``<host>-<pid>``: the writer named in the temporary files and folders this process makes."""
    return f"{platform.node() or 'localhost'}-{os.getpid()}"


def _alive_here(tag: str) -> bool:
    """Whether ``tag`` (:func:`owner_tag`) names a running process of this host."""
    host, _, pid = tag.rpartition("-")
    if host != (platform.node() or "localhost") or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_orphans(folder: Path, prefix: str) -> list[Path]:
    """Remove the files and folders in ``folder`` named ``<prefix><owner>.<random>...`` whose owner
    (:func:`owner_tag`) is not a running process of this host: what a killed writer (kill -9, a
    node lost) left behind. A writer on another host is taken as gone: one job writes an output
    at a time (Snakemake's lock). Returns what was removed."""
    import shutil

    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if not entry.name.startswith(prefix):
            continue
        owner = re.match(r"(.+-\d+)\.", entry.name[len(prefix) :])
        if owner is not None and _alive_here(owner.group(1)):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` only if the block succeeds.

    The temporary name is hidden, names its writer (``.<name>.part.<host>-<pid>.<random><suffix>``)
    and keeps the suffix, so writers that infer the format from the extension (matplotlib, ASE)
    still work. Temporary files of ``path`` left by a writer that no longer runs (killed with
    SIGKILL, or on a lost node) are removed first (:func:`remove_orphans`); a stage ended by
    SIGTERM removes its own (:func:`exit_on_sigterm`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for orphan in remove_orphans(path.parent, f".{path.name}.part."):
        import logging

        logging.getLogger("octastem").info("%s: removed %s, left by an interrupted writer", path, orphan.name)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.part.{owner_tag()}.", suffix=path.suffix, dir=path.parent)
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


def exit_on_sigterm() -> bool:
    """Make SIGTERM (a SLURM time limit, ``kill``) raise ``SystemExit(143)`` in this process, so that
    ``finally`` blocks run and temporary outputs are removed; returns whether it was installed (only
    from the main thread, and only over the default handler)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return False
    if signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
        return signal.getsignal(signal.SIGTERM) is _raise_exit
    signal.signal(signal.SIGTERM, _raise_exit)
    return True


def _raise_exit(signum, frame):
    raise SystemExit(128 + signum)


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


#: Per-axis calibration and scan geometry: typed fields of :class:`Stem4D`, each stored as the
#: attribute of the same name next to :data:`STEM_ATTRS`.
STEM_AXIS_ATTRS = ("scan_step_x_A", "scan_step_y_A", "k_sampling_x_mrad", "k_sampling_y_mrad", "scan_shape", "cell_A")


@dataclass
class Stem4D:
    """A 4D-STEM dataset in memory: ``data`` (scan_y, scan_x, k_y, k_x) and its calibration.

    Units: energy eV, semi-angle and detector sampling mrad, scan steps A, dose e/A^2, rotation deg.
    ``scan_step_x_A`` / ``scan_step_y_A``: steps along the scan columns (x) and rows (y);
    ``k_sampling_x_mrad`` / ``k_sampling_y_mrad``: detector pixel along k_x and k_y. Each takes
    the scalar ``scan_step_A`` / ``k_sampling_mrad`` where not given (a file without per-axis
    attributes); the scalars are the file attributes of that name, the means of x and y for the
    datasets made here. ``scan_shape``: (rows, cols) of the scan or averaged cell; ``cell_A``:
    (Lx, Ly, Lz) of a simulated cell or box; both None where not recorded. ``extra``: every other
    attribute; per-axis names given in ``extra`` go to their fields.

    ``attr_order``: the order in which the attributes after :data:`STEM_ATTRS` are written (an
    HDF5 file's bytes depend on it): a file's own order for a dataset read from it, so a dataset
    read and written back, or made twice, gives the same file. Names not in it follow, the
    per-axis fields first; a per-axis value equal to its scalar is written only where named in
    it (the file held it, or the dataset's maker lists it), so a file without per-axis attributes
    stays without.
    """

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
    scan_step_x_A: float | None = None
    scan_step_y_A: float | None = None
    k_sampling_x_mrad: float | None = None
    k_sampling_y_mrad: float | None = None
    scan_shape: list[int] | None = None
    cell_A: list[float] | None = None
    attr_order: tuple[str, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        if any(k in self.extra for k in STEM_AXIS_ATTRS):
            if not self.attr_order:
                self.attr_order = tuple(self.extra)
            extra = dict(self.extra)
            for k in STEM_AXIS_ATTRS:
                if k in extra:
                    value = extra.pop(k)
                    if getattr(self, k) is None:
                        setattr(self, k, value)
            self.extra = extra
        self.attr_order = tuple(self.attr_order)
        if self.scan_step_x_A is None:
            self.scan_step_x_A = self.scan_step_A
        if self.scan_step_y_A is None:
            self.scan_step_y_A = self.scan_step_A
        if self.k_sampling_x_mrad is None:
            self.k_sampling_x_mrad = self.k_sampling_mrad
        if self.k_sampling_y_mrad is None:
            self.k_sampling_y_mrad = self.k_sampling_mrad

    @classmethod
    def from_attrs(cls, data: Any, attrs: dict) -> Stem4D:
        """The dataset of ``data`` and its file attributes (plain values, as :func:`open_4dstem` gives them).

        ``data`` may be an open ``h5py.Dataset`` (read in parts) or an array; the attribute order is kept.
        """
        extra = {k: v for k, v in attrs.items() if k not in STEM_ATTRS}
        return cls(data=data, extra=extra, attr_order=tuple(extra), **{k: attrs[k] for k in STEM_ATTRS})

    def _implicit(self, name: str) -> bool:
        """Whether the per-axis field ``name`` is left out of the file: unset, or its scalar's value not named
        in ``attr_order``."""
        value = getattr(self, name)
        scalar = {
            "scan_step_x_A": self.scan_step_A,
            "scan_step_y_A": self.scan_step_A,
            "k_sampling_x_mrad": self.k_sampling_mrad,
            "k_sampling_y_mrad": self.k_sampling_mrad,
        }
        return value is None or (name in scalar and name not in self.attr_order and value == scalar[name])

    @property
    def attrs(self) -> dict:
        """The file attributes: :data:`STEM_ATTRS`, then the per-axis fields and ``extra`` in ``attr_order``."""
        d = {k: getattr(self, k) for k in STEM_ATTRS}
        rest = {k: getattr(self, k) for k in STEM_AXIS_ATTRS if not self._implicit(k)}
        rest.update(self.extra)
        for k in self.attr_order:
            if k in rest:
                d[k] = rest.pop(k)
        d.update(rest)
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
    """Read the internal 4D-STEM HDF5 format, checking rank and calibration (see :func:`open_4dstem`)."""
    with open_4dstem(path) as (ds, attrs):
        data = ds[()]
    return Stem4D.from_attrs(data, attrs)


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------


def write_image(
    path: str | os.PathLike,
    image: np.ndarray,
    sampling_A: float,
    kind: str,
    blocks: tuple[np.ndarray, np.ndarray] | None = None,
    **attrs: Any,
) -> None:
    """Write a 2D image (y, x) as float32 with its sampling (A/pixel), kind and attributes.

    ``blocks``: optional ``(means, counts)``, the (n, y, x) images of which ``image`` is the
    count-weighted mean (time blocks of MD snapshots), stored as dataset ``blocks`` with
    attribute ``counts`` (:func:`read_image_blocks`)."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise InputError(f"{path}: field 'image' must be 2D (y, x), got shape {image.shape}")
    if blocks is not None:
        means, counts = np.asarray(blocks[0], dtype=np.float32), np.asarray(blocks[1], dtype=np.int64)
        if means.ndim != 3 or means.shape[1:] != image.shape or counts.shape != (means.shape[0],):
            raise InputError(
                f"{path}: field 'blocks' must be (n, {image.shape[0]}, {image.shape[1]}) with n counts, "
                f"got {means.shape} and {counts.shape}"
            )
    attrs.setdefault("provenance", provenance())
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        ds = f.create_dataset("image", data=image)
        ds.attrs["sampling_A"] = float(sampling_A)
        ds.attrs["kind"] = kind
        for k, v in attrs.items():
            ds.attrs[k] = v
        if blocks is not None:
            f.create_dataset("blocks", data=means).attrs["counts"] = counts


def read_image_blocks(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """The time-block images ``(means (n, y, x), counts (n,))`` of an image file written with
    ``blocks``; InputError naming the file when it has none or they are damaged."""
    path = Path(path)
    with open_hdf5(path, "image file", ", truncated or corrupt") as f:
        if "blocks" not in f or "counts" not in f["blocks"].attrs:
            raise InputError(f"{path}: no dataset 'blocks' with attribute 'counts' (time-block images)")
        ds = f["blocks"]
        try:
            means, counts = ds[()], np.asarray(ds.attrs["counts"], dtype=np.int64)
        except OSError as e:
            raise InputError(f"{path}: dataset 'blocks' unreadable, truncated or corrupt ({e})") from e
        shape = f["image"].shape if "image" in f else None
    if means.ndim != 3 or counts.shape != (means.shape[0],) or (shape is not None and means.shape[1:] != shape):
        raise InputError(f"{path}: dataset 'blocks' has shape {means.shape} and {counts.shape} counts, image {shape}")
    if np.any(counts < 1):
        raise InputError(f"{path}: dataset 'blocks' has a block of {counts.min()} frames (need >= 1)")
    return means, counts


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """Read an image file: returns (image, attrs) with attrs including sampling_A and kind.

    A missing, truncated or corrupt file, a missing field or an image that is not 2D is an
    :class:`InputError` naming the file."""
    path = Path(path)
    with open_hdf5(path, "image file", ", truncated or corrupt") as f:
        if "image" not in f:
            raise InputError(f"{path}: missing dataset 'image'")
        ds = f["image"]
        if "sampling_A" not in ds.attrs:
            raise InputError(f"{path}: dataset 'image' lacks attribute 'sampling_A'")
        if ds.ndim != 2:
            raise InputError(f"{path}: field 'image' must be 2D (y, x), got shape {ds.shape}")
        try:
            image = ds[()]
        except OSError as e:  # the header was readable, the data block is not
            raise InputError(f"{path}: dataset 'image' unreadable, truncated or corrupt ({e})") from e
        return image, {k: _plain(v) for k, v in ds.attrs.items()}


def open_hdf5(path: str | os.PathLike, what: str = "file", damaged: str = "") -> h5py.File:
    """``path`` open for reading as HDF5; :class:`InputError` naming it if it is missing or unreadable.

    ``what`` names the kind of file in the messages ("file", "trajectory"); ``damaged`` is added to
    the unreadable message (e.g. ", truncated or corrupt").
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: {what} not found")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise InputError(f"{path}: not a readable HDF5 {what}{damaged} ({e})") from e


def _plain(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.ndarray):
        return v.tolist() if v.ndim else v.item()
    if isinstance(v, np.generic):
        return v.item()
    return v


@contextlib.contextmanager
def open_4dstem(path: str | os.PathLike) -> Iterator[tuple[h5py.Dataset, dict]]:
    """The dataset ``data`` of an internal 4D-STEM file, open for reading in parts (e.g. scan rows),
    and its attributes as plain values, after the checks of :func:`read_4dstem` (rank, calibration).

    For readers that stream a scan too large to hold in memory; the file closes with the block.
    """
    path = Path(path)
    with open_hdf5(path) as f:
        if "data" not in f:
            raise InputError(f"{path}: missing dataset 'data' (scan_y, scan_x, k_y, k_x)")
        ds = f["data"]
        if ds.ndim != 4:
            raise InputError(f"{path}: field 'data' must be 4D (scan_y, scan_x, k_y, k_x), got shape {ds.shape}")
        missing = [k for k in STEM_ATTRS if k not in ds.attrs]
        if missing:
            raise InputError(f"{path}: dataset 'data' lacks calibration attribute(s) {missing}")
        yield ds, {k: _plain(v) for k, v in ds.attrs.items()}
