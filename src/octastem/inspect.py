"""What one 4D-STEM file holds, before any pipeline run (``octastem inspect``).

The file is read through the ingest readers (:func:`octastem.stem.ingest.open_source`: raw
detector formats, generic HDF5, EMD and the internal 4D-STEM format), a few scan rows at a time,
with the ingest's checks (4D, finite, non-negative counts). :func:`inspect_file` returns an
:class:`Inspection`: shape and dtype, the calibration found in the file and the required fields
it lacks, the counts per scan position and the dose they imply (electrons per position /
(step_x * step_y), e/A^2, where a scan step is known), the bright-field disk found in the mean
pattern, virtual bright-field (BF) and annular dark-field (ADF) images and the mean diffraction
pattern. :func:`write_outputs` saves them as PNG (plus the numbers as JSON), all or nothing.

Virtual detectors: with the detector sampling and the semi-angle known they are those of the
pipeline's template matching (:func:`octastem.stem.lattice.detector_vectors`: BF within the
semi-angle, ADF beyond 1.2 x the semi-angle, optical axis at pixel (n_k // 2)); without them,
the same definitions in detector pixels around the disk found in the mean pattern.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from octastem import io
from octastem.io import InputError
from octastem.stem.ingest import REQUIRED_CALIBRATION, guess_format, open_source, resolve_calibration
from octastem.stem.ingest.calibration import AXIS_PAIRS
from octastem.stem.ingest.stream import check_chunk, check_source, chunk_rows, read_rows
from octastem.stem.lattice import detector_vectors
from octastem.stem.origin import find_disc

#: Attributes of an internal 4D-STEM file worth reporting beside the calibration.
RECORDED = ("dose_e_per_A2", "source", "intensity_unit", "counts_per_electron", "n_cells", "supercell", "format")

#: Output files of :func:`write_outputs`, by role: suffix after the input file's stem.
OUTPUTS = {
    "bf": "_bf.png",
    "adf": "_adf.png",
    "mean_pattern": "_mean_pattern.png",
    "overview": "_inspect.png",
    "summary": "_inspect.json",
}

#: Dynamic range (decades) of the logarithmic mean-pattern image.
PATTERN_DECADES = 3.0


@dataclass
class Inspection:
    """What :func:`inspect_file` found. Units: counts as stored (electrons after ``counts_per_electron``),
    calibration in the internal names and units (eV, mrad, A, deg), detector geometry in pixels."""

    path: str
    format: str
    internal: bool
    shape: tuple[int, int, int, int]
    dtype: str
    calibration: dict  # found in the file
    given: dict  # supplied by the caller, used where the file has none
    missing: list[str]  # required fields neither holds
    problems: list[str]  # what the ingest would refuse in the calibration (invalid values)
    counts_per_electron: float
    total_counts: float
    counts_per_position: dict  # mean, min, max over the scan
    whole_counts: bool
    electrons_per_position: float
    dose_e_per_A2: float | None
    dose_note: str
    recorded: dict  # attributes of an internal file (its recorded dose, source, ...)
    disk: dict  # bright-field disk in the mean pattern: centre (k_y, k_x) and radius, pixels
    detector: dict  # how the virtual BF / ADF were defined
    bf: np.ndarray = field(repr=False)
    adf: np.ndarray = field(repr=False)
    mean_pattern: np.ndarray = field(repr=False)

    def merged_calibration(self) -> dict:
        """The calibration used: the file's where it has a field, else the given one."""
        return _merged(self.calibration, self.given)

    def summary(self) -> dict:
        """The numbers, JSON-ready (no images)."""
        return {
            "path": self.path,
            "format": self.format,
            "internal": self.internal,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "calibration_in_file": self.calibration,
            "calibration_given": self.given,
            "missing": self.missing,
            "problems": self.problems,
            "counts_per_electron": self.counts_per_electron,
            "total_counts": self.total_counts,
            "counts_per_position": self.counts_per_position,
            "whole_counts": self.whole_counts,
            "electrons_per_position": self.electrons_per_position,
            "dose_e_per_A2": self.dose_e_per_A2,
            "dose_note": self.dose_note,
            "recorded": self.recorded,
            "disk": self.disk,
            "detector": self.detector,
        }

    def report(self) -> str:
        """A human-readable account, one fact per line."""
        ny, nx, nky, nkx = self.shape
        kind = "the internal 4D-STEM format" if self.internal else "raw"
        lines = [
            f"{self.path}",
            f"  format       {self.format} ({kind})",
            f"  shape        {self.shape}: scan {ny} rows x {nx} columns, patterns {nky} x {nkx} (k_y, k_x)",
            f"  dtype        {self.dtype}",
        ]
        merged = self.merged_calibration()
        for scalar, pair in AXIS_PAIRS.items():  # per-axis values only where they differ from their mean
            if scalar in merged and all(merged.get(p) == merged[scalar] for p in pair):
                for p in pair:
                    merged.pop(p, None)
        if merged:
            for i, (key, value) in enumerate(sorted(merged.items())):
                where = "file" if key in self.calibration else "option or schema default"
                lines.append(f"  {'calibration' if i == 0 else '':12} {key} = {value:g} ({where})")
        else:
            lines.append("  calibration  none in the file")
        if self.missing:
            lines.append(
                f"  missing      {', '.join(self.missing)}: give them with --calibration KEY=VALUE "
                "(in a pipeline config: samples.<name>.raw.calibration)"
            )
        elif self.problems:
            lines += [f"  problem      {p}" for p in self.problems]
        else:
            lines.append("  missing      nothing: the calibration is complete")
        c = self.counts_per_position
        lines.append(
            f"  counts       {c['mean']:.6g} per position (min {c['min']:.6g}, max {c['max']:.6g}), "
            f"{'whole counts' if self.whole_counts else 'not whole counts'}"
        )
        lines.append(f"  dose         {self.dose_note}")
        for key, value in self.recorded.items():
            lines.append(f"  recorded     {key} = {value}")
        if self.total_counts == 0:
            lines.append("  warning      every pattern is empty (zero counts)")
        d = self.disk
        if not d["found"]:
            empty = "the mean pattern is empty" if self.total_counts == 0 else "nothing in the mean pattern is a disk"
            lines.append(f"  BF disk      none found ({empty})")
        else:
            lines.append(
                f"  BF disk      radius {d['radius_px']:.1f} px, centre (k_y, k_x) = ({d['centre_px'][0]:.1f}, "
                f"{d['centre_px'][1]:.1f}) px; the pipeline takes the optical axis at ({nky // 2}, {nkx // 2})"
            )
        if d.get("cut"):
            lines.append(
                "  warning      the disk is cut by the detector edge: the ingest refuses it (origin: plane), "
                "since centre of mass, virtual detectors and the CNN need the whole disk"
            )
        elif d.get("off_centre"):
            lines.append(
                "  note         the disk is off the detector centre by more than half its radius: the ingest "
                "(origin: plane) centres it before any detector or reconstruction sees the patterns"
            )
        lines.append(f"  detectors    {self.detector['description']}")
        return "\n".join(lines)


