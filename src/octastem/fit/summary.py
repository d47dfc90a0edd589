"""The per-image summary of a column fit: per type (and Br site) the median ellipticity and its SE.

Angles of the major axes are axial (defined mod 180 deg): their mean is the axial mean (of the
doubled angles) with its resultant length R in [0, 1] (1: all aligned, 0: no common direction).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from octastem.config import schema_defaults
from octastem.fit.lattice import TYPES
from octastem.fit.stats import median_se


def _axial_mean_deg(angles_deg):
    """Mean of axial angles (mod 180 deg) and the resultant length R in [0, 1] (1: all aligned)."""
    t = np.radians(2 * np.asarray(angles_deg, dtype=float))
    if t.size == 0:
        return math.nan, math.nan
    c, s = np.cos(t).mean(), np.sin(t).mean()
    return float(np.degrees(0.5 * math.atan2(s, c))), float(math.hypot(c, s))


def _by_site(ok: pd.DataFrame) -> dict:
    """Number, median ellipticity and axial mean angle of the Br columns of each site."""
    by_site = {}
    for site in ("Br_x", "Br_y"):
        ss = ok[ok["site"] == site]
        ma, rr = _axial_mean_deg(ss["angle_deg"])
        by_site[site] = {
            "n": len(ss),
            "median_ellipticity": float(ss["ellipticity"].median()) if len(ss) else math.nan,
            "mean_angle_deg": ma,
            "angle_resultant": rr,
        }
    return by_site


def summarize(df: pd.DataFrame, se_method: str | None = None, n_boot: int = 2000, seed: int = 0) -> dict:
    """Per column type (and per site): number of successful fits, median ellipticity with its
    standard error (``se``, by ``se_method`` as in :func:`octastem.fit.median_se`, named in
    ``se_method``; default the schema's ``fit.se_method``; both ``se_asymptotic`` and
    ``se_bootstrap`` are reported as well), mean/median widths and the axial mean of the
    major-axis angle (deg, mod 180) with its resultant length. For Br: the median angle between
    the major axis and the Pb-Br-Pb bond (``median_angle_to_bond_deg``, 0-90 deg) and the fraction
    of columns whose major axis is closer to perpendicular than to parallel to the bond
    (``fraction_perpendicular``)."""
    if se_method is None:
        se_method = schema_defaults("fit", "se_method")
    out = {}
    for typ in [t for t in TYPES if t in set(df["type"])]:
        sub = df[df["type"] == typ]
        ok = sub[sub["success"].astype(bool)]
        entry = {"n": len(ok), "n_failed": int(len(sub) - len(ok)), "se_method": se_method}
        ses = {}
        if len(ok) >= 2:
            for m in sorted({se_method, "asymptotic", "bootstrap"}):
                med, ses[m] = median_se(ok["ellipticity"], method=m, n_boot=n_boot, seed=seed)
        elif len(ok) == 1:
            med = float(ok["ellipticity"].iloc[0])
        else:
            med = math.nan
        entry.update(median_ellipticity=med, se=ses.get(se_method, math.nan))
        entry.update(se_asymptotic=ses.get("asymptotic", math.nan), se_bootstrap=ses.get("bootstrap", math.nan))
        entry["mean_ellipticity"] = float(ok["ellipticity"].mean()) if len(ok) else math.nan
        entry["median_sigma_major_A"] = float(ok["sigma_major"].median()) if len(ok) else math.nan
        entry["median_sigma_minor_A"] = float(ok["sigma_minor"].median()) if len(ok) else math.nan
        mean_angle, resultant = _axial_mean_deg(ok["angle_deg"])
        entry.update(mean_angle_deg=mean_angle, angle_resultant=resultant)
        if typ == "Br":
            entry["median_angle_to_bond_deg"] = float(ok["angle_to_bond_deg"].median()) if len(ok) else math.nan
            entry["fraction_perpendicular"] = float((ok["angle_to_bond_deg"] > 45.0).mean()) if len(ok) else math.nan
            entry["by_site"] = _by_site(ok)
        out[typ] = entry
    return out
