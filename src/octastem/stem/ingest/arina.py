"""DECTRIS ARINA acquisitions: the NeXus master file ``<name>_master.h5``, whose ``entry/data/data_NNNNNN``
external links point to the data files of frames (bitshuffle/LZ4 compressed, read with the filters
of ``hdf5plugin``), and the scan metadata file ``<name>.h5`` the acquisition software writes next
to them (group "STEM Metadata").

The frames of all data files, in the order of their numbers, form one stack that fills the scan
row by row. The scan shape is (NumPixelsY, NumPixelsX) of the metadata file or the configured
``scan_shape``; both must agree with each other and with the number of frames, and the frames must
be as many as the master file records (``nimages`` x ``ntrigger``). Calibration from the metadata
file: the high tension (V) as ``energy_eV`` and, where the file marks it calibrated, the pixel size
(nm) as ``scan_step_A``. Pixels flagged in the detector's ``pixel_mask`` (module gaps, dead, hot or
noisy pixels, which the detector fills with its largest count) read as 0; their number is recorded.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from octastem import io
from octastem.io import InputError

from .hdf5 import check_filters, load_filter_plugins
from .source import Source, stack_reader

#: Links of a master file to its data files.
DATA_LINK = re.compile(r"data_\d{6}$")
DETECTOR = "entry/instrument/detector"
MASTER_SUFFIX = "_master.h5"


def data_names(f: h5py.File) -> list[str]:
    """Names of the data links (``data_000001`` ...) under ``entry/data``, in order."""
    try:
        group = f.get("entry/data")
    except (KeyError, OSError, TypeError):
        return []
    if not isinstance(group, h5py.Group):
        return []
    return sorted(k for k in group if DATA_LINK.match(k))


def is_arina(f: h5py.File) -> bool:
    """Whether ``f`` is a DECTRIS master file (frames behind ``entry/data/data_NNNNNN``)."""
    return bool(data_names(f))


def frame_stacks(path: Path, f: h5py.File, stacks: list) -> None:
    """Append to ``stacks`` the (name, dataset) frame stacks of the master file, links followed; each 3D
    with the same frame shape and dtype (those opened so far stay in ``stacks`` for closing on an error)."""
    group = f["entry/data"]
    for key in data_names(f):
        name = f"entry/data/{key}"
        link = group.get(key, getlink=True)
        try:
            ds = group[key]
        except (KeyError, OSError) as e:
            target = f"{link.filename}:{link.path}" if isinstance(link, h5py.ExternalLink) else key
            raise InputError(
                f"{path}: field 'data': {name} links to {target}, which is missing or unreadable; expected the "
                f"data file next to the master file ({e})"
            ) from e
        if isinstance(ds, h5py.Dataset):
            stacks.append((name, ds))
        if not isinstance(ds, h5py.Dataset) or ds.ndim != 3:
            raise InputError(f"{path}: field 'data': {name} must be a 3D stack of frames, got {ds}")
        first = stacks[0]
        if ds.shape[1:] != first[1].shape[1:] or ds.dtype != first[1].dtype:
            raise InputError(
                f"{path}: field 'data': {name} holds frames {ds.shape[1:]} {ds.dtype}, {first[0]} holds "
                f"{first[1].shape[1:]} {first[1].dtype}; expected one frame shape and dtype"
            )
        check_filters(path, name, ds)


def _scalar(f: h5py.File, name: str):
    obj = f.get(name)
    if not isinstance(obj, h5py.Dataset) or obj.shape not in ((), (1,)):
        return None
    value = obj[()]
    return value.item() if hasattr(value, "item") else value


def scan_metadata(path: Path) -> dict:
    """What the scan metadata file ``<name>.h5`` next to the master records: scan shape, energy, step."""
    if not path.name.endswith(MASTER_SUFFIX):
        return {}
    meta_path = path.with_name(path.name[: -len(MASTER_SUFFIX)] + ".h5")
    if not meta_path.exists():
        return {}
    with io.open_hdf5(meta_path, "scan metadata file", ", truncated or corrupt") as m:
        group = m.get("STEM Metadata")
        if not isinstance(group, h5py.Group):
            return {}
        attrs = {k: np.asarray(v).ravel() for k, v in group.attrs.items()}
    out: dict = {"file": meta_path.name}

    def first(key):
        return float(attrs[key][0]) if key in attrs and attrs[key].size else None

    ny, nx = first("NumPixelsY"), first("NumPixelsX")
    if ny and nx:
        out["scan_shape"] = (int(ny), int(nx))
    if (hv := first("High Tension")) and hv > 0:
        out["energy_eV"] = hv  # volts: the electron energy in eV
    if (step := first("Pixel Size")) and step > 0 and first("IsPixelSizeCalibrated"):
        out["scan_step_A"] = step * 10.0  # nm -> A
    return out


def _scan_shape(path: Path, meta: dict, scan_shape, frames: int, stacks) -> tuple[int, int]:
    """The scan shape from the metadata file and/or the configuration, checked against each other."""
    recorded = meta.get("scan_shape")
    if recorded is not None:
        if recorded[0] * recorded[1] != frames:
            raise InputError(
                f"{path}: the scan metadata file {meta['file']} records a scan of (NumPixelsY, NumPixelsX) = "
                f"{recorded}, {recorded[0] * recorded[1]} positions, but the data files hold {frames} frames "
                "(interrupted acquisition, or a data file of another scan?)"
            )
        if scan_shape is not None and tuple(int(v) for v in scan_shape) != recorded:
            raise InputError(
                f"{path}: field 'scan_shape' = {tuple(int(v) for v in scan_shape)} contradicts the scan metadata "
                f"file {meta['file']}, which records (NumPixelsY, NumPixelsX) = {recorded}; expected it unset "
                "or equal"
            )
        return recorded
    if scan_shape is None:
        ds = stacks[0][1]
        links = ", ".join(f"{name} ({d.shape[0]} frames)" for name, d in stacks)
        raise InputError(
            f"{path}: a DECTRIS ARINA master file: {frames} frames of {ds.shape[1]} x {ds.shape[2]} pixels "
            f"({ds.dtype}) in {links}; no scan metadata file "
            f"{path.name[: -len(MASTER_SUFFIX)] if path.name.endswith(MASTER_SUFFIX) else path.stem}.h5 next to it "
            f"records the scan shape: set calibration field 'scan_shape' (scan_y, scan_x) with scan_y x scan_x "
            f"= {frames}"
        )
    return tuple(int(v) for v in scan_shape)


def _check_planned(path: Path, f: h5py.File, frames: int) -> None:
    """The data files must hold the frames the master file records (nimages x ntrigger)."""
    spec = f"{DETECTOR}/detectorSpecific"
    nimages, ntrigger = _scalar(f, f"{spec}/nimages"), _scalar(f, f"{spec}/ntrigger")
    if nimages and ntrigger and frames < int(nimages) * int(ntrigger):
        raise InputError(
            f"{path}: field 'data': the master file records nimages x ntrigger = {int(nimages)} x {int(ntrigger)} "
            f"= {int(nimages) * int(ntrigger)} frames, its data files hold {frames} (a data file missing or "
            "incomplete?)"
        )


def _flagged_pixels(f: h5py.File, frame_shape: tuple[int, int]) -> np.ndarray | None:
    """Boolean map of the pixels flagged in the detector's ``pixel_mask``; None when none are."""
    mask = f.get(f"{DETECTOR}/detectorSpecific/pixel_mask")
    if not isinstance(mask, h5py.Dataset) or tuple(mask.shape) != tuple(frame_shape):
        return None
    flagged = np.asarray(mask[()]) != 0
    return flagged if flagged.any() else None