def _merged(from_file: Mapping, given: Mapping) -> dict:
    """File values first, given ones where the file has none; a scalar step or sampling fills its
    per-axis pair and a full pair defines the scalar (as the ingest does)."""
    out = {**dict(given), **dict(from_file)}
    for scalar, (px, py) in AXIS_PAIRS.items():
        if px in out and py in out:
            out.setdefault(scalar, 0.5 * (float(out[px]) + float(out[py])))
        elif scalar in out:
            out.setdefault(px, out[scalar])
            out.setdefault(py, out[scalar])
    return {k: float(v) for k, v in out.items() if k != "scan_shape"}


def _recorded(path: Path, fmt: str, dataset) -> dict | None:
    """The attributes of an internal 4D-STEM file (None for any other file)."""
    if dataset not in (None, "data") or (fmt if fmt != "auto" else guess_format(path, dataset)) != "hdf5":
        return None
    try:
        with io.open_4dstem(path) as (_, attrs):
            return {k: attrs[k] for k in RECORDED if k in attrs}
    except InputError:
        return None


def _read(path: Path, src, r0: int, r1: int) -> np.ndarray:
    """Scan rows r0..r1 as float32, checked (finite, non-negative); a read failure names the rows."""
    raw = read_rows(path, src, r0, r1)
    chunk = np.asarray(raw, dtype=np.float32)
    check_chunk(path, chunk, r0)
    return chunk


