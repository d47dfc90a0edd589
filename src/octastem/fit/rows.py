"""Result rows of the column fits: the columns of the table, quality flags and standard errors.

The fits estimate (sigma_x, sigma_y, rho); the table reports the axes (sigma_major, sigma_minor,
angle) of that covariance, ``ellipticity = sigma_major / sigma_minor`` and their standard errors
propagated from the fit's covariance matrix by the delta method (numerical Jacobian of the map).

Flags, first that applies: ``not_converged``, ``no_peak`` (height <= 0), ``shape_at_bound`` (a
width or the correlation on its bound), ``position_at_bound``, ``no_errorbars``, else ``ok``.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from octastem.fit.model import RHO_MAX, central_differences, cov_to_axes

RESULT_COLUMNS = [
    "type",
    "site",
    "i",
    "j",
    "x",
    "y",
    "height",
    "sigma_major",
    "sigma_minor",
    "angle_deg",
    "ellipticity",
    "angle_to_bond_deg",
    "x_stderr",
    "y_stderr",
    "sigma_major_stderr",
    "ellipticity_stderr",
    "angle_deg_stderr",
    "background",
    "success",
    "flag",
    "redchi",
    "nfev",
    "n_pixels",
]

#: Step floor of the numerical Jacobian of (sigma_x, sigma_y, rho) -> axes.
_STEP_FLOOR = 1e-3


def _unwrap_angle(diff):
    """The angle (deg, last of the three outputs) jumps by 180 deg across the branch cut: unwrap
    the difference."""
    diff[..., 2] = (diff[..., 2] + 90.0) % 180.0 - 90.0
    return diff


def _axes_stderr(sx, sy, rho, cov3):
    """Delta-method standard errors of (sigma_major, ratio, angle_deg) from the 3x3 covariance of
    (sx, sy, rho); NaN where the covariance is unavailable."""
    if cov3 is None or not np.all(np.isfinite(cov3)):
        return math.nan, math.nan, math.nan

    def f(p):
        major, minor, ang = cov_to_axes(*p)
        return np.array([float(major), float(major / minor), float(np.degrees(ang))])

    grad = central_differences(f, np.array([sx, sy, rho], dtype=float), _STEP_FLOOR, _unwrap_angle)
    var = np.einsum("ij,jk,ik->i", grad, cov3, grad)
    return tuple(float(math.sqrt(v)) if v >= 0 else math.nan for v in var)


def _axes_stderr_vec(sx, sy, rho, cov3):
    """Vectorised :func:`_axes_stderr`: ``cov3`` (n, 3, 3) -> arrays of SEs of (sigma_major, ratio, angle_deg)."""
    p0 = np.stack([np.asarray(sx, float), np.asarray(sy, float), np.asarray(rho, float)], axis=1)
    n = p0.shape[0]
    if n == 0:
        return np.empty(0), np.empty(0), np.empty(0)

    def f(p):
        major, minor, ang = cov_to_axes(p[:, 0], p[:, 1], p[:, 2])
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.stack([major, major / minor, np.degrees(ang)], axis=1)

    grad = central_differences(f, p0, _STEP_FLOOR, _unwrap_angle)
    var = np.einsum("nij,njk,nik->ni", grad, cov3, grad)
    with np.errstate(invalid="ignore"):
        se = np.where(var >= 0, np.sqrt(np.abs(var)), np.nan)
    se[~np.all(np.isfinite(cov3), axis=(1, 2))] = np.nan
    return se[:, 0], se[:, 1], se[:, 2]


def rows_from_arrays(p, cov, guess_xy, success, nfev, redchi, n_pixels, smin, smax, dpos):
    """Result rows (dict of arrays, keys of ``RESULT_COLUMNS``) from fitted (x0, y0, h, sx, sy, rho, b)
    arrays ``p`` (n, 7) and their covariance ``cov`` (n, 7, 7) (NaN where unavailable)."""
    x0, y0, h, sx, sy, rho, b = (p[:, k] for k in range(7))
    major, minor, ang = cov_to_axes(sx, sy, rho)
    se_major, se_ratio, se_angle = _axes_stderr_vec(sx, sy, rho, cov[:, 3:6, 3:6])
    with np.errstate(invalid="ignore"):
        se = np.sqrt(np.diagonal(cov, axis1=1, axis2=2))
    tol = 1e-3 * (smax - smin)
    at_bound = (
        (np.minimum(sx - smin, smax - sx) < tol)
        | (np.minimum(sy - smin, smax - sy) < tol)
        | (np.abs(np.abs(rho) - RHO_MAX) < 1e-4)
    )
    moved = np.maximum(np.abs(x0 - guess_xy[:, 0]), np.abs(y0 - guess_xy[:, 1])) > 0.99 * dpos
    flag = np.where(
        ~success,
        "not_converged",
        np.where(
            h <= 0,
            "no_peak",
            np.where(
                at_bound,
                "shape_at_bound",
                np.where(moved, "position_at_bound", np.where(np.isfinite(se[:, 0]), "ok", "no_errorbars")),
            ),
        ),
    )
    with np.errstate(divide="ignore"):
        ellipticity = np.where(minor > 0, major / np.where(minor > 0, minor, 1.0), np.inf)
    return {
        "x": x0,
        "y": y0,
        "height": h,
        "sigma_major": major,
        "sigma_minor": minor,
        "angle_deg": np.degrees(ang),
        "ellipticity": ellipticity,
        "x_stderr": se[:, 0],
        "y_stderr": se[:, 1],
        "sigma_major_stderr": se_major,
        "ellipticity_stderr": se_ratio,
        "angle_deg_stderr": se_angle,
        "background": b,
        "success": flag == "ok",
        "flag": flag,
        "redchi": np.asarray(redchi, float),
        "nfev": np.asarray(nfev, int),
        "n_pixels": np.asarray(n_pixels, int),
    }


def select_types(grid: pd.DataFrame, rows: pd.DataFrame, types) -> pd.DataFrame:
    """``rows`` of all columns of ``grid`` (same order) labelled with type, site, i, j and reduced
    to the columns of the given ``types``."""
    rows = pd.concat([grid[["type", "site", "i", "j"]], rows], axis=1)
    return rows[grid["type"].isin(types).to_numpy()].reset_index(drop=True)
