"""The alignment of a raw scan, measured in passes over the source before the copy: the bright-field
disc of the mean pattern, the per-position disc centres and their fitted surface (descan), the
disc's edge profile about the fitted centres, the rotation and flip of the detector from the curl
of the COM field, and the output window (:mod:`octastem.stem.origin` holds the science; this
module streams the source through it)."""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import numpy as np

from octastem.io import InputError

from ..origin import (
    RADIUS_RTOL,
    ROTATION_MAX_CURL_RATIO,
    ROTATION_MAX_UNCERTAINTY_DEG,
    ROTATION_WARN_DEG,
    Alignment,
    angle_difference_deg,
    bins_for_edge,
    check_radius,
    disc_com,
    disc_edge,
    edge_sums,
    find_disc,
    fit_origin,
    measure_rotation,
)
from .source import Source
from .stream import read_electrons

log = logging.getLogger("octastem")


class CalibrationWarning(UserWarning):
    """A configured calibration disagrees with what the data show."""


def _rows(ny: int, rows: int):
    return [(r0, min(ny, r0 + rows)) for r0 in range(0, ny, rows)]


def _mean_pattern(path, src, rows, cpe, bar) -> np.ndarray:
    ny, nx, nky, nkx = src.shape
    total = np.zeros((nky, nkx))
    for r0, r1 in _rows(ny, rows):
        total += read_electrons(path, src, r0, r1, cpe).sum(axis=(0, 1), dtype=np.float64)
        bar.update(r1 - r0)
    return total / (ny * nx)


def _disc_centres(path, src, rows, cpe, centres, radius, bar):
    ny, nx = src.shape[:2]
    com = np.empty((ny, nx, 2))
    inside = np.empty((ny, nx))
    totals = np.empty((ny, nx))
    for r0, r1 in _rows(ny, rows):
        chunk = read_electrons(path, src, r0, r1, cpe)
        com[r0:r1], inside[r0:r1] = disc_com(chunk, centres[r0:r1], radius)
        totals[r0:r1] = chunk.sum(axis=(2, 3), dtype=np.float64)
        bar.update(r1 - r0)
    return com, inside, totals


def _edge(path, src, rows, cpe, fitted, radius_px, k_sampling, bar):
    bins = bins_for_edge(radius_px, k_sampling)
    sums, counts = np.zeros(len(bins) - 1), np.zeros(len(bins) - 1)
    for r0, r1 in _rows(src.shape[0], rows):
        s, c = edge_sums(read_electrons(path, src, r0, r1, cpe), fitted[r0:r1], k_sampling, bins)
        sums += s
        counts += c
        bar.update(r1 - r0)
    return disc_edge(sums, counts, bins, radius_px, math.sqrt(k_sampling[0] * k_sampling[1]))


def _cut_message(path: Path, disc, shape, what: str) -> str:
    cy, cx = disc.centre_px
    r = disc.radius_px
    beyond = {
        "row 0": r - cy,
        f"row {shape[0] - 1}": cy + r - (shape[0] - 1),
        "column 0": r - cx,
        f"column {shape[1] - 1}": cx + r - (shape[1] - 1),
    }
    edge, by = max(beyond.items(), key=lambda kv: kv[1])
    reach = f"it reaches {by:.1f} px beyond {edge}" if by > 0.5 else f"it reaches the detector edge at {edge}"
    return (
        f"{path}: the bright-field disc (centre (k_y, k_x) = ({cy:.1f}, {cx:.1f}) px, radius {r:.1f} px, on a "
        f"{shape[0]} x {shape[1]} detector) is cut by the detector edge{what}: {reach}. Centre of mass, "
        "virtual detectors and the CNN need the whole disc on the detector: re-acquire with the disc centred, "
        "or set origin: off to ingest the patterns as stored"
    )