def _stream(path: Path, src, rows: int, vec: np.ndarray | None, progress: bool, desc: str):
    """One pass over the scan: counts per position, summed pattern, whole-count flag and, with
    detector vectors ``vec``, the virtual-image channels (n_channels, ny, nx)."""
    from tqdm.auto import tqdm

    ny, nx, nky, nkx = src.shape
    per_position = np.zeros((ny, nx))
    pattern = np.zeros((nky, nkx))
    channels = None if vec is None else np.zeros((vec.shape[0], ny, nx))
    integer = np.issubdtype(src.dtype, np.integer)
    whole = True
    for r0 in tqdm(range(0, ny, rows), desc=desc, unit="chunk", disable=not progress):
        r1 = min(ny, r0 + rows)
        chunk = _read(path, src, r0, r1)
        per_position[r0:r1] = chunk.sum(axis=(2, 3), dtype=np.float64)
        pattern += chunk.sum(axis=(0, 1), dtype=np.float64)
        if not integer:
            whole = whole and bool(np.all(chunk == np.round(chunk)))
        if vec is not None:
            flat = chunk.reshape((r1 - r0) * nx, nky * nkx)
            channels[:, r0:r1] = (vec @ flat.T).reshape(vec.shape[0], r1 - r0, nx)
    return per_position, pattern / (ny * nx), whole, channels


