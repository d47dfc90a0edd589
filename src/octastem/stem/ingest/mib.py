"""Quantum Detectors Merlin ``.mib`` acquisitions (with their ``.hdr``), read through rosettasciio.

A .mib file is a sequence of frames, each a text header (``MQ1,<frame>,<header bytes>,<chips>,
<width>,<height>,<data type>,...``) followed by its pixels. The first header says what the file
holds: frames of counts (data type U08, U16 or U32) or a RAW acquisition (R64: the counter bits as
read out, which rosettasciio does not decode); the file size gives the number of complete frames.

The scan is scan_y x scan_x frames filled row by row. Its row length is recorded by the ``.hdr``
("Frames per Trigger" above 1: one trigger per scan row) or by the frame timestamps (a longer gap
before every row, found at the same period through the file). A configured ``scan_shape`` must
match the number of frames and a recorded row length; without it, the recorded row length sets the
scan. The frames are then read lazily by ``rsciio.quantumdetector.file_reader`` with that
navigation shape, so rows, columns and the vertical flip of the readout are rosettasciio's own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from octastem.io import InputError

from .rsciio import signal_calibration
from .source import Source, array_source, check_frame_count

#: Bytes per pixel of the Merlin data types rosettasciio reads.
PIXEL_BYTES = {"U08": 1, "U16": 2, "U32": 4}
#: Frame timestamps looked at for the row length (rosettasciio's default).
MAX_TIMESTAMPS = 10000


@dataclass(frozen=True)
class MibFile:
    """What the headers, the size and the ``.hdr`` of a .mib file say about it."""

    frame_shape: tuple[int, int]  # (height, width) pixels
    data_type: str  # U08, U16, U32
    frames: int  # complete frames in the file
    planned: int | None  # frames of the acquisition, from the .hdr
    row_length: int | None  # frames per scan row, when recorded
    row_origin: str  # where the row length comes from, or why it is unknown


def first_header(path: Path) -> list[str]:
    """The fields of the first frame header; :class:`InputError` if the file does not start with one."""
    with open(path, "rb") as fh:
        head = fh.read(384)
    fields = head.decode("ascii", errors="replace").split(",")
    if len(fields) < 8 or fields[0] != "MQ1":
        raise InputError(
            f"{path}: not a Merlin .mib file: it does not start with a frame header 'MQ1,...' "
            f"(first bytes {head[:16]!r}); expected a Quantum Detectors Merlin acquisition"
        )
    return fields


def parse_hdr(path: Path) -> dict[str, str]:
    """Key -> value of the acquisition's ``.hdr`` (tab separated), empty when there is none."""
    hdr = path.with_suffix(".hdr")
    if not hdr.is_file():
        return {}
    out = {}
    for line in hdr.read_text(errors="replace").splitlines():
        if "\t" in line and not line.startswith(("HDR", "End")):
            key, value = line.split("\t", 1)
            out[key.rstrip(":").strip()] = value.strip()
    return out


def _hdr_int(hdr: dict, key: str) -> int | None:
    try:
        return int(hdr[key])
    except (KeyError, ValueError):
        return None


def timestamp_row_length(path: Path) -> int | None:
    """Frames per scan row from the frame timestamps: a longer gap before every row, at one period."""
    from rsciio.quantumdetector import load_mib_data, parse_timestamps

    try:
        _, headers = load_mib_data(str(path), return_headers=True)
        stamps = [s.strip().rstrip("Z") for s in parse_timestamps(headers, max_index=MAX_TIMESTAMPS)]
        times = np.array(stamps, dtype="datetime64[ns]").astype(np.int64)
    except (ValueError, TypeError, OSError, IndexError):
        return None  # older Merlin versions write no timestamp there
    gaps = np.diff(times).astype(float)
    if gaps.size < 2 or np.ptp(gaps) == 0:
        return None
    starts = np.flatnonzero(gaps > gaps.mean()) + 1  # frames that follow a longer gap
    if starts.size == 0 or starts[0] < 2:
        return None
    period = int(starts[0])
    return period if np.array_equal(starts, np.arange(period, gaps.size + 1, period)) else None