def measure_alignment(
    path: Path, src: Source, rows: int, cal: dict, cal_origin: dict, fit: str, cpe: float, progress: bool
) -> tuple[Alignment, dict]:
    """The resampling plan of the copy and its record (``calibration``: the output's k-sampling and
    rotation; ``attrs``: what the output file records; ``record``: the summary and provenance entry).

    Raises :class:`InputError` naming the file when no disc is found, its radius disagrees with
    semiangle_mrad / k_sampling_mrad, it is cut by the detector edge, or the rotation is to be
    measured and cannot be; warns (:class:`CalibrationWarning`) when a configured rotation differs
    from the measured one by more than :data:`~octastem.stem.origin.ROTATION_WARN_DEG`."""
    from tqdm.auto import tqdm

    ny, nx, nky, nkx = src.shape
    dkx, dky = float(cal["k_sampling_x_mrad"]), float(cal["k_sampling_y_mrad"])
    bar = tqdm(total=3 * ny, desc=f"origin {path.name}", unit="row", disable=not progress)
    try:
        mean = _mean_pattern(path, src, rows, cpe, bar)
        disc = find_disc(mean)
        if disc is None:
            raise InputError(
                f"{path}: no bright-field disc found in the mean pattern ({nky} x {nkx} pixels, mean "
                f"{mean.sum():.3g} electrons per pattern, brightest pixel {mean.max():.3g}): expected a bright disc "
                "(at least 12 pixels, twice as bright as its surroundings); set origin: off for data already centred "
                "on the detector"
            )
        if disc.cut:
            raise InputError(_cut_message(path, disc, (nky, nkx), ""))
        check_radius(str(path), disc, float(cal["semiangle_mrad"]), math.sqrt(dkx * dky), cal_origin)
        margin = max(3.0, 0.2 * disc.radius_px)
        radius = disc.radius_px + margin
        guess = np.broadcast_to(np.array(disc.centre_px), (ny, nx, 2))
        com, inside, totals = _disc_centres(path, src, rows, cpe, guess, radius, bar)
        fitted, summary = fit_origin(com, inside, fit)
        if np.max(np.hypot(*(fitted - guess).reshape(-1, 2).T)) > 0.5 * margin:
            # the disc moves further than the mask's margin: measure again around the fitted centres
            bar.total += ny
            com, inside, totals = _disc_centres(path, src, rows, cpe, fitted, radius, bar)
            fitted, summary = fit_origin(com, inside, fit)
        # the disc's edge in its own frame (one more pass): the resampling keeps it as sharp as this
        edge = _edge(path, src, rows, cpe, fitted, disc.radius_px, (dkx, dky), bar)
    finally:
        bar.close()
    rotation = _rotation(path, cal, cal_origin, com, fitted, inside, totals, (dkx, dky))
    try:
        plan = Alignment.fit_window(fitted, rotation["applied_deg"], rotation["flip"], (dkx, dky), (nky, nkx), edge)
    except InputError as e:
        raise InputError(_cut_message(path, disc, (nky, nkx), f" over the scan ({e})")) from e
    if plan.reach_px() * plan.dk < disc.radius_px * math.sqrt(dkx * dky):
        raise InputError(_cut_message(path, disc, (nky, nkx), " at some scan positions (descan)"))
    record = {
        "fit": fit,
        "disc": disc.as_dict(),
        "disc_radius_mrad": disc.radius_px * math.sqrt(dkx * dky),
        "radius_rtol": RADIUS_RTOL,
        "descan": summary,
        "disc_edge": edge.as_dict(),
        "rotation": rotation,
        "detector_shape_raw": [nky, nkx],
        "output_shape": list(plan.shape),
        "output_k_sampling_mrad": plan.dk,
    }
    log.info(
        "%s: disc at (k_y, k_x) = (%.2f, %.2f) px, radius %.2f px; descan %s over the scan (%s fit, rms residual "
        "%.2f px); rotation %.2f deg%s (%s); patterns resampled onto %d x %d pixels of %.4g mrad",
        path,
        *disc.centre_px,
        disc.radius_px,
        [round(v, 2) for v in summary["range_px"]],
        fit,
        summary["rms_residual_px"],
        rotation["applied_deg"],
        ", detector axes transposed" if rotation["flip"] else "",
        rotation["source"],
        *plan.shape,
        plan.dk,
    )
    measured = rotation.get("measured_deg")
    attrs = {
        "origin_fit": fit,
        "origin_disc_centre_px": list(disc.centre_px),
        "origin_disc_radius_px": disc.radius_px,
        "origin_descan_range_px": summary["range_px"],
        "scan_rotation_applied_deg": rotation["applied_deg"],
        "scan_rotation_measured_deg": float("nan") if measured is None else measured,
        "scan_rotation_source": rotation["source"],
        "scan_flip": rotation["flip"],
        "detector_shape_raw": [nky, nkx],
    }
    calibration = {
        "k_sampling_mrad": plan.dk,
        "k_sampling_x_mrad": plan.dk,
        "k_sampling_y_mrad": plan.dk,
        "scan_rotation_deg": 0.0,
    }
    return plan, {"calibration": calibration, "attrs": attrs, "record": record}