def find_disk(mean_pattern: np.ndarray) -> dict:
    """The bright-field disk of a mean pattern (:func:`octastem.stem.origin.find_disc`, as the ingest
    finds it): centre (k_y, k_x) and radius in pixels, whether it is cut by the detector edge and
    off the detector centre by more than half its radius; ``found`` False when the pattern holds
    no disk (no counts, or nothing brighter than its surroundings)."""
    m = np.asarray(mean_pattern, dtype=float)
    disc = find_disc(m)
    if disc is None:
        return {"centre_px": [m.shape[0] / 2, m.shape[1] / 2], "radius_px": 0.0, "found": False}
    cy, cx = disc.centre_px
    off = math.hypot(cy - m.shape[0] // 2, cx - m.shape[1] // 2) > 0.5 * disc.radius_px
    return {**disc.as_dict(), "found": True, "off_centre": bool(off)}


def _pixel_vectors(shape_k: tuple[int, int], disk: dict) -> np.ndarray:
    """BF (within the disk radius) and ADF (beyond 1.2 x the radius) weights around the disk centre, in pixels."""
    ky, kx = np.indices(shape_k)
    k = np.hypot(ky - disk["centre_px"][0], kx - disk["centre_px"][1])
    r = max(disk["radius_px"], 1.0)
    return np.stack([(k <= r).ravel(), (k > 1.2 * r).ravel()]).astype(np.float32)


def _calibrated_vectors(shape_k: tuple[int, int], cal: dict) -> np.ndarray | None:
    """The pipeline's BF and ADF detector weights, or None without detector sampling and semi-angle."""
    needed = ("k_sampling_x_mrad", "k_sampling_y_mrad", "semiangle_mrad")
    if not all(k in cal for k in needed):
        return None
    k_sampling = (cal["k_sampling_x_mrad"], cal["k_sampling_y_mrad"])
    bf = detector_vectors(shape_k, k_sampling, cal["semiangle_mrad"], "bf")
    try:
        adf = detector_vectors(shape_k, k_sampling, cal["semiangle_mrad"], "adf")
    except InputError:  # the detector ends inside 1.2 x the semi-angle: no dark field to show
        adf = np.zeros_like(bf)
    return np.concatenate([bf, adf])


def _dose(cal: dict, electrons: float, recorded: dict | None) -> tuple[float | None, str]:
    """Dose (e/A^2) implied by the electrons per position, and the sentence that says how (or why not)."""
    if recorded and not math.isfinite(float(recorded.get("dose_e_per_A2", 0.0))):
        return None, (
            "none: a noise-free simulation (dose_e_per_A2 = inf; each pattern holds the fraction of the beam, "
            f"{electrons:.4g} per position)"
        )
    if "scan_step_x_A" not in cal:
        return None, (
            f"unknown: {electrons:.6g} electrons per position, but the scan step is not in the file; "
            "give --calibration scan_step_A=... for the dose in e/A^2"
        )
    sx, sy = cal["scan_step_x_A"], cal["scan_step_y_A"]
    dose = electrons / (sx * sy)
    return dose, f"{dose:.6g} e/A^2 = {electrons:.6g} electrons per position / ({sx:g} A x {sy:g} A)"


def _check(path: Path, found: dict, given: dict, cal: dict) -> tuple[list[str], list[str]]:
    """Required calibration fields neither the file nor ``given`` holds, and what the ingest would
    refuse in the rest (its own check, :func:`resolve_calibration`)."""
    missing = [k for k in REQUIRED_CALIBRATION if k not in cal]
    if missing:
        return missing, []
    try:
        resolve_calibration(path, found, given)
    except InputError as e:
        return [], [str(e)]
    return [], []


def _scan(path: Path, src, cal: dict, found: dict, chunk_positions, progress: bool) -> dict:
    """Counts, mean pattern, bright-field disk and virtual images of an open source (one pass, or
    two when the virtual detectors must wait for the disk found in the mean pattern)."""
    shape_k = tuple(src.shape[2:])
    rows = chunk_rows(path, src.shape, chunk_positions)
    vec = _calibrated_vectors(shape_k, cal)
    per_position, mean, whole, channels = _stream(path, src, rows, vec, progress, f"inspect {path.name}")
    disk = find_disk(mean)
    if vec is None:
        *_, channels = _stream(path, src, rows, _pixel_vectors(shape_k, disk), progress, "virtual images")
        r = max(disk["radius_px"], 1.0)
        detector = {
            "units": "px",
            "centre_px": disk["centre_px"],
            "bf_radius_px": r,
            "description": f"BF within {r:.1f} px, ADF beyond {1.2 * r:.1f} px of the disk centre "
            "(no detector sampling or semi-angle: pixel units)",
        }
    else:
        s, k = cal["semiangle_mrad"], 0.5 * (cal["k_sampling_x_mrad"] + cal["k_sampling_y_mrad"])
        detector = {
            "units": "mrad",
            "centre_px": [shape_k[0] // 2, shape_k[1] // 2],
            "bf_radius_px": s / k,
            "description": f"BF within {s:g} mrad, ADF beyond {1.2 * s:g} mrad of pixel "
            f"({shape_k[0] // 2}, {shape_k[1] // 2}) (the pipeline's virtual detectors)",
        }
    if disk["found"] and "semiangle_mrad" in cal and "k_sampling_mrad" not in found:
        detector["implied_k_sampling_mrad"] = cal["semiangle_mrad"] / disk["radius_px"]
    return {
        "per_position": per_position,
        "mean": mean,
        "whole": whole,
        "channels": channels,
        "disk": disk,
        "detector": detector,
    }


def inspect_file(
    path: str | os.PathLike,
    *,
    fmt: str = "auto",
    dataset: str | None = None,
    scan_shape=None,
    calibration: Mapping | None = None,
    counts_per_electron: float = 1.0,
    chunk_positions: int | None = None,
    progress: bool = True,
) -> Inspection:
    """Read ``path`` (any format the ingest reads) and describe it; see the module docstring.

    ``calibration``: fields to use where the file has none (internal names, as in a config's
    ``samples.<name>.raw.calibration``); ``scan_shape`` (scan_y, scan_x) arranges a 3D frame stack.
    ``counts_per_electron``: detector counts per incident electron (the dose is in electrons).
    Raises :class:`InputError` naming the file for anything the ingest would refuse to read.
    """
    path = Path(path)
    given = {k: float(v) for k, v in dict(calibration or {}).items() if k != "scan_shape" and v is not None}
    if not (math.isfinite(counts_per_electron) and counts_per_electron > 0):
        raise InputError(f"{path}: field 'counts_per_electron' must be a positive number, got {counts_per_electron}")
    recorded = _recorded(path, fmt, dataset) if path.is_file() else None
    with open_source(path, fmt, dataset, scan_shape, given.get("energy_eV")) as src:
        check_source(path, src)
        found = {k: float(v) for k, v in src.calibration.items()}
        cal = _merged(found, given)
        scan = _scan(path, src, cal, found, chunk_positions, progress)
        fmt_used, dtype, shape = src.fmt, str(src.dtype), tuple(int(n) for n in src.shape)
    missing, problems = _check(path, found, given, cal)
    per_position = scan["per_position"]
    electrons = float(per_position.mean()) / counts_per_electron
    dose, note = _dose(cal, electrons, recorded)
    return Inspection(
        path=str(path),
        format=fmt_used,
        internal=recorded is not None,
        shape=shape,
        dtype=dtype,
        calibration=found,
        given=given,
        missing=missing,
        problems=problems,
        counts_per_electron=float(counts_per_electron),
        total_counts=float(per_position.sum()),
        counts_per_position={
            "mean": float(per_position.mean()),
            "min": float(per_position.min()),
            "max": float(per_position.max()),
        },
        whole_counts=scan["whole"],
        electrons_per_position=electrons,
        dose_e_per_A2=dose,
        dose_note=note,
        recorded={} if recorded is None else recorded,
        disk=scan["disk"],
        detector=scan["detector"],
        bf=scan["channels"][0],
        adf=scan["channels"][1],
        mean_pattern=scan["mean"],
    )


def pattern_image(mean_pattern: np.ndarray) -> np.ndarray:
    """The mean pattern on a logarithmic scale over :data:`PATTERN_DECADES` decades (what the PNG shows)."""
    m = np.asarray(mean_pattern, dtype=float)
    top = float(m.max())
    return np.log10(np.maximum(m, 0.0) + (10.0**-PATTERN_DECADES) * (top if top > 0 else 1.0))


def output_paths(path: str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, Path]:
    """The files :func:`write_outputs` writes for the input ``path`` into ``out_dir``, by role."""
    stem = Path(path).stem
    return {role: Path(out_dir) / f"{stem}{suffix}" for role, suffix in OUTPUTS.items()}


def write_outputs(insp: Inspection, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Save the virtual BF and ADF images and the mean pattern (one image pixel per scan position or
    detector pixel, grey levels from minimum to maximum), an overview figure and the JSON summary.

    All files are written under temporary names and renamed only when every one is complete.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = output_paths(insp.path, out_dir)
    with contextlib.ExitStack() as stack:
        tmp = {role: stack.enter_context(io.atomic_path(p)) for role, p in paths.items()}
        plt.imsave(tmp["bf"], insp.bf, cmap="gray")
        plt.imsave(tmp["adf"], insp.adf, cmap="gray")
        plt.imsave(tmp["mean_pattern"], pattern_image(insp.mean_pattern), cmap="gray")
        _overview(insp, tmp["overview"])
        io.write_json(tmp["summary"], insp.summary())
    return paths


def _overview(insp: Inspection, path: Path) -> None:
    """BF, ADF and the mean pattern side by side, with axes in A and mrad where calibrated."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle

    cal = insp.merged_calibration()
    ny, nx, nky, nkx = insp.shape
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.4), dpi=100)
    if "scan_step_x_A" in cal:
        scan_extent, scan_unit = (0, nx * cal["scan_step_x_A"], ny * cal["scan_step_y_A"], 0), "A"
    else:
        scan_extent, scan_unit = (0, nx, ny, 0), "scan position"
    for ax, img, title in ((axes[0], insp.bf, "virtual BF"), (axes[1], insp.adf, "virtual ADF")):
        im = ax.imshow(img, cmap="gray", extent=scan_extent, interpolation="nearest")
        ax.set(title=title, xlabel=f"x ({scan_unit})", ylabel=f"y ({scan_unit})")
        fig.colorbar(im, ax=ax, shrink=0.8, label="counts")
    ax = axes[2]
    im = ax.imshow(pattern_image(insp.mean_pattern), cmap="gray", interpolation="nearest")
    ax.set(title="mean pattern (log10)", xlabel="k_x (px)", ylabel="k_y (px)")
    fig.colorbar(im, ax=ax, shrink=0.8)
    det = insp.detector
    for r, colour in ((det["bf_radius_px"], "tab:orange"), (1.2 * det["bf_radius_px"], "tab:cyan")):
        ax.add_patch(Circle((det["centre_px"][1], det["centre_px"][0]), r, fill=False, color=colour, lw=1))
    fig.suptitle(f"{Path(insp.path).name}: {insp.dose_note}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