def inspect_mib(path: Path) -> MibFile:
    """Read the first header, the size and the ``.hdr`` of a .mib file; refuse what is not a 4D scan."""
    fields = first_header(path)
    data_type = fields[6].strip()
    try:
        header_bytes, width, height = int(fields[2]), int(fields[4]), int(fields[5])
    except ValueError as e:
        raise InputError(f"{path}: Merlin frame header unreadable ({','.join(fields[:8])}): corrupt file?") from e
    if data_type == "R64":
        raise InputError(
            f"{path}: a Merlin RAW acquisition (frame data type R64: the counter bits as read out, "
            f"{width} x {height} pixels): rosettasciio does not decode RAW .mib frames, so it cannot be read as "
            "a 4D scan; expected frames of counts (data type U08, U16 or U32: acquire with RAW output off)"
        )
    if data_type not in PIXEL_BYTES:
        raise InputError(
            f"{path}: Merlin frame data type {data_type!r}; expected one of {sorted(PIXEL_BYTES)} (rosettasciio)"
        )
    frame_bytes = header_bytes + width * height * PIXEL_BYTES[data_type]
    size = path.stat().st_size
    frames, rest = divmod(size, frame_bytes)
    if rest:
        raise InputError(
            f"{path}: the file ends inside frame {frames + 1} ({rest} of its {frame_bytes} bytes): truncated "
            f"file (interrupted acquisition or copy); expected whole frames of {frame_bytes} bytes"
        )
    if frames == 1:
        raise InputError(
            f"{path}: a single Merlin frame ({height} x {width} pixels, {data_type}), not a 4D scan: a 4D-STEM "
            "acquisition holds one diffraction frame per scan position (scan_y x scan_x frames)"
        )
    hdr = parse_hdr(path)
    per_trigger = _hdr_int(hdr, "Frames per Trigger (Number)")
    if per_trigger and per_trigger > 1:
        row, origin = per_trigger, f"the .hdr ('Frames per Trigger' = {per_trigger}, one trigger per scan row)"
    else:
        row = timestamp_row_length(path)
        origin = (
            "the frame timestamps (a longer gap before every scan row)"
            if row
            else "the .hdr has no 'Frames per Trigger' above 1 and the frame timestamps show no regular row gaps"
        )
    planned = _hdr_int(hdr, "Frames in Acquisition (Number)")
    return MibFile((height, width), data_type, frames, planned, row, origin)


def scan_layout(path: Path, mib: MibFile, scan_shape) -> tuple[int, int]:
    """(scan_y, scan_x) of the acquisition: the configured ``scan_shape`` checked against the file, or the file's."""
    frames, row = mib.frames, mib.row_length
    if scan_shape is not None:
        ny, nx = check_frame_count(path, frames, scan_shape)
        if row is not None and nx != row:
            scan = (
                f"a scan of ({frames // row}, {row}) (scan_y, scan_x); expected scan_shape [{frames // row}, {row}] "
                "or unset"
                if frames % row == 0
                else f"and {frames} frames are not whole rows (incomplete last row)"
            )
            raise InputError(
                f"{path}: field 'scan_shape' = ({ny}, {nx}) contradicts the file: according to {mib.row_origin}, "
                f"its scan rows are {row} frames long, {scan}"
            )
        return ny, nx
    if mib.planned is not None and mib.planned != frames:
        raise InputError(
            f"{path}: the .hdr records {mib.planned} frames in the acquisition, the file holds {frames} "
            "(interrupted acquisition or incomplete copy); set calibration field 'scan_shape' (scan_y, scan_x) "
            f"to the scan these {frames} frames cover"
        )
    if row is None or frames % row:
        why = mib.row_origin if row is None else f"{frames} frames are not whole rows of {row}"
        raise InputError(
            f"{path}: a stack of {frames} Merlin frames whose scan shape the file does not record ({why}): "
            f"set calibration field 'scan_shape' (scan_y, scan_x) with scan_y x scan_x = {frames}"
        )
    return frames // row, row


@contextlib.contextmanager
def open_mib(path: Path, scan_shape, energy_eV: float | None) -> Iterator[Source]:
    """The Merlin acquisition as a 4D scan, read lazily by rosettasciio with the checked scan shape."""
    from rsciio.quantumdetector import file_reader

    mib = inspect_mib(path)
    ny, nx = scan_layout(path, mib, scan_shape)
    try:
        signal = file_reader(str(path), lazy=True, navigation_shape=(nx, ny))[0]  # rosettasciio order (x, y)
    except Exception as e:  # noqa: BLE001 - any reader failure means a damaged file; keep the cause
        raise InputError(
            f"{path}: rosettasciio cannot read the Merlin frames ({type(e).__name__}: {e}); corrupt file?"
        ) from e
    data = signal["data"]
    shape = (ny, nx, *mib.frame_shape)
    if int(np.prod(data.shape)) != int(np.prod(shape)) or tuple(data.shape[-2:]) != mib.frame_shape:
        raise InputError(f"{path}: rosettasciio read {tuple(data.shape)}; expected {shape} from the frame headers")
    data = data.reshape(shape)  # rosettasciio squeezes a scan of one row or column
    chunks = getattr(data, "chunks", None)
    rows = int(chunks[0][0]) if chunks else None
    notes = {"frames": mib.frames, "scan_shape_origin": "config" if scan_shape is not None else mib.row_origin}
    yield array_source(path, data, "mib", None, signal_calibration(signal, energy_eV), rows, notes)
