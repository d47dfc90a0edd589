"""The "joint" engine: one lmfit fit of all columns of an image and a constant background at once.

:func:`fit_joint` is the general joint least-squares fit of elliptical Gaussians (any columns, any
image, optionally periodic and weighted): the maximum-likelihood estimate for Gaussian noise, and
the reference of the Cramér-Rao tests. :func:`fit_joint_lattice` applies it to the lattice of
:func:`octastem.fit.fit_columns` (small images: the cost grows with the square of the number of
columns).
"""

from __future__ import annotations

import math

import lmfit
import numpy as np
import pandas as pd

from octastem.fit.lattice import moment_guesses
from octastem.fit.model import (
    DPOS_FRAC,
    RHO_MAX,
    SIGMA_MIN_PX,
    WINDOW_FRAC,
    _gauss_cov,
    axes_to_cov,
    window_radius,
)
from octastem.fit.model import width_bounds as lattice_width_bounds
from octastem.fit.rows import rows_from_arrays, select_types
from octastem.io import InputError


def _wrap(X, x0, period):
    """``X`` moved by whole periods to lie within half a period of ``x0`` (no-op without a period)."""
    if period is None:
        return X
    return x0 + (X - x0 + 0.5 * period) % period - 0.5 * period


def _initial_table(columns) -> pd.DataFrame:
    """The columns' initial values with (sigma_x, sigma_y, rho), from the axes where not given."""
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
    return cols


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
    cols = _initial_table(columns)
    ny, nx = img.shape
    Y, X = (v.ravel() * s for v in np.mgrid[0:ny, 0:nx])
    data = img.ravel()
    w = None if weights is None else np.asarray(weights, dtype=float).ravel()
    if w is not None and (w.shape != data.shape or not np.all(np.isfinite(w)) or np.any(w < 0)):
        raise InputError("fit_joint: weights must be finite, >= 0 and of the image's shape")
    px, py = (None, None) if period is None else (float(period[0]), float(period[1]))
    if width_bounds is None:  # the lower width bound of the lattice fits, no upper bound
        smin, smax = SIGMA_MIN_PX * s, np.inf
    else:
        smin, smax = float(width_bounds[0]), float(width_bounds[1])
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
        p.add(f"c{k}_rho", value=float(np.clip(r.rho, -0.9, 0.9)), min=-RHO_MAX, max=RHO_MAX)
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
    return _joint_rows(res, cp, b, cols, px, py, smin, smax, dpos, X.size)


def _joint_rows(res, cp, b, cols, px, py, smin, smax, dpos, n_pixels) -> pd.DataFrame:
    """Result rows of a joint fit (one per column) from the fitted column parameters ``cp`` (K, 6)
    and background ``b``, with the background, quality and cost of the fit in ``attrs``."""
    K = len(cols)
    par = np.column_stack([cp, np.full(K, b)])
    cov = np.full((K, 7, 7), np.nan)
    if res.covar is not None:
        for k in range(K):
            idx = [6 * k + c for c in range(6)] + [6 * K]
            cov[k] = res.covar[np.ix_(idx, idx)]
    guess_xy = cols[["x", "y"]].to_numpy(dtype=float)
    rows = rows_from_arrays(
        par,
        cov,
        guess_xy,
        np.full(K, bool(res.success)),
        np.full(K, res.nfev),
        np.full(K, res.redchi),
        np.full(K, n_pixels),
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


def fit_joint_lattice(img, lattice, grid, types, *, window_A, **_):
    """Engine "joint" of :func:`octastem.fit.fit_columns`: all columns of ``grid`` from their moment
    guesses fitted at once by :func:`fit_joint` (periodic image, the lattice fits' bounds); rows of
    the columns of ``types``. ``window_A`` (default :data:`WINDOW_FRAC` lattice constants) is only
    checked and reported. Returns (rows, window radius in A)."""
    s, a = lattice.sampling_A, lattice.a
    radius = window_radius(window_A, WINDOW_FRAC, a, s)
    gb = moment_guesses(img, s, grid, a)
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
        period=lattice.cell_A,
        dpos=DPOS_FRAC * a,
        width_bounds=lattice_width_bounds(s, a),
    )
    rows = rows.drop(columns=["sigma_x", "sigma_y", "rho"])
    return select_types(grid, rows, types), radius
