"""Calibration of a raw 4D-STEM file: what the file holds, in the internal names and units, merged
with the configured fallback.

Internal names and units: ``energy_eV``, ``semiangle_mrad``, ``scan_step_A`` (or
``scan_step_x_A`` and ``scan_step_y_A``), ``k_sampling_mrad`` (or ``k_sampling_x_mrad`` and
``k_sampling_y_mrad``) and ``scan_rotation_deg``. Axis steps of other files (EMD dimension
vectors, rosettasciio axes) are converted from their length, angle or spatial-frequency units.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from octastem.io import InputError
from octastem.units import electron_wavelength_A

#: Calibration fields every ingested dataset needs, from the file or from the configuration.
REQUIRED_CALIBRATION = ("energy_eV", "semiangle_mrad", "scan_step_A", "k_sampling_mrad")
#: Fields measured from the data where neither the file nor the configuration gives them.
MEASURED_CALIBRATION = ("scan_rotation_deg",)
#: Every scalar calibration field read from a file or the configuration.
CALIBRATION_FIELDS = REQUIRED_CALIBRATION + MEASURED_CALIBRATION

#: Per-axis fields and the scalar each pair defines (their mean).
AXIS_PAIRS = {
    "scan_step_A": ("scan_step_x_A", "scan_step_y_A"),
    "k_sampling_mrad": ("k_sampling_x_mrad", "k_sampling_y_mrad"),
}

#: Plausible range (low, high) of a calibration field in its internal unit, and the unit slips
#: (name of the unit typed instead, factor to the internal unit) that explain a value outside it:
#: 10-1,000 keV beams (the simulation side needs >= 10 keV), 1-100 mrad probes, 0.01-10 A steps.
PLAUSIBLE = {
    "energy_eV": (1e4, 1e6, "eV (10-1,000 keV)", (("kV or keV", 1e3), ("MV or MeV", 1e6), ("meV", 1e-3))),
    "semiangle_mrad": (1.0, 100.0, "mrad", (("rad", 1e3), ("urad", 1e-3))),
    "scan_step_A": (0.01, 10.0, "A", (("nm", 10.0), ("pm", 0.01), ("um", 1e4), ("m", 1e10))),
}
PLAUSIBLE["scan_step_x_A"] = PLAUSIBLE["scan_step_y_A"] = PLAUSIBLE["scan_step_A"]

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


def hdf5_attrs_calibration(attrs: Mapping) -> dict:
    """Calibration stored as attributes with the internal names (an internal or similar file)."""
    keys = CALIBRATION_FIELDS + tuple(k for pair in AXIS_PAIRS.values() for k in pair)
    out = {}
    for k in keys:
        if k in attrs:
            try:
                out[k] = float(np.asarray(attrs[k]).item())
            except (TypeError, ValueError):
                continue
    return out


def length_A(scale: float, units: str) -> float | None:
    """``scale`` in ``units`` of length as A; None for unknown units."""
    u = (units or "").strip().lower()
    return scale * _LENGTH_TO_A[u] if u in _LENGTH_TO_A else None


def angle_mrad(scale: float, units: str, energy_eV: float | None) -> float | None:
    """``scale`` in angle or spatial-frequency ``units`` as a scattering angle (mrad); None if unknown."""
    u = (units or "").strip().lower().replace(" ", "")
    if u in _ANGLE_TO_MRAD:
        return scale * _ANGLE_TO_MRAD[u]
    if u in _RECIPROCAL_TO_INV_A and energy_eV:
        # spatial frequency k = 1/d (A^-1) -> scattering angle lambda * k (small angle)
        return scale * _RECIPROCAL_TO_INV_A[u] * electron_wavelength_A(energy_eV) * 1e3
    return None


def axes_calibration(cal: dict, nav: list, sig: list, energy_eV: float | None) -> None:
    """Fill scan steps and k sampling from (step, units) of the navigation (y, x) and signal (y, x) axes."""
    nav_A = [length_A(s, u) if s else None for s, u in nav]
    if all(v is not None and v > 0 for v in nav_A):
        cal.setdefault("scan_step_y_A", nav_A[0])
        cal.setdefault("scan_step_x_A", nav_A[1])
    sig_mrad = [angle_mrad(s, u, energy_eV) if s else None for s, u in sig]
    if all(v is not None and v > 0 for v in sig_mrad):
        cal.setdefault("k_sampling_y_mrad", sig_mrad[0])
        cal.setdefault("k_sampling_x_mrad", sig_mrad[1])


def _complete(src: Mapping) -> dict:
    """A scalar fills missing per-axis values; a full per-axis pair defines the scalar (mean)."""
    d = {k: v for k, v in src.items() if v is not None}
    for scalar, (px, py) in AXIS_PAIRS.items():
        if px in d and py in d:
            with contextlib.suppress(TypeError, ValueError):
                d[scalar] = 0.5 * (float(d[px]) + float(d[py]))
        elif scalar in d:
            d.setdefault(px, d[scalar])
            d.setdefault(py, d[scalar])
    return d


def resolve_calibration(path: Path, from_file: Mapping, config: Mapping) -> tuple[dict, dict]:
    """Merge calibration from the file (preferred) and the configuration; returns (values, origin per field).

    Per-axis fields (``scan_step_x_A`` / ``_y_A``, ``k_sampling_x_mrad`` / ``_y_mrad``) fill the
    scalar ones with their mean. A field of :data:`MEASURED_CALIBRATION` that neither gives is None
    (origin "measured": the ingest measures it from the data). Raises :class:`InputError` naming the
    first missing, invalid or implausible (:func:`check_plausible`) field.
    """
    sources = (("file", _complete(from_file)), ("config", _complete(config)))
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    keys = CALIBRATION_FIELDS + tuple(k for pair in AXIS_PAIRS.values() for k in pair)
    for key in keys:
        for where, src in sources:
            if key in src:
                values[key], origin[key] = src[key], where
                break
    # keep a per-axis pair and its scalar from the same origin
    for scalar, pair in AXIS_PAIRS.items():
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
    out: dict[str, Any] = {key: None for key in MEASURED_CALIBRATION if key not in values}
    origin.update({key: "measured" for key in out})
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
    for key, v in out.items():
        if v is not None:
            check_plausible(path, key, v, origin[key])
    return out, origin


def check_plausible(path: Path, key: str, value: float, where: str = "config") -> None:
    """Raise :class:`InputError` when calibration field ``key`` lies outside :data:`PLAUSIBLE`,
    naming the field, the value, the expected range and the unit slip that explains it."""
    if key not in PLAUSIBLE:
        return
    low, high, unit, slips = PLAUSIBLE[key]
    if low <= value <= high:
        return
    centre = math.sqrt(low * high)
    fits = [(abs(math.log(value * f / centre)), name, value * f) for name, f in slips if low <= value * f <= high]
    hint = ""
    if fits:
        _, name, fixed = min(fits)
        hint = f": it looks like a value in {name} typed as {unit.split()[0]} (did you mean {fixed:g}?)"
    raise InputError(
        f"{path}: calibration field '{key}' = {value:g} ({where}) is implausible; expected {low:g} to {high:g} "
        f"{unit}{hint}"
    )
