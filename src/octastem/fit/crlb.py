"""Cramér-Rao lower bounds for the parameters of elliptical Gaussian columns on a pixel grid.

The image model is the one fitted by :mod:`octastem.fit`: a sum of elliptical Gaussians, one per
column, sampled at the pixel centres, plus a background (constant, optionally with a linear
slope). For an unbiased estimator of the parameters ``theta`` the covariance is bounded below by
the inverse of the Fisher information ``F`` (Van Aert, den Dekker et al., Ultramicroscopy 2005;
StatSTEM):

Gaussian noise (known pixel standard deviation ``sigma``)
    ``F_ij = sum_p d_i m_p d_j m_p / sigma^2``
Poisson noise (the model ``m`` is the expected number of counts per pixel)
    ``F_ij = sum_p d_i m_p d_j m_p / m_p``

so for Poisson noise the bound on every parameter scales as ``1 / sqrt(dose)``. All parameters of
all columns (and of the background) are estimated together; the bound of one column's position
therefore includes the loss from overlapping neighbours.

Column shape parametrisations:

``"axes"``
    (x, y, height, sigma_major, ratio, angle) with ``ratio = sigma_major / sigma_minor >= 1`` and
    the angle of the major axis (radians internally, degrees in the output). Singular at
    ``ratio == 1`` (the angle is then not identifiable).
``"cov"``
    (x, y, height, sigma_x, sigma_y, rho) of the covariance matrix; regular everywhere. The bounds
    are computed in this parametrisation and transformed (see :func:`crlb`).

Lengths are in the unit of the pixel coordinates (A in this package).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from octastem.fit.model import _gauss_cov, axes_to_cov, central_differences
from octastem.io import InputError

AXES_PARAMS = ("x", "y", "height", "sigma_major", "ratio", "angle_deg")
COV_PARAMS = ("x", "y", "height", "sigma_x", "sigma_y", "rho")
#: A ratio this close to 1 is treated as round (the angle is then not identifiable).
_ROUND_TOL = 1e-9
#: Step floor of the numerical Jacobian of (sigma_major, ratio, angle) -> covariance.
_STEP_FLOOR = 1e-2


def _columns_table(columns) -> pd.DataFrame:
    df = pd.DataFrame(columns).reset_index(drop=True)
    if "angle_deg" not in df and "angle_rad" in df:
        df["angle_deg"] = np.degrees(df["angle_rad"])
    if "ratio" not in df and "ellipticity" in df:
        df["ratio"] = df["ellipticity"]
    if "ratio" not in df and "sigma_minor" in df:
        df["ratio"] = df["sigma_major"] / df["sigma_minor"]
    for col, default in (("ratio", 1.0), ("angle_deg", 0.0)):
        if col not in df:
            df[col] = default
    missing = [c for c in ("x", "y", "height", "sigma_major") if c not in df]
    if missing or len(df) == 0:
        raise InputError(f"crlb: columns need x, y, height, sigma_major (ratio, angle_deg); missing {missing}")
    vals = df[["x", "y", "height", "sigma_major", "ratio", "angle_deg"]].to_numpy(dtype=float)
    if not np.all(np.isfinite(vals)):
        raise InputError("crlb: non-finite column parameters")
    if (df["sigma_major"] <= 0).any() or (df["ratio"] < 1).any():
        raise InputError("crlb: expected sigma_major > 0 and ratio >= 1")
    return df


def _axes_derivatives(X, Y, x0, y0, h, major, ratio, angle):
    """Gaussian in (x0, y0, h, sigma_major, ratio, angle) and its derivatives (list of 6 arrays)."""
    c, s = math.cos(angle), math.sin(angle)
    dx, dy = X - x0, Y - y0
    u = dx * c + dy * s
    v = -dx * s + dy * c
    m2 = major * major
    r2 = ratio * ratio
    q = (u * u + r2 * v * v) / m2
    e = np.exp(-0.5 * q)
    g = h * e
    return g, [
        g * (u * c - r2 * v * s) / m2,
        g * (u * s + r2 * v * c) / m2,
        e,
        g * q / major,
        -g * ratio * v * v / m2,
        -g * u * v * (1.0 - r2) / m2,
    ]


def _cov_derivatives(X, Y, x0, y0, h, major, ratio, angle):
    """Gaussian in (x0, y0, h, sigma_x, sigma_y, rho) and its derivatives."""
    sx, sy, rho = axes_to_cov(major, ratio, angle)
    g, d = _gauss_cov(X, Y, x0, y0, h, sx, sy, rho, jac=True)
    return g, list(d)


def design(X, Y, columns, background=0.0, parametrisation="axes", background_terms=1):
    """Model values ``m`` (pixels,) and Jacobian ``J`` (pixels, parameters) with parameter names.

    ``X``, ``Y``: pixel-centre coordinates (any shape, flattened); ``columns``: table (DataFrame,
    list of dicts) with x, y, height, sigma_major and optionally ratio (>= 1) and angle_deg;
    ``background``: constant level; ``background_terms``: 0 (background known), 1 (constant
    estimated) or 3 (constant and linear slopes in x and y estimated).
    """
    if parametrisation not in ("axes", "cov"):
        raise InputError(f"crlb: parametrisation must be 'axes' or 'cov', got {parametrisation!r}")
    if background_terms not in (0, 1, 3):
        raise InputError(f"crlb: background_terms must be 0, 1 or 3, got {background_terms!r}")
    df = _columns_table(columns)
    X = np.asarray(X, dtype=float).ravel()
    Y = np.asarray(Y, dtype=float).ravel()
    fn = _axes_derivatives if parametrisation == "axes" else _cov_derivatives
    pnames = AXES_PARAMS if parametrisation == "axes" else COV_PARAMS
    m = np.full(X.size, float(background))
    cols, names = [], []
    for k, r in enumerate(df.itertuples(index=False)):
        g, d = fn(X, Y, r.x, r.y, r.height, r.sigma_major, r.ratio, math.radians(r.angle_deg))
        m += g
        cols += d
        names += [(k, p) for p in pnames]
    if background_terms >= 1:
        cols.append(np.ones_like(X))
        names.append((-1, "background"))
    if background_terms == 3:
        cols += [X - X.mean(), Y - Y.mean()]
        names += [(-1, "background_x"), (-1, "background_y")]
    return m, np.stack(cols, axis=1), names, df


def fisher_information(
    X, Y, columns, noise="gaussian", sigma=None, background=0.0, parametrisation="axes", background_terms=1
):
    """Fisher information matrix of all column (and background) parameters.

    ``noise="gaussian"`` needs the pixel standard deviation ``sigma``; ``noise="poisson"`` takes
    the model as the expected counts per pixel (so it must be > 0 everywhere: give a background).
    Returns ``(F, names)`` with ``names[i] = (column index or -1, parameter)``; angles in radians.
    """
    m, J, names, _ = design(X, Y, columns, background, parametrisation, background_terms)
    if noise == "gaussian":
        if sigma is None or not (float(sigma) > 0):
            raise InputError(f"crlb: Gaussian noise needs a pixel standard deviation sigma > 0, got {sigma!r}")
        F = J.T @ J / float(sigma) ** 2
    elif noise == "poisson":
        if np.any(m <= 0):
            raise InputError("crlb: Poisson noise needs a model > 0 (expected counts) in every pixel")
        F = (J / m[:, None]).T @ J
    else:
        raise InputError(f"crlb: noise must be 'gaussian' or 'poisson', got {noise!r}")
    return F, names


def _dcov_daxes(major, ratio, angle):
    """3x3 Jacobian d(sigma_x, sigma_y, rho) / d(sigma_major, ratio, angle_rad) (central differences
    of a smooth map)."""
    return central_differences(lambda p: np.array(axes_to_cov(*p)), np.array([major, ratio, angle]), _STEP_FLOOR)


def crlb(
    X,
    Y,
    columns,
    noise="gaussian",
    sigma=None,
    background=0.0,
    parametrisation="axes",
    background_terms=1,
    return_covariance=False,
):
    """Cramér-Rao lower bounds (standard deviations) of the column parameters.

    Returns a DataFrame with one row per column and the columns ``<param>_crlb`` for the
    parameters of ``parametrisation`` ("axes": x, y, height, sigma_major, ratio, angle_deg (in
    degrees); "cov": x, y, height, sigma_x, sigma_y, rho); ``df.attrs["background_crlb"]`` holds the
    bound of the constant background. With ``return_covariance`` also the full bound matrix
    (``inv(F)`` in the "cov" parametrisation) and the parameter names. See
    :func:`fisher_information` for the noise models.

    The information is always computed in the regular (sigma_x, sigma_y, rho) parametrisation, so
    a round column keeps all three shape parameters free (as in the fit); the bounds of
    (sigma_major, ratio, angle) follow by the exact change of variables where that is smooth
    (ratio > 1). For a round column the estimated ratio sits on its boundary (>= 1) and has no
    regular bound: ``sigma_major_crlb`` and ``ratio_crlb`` are then NaN and ``angle_deg_crlb`` inf.
    """
    if parametrisation not in ("axes", "cov"):
        raise InputError(f"crlb: parametrisation must be 'axes' or 'cov', got {parametrisation!r}")
    F, names = fisher_information(X, Y, columns, noise, sigma, background, "cov", background_terms)
    df = _columns_table(columns)
    # Scale to unit diagonal before inverting (heights and widths differ by orders of magnitude).
    d = np.sqrt(np.diag(F))
    if np.any(d == 0):
        bad = [names[i] for i in np.nonzero(d == 0)[0]]
        raise InputError(f"crlb: parameters without information (outside the pixels?): {bad}")
    cov = np.linalg.inv(F / np.outer(d, d)) / np.outer(d, d)
    pnames = AXES_PARAMS if parametrisation == "axes" else COV_PARAMS
    out = pd.DataFrame(index=range(len(df)), columns=[f"{p}_crlb" for p in pnames], dtype=float)
    sd = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    for k in range(len(df)):
        i0 = 6 * k
        out.loc[k, "x_crlb"], out.loc[k, "y_crlb"], out.loc[k, "height_crlb"] = sd[i0 : i0 + 3]
        block = cov[i0 + 3 : i0 + 6, i0 + 3 : i0 + 6]
        if parametrisation == "cov":
            out.loc[k, ["sigma_x_crlb", "sigma_y_crlb", "rho_crlb"]] = sd[i0 + 3 : i0 + 6]
            continue
        r = df.iloc[k]
        if r["ratio"] - 1.0 < _ROUND_TOL:
            out.loc[k, ["sigma_major_crlb", "ratio_crlb", "angle_deg_crlb"]] = (math.nan, math.nan, math.inf)
            continue
        T = np.linalg.inv(_dcov_daxes(r["sigma_major"], r["ratio"], math.radians(r["angle_deg"])))
        v = np.sqrt(np.clip(np.diag(T @ block @ T.T), 0.0, None))
        out.loc[k, ["sigma_major_crlb", "ratio_crlb", "angle_deg_crlb"]] = (v[0], v[1], math.degrees(v[2]))
    out.attrs["background_crlb"] = (
        float(sd[names.index((-1, "background"))]) if (-1, "background") in names else math.nan
    )
    if return_covariance:
        return out, cov, names
    return out


def pixel_grid(shape, sampling):
    """Pixel-centre coordinates (X, Y) of an image of ``shape`` (ny, nx) at ``sampling`` per pixel."""
    ny, nx = shape
    y, x = np.mgrid[0:ny, 0:nx]
    return x * float(sampling), y * float(sampling)
