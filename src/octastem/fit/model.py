"""The column model: elliptical 2D Gaussians, their parametrisations, the fit's bounds and images.

A column is a 2D Gaussian either by its axes (sigma_major, ratio = sigma_major / sigma_minor >= 1,
angle of the major axis from +x) or by its covariance (sigma_x, sigma_y, rho); the fits work in
the covariance parametrisation, which is smooth everywhere, round shape included. Lengths are in A
(any consistent unit); ``s`` is the pixel size and ``a`` the lattice constant (both A).

This module also holds the bounds and window sizes shared by the three fitting engines, the one
numerical Jacobian (central differences) used by the fits' standard errors and by the Cramér-Rao
bounds, the pixel stencils of the batched paths and :func:`model_image`.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from octastem.io import InputError

# ----------------------------------------------------------------------------------------------
# Bounds and windows of the fit (lengths: fractions of the pixel size s or lattice constant a)
# ----------------------------------------------------------------------------------------------

#: Correlation bound of the fitted covariance (|rho| <= 0.95 allows ratios up to ~6 at equal sigmas).
RHO_MAX = 0.95
#: Fitted positions may move at most this fraction of the lattice constant from the initial guess.
DPOS_FRAC = 0.15
#: Fitted widths sigma_x, sigma_y lie in [SIGMA_MIN_PX * s, SIGMA_MAX_FRAC * a].
SIGMA_MIN_PX = 0.3
SIGMA_MAX_FRAC = 0.25
#: Initial widths start this far inside the width bounds (factors of the lower and upper bound).
START_INSET = (1.05, 0.95)
#: Default window diameter of the "window" and "joint" paths (lattice constants): the column
#: with its four nearest neighbours.
WINDOW_FRAC = 1.2
#: Default window diameter of the "fast" path (lattice constants).
FAST_WINDOW_FRAC = 0.6
#: Default pixel cap of one window of the window path, and the cap of the fast path (windows are
#: subsampled on a regular stride above it).
WINDOW_MAX_PIXELS = 20000
FAST_MAX_PIXELS = 1500


def width_bounds(s: float, a: float) -> tuple[float, float]:
    """(min, max) of the fitted widths sigma_x, sigma_y (A) at pixel size ``s`` and lattice constant ``a``."""
    return SIGMA_MIN_PX * s, SIGMA_MAX_FRAC * a


def start_width(width, smin, smax):
    """Initial width(s) moved inside the bounds (:data:`START_INSET`), so no fit starts on a bound."""
    return np.clip(width, START_INSET[0] * smin, START_INSET[1] * smax)


def window_radius(window_A, default_frac: float, a: float, s: float) -> float:
    """Radius (A) of the fit window of diameter ``window_A`` (None: ``default_frac`` lattice constants)."""
    radius = 0.5 * (float(window_A) if window_A is not None else default_frac * a)
    if not (radius > 2 * s):
        raise InputError(f"window_A: expected a window of several pixels, got {window_A!r}")
    return radius


# ----------------------------------------------------------------------------------------------
# Model functions
# ----------------------------------------------------------------------------------------------


def elliptical_gaussian(x, y, x0, y0, height, sigma_major, ratio, angle_rad):
    """Elliptical 2D Gaussian ``height * exp(-u^2/(2 sigma_major^2) - v^2/(2 sigma_minor^2))``.

    ``u`` runs along the major axis, at ``angle_rad`` from +x (counter-clockwise towards +y),
    ``v`` across it; ``sigma_minor = sigma_major / ratio`` with ``ratio >= 1`` (major/minor).
    Lengths in A (any consistent unit); broadcasts over ``x`` and ``y``.
    """
    if np.any(np.asarray(ratio) < 1):
        raise ValueError(f"ratio must be >= 1 (major/minor), got {ratio}")
    c, s = np.cos(angle_rad), np.sin(angle_rad)
    dx = np.asarray(x, dtype=float) - x0
    dy = np.asarray(y, dtype=float) - y0
    u = dx * c + dy * s
    v = -dx * s + dy * c
    sigma_minor = sigma_major / ratio
    return height * np.exp(-0.5 * ((u / sigma_major) ** 2 + (v / sigma_minor) ** 2))


def axes_to_cov(sigma_major, ratio, angle_rad) -> tuple[float, float, float]:
    """(sigma_major, ratio, angle) -> (sigma_x, sigma_y, rho) of the same Gaussian."""
    l1 = sigma_major**2
    l2 = (sigma_major / ratio) ** 2
    c, s = math.cos(angle_rad), math.sin(angle_rad)
    sxx = l1 * c * c + l2 * s * s
    syy = l1 * s * s + l2 * c * c
    sxy = (l1 - l2) * c * s
    sx, sy = math.sqrt(sxx), math.sqrt(syy)
    return sx, sy, sxy / (sx * sy)


def cov_to_axes(sigma_x, sigma_y, rho):
    """(sigma_x, sigma_y, rho) -> (sigma_major, sigma_minor, angle_rad in (-pi/2, pi/2]); vectorised."""
    sxx = np.asarray(sigma_x, dtype=float) ** 2
    syy = np.asarray(sigma_y, dtype=float) ** 2
    sxy = np.asarray(rho, dtype=float) * np.asarray(sigma_x) * np.asarray(sigma_y)
    mean = 0.5 * (sxx + syy)
    half = np.hypot(0.5 * (sxx - syy), sxy)
    major = np.sqrt(mean + half)
    minor = np.sqrt(np.maximum(mean - half, 0.0))
    angle = 0.5 * np.arctan2(2 * sxy, sxx - syy)
    angle = np.where(angle <= -np.pi / 2, angle + np.pi, angle)
    return major, minor, angle


def _gauss_cov(X, Y, x0, y0, h, sx, sy, rho, jac: bool = False):
    """Gaussian with covariance (sx, sy, rho) at (x0, y0); with ``jac`` also d/d(x0, y0, h, sx, sy, rho)."""
    dx = X - x0
    dy = Y - y0
    a = dx / sx
    b = dy / sy
    om = 1.0 - rho * rho
    u = a * b
    p = a * a - 2 * rho * u + b * b
    q = p / om
    e = np.exp(-0.5 * q)
    g = h * e
    if not jac:
        return g
    d_x0 = g * (a - rho * b) / (sx * om)
    d_y0 = g * (b - rho * a) / (sy * om)
    d_sx = g * (a * a - rho * u) / (sx * om)
    d_sy = g * (b * b - rho * u) / (sy * om)
    d_rho = g * (u - rho * q) / om
    return g, (d_x0, d_y0, e, d_sx, d_sy, d_rho)


def _gauss_values(X, Y, p):
    """Values only of the Gaussians with rows ``p`` = (x0, y0, h, sx, sy, rho, ...) (n, >= 6) at
    (X, Y) (n, P): the quadratic form with precomputed coefficients, in place."""
    x0, y0, h, sx, sy, rho = (p[:, c, None] for c in range(6))
    om = 1.0 - rho * rho
    cxx, cyy, cxy = -0.5 / (sx * sx * om), -0.5 / (sy * sy * om), rho / (sx * sy * om)
    dx = X - x0
    dy = Y - y0
    q = dx * dx
    q *= cxx
    dx *= dy
    dx *= cxy
    q += dx
    dy *= dy
    dy *= cyy
    q += dy
    np.exp(q, out=q)
    q *= h
    return q


def _gauss_round(X, Y, x0, y0, h, s, jac: bool = False):
    """Round Gaussian; with ``jac`` also d/d(x0, y0, h, s)."""
    dx = X - x0
    dy = Y - y0
    r2 = (dx * dx + dy * dy) / (s * s)
    e = np.exp(-0.5 * r2)
    g = h * e
    if not jac:
        return g
    return g, (g * dx / (s * s), g * dy / (s * s), e, g * r2 / s)


# ----------------------------------------------------------------------------------------------
# Numerical Jacobian of a change of parameters
# ----------------------------------------------------------------------------------------------


def central_differences(f, p0, floor: float, unwrap=None) -> np.ndarray:
    """Jacobian ``d f / d p`` at ``p0`` by central differences, step ``1e-6 * max(|p|, floor)``.

    ``p0`` (..., k): parameters, batched over any leading axes; ``f`` maps (..., k) to (..., m);
    ``unwrap`` (optional) maps each difference ``f(p + h) - f(p - h)`` (..., m) to its value on
    one branch (e.g. an angle across its branch cut). Returns (..., m, k).
    """
    p0 = np.asarray(p0, dtype=float)
    step = 1e-6 * np.maximum(np.abs(p0), floor)
    k = p0.shape[-1]
    jac = None
    for c in range(k):
        hi, lo = p0.copy(), p0.copy()
        hi[..., c] += step[..., c]
        lo[..., c] -= step[..., c]
        diff = f(hi) - f(lo)
        if unwrap is not None:
            diff = unwrap(diff)
        col = diff / (2 * step[..., c, None])
        if jac is None:
            jac = np.empty(col.shape + (k,))
        jac[..., c] = col
    return jac


# ----------------------------------------------------------------------------------------------
# Pixel stencils and model images
# ----------------------------------------------------------------------------------------------


def _stencil(radius_px, stride=1):
    """Integer pixel offsets (di, dj) within ``radius_px`` of the origin, on a regular ``stride``."""
    r = int(math.ceil(radius_px))
    r -= r % stride
    dj, di = np.mgrid[-r : r + 1 : stride, -r : r + 1 : stride]
    m = di * di + dj * dj <= radius_px * radius_px
    return di[m], dj[m]


def _gather(shape, s, ax_, ay_, di, dj):
    """Unwrapped coordinates (X, Y) (n, P) and wrapped linear pixel indices of stencils anchored at
    the integer pixels (ax_, ay_)."""
    ny, nx = shape
    IX = ax_[:, None] + di[None, :]
    IY = ay_[:, None] + dj[None, :]
    return IX * s, IY * s, (IY % ny) * nx + IX % nx


def model_image(shape, sampling_A, columns, background=0.0, periodic=True, reach=5.0) -> np.ndarray:
    """Image (y, x) of elliptical Gaussians sampled at the pixel centres, plus ``background``.

    ``columns``: table with x, y (A), height, sigma_major and ratio (or sigma_minor or
    ellipticity; default 1) and angle_deg (default 0). ``periodic``: columns wrap around the image
    edges; otherwise they are cut at them. Each column is evaluated within ``reach`` of its
    major width of its centre.
    """
    cols = pd.DataFrame(columns)
    ny, nx = (int(v) for v in shape)
    s = float(sampling_A)
    img = np.full((ny, nx), float(background))
    if len(cols) == 0:
        return img
    if "ratio" in cols:
        ratio = cols["ratio"].to_numpy(float)
    elif "sigma_minor" in cols:
        ratio = cols["sigma_major"].to_numpy(float) / cols["sigma_minor"].to_numpy(float)
    elif "ellipticity" in cols:
        ratio = cols["ellipticity"].to_numpy(float)
    else:
        ratio = np.ones(len(cols))
    angle = np.radians(cols["angle_deg"].to_numpy(float)) if "angle_deg" in cols else np.zeros(len(cols))
    major = cols["sigma_major"].to_numpy(float)
    if np.any(ratio < 1) or np.any(major <= 0):
        raise InputError("model_image: expected sigma_major > 0 and ratio >= 1")
    cov = np.array([axes_to_cov(m, r, t) for m, r, t in zip(major, ratio, angle)])
    p = np.column_stack([cols["x"].to_numpy(float), cols["y"].to_numpy(float), cols["height"].to_numpy(float), cov])
    r_px = min(reach * float(major.max()) / s + 1, 0.5 * max(nx, ny) if periodic else 1e9)
    di, dj = _stencil(r_px)
    ax_, ay_ = np.rint(p[:, 0] / s).astype(int), np.rint(p[:, 1] / s).astype(int)
    X, Y, L = _gather((ny, nx), s, ax_, ay_, di, dj)
    g = _gauss_cov(X, Y, *(p[:, c, None] for c in range(6)))
    if periodic:
        img += np.bincount(L.ravel(), weights=g.ravel(), minlength=nx * ny).reshape(ny, nx)
        return img
    IX, IY = ax_[:, None] + di[None, :], ay_[:, None] + dj[None, :]
    inside = (IX >= 0) & (IX < nx) & (IY >= 0) & (IY < ny)
    img += np.bincount((IY * nx + IX)[inside], weights=g[inside], minlength=nx * ny).reshape(ny, nx)
    return img
