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
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import lmfit
import numpy as np
import pandas as pd
from scipy import ndimage

from .io import InputError, atomic_path, provenance, read_image, write_json
from .stats import median_se

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
) -> pd.DataFrame:
    """Fit elliptical Gaussians to the columns of the given ``types`` (any of "PbBr", "Br", "FA").

    ``image`` (y, x) with ``sampling_A`` A/px spans the supercell ``cell_A = (Lx, Ly)`` A made of
    ``n_cells = (nx, ny)`` cubic cells. ``window_A``: diameter of the circular fit window around
    each column (default 1.2 lattice constants, so the four nearest neighbours are fitted with
    it). ``origin_A``: rigid lattice offset; refined from the data when None. ``max_pixels``: the
    window is subsampled on a regular stride when it would hold more pixels (None: never).
    ``seed`` seeds the perturbed restarts of fits that fail to converge. ``neighbours``:
    "elliptical" (default) or "round" Gaussians for the free neighbouring columns.

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
    df = pd.DataFrame(rows)
    for col in RESULT_COLUMNS:
        if col not in df:
            df[col] = pd.Series(dtype=float)
    df["x"] = df["x"] % lx
    df["y"] = df["y"] % ly
    bond = df["site"].map(_BOND_ANGLE_DEG).astype(float)
    d = np.abs((df["angle_deg"] - bond + 90.0) % 180.0 - 90.0)
    df["angle_to_bond_deg"] = d
    df = df[RESULT_COLUMNS]

    n_ok = int(df["success"].sum())
    if n_ok < max(1, 0.5 * len(df)):
        flags = df["flag"].value_counts().to_dict()
        raise InputError(
            f"image: columns not found: only {n_ok} of {len(df)} {'/'.join(types)} column fits "
            f"succeeded (flags {flags}); check the lattice (n_cells, cell_A) and the image contrast"
        )
    df.attrs.update(
        origin_A=(ox, oy),
        lattice_A=(ax, ay),
        n_cells=(nx, ny),
        cell_A=(lx, ly),
        sampling_A=s,
        window_A=2 * radius,
        noise_sigma=noise,
        fit_seconds=time.perf_counter() - t0,
    )
    return df


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
    standard error (``se_method`` as in :func:`octastem.stats.median_se`), mean/median widths and
    the axial mean of the major-axis angle (deg, mod 180) with its resultant length."""
    out = {}
    for typ in [t for t in TYPES if t in set(df["type"])]:
        sub = df[df["type"] == typ]
        ok = sub[sub["success"].astype(bool)]
        entry = {"n": len(ok), "n_failed": int(len(sub) - len(ok)), "se_method": se_method}
        if len(ok) >= 2:
            med, se = median_se(ok["ellipticity"], method=se_method, n_boot=n_boot, seed=seed)
        elif len(ok) == 1:
            med, se = float(ok["ellipticity"].iloc[0]), math.nan
        else:
            med, se = math.nan, math.nan
        entry.update(median_ellipticity=med, se=se)
        entry["mean_ellipticity"] = float(ok["ellipticity"].mean()) if len(ok) else math.nan
        entry["median_sigma_major_A"] = float(ok["sigma_major"].median()) if len(ok) else math.nan
        entry["median_sigma_minor_A"] = float(ok["sigma_minor"].median()) if len(ok) else math.nan
        mean_angle, resultant = _axial_mean_deg(ok["angle_deg"])
        entry.update(mean_angle_deg=mean_angle, angle_resultant=resultant)
        if typ == "Br":
            entry["median_angle_to_bond_deg"] = float(ok["angle_to_bond_deg"].median()) if len(ok) else math.nan
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
) -> dict:
    """Fit the image file ``image_path`` (see :func:`octastem.io.read_image`) and write the per-column
    table ``out_csv`` and the JSON summary ``out_json`` (and the figure ``plot_path`` if given),
    all atomically. ``n_cells``/``cell_A`` default to the image attributes of the same names.
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
        )
    except InputError as e:
        raise InputError(f"{image_path}: {e}") from e
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
        "summary": summarize(df, se_method=se_method, n_boot=n_boot, seed=seed),
        "provenance": provenance(seed=seed, se_method=se_method, max_pixels=max_pixels, neighbours=neighbours),
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
