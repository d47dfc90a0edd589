"""Elliptical Gaussian fits of the projected atomic columns of cubic FAPbBr3 viewed along [001].

The image model is that of StatSTEM / De wael et al. (2021): a sum of 2D Gaussians, one centred on
each atomic column, fitted by non-linear least squares. Every column of interest is fitted in a
circular window around it (with periodic wrap, the image spans an integer number of cells of a
periodic supercell) with

- an elliptical Gaussian for the column itself,
- a linear background,
- Gaussians for the neighbouring columns whose centres lie inside the window (elliptical by
  default, or round; position, height and widths free), and fixed Gaussians (shape from image
  moments) for the columns just outside, so that the tails of bright neighbours do not widen the
  fitted column.

Geometry. ``image`` is a numpy array (y, x); pixel (iy, ix) lies at (x = ix*s, y = iy*s) A with
``s = sampling_A``. ``n_cells = (nx, ny)`` unit cells span the image and ``cell_A = (Lx, Ly)`` is
the in-plane size of that periodic supercell (the whole image), so the lattice constants are
``Lx/nx`` and ``Ly/ny``. The ideal columns per unit cell (fractional coordinates) are PbBr (0, 0),
Br (1/2, 0) (site ``Br_x``: its Pb-Br-Pb bond runs along x), Br (0, 1/2) (site ``Br_y``) and FA
(1/2, 1/2). A rigid lattice offset (``origin_A``: position of the PbBr column of cell (0, 0)) is
refined from the data.

Fitted shape. Internally the column is parametrised by (sigma_x, sigma_y, rho) of its covariance
matrix. This is smooth everywhere, including the round shape, so the fit has no angle degeneracy
at ratio 1 and no sigma_x/sigma_y swap ambiguity; the reported (sigma_major, sigma_minor,
angle) are the eigen-decomposition of that covariance, with ``ellipticity = sigma_major /
sigma_minor >= 1`` and the angle of the major axis from +x in (-90, 90] degrees. Their standard
errors are propagated from the lmfit covariance matrix (delta method).

Paths (``fit_columns(method=...)``): "window" (above, lmfit per column, the reference), "joint"
(lmfit on all columns and the background at once, small images) and "fast" (batched
Levenberg-Marquardt on all windows with neighbour subtraction sweeps and a global linear re-solve
of heights and background; thousands of columns per second). :func:`round_baseline` measures the
ellipticity that noise alone produces for round columns; :mod:`octastem.crlb` gives the
Cramér-Rao bounds of the fitted parameters.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import lmfit
import numpy as np
import pandas as pd
from scipy import ndimage

from octastem.fit.stats import median_se
from octastem.io import InputError, atomic_path, provenance, read_image, write_json

#: Column sites of the cubic perovskite along [001]: (site, type, fractional x, fractional y).
SITES = (
    ("PbBr", "PbBr", 0.0, 0.0),
    ("Br_x", "Br", 0.5, 0.0),
    ("Br_y", "Br", 0.0, 0.5),
    ("FA", "FA", 0.5, 0.5),
)
TYPES = ("PbBr", "Br", "FA")

#: Direction of the Pb-Br-Pb bond through each Br site (degrees from +x).
_BOND_ANGLE_DEG = {"Br_x": 0.0, "Br_y": 90.0}

#: Correlation bound of the fitted covariance (|rho| <= 0.95 allows ratios up to ~6 at equal sigmas).
_RHO_MAX = 0.95
#: Fitted positions may move at most this fraction of the lattice constant from the initial guess.
_DPOS_FRAC = 0.15

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

log = logging.getLogger("octastem")


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
# Lattice
# ----------------------------------------------------------------------------------------------


def _pair(value, name: str, cast=float) -> tuple:
    try:
        seq = list(np.asarray(value).ravel())
    except Exception as e:  # pragma: no cover - defensive
        raise InputError(f"{name}: expected two numbers (x, y), got {value!r}") from e
    if len(seq) != 2:
        raise InputError(f"{name}: expected two numbers (x, y), got {value!r}")
    out = tuple(cast(v) for v in seq)
    if cast is int and any(v < 1 for v in out):
        raise InputError(f"{name}: expected two integers >= 1, got {value!r}")
    if cast is float and any(not (v > 0 and math.isfinite(v)) for v in out):
        raise InputError(f"{name}: expected two positive lengths in A, got {value!r}")
    return out


def column_grid(n_cells, cell_A, origin_A=(0.0, 0.0)) -> pd.DataFrame:
    """Ideal column positions of ``n_cells = (nx, ny)`` cubic cells spanning the supercell ``cell_A``.

    Returns a DataFrame with columns type, site, i, j (cell indices), x, y (A, wrapped into the
    supercell [0, Lx) x [0, Ly)); ``origin_A`` is the position of the PbBr column of cell (0, 0).
    """
    nx, ny = _pair(n_cells, "n_cells", int)
    lx, ly = _pair(cell_A, "cell_A")
    ax, ay = lx / nx, ly / ny
    ox, oy = (float(v) for v in origin_A)
    rows = []
    for site, typ, fx, fy in SITES:
        for j in range(ny):
            for i in range(nx):
                rows.append((typ, site, i, j, ((i + fx) * ax + ox) % lx, ((j + fy) * ay + oy) % ly))
    return pd.DataFrame(rows, columns=["type", "site", "i", "j", "x", "y"])


def _check_geometry(image, sampling_A, n_cells, cell_A):
    """Validate image and lattice; return (image float64, s, (nx, ny), (Lx, Ly), (ax, ay))."""
    img = np.asarray(image, dtype=float)
    if img.ndim != 2:
        raise InputError(f"image: expected a 2D array (y, x), got shape {img.shape}")
    n_bad = int((~np.isfinite(img)).sum())
    if n_bad:
        raise InputError(f"image: {n_bad} non-finite (NaN/inf) pixel(s); expected a finite image")
    s = float(sampling_A)
    if not (s > 0 and math.isfinite(s)):
        raise InputError(f"sampling_A: expected a positive pixel size in A, got {sampling_A!r}")
    nx, ny = _pair(n_cells, "n_cells", int)
    lx, ly = _pair(cell_A, "cell_A")
    ext_x, ext_y = img.shape[1] * s, img.shape[0] * s
    tol_x, tol_y = max(1.5 * s, 0.01 * lx), max(1.5 * s, 0.01 * ly)
    if abs(ext_x - lx) > tol_x or abs(ext_y - ly) > tol_y:
        hint = ""
        if abs(ext_x - nx * lx) <= tol_x * nx and abs(ext_y - ny * ly) <= tol_y * ny:
            hint = " (cell_A looks like the unit-cell size; pass the supercell size n_cells * a)"
        raise InputError(
            f"image: extent {ext_x:.3f} x {ext_y:.3f} A ({img.shape[1]} x {img.shape[0]} px at "
            f"{s} A/px) does not match cell_A = ({lx}, {ly}) A; the image must span the periodic "
            f"supercell of n_cells = ({nx}, {ny}) unit cells{hint}"
        )
    ax, ay = lx / nx, ly / ny
    if min(ax, ay) / s < 8:
        raise InputError(
            f"image: too small for the lattice: {min(ax, ay) / s:.1f} px per unit cell "
            f"(n_cells = ({nx}, {ny}) over {img.shape[1]} x {img.shape[0]} px); expected >= 8"
        )
    return img, s, (nx, ny), (lx, ly), (ax, ay)


def _patch(img, s, xc, yc, radius, stride: int = 1):
    """Pixels within ``radius`` A of (xc, yc) with periodic wrap: (X, Y, values) in unwrapped A."""
    ny, nx = img.shape
    ix = np.arange(math.floor((xc - radius) / s), math.ceil((xc + radius) / s) + 1, stride)
    iy = np.arange(math.floor((yc - radius) / s), math.ceil((yc + radius) / s) + 1, stride)
    IX, IY = np.meshgrid(ix, iy)
    X, Y = IX * s, IY * s
    m = (X - xc) ** 2 + (Y - yc) ** 2 <= radius * radius
    return X[m], Y[m], img[IY[m] % ny, IX[m] % nx]


def _peak_position(img, smooth, s, xp, yp, search_A, centroid_A):
    """Brightest (smoothed) pixel within ``search_A`` of (xp, yp), refined by the centroid of the
    region above half maximum within ``centroid_A`` of it. Returns (x, y, contrast)."""
    X, Y, V = _patch(smooth, s, xp, yp, search_A)
    k = int(np.argmax(V))
    xm, ym = X[k], Y[k]
    bg = float(np.percentile(V, 10))
    X2, Y2, V2 = _patch(img, s, xm, ym, centroid_A)
    half = bg + 0.5 * (V[k] - bg)
    w = np.clip(V2 - half, 0, None)
    if w.sum() <= 0:
        return xm, ym, V[k] - bg
    return float((w * X2).sum() / w.sum()), float((w * Y2).sum() / w.sum()), float(V[k] - bg)


def _noise_sigma(img) -> float:
    """Pixel noise estimate from the MAD of differences of next-but-one pixels (robust to smooth signal)."""
    d = (img[:, 2:] - 2 * img[:, 1:-1] + img[:, :-2]).ravel()
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / math.sqrt(6))


def _locate_pbbr(image, sampling_A, n_cells, cell_A):
    """Per-cell offsets (dx, dy) of the brightest peak of each cell from its ideal PbBr site, and
    the peak contrasts. The search box is a whole cell, so any rigid offset is found."""
    img, s, (nx, ny), (_lx, _ly), (ax, ay) = _check_geometry(image, sampling_A, n_cells, cell_A)
    smooth = ndimage.uniform_filter(img, size=3, mode="wrap")
    a = min(ax, ay)
    offsets, contrasts = [], []
    for j in range(ny):
        for i in range(nx):
            x, y, c = _peak_position(img, smooth, s, i * ax, j * ay, 0.5 * math.hypot(ax, ay), 0.15 * a)
            dx = (x - i * ax + 0.5 * ax) % ax - 0.5 * ax
            dy = (y - j * ay + 0.5 * ay) % ay - 0.5 * ay
            offsets.append((dx, dy))
            contrasts.append(c)
    return np.array(offsets), np.array(contrasts), (ax, ay)


def _circular_mean(d, period):
    return float(period / (2 * math.pi) * np.angle(np.mean(np.exp(2j * math.pi * np.asarray(d) / period))))


def refine_origin(image, sampling_A, n_cells, cell_A) -> tuple[float, float]:
    """Rigid lattice offset (ox, oy) in A: the mean (periodic) displacement of the PbBr columns,
    found as the brightest peak of each unit cell, from the ideal grid at origin (0, 0)."""
    offsets, _, (ax, ay) = _locate_pbbr(image, sampling_A, n_cells, cell_A)
    return _circular_mean(offsets[:, 0], ax), _circular_mean(offsets[:, 1], ay)


# ----------------------------------------------------------------------------------------------
# Initial guesses
# ----------------------------------------------------------------------------------------------


def _moment_guess(img, smooth, s, xp, yp, a):
    """Position, height, background and covariance (sx, sy, rho) of the column near (xp, yp) from
    the brightest pixel within 0.15 a and the second moments of its half-maximum region."""
    X, Y, V = _patch(smooth, s, xp, yp, max(0.15 * a, 1.5 * s))
    k = int(np.argmax(V))
    xm, ym = X[k], Y[k]
    _, _, Vb = _patch(img, s, xm, ym, 0.5 * a)
    bg = float(np.percentile(Vb, 10))
    h = float(V[k] - bg)
    X2, Y2, V2 = _patch(img, s, xm, ym, 0.3 * a)
    inside = V2 > bg + 0.5 * h
    smin, smax = 0.5 * s, 0.2 * a
    if h <= 0 or inside.sum() < 3:
        sig = max(0.07 * a, smin)
        return {"x": xm, "y": ym, "h": max(h, 0.0), "bg": bg, "sx": sig, "sy": sig, "rho": 0.0}
    Xi, Yi, w = X2[inside], Y2[inside], V2[inside] - (bg + 0.5 * h)
    x0 = float((w * Xi).sum() / w.sum()) if w.sum() > 0 else xm
    y0 = float((w * Yi).sum() / w.sum()) if w.sum() > 0 else ym
    # The 3x3 smoothing lowers the peak; take the height from the raw pixels nearest the centroid.
    near = (X2 - x0) ** 2 + (Y2 - y0) ** 2 <= max(s * s, (0.05 * a) ** 2)
    if near.any():
        h = max(float(V2[near].mean()) - bg, h)
    # Unweighted moments of the half-maximum region: for a Gaussian it is an ellipse whose
    # variance along each axis is sigma^2 ln2 / 2; pixelisation adds s^2/12.
    cxx = np.mean((Xi - Xi.mean()) ** 2) - s * s / 12
    cyy = np.mean((Yi - Yi.mean()) ** 2) - s * s / 12
    cxy = np.mean((Xi - Xi.mean()) * (Yi - Yi.mean()))
    f = 2.0 / math.log(2.0)
    sx = float(np.clip(math.sqrt(max(f * cxx, 0.0)), smin, smax))
    sy = float(np.clip(math.sqrt(max(f * cyy, 0.0)), smin, smax))
    rho = float(np.clip(f * cxy / (sx * sy), -0.8, 0.8))
    return {"x": x0, "y": y0, "h": h, "bg": bg, "sx": sx, "sy": sy, "rho": rho}


# ----------------------------------------------------------------------------------------------
# Window fit
# ----------------------------------------------------------------------------------------------


class _WindowModel:
    """Elliptical target + linear background + free neighbours (round or elliptical) + fixed part."""

    def __init__(self, X, Y, data, xc, yc, n_free, fixed, elliptical_neighbours):
        self.X, self.Y, self.data = X, Y, data
        self.Xr, self.Yr = X - xc, Y - yc
        self.n_nb = n_free
        self.fixed = fixed
        self.fn = _gauss_cov if elliptical_neighbours else _gauss_round
        self.k = 6 if elliptical_neighbours else 4
        names = ["x0", "y0", "height", "sx", "sy", "rho", "b0", "bx", "by"]
        suffixes = ("x", "y", "h", "sx", "sy", "rho") if elliptical_neighbours else ("x", "y", "h", "s")
        for k in range(self.n_nb):
            names += [f"n{k}_{c}" for c in suffixes]
        self.names = names

    def _values(self, params):
        return [params[n].value for n in self.names]

    def model(self, params):
        v = self._values(params)
        m = _gauss_cov(self.X, self.Y, *v[:6]) + v[6] + v[7] * self.Xr + v[8] * self.Yr + self.fixed
        nk = self.k
        for k in range(self.n_nb):
            m = m + self.fn(self.X, self.Y, *v[9 + nk * k : 9 + nk * (k + 1)])
        return m

    def residual(self, params):
        return self.model(params) - self.data

    def jacobian(self, params):
        v = self._values(params)
        jac = np.empty((self.X.size, len(self.names)))
        _, d = _gauss_cov(self.X, self.Y, *v[:6], jac=True)
        for c in range(6):
            jac[:, c] = d[c]
        jac[:, 6] = 1.0
        jac[:, 7] = self.Xr
        jac[:, 8] = self.Yr
        nk = self.k
        for k in range(self.n_nb):
            _, d = self.fn(self.X, self.Y, *v[9 + nk * k : 9 + nk * (k + 1)], jac=True)
            for c in range(nk):
                jac[:, 9 + nk * k + c] = d[c]
        return jac


def _axes_stderr(sx, sy, rho, cov3):
    """Delta-method standard errors of (sigma_major, ratio, angle_deg) from the 3x3 covariance of
    (sx, sy, rho); NaN where the covariance is unavailable."""
    if cov3 is None or not np.all(np.isfinite(cov3)):
        return math.nan, math.nan, math.nan

    def f(p):
        major, minor, ang = cov_to_axes(*p)
        return np.array([float(major), float(major / minor), float(np.degrees(ang))])

    p0 = np.array([sx, sy, rho], dtype=float)
    grad = np.empty((3, 3))
    for c in range(3):
        step = 1e-6 * max(abs(p0[c]), 1e-3)
        hi, lo = p0.copy(), p0.copy()
        hi[c] += step
        lo[c] -= step
        dh, dl = f(hi), f(lo)
        # The angle jumps by 180 deg across the branch cut: unwrap the difference.
        diff = dh - dl
        diff[2] = (diff[2] + 90.0) % 180.0 - 90.0
        grad[:, c] = diff / (2 * step)
    var = np.einsum("ij,jk,ik->i", grad, cov3, grad)
    return tuple(float(math.sqrt(v)) if v >= 0 else math.nan for v in var)


def _fit_window(img, s, target, guesses, period, a, radius, max_pixels, elliptical_nb, jitter=None):
    """Fit one column; ``target`` is its guess dict; ``guesses`` all columns (arrays), ``period``
    the supercell size (wrap of the neighbours)."""
    xc, yc = target["x"], target["y"]
    npx_est = math.pi * radius * radius / (s * s)
    stride = max(1, math.ceil(math.sqrt(npx_est / max_pixels))) if max_pixels else 1
    X, Y, V = _patch(img, s, xc, yc, radius, stride)

    # Neighbours (all periodic images) near the window: free inside, fixed just outside.
    lx, ly = period
    free, fixed = [], np.zeros_like(X)
    reach = radius + 4.0 * guesses["smax"]
    kx = math.ceil(reach / lx)
    ky = math.ceil(reach / ly)
    for sx_ in range(-kx, kx + 1):
        for sy_ in range(-ky, ky + 1):
            gx = guesses["x"] + sx_ * lx
            gy = guesses["y"] + sy_ * ly
            d = np.hypot(gx - xc, gy - yc)
            for n in np.nonzero(d < reach)[0]:
                if n == target["index"] and sx_ == 0 and sy_ == 0:
                    continue
                shape = (guesses["sx"][n], guesses["sy"][n], guesses["rho"][n])
                if d[n] < radius:
                    free.append((gx[n], gy[n], max(guesses["h"][n], 0.0), *shape))
                elif d[n] < radius + 4.0 * max(shape[0], shape[1]):
                    fixed = fixed + _gauss_cov(X, Y, gx[n], gy[n], guesses["h"][n], *shape)

    wm = _WindowModel(X, Y, V, xc, yc, len(free), fixed, elliptical_nb)
    smin, smax = 0.3 * s, 0.25 * a
    dpos = _DPOS_FRAC * a
    h0 = max(target["h"], 1e-12)
    sx0, sy0, rho0 = target["sx"], target["sy"], target["rho"]
    if jitter is not None:
        sx0, sy0 = sx0 * jitter[0], sy0 * jitter[1]
        rho0 = float(np.clip(rho0 + jitter[2], -0.8, 0.8))
    p = lmfit.Parameters()
    p.add("x0", value=xc, min=xc - dpos, max=xc + dpos)
    p.add("y0", value=yc, min=yc - dpos, max=yc + dpos)
    p.add("height", value=h0, min=0.0)
    p.add("sx", value=float(np.clip(sx0, 1.05 * smin, 0.95 * smax)), min=smin, max=smax)
    p.add("sy", value=float(np.clip(sy0, 1.05 * smin, 0.95 * smax)), min=smin, max=smax)
    p.add("rho", value=rho0, min=-_RHO_MAX, max=_RHO_MAX)
    p.add("b0", value=target["bg"])
    p.add("bx", value=0.0)
    p.add("by", value=0.0)
    for k, (nx_, ny_, nh, nsx, nsy, nrho) in enumerate(free):
        p.add(f"n{k}_x", value=nx_, min=nx_ - dpos, max=nx_ + dpos)
        p.add(f"n{k}_y", value=ny_, min=ny_ - dpos, max=ny_ + dpos)
        p.add(f"n{k}_h", value=max(nh, 1e-12), min=0.0)
        if elliptical_nb:
            p.add(f"n{k}_sx", value=float(np.clip(nsx, 1.05 * smin, 0.95 * smax)), min=smin, max=smax)
            p.add(f"n{k}_sy", value=float(np.clip(nsy, 1.05 * smin, 0.95 * smax)), min=smin, max=smax)
            p.add(f"n{k}_rho", value=float(nrho), min=-_RHO_MAX, max=_RHO_MAX)
        else:
            ns = math.sqrt(nsx * nsy)
            p.add(f"n{k}_s", value=float(np.clip(ns, 1.05 * smin, 0.95 * smax)), min=smin, max=smax)

    mini = lmfit.Minimizer(wm.residual, p)
    res = mini.minimize(method="leastsq", Dfun=wm.jacobian, col_deriv=0)
    if list(res.var_names) != wm.names:  # pragma: no cover - guards the Jacobian column order
        raise RuntimeError("parameter order of the window model changed")
    return res, X.size


def _row_from_result(res, target, n_pixels, smin, smax, dpos):
    pv = res.params
    sx, sy, rho = pv["sx"].value, pv["sy"].value, pv["rho"].value
    major, minor, ang = (float(v) for v in cov_to_axes(sx, sy, rho))
    cov3 = None
    if res.covar is not None:
        idx = [res.var_names.index(n) for n in ("sx", "sy", "rho")]
        cov3 = res.covar[np.ix_(idx, idx)]
    se_major, se_ratio, se_angle = _axes_stderr(sx, sy, rho, cov3)

    at_bound = (
        any(min(pv[n].value - smin, smax - pv[n].value) < 1e-3 * (smax - smin) for n in ("sx", "sy"))
        or abs(abs(rho) - _RHO_MAX) < 1e-4
    )
    moved = max(abs(pv["x0"].value - target["x"]), abs(pv["y0"].value - target["y"])) > 0.99 * dpos
    if not res.success:
        flag = "not_converged"
    elif pv["height"].value <= 0:
        flag = "no_peak"
    elif at_bound:
        flag = "shape_at_bound"
    elif moved:
        flag = "position_at_bound"
    elif not res.errorbars:
        flag = "no_errorbars"
    else:
        flag = "ok"
    return {
        "x": pv["x0"].value,
        "y": pv["y0"].value,
        "height": pv["height"].value,
        "sigma_major": major,
        "sigma_minor": minor,
        "angle_deg": math.degrees(ang),
        "ellipticity": major / minor if minor > 0 else math.inf,
        "x_stderr": pv["x0"].stderr if pv["x0"].stderr is not None else math.nan,
        "y_stderr": pv["y0"].stderr if pv["y0"].stderr is not None else math.nan,
        "sigma_major_stderr": se_major,
        "ellipticity_stderr": se_ratio,
        "angle_deg_stderr": se_angle,
        "background": pv["b0"].value,
        "success": flag == "ok",
        "flag": flag,
        "redchi": float(res.redchi),
        "nfev": int(res.nfev),
        "n_pixels": int(n_pixels),
    }


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

    grad = np.empty((n, 3, 3))
    for c in range(3):
        step = 1e-6 * np.maximum(np.abs(p0[:, c]), 1e-3)
        hi, lo = p0.copy(), p0.copy()
        hi[:, c] += step
        lo[:, c] -= step
        diff = f(hi) - f(lo)
        diff[:, 2] = (diff[:, 2] + 90.0) % 180.0 - 90.0
        grad[:, :, c] = diff / (2 * step[:, None])
    var = np.einsum("nij,njk,nik->ni", grad, cov3, grad)
    with np.errstate(invalid="ignore"):
        se = np.where(var >= 0, np.sqrt(np.abs(var)), np.nan)
    se[~np.all(np.isfinite(cov3), axis=(1, 2))] = np.nan
    return se[:, 0], se[:, 1], se[:, 2]


def _rows_from_arrays(p, cov, guess_xy, success, nfev, redchi, n_pixels, smin, smax, dpos):
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
        | (np.abs(np.abs(rho) - _RHO_MAX) < 1e-4)
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


# ----------------------------------------------------------------------------------------------
# Joint fit of all columns (small images)
# ----------------------------------------------------------------------------------------------


def _wrap(X, x0, period):
    """``X`` moved by whole periods to lie within half a period of ``x0`` (no-op without a period)."""
    if period is None:
        return X
    return x0 + (X - x0 + 0.5 * period) % period - 0.5 * period


def fit_joint(
    image,
    sampling_A,
    columns,
    background=None,
    period=None,
    weights=None,
    dpos=None,
    width_bounds=None,
):
    """Joint least-squares fit of elliptical Gaussians at all ``columns`` plus a constant background.

    ``columns``: table (DataFrame or list of dicts) of initial values x, y (A), height,
    sigma_major and optionally ratio (>= 1) and angle_deg (or sigma_x, sigma_y, rho).
    ``background``: initial background (default: 10th percentile of the image). ``period``:
    (Lx, Ly) of a periodic image (columns then wrap around), or None. ``weights``: per-pixel
    weights 1/sd (same shape as the image; e.g. ``1/sqrt(counts)`` for Poisson data), or None.
    ``dpos``: positions may move at most this far (A) from their initial values (None: free).
    ``width_bounds``: (min, max) of sigma_x and sigma_y (default: (0.3 px, inf)).

    All parameters are estimated together by lmfit (Levenberg-Marquardt with the analytic
    Jacobian), so this is the maximum-likelihood estimate for Gaussian noise. Returns one row per
    column (x, y, height, sigma_major, sigma_minor, ellipticity, angle_deg, sigma_x, sigma_y, rho,
    their standard errors and a flag); ``df.attrs`` holds background, background_stderr, redchi,
    nfev and success.
    """
    img = np.asarray(image, dtype=float)
    if img.ndim != 2 or not np.all(np.isfinite(img)):
        raise InputError("image: expected a finite 2D array (y, x)")
    s = float(sampling_A)
    cols = pd.DataFrame(columns).reset_index(drop=True)
    if len(cols) == 0:
        raise InputError("fit_joint: no columns to fit")
    if "sigma_x" not in cols:
        if "sigma_major" not in cols:
            raise InputError("fit_joint: columns need sigma_major (or sigma_x, sigma_y, rho) initial widths")
        ratio = cols["ratio"] if "ratio" in cols else pd.Series(1.0, index=cols.index)
        angle = cols["angle_deg"] if "angle_deg" in cols else pd.Series(0.0, index=cols.index)
        cov = [axes_to_cov(m, r, math.radians(t)) for m, r, t in zip(cols["sigma_major"], ratio, angle)]
        cols["sigma_x"], cols["sigma_y"], cols["rho"] = (np.array([c[k] for c in cov]) for k in range(3))
    ny, nx = img.shape
    Y, X = (v.ravel() * s for v in np.mgrid[0:ny, 0:nx])
    data = img.ravel()
    w = None if weights is None else np.asarray(weights, dtype=float).ravel()
    if w is not None and (w.shape != data.shape or not np.all(np.isfinite(w)) or np.any(w < 0)):
        raise InputError("fit_joint: weights must be finite, >= 0 and of the image's shape")
    px, py = (None, None) if period is None else (float(period[0]), float(period[1]))
    smin, smax = (0.3 * s, np.inf) if width_bounds is None else (float(width_bounds[0]), float(width_bounds[1]))
    bg0 = float(np.percentile(data, 10)) if background is None else float(background)
    if "height" not in cols:
        raise InputError("fit_joint: columns need initial heights")

    p = lmfit.Parameters()
    for k, r in enumerate(cols.itertuples(index=False)):
        dp = np.inf if dpos is None else float(dpos)
        p.add(f"c{k}_x", value=r.x, min=r.x - dp, max=r.x + dp)
        p.add(f"c{k}_y", value=r.y, min=r.y - dp, max=r.y + dp)
        p.add(f"c{k}_h", value=max(float(r.height), 1e-12))
        p.add(f"c{k}_sx", value=float(np.clip(r.sigma_x, 1.01 * smin, 0.99 * smax)), min=smin, max=smax)
        p.add(f"c{k}_sy", value=float(np.clip(r.sigma_y, 1.01 * smin, 0.99 * smax)), min=smin, max=smax)
        p.add(f"c{k}_rho", value=float(np.clip(r.rho, -0.9, 0.9)), min=-_RHO_MAX, max=_RHO_MAX)
    p.add("b0", value=bg0)
    K = len(cols)
    names = list(p.keys())

    def unpack(params):
        v = np.array([params[n].value for n in names])
        return v[:-1].reshape(K, 6), v[-1]

    def model_jac(params, jac):
        cp, b = unpack(params)
        m = np.full(X.size, b)
        J = np.empty((X.size, 6 * K + 1)) if jac else None
        for k in range(K):
            Xk, Yk = _wrap(X, cp[k, 0], px), _wrap(Y, cp[k, 1], py)
            out = _gauss_cov(Xk, Yk, *cp[k], jac=jac)
            if jac:
                g, d = out
                for c in range(6):
                    J[:, 6 * k + c] = d[c]
            else:
                g = out
            m += g
        if jac:
            J[:, -1] = 1.0
        return m, J

    def residual(params):
        r = model_jac(params, False)[0] - data
        return r if w is None else r * w

    def jacobian(params):
        J = model_jac(params, True)[1]
        return J if w is None else J * w[:, None]

    mini = lmfit.Minimizer(residual, p)
    res = mini.minimize(method="leastsq", Dfun=jacobian, col_deriv=0)
    if list(res.var_names) != names:  # pragma: no cover - guards the Jacobian column order
        raise RuntimeError("parameter order of the joint model changed")
    cp, b = unpack(res.params)
    par = np.column_stack([cp, np.full(K, b)])
    cov = np.full((K, 7, 7), np.nan)
    if res.covar is not None:
        for k in range(K):
            idx = [6 * k + c for c in range(6)] + [6 * K]
            cov[k] = res.covar[np.ix_(idx, idx)]
    guess_xy = cols[["x", "y"]].to_numpy(dtype=float)
    rows = _rows_from_arrays(
        par,
        cov,
        guess_xy,
        np.full(K, bool(res.success)),
        np.full(K, res.nfev),
        np.full(K, res.redchi),
        np.full(K, X.size),
        smin,
        smax if np.isfinite(smax) else 1e300,
        dpos if dpos else np.inf,
    )
    df = pd.DataFrame(rows)
    if px is not None:
        df["x"] = df["x"] % px
        df["y"] = df["y"] % py
    df["sigma_x"], df["sigma_y"], df["rho"] = cp[:, 3], cp[:, 4], cp[:, 5]
    bse = res.params["b0"].stderr
    df.attrs.update(
        background=float(b),
        background_stderr=float(bse) if bse is not None else math.nan,
        redchi=float(res.redchi),
        nfev=int(res.nfev),
        success=bool(res.success),
    )
    return df


# ----------------------------------------------------------------------------------------------
# Fast path: batched Levenberg-Marquardt on all windows at once, with neighbour subtraction
# ----------------------------------------------------------------------------------------------

#: Pixel cap of one window in the fast path (windows are subsampled on a regular stride above it).
_FAST_MAX_PIXELS = 1500


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


def _moment_guess_batch(img, smooth, s, x, y, a):
    """Vectorised :func:`_moment_guess` for all columns at once: dict of arrays."""
    shape = img.shape
    n = len(x)
    ax_, ay_ = np.rint(np.asarray(x) / s).astype(int), np.rint(np.asarray(y) / s).astype(int)
    di, dj = _stencil(max(0.15 * a, 1.5 * s) / s)
    _, _, L = _gather(shape, s, ax_, ay_, di, dj)
    V = smooth.ravel()[L]
    k = np.argmax(V, axis=1)
    mx, my = ax_ + di[k], ay_ + dj[k]
    vmax = V[np.arange(n), k]
    r_bg = 0.5 * a / s
    di, dj = _stencil(r_bg, max(1, int(r_bg // 20)))
    _, _, L = _gather(shape, s, mx, my, di, dj)
    bg = np.percentile(img.ravel()[L], 10, axis=1)
    h = vmax - bg
    di, dj = _stencil(0.3 * a / s)
    X2, Y2, L = _gather(shape, s, mx, my, di, dj)
    V2 = img.ravel()[L]
    half = (bg + 0.5 * h)[:, None]
    inside = V2 > half
    cnt = inside.sum(1)
    w = np.where(inside, V2 - half, 0.0)
    ws = w.sum(1)
    safe = np.where(ws > 0, ws, 1.0)
    x0 = np.where(ws > 0, (w * X2).sum(1) / safe, mx * s)
    y0 = np.where(ws > 0, (w * Y2).sum(1) / safe, my * s)
    near = (X2 - x0[:, None]) ** 2 + (Y2 - y0[:, None]) ** 2 <= max(s * s, (0.05 * a) ** 2)
    nn = near.sum(1)
    hnear = np.where(nn > 0, np.where(near, V2, 0.0).sum(1) / np.maximum(nn, 1) - bg, h)
    h = np.maximum(h, hnear)
    c = np.maximum(cnt, 1)
    mxi = np.where(inside, X2, 0.0).sum(1) / c
    myi = np.where(inside, Y2, 0.0).sum(1) / c
    dxi = np.where(inside, X2 - mxi[:, None], 0.0)
    dyi = np.where(inside, Y2 - myi[:, None], 0.0)
    f = 2.0 / math.log(2.0)
    smin, smax = 0.5 * s, 0.2 * a
    sx = np.clip(np.sqrt(np.maximum(f * ((dxi * dxi).sum(1) / c - s * s / 12), 0.0)), smin, smax)
    sy = np.clip(np.sqrt(np.maximum(f * ((dyi * dyi).sum(1) / c - s * s / 12), 0.0)), smin, smax)
    rho = np.clip(f * (dxi * dyi).sum(1) / c / (sx * sy), -0.8, 0.8)
    poor = (h <= 0) | (cnt < 3)
    sig = max(0.07 * a, smin)
    return {
        "x": np.where(poor, mx * s, x0),
        "y": np.where(poor, my * s, y0),
        "h": np.where(poor, np.maximum(h, 0.0), h),
        "bg": bg,
        "sx": np.where(poor, sig, sx),
        "sy": np.where(poor, sig, sy),
        "rho": np.where(poor, 0.0, rho),
    }


def _lm_batch(X, Y, T, p, lo, hi, max_iter=40, tol=1e-9):
    """Levenberg-Marquardt on a batch of independent windows: model = elliptical Gaussian
    (x0, y0, h, sx, sy, rho) + constant b, data ``T`` (n, P) at (X, Y); ``p`` (n, 7) initial values,
    clipped to [lo, hi] (projected steps). Returns (p, cost, J^T J, converged, iterations)."""
    n, P = T.shape
    eye = np.eye(7)
    ones = np.ones_like(T)

    def evaluate(q, jac):
        if not jac:
            g = _gauss_values(X, Y, q)
            g += q[:, 6, None] - T
            return g, None
        g, d = _gauss_cov(X, Y, *(q[:, c, None] for c in range(6)), jac=True)
        return g + q[:, 6, None] - T, np.stack(d + (ones,), axis=1)

    p = np.clip(p, lo, hi)
    r, J = evaluate(p, True)
    cost = np.einsum("np,np->n", r, r)
    lam = np.full(n, 1e-3)
    converged = np.zeros(n, dtype=bool)
    it = 0
    while it < max_iter:
        it += 1
        A = J @ J.transpose(0, 2, 1)
        grad = (J @ r[:, :, None])[:, :, 0]
        diag = np.diagonal(A, axis1=1, axis2=2)
        scale = np.maximum(diag, 1e-12 * diag.max(axis=1, keepdims=True) + 1e-300)
        M = A + (lam[:, None] * scale)[:, :, None] * eye
        step = -np.linalg.solve(M, grad[:, :, None])[:, :, 0]
        q = np.clip(p + step, lo, hi)
        rq, _ = evaluate(q, False)
        cq = np.einsum("np,np->n", rq, rq)
        better = (cq < cost) & ~converged
        rel = (cost - cq) / np.maximum(cost, 1e-300)
        small_step = np.all(np.abs(q - p) <= 1e-9 * (np.abs(p) + 1e-6), axis=1)
        converged |= (better & (rel < tol)) | small_step | (lam > 1e8)
        p = np.where(better[:, None], q, p)
        cost = np.where(better, cq, cost)
        lam = np.where(better, np.maximum(lam / 3.0, 1e-7), lam * 4.0)
        if converged.all():
            break
        if better.all():
            r, J = evaluate(p, True)
        elif better.any():
            sel = np.nonzero(better)[0]
            g, d = _gauss_cov(X[sel], Y[sel], *(p[sel, c, None] for c in range(6)), jac=True)
            r[sel] = g + p[sel, 6, None] - T[sel]
            J[sel] = np.stack(d + (ones[sel],), axis=1)
    r, J = evaluate(p, True)
    return p, np.einsum("np,np->n", r, r), J @ J.transpose(0, 2, 1), converged, it


def _linear_resolve(img, p, G, X, Y, L):
    """Global linear least squares of all heights and a constant background with positions and
    shapes ``p`` fixed; ``G``: the columns rendered on their stencils (X, Y, L). Returns
    (heights, background, unit-height Gaussians on the stencils)."""
    from scipy import sparse
    from scipy.sparse.linalg import spsolve

    n = p.shape[0]
    h = p[:, 2]
    g = G / np.where(h > 0, h, 1.0)[:, None]
    flat = np.nonzero(~(h > 0))[0]
    if flat.size:
        unit = p[flat].copy()
        unit[:, 2] = 1.0
        g[flat] = _gauss_values(X[flat], Y[flat], unit)
    npix = img.size
    A = sparse.csr_matrix((g.ravel(), (L.ravel(), np.repeat(np.arange(n), L.shape[1]))), shape=(npix, n))
    AtA = (A.T @ A).tocsr()
    colsum = np.asarray(A.sum(axis=0)).ravel()
    M = sparse.bmat([[AtA, colsum[:, None]], [colsum[None, :], np.array([[float(npix)]])]], format="csc")
    data = img.ravel()
    rhs = np.concatenate([A.T @ data, [data.sum()]])
    sol = spsolve(M, rhs)
    return sol[:n], float(sol[n]), g


def _fit_fast(img, s, grid, period, a, radius, max_pixels, n_sweeps=3):
    """Fit all columns of ``grid``: StatSTEM-style sweeps (sites in turn, each site's columns fitted
    at once with all other columns subtracted) alternating with a global linear re-solve of the
    heights and background. Returns (p (n, 7), cov (n, 7, 7), guess positions, converged, nfev,
    redchi, n_pixels)."""
    shape = img.shape
    smooth = ndimage.uniform_filter(img, size=3, mode="wrap")
    g = _moment_guess_batch(img, smooth, s, grid["x"].to_numpy(), grid["y"].to_numpy(), a)
    n = len(grid)
    smin, smax = 0.3 * s, 0.25 * a
    dpos = _DPOS_FRAC * a
    sx = np.clip(g["sx"], 1.05 * smin, 0.95 * smax)
    sy = np.clip(g["sy"], 1.05 * smin, 0.95 * smax)
    p = np.column_stack([g["x"], g["y"], np.maximum(g["h"], 1e-12), sx, sy, g["rho"], g["bg"]])
    guess_xy = p[:, :2].copy()
    lo = np.column_stack(
        [guess_xy - dpos, np.zeros(n), np.full(n, smin), np.full(n, smin), np.full(n, -_RHO_MAX), np.full(n, -np.inf)]
    )
    hi = np.column_stack(
        [
            guess_xy + dpos,
            np.full(n, np.inf),
            np.full(n, smax),
            np.full(n, smax),
            np.full(n, _RHO_MAX),
            np.full(n, np.inf),
        ]
    )
    ax_, ay_ = np.rint(guess_xy[:, 0] / s).astype(int), np.rint(guess_xy[:, 1] / s).astype(int)
    r_px = radius / s
    stride = max(1, math.ceil(math.sqrt(math.pi * r_px * r_px / max_pixels))) if max_pixels else 1
    fdi, fdj = _stencil(r_px, stride)
    # Neighbours are subtracted out to 4.5 major widths (the largest initial one), at least over
    # the fit window.
    major0 = float(np.max(cov_to_axes(sx, sy, g["rho"])[0]))
    r_render = max(radius + 1.5 * s, min(4.5 * max(major0, 0.05 * a), 0.75 * a))
    rdi, rdj = _stencil(r_render / s)
    Xr, Yr, Lr = _gather(shape, s, ax_, ay_, rdi, rdj)
    npix = shape[0] * shape[1]
    Xf, Yf, Lf = _gather(shape, s, ax_, ay_, fdi, fdj)
    D = img.ravel()[Lf]
    sites = grid["site"].to_numpy()
    groups = [np.nonzero(sites == site)[0] for site, *_ in SITES]
    groups = [gr for gr in groups if gr.size]
    converged = np.zeros(n, dtype=bool)
    nfev = np.zeros(n, dtype=int)
    A_all = np.full((n, 7, 7), np.nan)
    cost_all = np.zeros(n)
    G = _gauss_values(Xr, Yr, p)  # rendered columns (n, render pixels)
    full = np.bincount(Lr.ravel(), weights=G.ravel(), minlength=npix)
    for sweep in range(n_sweeps):
        for gr in groups:
            own = _gauss_values(Xf[gr], Yf[gr], p[gr])
            T = D[gr] - (full[Lf[gr]] - own)
            pg, cost, A, conv, it = _lm_batch(Xf[gr], Yf[gr], T, p[gr].copy(), lo[gr], hi[gr])
            p[gr] = pg
            converged[gr], nfev[gr], A_all[gr], cost_all[gr] = conv, nfev[gr] + it, A, cost
            Gg = _gauss_values(Xr[gr], Yr[gr], p[gr])
            full += np.bincount(Lr[gr].ravel(), weights=(Gg - G[gr]).ravel(), minlength=npix)
            G[gr] = Gg
        if sweep < n_sweeps - 1:
            heights, bg, unit = _linear_resolve(img, p, G, Xr, Yr, Lr)
            p[:, 2] = np.clip(heights, 0.0, None)
            p[:, 6] = bg
            G = unit * p[:, 2, None]
            full = np.bincount(Lr.ravel(), weights=G.ravel(), minlength=npix)
    dof = max(Lf.shape[1] - 7, 1)
    redchi = cost_all / dof
    cov = np.full((n, 7, 7), np.nan)
    try:
        cov = np.linalg.inv(A_all) * redchi[:, None, None]
    except np.linalg.LinAlgError:
        for k in range(n):
            try:
                cov[k] = np.linalg.inv(A_all[k]) * redchi[k]
            except np.linalg.LinAlgError:
                pass
    return p, cov, guess_xy, converged, nfev, redchi, np.full(n, Lf.shape[1]), smin, smax, dpos


def fit_columns(
    image,
    sampling_A,
    n_cells,
    cell_A,
    types=("Br",),
    window_A=None,
    seed=0,
    progress=False,
    origin_A=None,
    max_pixels=20000,
    neighbours="elliptical",
    method="window",
) -> pd.DataFrame:
    """Fit elliptical Gaussians to the columns of the given ``types`` (any of "PbBr", "Br", "FA").

    ``image`` (y, x) with ``sampling_A`` A/px spans the supercell ``cell_A = (Lx, Ly)`` A made of
    ``n_cells = (nx, ny)`` cubic cells. ``window_A``: diameter of the circular fit window around
    each column (default 1.2 lattice constants, so the four nearest neighbours are fitted with
    it). ``origin_A``: rigid lattice offset; refined from the data when None. ``max_pixels``: the
    window is subsampled on a regular stride when it would hold more pixels (None: never).
    ``seed`` seeds the perturbed restarts of fits that fail to converge. ``neighbours``:
    "elliptical" (default) or "round" Gaussians for the free neighbouring columns.

    ``method``:

    ``"window"`` (default)
        one lmfit fit per column in its window, neighbours inside the window free (reference path);
    ``"joint"``
        one lmfit fit of all columns of the image and a constant background at once (small images:
        the cost grows with the square of the number of columns);
    ``"fast"``
        all columns (every type) fitted by batched Levenberg-Marquardt on small windows
        (diameter ``window_A``, default 0.6 lattice constants; at most 1500 pixels each), in
        StatSTEM-style sweeps over the four sites with all other columns subtracted, alternating
        with a global linear re-solve of heights and background; ``neighbours`` and ``seed`` do
        not apply. Thousands of columns per second.

    Returns one row per fitted column (see ``RESULT_COLUMNS``; lengths in A, angles in degrees,
    the major-axis angle from +x in (-90, 90]); ``df.attrs`` holds origin_A, lattice and timing.
    Raises :class:`~octastem.io.InputError` for a non-finite image, an image that does not span
    the lattice, a lattice guess off by more than a quarter cell, or columns that are not found.
    """
    t0 = time.perf_counter()
    img, s, (nx, ny), (lx, ly), (ax, ay) = _check_geometry(image, sampling_A, n_cells, cell_A)
    types = (types,) if isinstance(types, str) else tuple(types)
    bad = [t for t in types if t not in TYPES]
    if bad or not types:
        raise InputError(f"types: expected a non-empty subset of {TYPES}, got {types!r}")
    a = min(ax, ay)
    if neighbours not in ("elliptical", "round"):
        raise InputError(f"neighbours: expected 'elliptical' or 'round', got {neighbours!r}")
    elliptical_nb = neighbours == "elliptical"

    offsets, contrasts, _ = _locate_pbbr(img, s, (nx, ny), (lx, ly))
    noise = _noise_sigma(img)
    if np.median(contrasts) <= 5 * noise:
        raise InputError(
            f"image: columns not found: PbBr peak contrast {np.median(contrasts):.3g} is not above "
            f"5x the pixel noise {noise:.3g}"
        )
    mx, my = _circular_mean(offsets[:, 0], ax), _circular_mean(offsets[:, 1], ay)
    scatter = np.hypot((offsets[:, 0] - mx + ax / 2) % ax - ax / 2, (offsets[:, 1] - my + ay / 2) % ay - ay / 2)
    if np.median(scatter) > 0.125 * a:
        raise InputError(
            f"lattice: the brightest peak of each cell does not repeat with the lattice of "
            f"n_cells = ({nx}, {ny}) over cell_A = ({lx}, {ly}) A (median scatter "
            f"{np.median(scatter):.2f} A about the mean offset); columns not found"
        )
    ox, oy = (mx, my) if origin_A is None else (float(v) for v in origin_A)
    if abs(ox) > ax / 4 or abs(oy) > ay / 4:
        raise InputError(
            f"lattice: the brightest (PbBr) columns sit ({ox:.2f}, {oy:.2f}) A from the ideal grid, "
            f"more than a quarter cell ({ax / 4:.2f}, {ay / 4:.2f}) A; check n_cells/cell_A or the contrast"
        )

    grid = column_grid((nx, ny), (lx, ly), (ox, oy))
    if method not in ("window", "joint", "fast"):
        raise InputError(f"method: expected 'window', 'joint' or 'fast', got {method!r}")
    if method in ("joint", "fast"):
        default_w = 0.6 * a if method == "fast" else 1.2 * a
        radius = 0.5 * (float(window_A) if window_A is not None else default_w)
        if not (radius > 2 * s):
            raise InputError(f"window_A: expected a window of several pixels, got {window_A!r}")
        if method == "fast":
            cap = min(max_pixels, _FAST_MAX_PIXELS) if max_pixels else _FAST_MAX_PIXELS
            p, cov, guess_xy, conv, nfev, redchi, npx, smin, smax, dpos = _fit_fast(
                img, s, grid, (lx, ly), a, radius, cap
            )
            rows = pd.DataFrame(_rows_from_arrays(p, cov, guess_xy, conv, nfev, redchi, npx, smin, smax, dpos))
        else:
            smooth = ndimage.uniform_filter(img, size=3, mode="wrap")
            gb = _moment_guess_batch(img, smooth, s, grid["x"].to_numpy(), grid["y"].to_numpy(), a)
            smin, smax = 0.3 * s, 0.25 * a
            init = pd.DataFrame(
                {
                    "x": gb["x"],
                    "y": gb["y"],
                    "height": np.maximum(gb["h"], 1e-12),
                    "sigma_x": gb["sx"],
                    "sigma_y": gb["sy"],
                    "rho": gb["rho"],
                }
            )
            rows = fit_joint(
                img,
                s,
                init,
                background=float(np.median(gb["bg"])),
                period=(lx, ly),
                dpos=_DPOS_FRAC * a,
                width_bounds=(smin, smax),
            )
            rows = rows.drop(columns=["sigma_x", "sigma_y", "rho"])
        rows = pd.concat([grid[["type", "site", "i", "j"]], rows], axis=1)
        df = rows[grid["type"].isin(types).to_numpy()].reset_index(drop=True)
        return _finish(
            df,
            types,
            (lx, ly),
            dict(
                origin_A=(ox, oy),
                lattice_A=(ax, ay),
                n_cells=(nx, ny),
                cell_A=(lx, ly),
                sampling_A=s,
                window_A=2 * radius,
                noise_sigma=noise,
                method=method,
                fit_seconds=time.perf_counter() - t0,
            ),
        )

    smooth = ndimage.uniform_filter(img, size=3, mode="wrap")
    g = [_moment_guess(img, smooth, s, x, y, a) for x, y in zip(grid["x"], grid["y"])]
    guesses = {k: np.array([d[k] for d in g]) for k in ("x", "y", "h", "bg", "sx", "sy", "rho")}
    guesses["smax"] = float(np.sqrt(guesses["sx"] * guesses["sy"]).max())

    radius = 0.5 * (float(window_A) if window_A is not None else 1.2 * a)
    if not (radius > 2 * s):
        raise InputError(f"window_A: expected a window of several pixels, got {window_A!r}")
    smin, smax = 0.3 * s, 0.25 * a
    targets = np.nonzero(grid["type"].isin(types).to_numpy())[0]
    rng = np.random.default_rng(seed)
    iterator = targets
    if progress:
        from tqdm import tqdm

        iterator = tqdm(targets, desc="fit columns", unit="col")
    rows = []
    for n in iterator:
        target = dict(g[n], index=int(n))
        res, npx = _fit_window(img, s, target, guesses, (lx, ly), a, radius, max_pixels, elliptical_nb)
        row = _row_from_result(res, target, npx, smin, smax, _DPOS_FRAC * a)
        for _ in range(2):
            if row["flag"] not in ("not_converged", "shape_at_bound"):
                break
            jitter = (rng.uniform(0.8, 1.25), rng.uniform(0.8, 1.25), rng.uniform(-0.3, 0.3))
            res2, npx = _fit_window(img, s, target, guesses, (lx, ly), a, radius, max_pixels, elliptical_nb, jitter)
            row2 = _row_from_result(res2, target, npx, smin, smax, _DPOS_FRAC * a)
            if row2["flag"] == "ok" or (res2.chisqr < res.chisqr and row["flag"] != "ok"):
                row, res = row2, res2
        site = grid["site"].iat[n]
        rows.append(
            dict(
                type=grid["type"].iat[n],
                site=site,
                i=int(grid["i"].iat[n]),
                j=int(grid["j"].iat[n]),
                **row,
            )
        )
    return _finish(
        pd.DataFrame(rows),
        types,
        (lx, ly),
        dict(
            origin_A=(ox, oy),
            lattice_A=(ax, ay),
            n_cells=(nx, ny),
            cell_A=(lx, ly),
            sampling_A=s,
            window_A=2 * radius,
            noise_sigma=noise,
            method=method,
            fit_seconds=time.perf_counter() - t0,
        ),
    )


def _finish(df, types, period, attrs):
    """Wrap positions, add the angle to the Pb-Br-Pb bond, order the columns, check the success rate."""
    lx, ly = period
    for col in RESULT_COLUMNS:
        if col not in df:
            df[col] = pd.Series(dtype=float)
    df["x"] = df["x"] % lx
    df["y"] = df["y"] % ly
    bond = df["site"].map(_BOND_ANGLE_DEG).astype(float)
    d = np.abs((df["angle_deg"] - bond + 90.0) % 180.0 - 90.0)
    df["angle_to_bond_deg"] = d
    df = df[RESULT_COLUMNS].copy()
    df["success"] = df["success"].astype(bool)

    n_ok = int(df["success"].sum())
    if n_ok < max(1, 0.5 * len(df)):
        flags = df["flag"].value_counts().to_dict()
        raise InputError(
            f"image: columns not found: only {n_ok} of {len(df)} {'/'.join(types)} column fits "
            f"succeeded (flags {flags}); check the lattice (n_cells, cell_A) and the image contrast"
        )
    df.attrs.update(attrs)
    return df


# ----------------------------------------------------------------------------------------------
# Synthetic images and the noise bias of the ellipticity
# ----------------------------------------------------------------------------------------------


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
    if periodic:
        g = _gauss_cov(X, Y, *(p[:, c, None] for c in range(6)))
        img += np.bincount(L.ravel(), weights=g.ravel(), minlength=nx * ny).reshape(ny, nx)
        return img
    IX, IY = ax_[:, None] + di[None, :], ay_[:, None] + dj[None, :]
    inside = (IX >= 0) & (IX < nx) & (IY >= 0) & (IY < ny)
    g = _gauss_cov(X, Y, *(p[:, c, None] for c in range(6)))
    img += np.bincount((IY * nx + IX)[inside], weights=g[inside], minlength=nx * ny).reshape(ny, nx)
    return img


def _structure(image, s, df, n_cells, cell_A):
    """All lattice columns as (x, y, height, sigma_major, ratio, angle_deg) with the fitted values
    where ``df`` has a successful fit and values of the fast fit (all columns) elsewhere; and the
    background."""
    img, s, (nx, ny), (lx, ly), (ax, ay) = _check_geometry(image, s, n_cells, cell_A)
    a = min(ax, ay)
    origin = df.attrs.get("origin_A") or refine_origin(img, s, (nx, ny), (lx, ly))
    grid = column_grid((nx, ny), (lx, ly), origin)
    p, *_ = _fit_fast(img, s, grid, (lx, ly), a, 0.3 * a, _FAST_MAX_PIXELS)
    major, minor, ang = cov_to_axes(p[:, 3], p[:, 4], p[:, 5])
    cols = pd.DataFrame(
        {
            "type": grid["type"],
            "site": grid["site"],
            "i": grid["i"],
            "j": grid["j"],
            "x": p[:, 0],
            "y": p[:, 1],
            "height": np.maximum(p[:, 2], 0.0),
            "sigma_major": major,
            "ratio": major / np.maximum(minor, 1e-12),
            "angle_deg": np.degrees(ang),
        }
    )
    ok = df[df["success"].astype(bool)]
    key = ["type", "site", "i", "j"]
    m = cols[key].merge(ok[key + ["x", "y", "height", "sigma_major", "sigma_minor", "angle_deg"]], on=key, how="left")
    fitted = m["x"].notna().to_numpy()
    for c in ("x", "y", "height", "sigma_major", "angle_deg"):
        cols.loc[fitted, c] = m.loc[fitted, c].to_numpy()
    cols.loc[fitted, "ratio"] = (m.loc[fitted, "sigma_major"] / m.loc[fitted, "sigma_minor"]).to_numpy()
    bg = float(ok["background"].median()) if len(ok) else float(np.median(p[:, 6]))
    return img, cols, fitted, bg


def round_baseline(
    image,
    sampling_A,
    df,
    n_cells,
    cell_A,
    noise="gaussian",
    noise_sigma=None,
    types=None,
    window_A=None,
    method=None,
    se_method="asymptotic",
    n_boot=2000,
    seed=0,
    max_pixels=20000,
    neighbours="elliptical",
) -> dict:
    """Median ellipticity that noise alone produces: the baseline for the measured value.

    The structure fitted in ``df`` (from :func:`fit_columns` on ``image``) is synthesised with
    every fitted column made round (same position and height, width the geometric mean
    ``sqrt(sigma_major * sigma_minor)``), the other lattice columns likewise (from the fast fit),
    the fitted background, and noise of the same level: ``noise="gaussian"`` with pixel SD
    ``noise_sigma`` (default: robust SD (1.4826 MAD) of the residual image minus the fitted
    elliptical model), or ``noise="poisson"`` (the image is in counts). That image is fitted with
    the same settings (``types``, ``window_A``, ``method``; default those in ``df``) and the
    median ellipticity of each type is returned: ``{type: {n, median_ellipticity, se, se_method}}``
    plus ``noise_sigma``, ``noise`` and ``seed`` entries.
    """
    img, cols, fitted, bg = _structure(image, sampling_A, df, n_cells, cell_A)
    s = float(sampling_A)
    if noise not in ("gaussian", "poisson"):
        raise InputError(f"noise: expected 'gaussian' or 'poisson', got {noise!r}")
    measured = model_image(img.shape, s, cols, bg)
    if noise_sigma is None:
        res = (img - measured).ravel()
        noise_sigma = float(1.4826 * np.median(np.abs(res - np.median(res))))
    round_cols = cols.copy()
    round_cols["sigma_major"] = cols["sigma_major"] / np.sqrt(cols["ratio"])  # sqrt(major * minor)
    round_cols["ratio"] = 1.0
    clean = model_image(img.shape, s, round_cols, bg)
    rng = np.random.default_rng(seed)
    if noise == "poisson":
        if np.any(clean < 0):
            raise InputError("round_baseline: Poisson noise needs a non-negative model (an image in counts)")
        synth = rng.poisson(clean).astype(float)
    else:
        synth = clean + rng.normal(0.0, noise_sigma, clean.shape)
    types = tuple(sorted(set(df["type"]))) if types is None else ((types,) if isinstance(types, str) else tuple(types))
    fit = fit_columns(
        synth,
        s,
        n_cells,
        cell_A,
        types=types,
        window_A=window_A if window_A is not None else df.attrs.get("window_A"),
        seed=seed,
        max_pixels=max_pixels,
        neighbours=neighbours,
        method=method if method is not None else df.attrs.get("method", "window"),
    )
    out = {"noise": noise, "noise_sigma": float(noise_sigma), "seed": int(seed)}
    for typ in types:
        ok = fit[(fit["type"] == typ) & fit["success"]]
        if len(ok) >= 2:
            med, se = median_se(ok["ellipticity"], method=se_method, n_boot=n_boot, seed=seed)
        else:
            med, se = (float(ok["ellipticity"].iloc[0]) if len(ok) else math.nan), math.nan
        out[typ] = {"n": int(len(ok)), "median_ellipticity": float(med), "se": float(se), "se_method": se_method}
    return out


# ----------------------------------------------------------------------------------------------
# Summary, files, figure
# ----------------------------------------------------------------------------------------------


def _axial_mean_deg(angles_deg):
    """Mean of axial angles (mod 180 deg) and the resultant length R in [0, 1] (1: all aligned)."""
    t = np.radians(2 * np.asarray(angles_deg, dtype=float))
    if t.size == 0:
        return math.nan, math.nan
    c, s = np.cos(t).mean(), np.sin(t).mean()
    return float(np.degrees(0.5 * math.atan2(s, c))), float(math.hypot(c, s))


def summarize(df: pd.DataFrame, se_method: str = "asymptotic", n_boot: int = 2000, seed: int = 0) -> dict:
    """Per column type (and per site): number of successful fits, median ellipticity with its
    standard error (``se``, by ``se_method`` as in :func:`octastem.stats.median_se`, named in
    ``se_method``; both ``se_asymptotic`` and ``se_bootstrap`` are reported as well), mean/median
    widths and the axial mean of the major-axis angle (deg, mod 180) with its resultant length.
    For Br: the median angle between the major axis and the Pb-Br-Pb bond
    (``median_angle_to_bond_deg``, 0-90 deg) and the fraction of columns whose major axis is
    closer to perpendicular than to parallel to the bond (``fraction_perpendicular``)."""
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
            entry["by_site"] = by_site
        out[typ] = entry
    return out


def fit_image_file(
    image_path,
    out_csv,
    out_json,
    n_cells=None,
    cell_A=None,
    types=("Br",),
    window_A=None,
    se_method="asymptotic",
    n_boot=2000,
    seed=0,
    plot_path=None,
    progress=False,
    max_pixels=20000,
    neighbours="elliptical",
    method="window",
    baseline=True,
    noise="gaussian",
) -> dict:
    """Fit the image file ``image_path`` (see :func:`octastem.io.read_image`) and write the per-column
    table ``out_csv`` and the JSON summary ``out_json`` (and the figure ``plot_path`` if given),
    all atomically. ``n_cells``/``cell_A`` default to the image attributes of the same names;
    ``method`` as in :func:`fit_columns`.

    With ``baseline`` the noise bias of the ellipticity is measured by :func:`round_baseline`
    (same structure with round columns, same noise level (``noise``), same fit settings) and
    written beside the measured value of each type as ``baseline_median_ellipticity`` and
    ``baseline_se`` (its noise model under the top-level key ``baseline``).
    Returns the summary dict written to JSON."""
    image_path = Path(image_path)
    image, attrs = read_image(image_path)
    if n_cells is None:
        n_cells = attrs.get("n_cells")
    if cell_A is None:
        cell_A = attrs.get("cell_A")
    if n_cells is None or cell_A is None:
        raise InputError(
            f"{image_path}: lattice unknown: pass n_cells and cell_A or store them as attributes "
            f"'n_cells' and 'cell_A' of dataset 'image'"
        )
    try:
        df = fit_columns(
            image,
            attrs["sampling_A"],
            n_cells,
            cell_A,
            types=types,
            window_A=window_A,
            seed=seed,
            progress=progress,
            max_pixels=max_pixels,
            neighbours=neighbours,
            method=method,
        )
    except InputError as e:
        raise InputError(f"{image_path}: {e}") from e
    base, baseline_error = None, None
    if baseline:
        # a secondary estimate: when the round columns cannot be fitted at this noise level the
        # measured values stand without it (NaN baseline, reason in the summary)
        try:
            base = round_baseline(
                image,
                attrs["sampling_A"],
                df,
                n_cells,
                cell_A,
                noise=noise,
                types=types,
                window_A=window_A,
                method=method,
                se_method=se_method,
                n_boot=n_boot,
                seed=seed + 1,
                max_pixels=max_pixels,
                neighbours=neighbours,
            )
        except InputError as e:
            baseline_error = str(e)
            log.warning("%s: no round-column baseline: %s", image_path, e)
            base = {}
    per_type = summarize(df, se_method=se_method, n_boot=n_boot, seed=seed)
    if base is not None:
        for typ, entry in per_type.items():
            b = base.get(typ, {})
            entry["baseline_median_ellipticity"] = b.get("median_ellipticity", math.nan)
            entry["baseline_se"] = b.get("se", math.nan)
    summary = {
        "source": str(image_path),
        "kind": attrs.get("kind"),
        "sampling_A": float(attrs["sampling_A"]),
        "n_cells": list(df.attrs["n_cells"]),
        "cell_A": list(df.attrs["cell_A"]),
        "lattice_A": list(df.attrs["lattice_A"]),
        "origin_A": list(df.attrs["origin_A"]),
        "window_A": df.attrs["window_A"],
        "noise_sigma": df.attrs["noise_sigma"],
        "types": list(types) if not isinstance(types, str) else [types],
        "fit_seconds": df.attrs["fit_seconds"],
        "method": method,
        "summary": per_type,
        "baseline": None
        if base is None
        else {"error": baseline_error}
        if baseline_error
        else {k: base[k] for k in ("noise", "noise_sigma", "seed")},
        "provenance": provenance(
            seed=seed,
            se_method=se_method,
            max_pixels=max_pixels,
            neighbours=neighbours,
            method=method,
            baseline=bool(baseline),
            noise=noise,
        ),
    }
    with atomic_path(out_csv) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")
    write_json(out_json, summary)
    if plot_path is not None:
        plot_model(image, attrs["sampling_A"], df, plot_path)
    return summary


def plot_model(image, sampling_A, df: pd.DataFrame, path, title: str | None = None) -> None:
    """Save a PNG of ``image`` with the fitted 2-sigma ellipses, coloured by ellipticity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Ellipse

    img = np.asarray(image, dtype=float)
    s = float(sampling_A)
    ny, nx = img.shape
    fig, ax = plt.subplots(figsize=(6, 6 * ny / nx + 0.3), dpi=120)
    ax.imshow(img, cmap="gray", origin="upper", extent=(-s / 2, (nx - 0.5) * s, (ny - 0.5) * s, -s / 2))
    ok = df[df["success"].astype(bool)] if "success" in df else df
    vals = ok["ellipticity"].to_numpy(dtype=float)
    vmax = max(1.05, float(np.nanmax(vals))) if vals.size else 1.5
    norm = matplotlib.colors.Normalize(vmin=1.0, vmax=vmax)
    cmap = matplotlib.colormaps["viridis"]
    for row in ok.itertuples():
        ax.add_patch(
            Ellipse(
                (row.x, row.y),
                4 * row.sigma_major,
                4 * row.sigma_minor,
                angle=row.angle_deg,
                fill=False,
                lw=1.2,
                color=cmap(norm(row.ellipticity)),
            )
        )
    sm = matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(sm, ax=ax, label="ellipticity (major/minor)", fraction=0.046, pad=0.04)
    ax.set_xlabel("x (A)")
    ax.set_ylabel("y (A)")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