def arina_source(path: Path, f: h5py.File, stacks, scan_shape) -> Source:
    """The :class:`Source` over the frame stacks of an open master file."""
    datasets = [ds for _, ds in stacks]
    frames = sum(int(ds.shape[0]) for ds in datasets)
    _check_planned(path, f, frames)
    meta = scan_metadata(path)
    shape = _scan_shape(path, meta, scan_shape, frames, stacks)
    frame_shape = tuple(int(n) for n in datasets[0].shape[1:])
    flagged = _flagged_pixels(f, frame_shape)
    bounds = np.cumsum([0] + [int(ds.shape[0]) for ds in datasets])

    def frames_of(s: slice) -> np.ndarray:
        parts = []
        for ds, lo, hi in zip(datasets, bounds[:-1], bounds[1:], strict=True):
            a, b = max(s.start, lo), min(s.stop, hi)
            if a < b:
                parts.append(ds[a - lo : b - lo])
        out = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if flagged is not None:
            out[:, flagged] = 0
        return out

    shape4, read = stack_reader(path, (frames, *frame_shape), frames_of, shape)
    cal = {k: meta[k] for k in ("energy_eV", "scan_step_A") if k in meta}
    notes = {"data_links": [name for name, _ in stacks], "frames": frames}
    if meta:
        notes["scan_metadata_file"] = meta["file"]
    if flagged is not None:
        notes["pixels_masked"] = int(flagged.sum())
    return Source(shape4, np.dtype(datasets[0].dtype), read, "arina", cal, None, notes)


def close_linked(f: h5py.File, datasets) -> None:
    """Close the data files that the links of ``f`` opened (they stay open while a dataset is referenced)."""
    for ds in datasets:
        with contextlib.suppress(ValueError, RuntimeError):
            if ds.id.valid and ds.file.filename != f.filename:
                ds.file.close()


@contextlib.contextmanager
def open_arina(path: Path, scan_shape, energy_eV: float | None = None) -> Iterator[Source]:
    """The frames of a DECTRIS ARINA master file and its data files as a 4D scan."""
    load_filter_plugins()
    with io.open_hdf5(path, damaged=", truncated or corrupt") as f:
        stacks: list = []
        try:
            frame_stacks(path, f, stacks)
            yield arina_source(path, f, stacks, scan_shape)
        finally:
            close_linked(f, [ds for _, ds in stacks])