def _rotation(path, cal, cal_origin, com, fitted, inside, totals, k_sampling) -> dict:
    """The rotation (and flip) applied: measured when not configured, else configured and compared."""
    configured = cal["scan_rotation_deg"]
    com_x = np.nan_to_num(com[..., 1] - fitted[..., 1]) * k_sampling[0]
    com_y = np.nan_to_num(com[..., 0] - fitted[..., 0]) * k_sampling[1]
    step_x, step_y = float(cal["scan_step_x_A"]), float(cal["scan_step_y_A"])
    try:
        found = measure_rotation(com_x, com_y, totals - inside, step_x, step_y)
        reason = None
        if found["curl_ratio"] > ROTATION_MAX_CURL_RATIO:
            reason = (
                f"the curl of the COM field at its best angle is {found['curl_ratio']:.2f} of its mean over the "
                f"angles (needs < {ROTATION_MAX_CURL_RATIO}; {found['frequencies']} frequencies stand out of the "
                "noise): too little specimen contrast or dose"
            )
        elif found["uncertainty_deg"] > ROTATION_MAX_UNCERTAINTY_DEG:
            reason = (
                f"the angle found, {found['angle_deg']:.1f} deg, is uncertain by {found['uncertainty_deg']:.1f} deg "
                f"(the halves of the scan disagree; needs <= {ROTATION_MAX_UNCERTAINTY_DEG:g} deg): too little dose "
                "or too few positions for a precise angle"
            )
    except InputError as e:
        found, reason = None, str(e)
    if configured is None:
        if reason is not None:
            raise InputError(
                f"{path}: calibration field 'scan_rotation_deg' is unset, so it is measured from the data, but "
                f"{reason}; set samples.<name>.raw.calibration.scan_rotation_deg (deg, detector to scan axes)"
            )
        return {
            "source": "measured",
            "applied_deg": found["angle_deg"],
            "measured_deg": found["angle_deg"],
            "flip": found["flip"],
            **{
                k: found[k]
                for k in (
                    "curl_ratio",
                    "curl_other_flip_ratio",
                    "frequencies",
                    "uncertainty_deg",
                    "dark_field_correlation",
                )
            },
        }
    out = {"source": cal_origin.get("scan_rotation_deg", "config"), "applied_deg": float(configured), "flip": False}
    if found is None or reason is not None:
        log.info("%s: scan_rotation_deg = %g not checked against the data: %s", path, configured, reason)
        return out
    out.update(
        measured_deg=found["angle_deg"],
        measured_flip=found["flip"],
        curl_ratio=found["curl_ratio"],
        uncertainty_deg=found["uncertainty_deg"],
    )
    diff = angle_difference_deg(found["angle_deg"], float(configured))
    if diff > max(ROTATION_WARN_DEG, 3 * found["uncertainty_deg"]) or found["flip"]:
        flip = " with the detector axes transposed" if found["flip"] else ""
        warnings.warn(
            f"{path}: calibration field 'scan_rotation_deg' = {configured:g} deg ({out['source']}) but the curl of the "
            f"COM field says {found['angle_deg']:.1f} deg{flip} ({diff:.1f} deg apart); the configured value is used: "
            "unset it to use the measured one",
            CalibrationWarning,
            stacklevel=3,
        )
    return out
