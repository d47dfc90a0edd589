"""The "window" engine: one lmfit fit per column in a circular window around it (the reference path).

The model of a window (with periodic wrap: the image spans an integer number of cells of a
periodic supercell) is

- an elliptical Gaussian for the column itself,
- a linear background,
- Gaussians for the neighbouring columns whose centres lie inside the window (elliptical by
  default, or round; position, height and widths free), and fixed Gaussians (shape from image
  moments) for the columns just outside, so that the tails of bright neighbours do not widen the
  fitted column.

Fits that do not converge or end with the shape on a bound are restarted (twice at most) from
seeded random perturbations of the initial widths and correlation.
"""

from __future__ import annotations

import math

import lmfit
import numpy as np
import pandas as pd

from octastem.fit.lattice import GUESS_RHO_MAX, _moment_guess, _patch, _smooth
from octastem.fit.model import (
    DPOS_FRAC,
    RHO_MAX,
    WINDOW_FRAC,
    _gauss_cov,
    _gauss_round,
    cov_to_axes,
    start_width,
    width_bounds,
    window_radius,
)
from octastem.fit.rows import _axes_stderr
from octastem.rng import generator

#: Perturbed restarts of a failed window fit, and the range of their perturbations: factors of
#: the initial sigma_x and sigma_y, and a shift of the initial rho.
N_RESTARTS = 2
JITTER_SIGMA = (0.8, 1.25)
JITTER_RHO = 0.3


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


def _neighbours(X, Y, xc, yc, target, guesses, period, radius):
    """Columns (all periodic images) near the window: the initial (x, y, h, sx, sy, rho) of those
    inside it (fitted free) and the rendered sum of those just outside (held fixed)."""
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
    return free, fixed


def _fit_window(img, s, target, guesses, period, a, radius, max_pixels, elliptical_nb, jitter=None):
    """Fit one column; ``target`` is its guess dict; ``guesses`` all columns (arrays), ``period``
    the supercell size (wrap of the neighbours)."""
    xc, yc = target["x"], target["y"]
    npx_est = math.pi * radius * radius / (s * s)
    stride = max(1, math.ceil(math.sqrt(npx_est / max_pixels))) if max_pixels else 1
    X, Y, V = _patch(img, s, xc, yc, radius, stride)
    free, fixed = _neighbours(X, Y, xc, yc, target, guesses, period, radius)

    wm = _WindowModel(X, Y, V, xc, yc, len(free), fixed, elliptical_nb)
    smin, smax = width_bounds(s, a)
    dpos = DPOS_FRAC * a
    h0 = max(target["h"], 1e-12)
    sx0, sy0, rho0 = target["sx"], target["sy"], target["rho"]
    if jitter is not None:
        sx0, sy0 = sx0 * jitter[0], sy0 * jitter[1]
        rho0 = float(np.clip(rho0 + jitter[2], -GUESS_RHO_MAX, GUESS_RHO_MAX))
    p = lmfit.Parameters()
    p.add("x0", value=xc, min=xc - dpos, max=xc + dpos)
    p.add("y0", value=yc, min=yc - dpos, max=yc + dpos)
    p.add("height", value=h0, min=0.0)
    p.add("sx", value=float(start_width(sx0, smin, smax)), min=smin, max=smax)
    p.add("sy", value=float(start_width(sy0, smin, smax)), min=smin, max=smax)
    p.add("rho", value=rho0, min=-RHO_MAX, max=RHO_MAX)
    p.add("b0", value=target["bg"])
    p.add("bx", value=0.0)
    p.add("by", value=0.0)
    for k, (nx_, ny_, nh, nsx, nsy, nrho) in enumerate(free):
        p.add(f"n{k}_x", value=nx_, min=nx_ - dpos, max=nx_ + dpos)
        p.add(f"n{k}_y", value=ny_, min=ny_ - dpos, max=ny_ + dpos)
        p.add(f"n{k}_h", value=max(nh, 1e-12), min=0.0)
        if elliptical_nb:
            p.add(f"n{k}_sx", value=float(start_width(nsx, smin, smax)), min=smin, max=smax)
            p.add(f"n{k}_sy", value=float(start_width(nsy, smin, smax)), min=smin, max=smax)
            p.add(f"n{k}_rho", value=float(nrho), min=-RHO_MAX, max=RHO_MAX)
        else:
            ns = math.sqrt(nsx * nsy)
            p.add(f"n{k}_s", value=float(start_width(ns, smin, smax)), min=smin, max=smax)

    mini = lmfit.Minimizer(wm.residual, p)
    res = mini.minimize(method="leastsq", Dfun=wm.jacobian, col_deriv=0)
    if list(res.var_names) != wm.names:  # pragma: no cover - guards the Jacobian column order
        raise RuntimeError("parameter order of the window model changed")
    return res, X.size


def _row_from_result(res, target, n_pixels, smin, smax, dpos):
    """Result row (dict, keys of ``RESULT_COLUMNS`` less the labels) of one lmfit window fit."""
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
        or abs(abs(rho) - RHO_MAX) < 1e-4
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


def fit_windows(img, lattice, grid, types, *, window_A, max_pixels, elliptical_neighbours, seed, progress, **_):
    """Engine "window" of :func:`octastem.fit.fit_columns`: every column of ``types`` in ``grid``
    fitted in its window (diameter ``window_A``, default :data:`WINDOW_FRAC` lattice constants).
    Returns (rows, window radius in A)."""
    s, a = lattice.sampling_A, lattice.a
    smooth = _smooth(img)
    g = [_moment_guess(img, smooth, s, x, y, a) for x, y in zip(grid["x"], grid["y"])]
    guesses = {k: np.array([d[k] for d in g]) for k in ("x", "y", "h", "bg", "sx", "sy", "rho")}
    guesses["smax"] = float(np.sqrt(guesses["sx"] * guesses["sy"]).max())

    radius = window_radius(window_A, WINDOW_FRAC, a, s)
    smin, smax = width_bounds(s, a)
    dpos = DPOS_FRAC * a
    targets = np.nonzero(grid["type"].isin(types).to_numpy())[0]
    rng = generator(seed, "fit_restarts")
    iterator = targets
    if progress:
        from tqdm import tqdm

        iterator = tqdm(targets, desc="fit columns", unit="col")
    rows = []
    for n in iterator:
        target = dict(g[n], index=int(n))
        fit = (img, s, target, guesses, lattice.cell_A, a, radius, max_pixels, elliptical_neighbours)
        res, npx = _fit_window(*fit)
        row = _row_from_result(res, target, npx, smin, smax, dpos)
        for _ in range(N_RESTARTS):
            if row["flag"] not in ("not_converged", "shape_at_bound"):
                break
            jitter = (rng.uniform(*JITTER_SIGMA), rng.uniform(*JITTER_SIGMA), rng.uniform(-JITTER_RHO, JITTER_RHO))
            res2, npx = _fit_window(*fit, jitter)
            row2 = _row_from_result(res2, target, npx, smin, smax, dpos)
            if row2["flag"] == "ok" or (res2.chisqr < res.chisqr and row["flag"] != "ok"):
                row, res = row2, res2
        rows.append(
            dict(
                type=grid["type"].iat[n],
                site=grid["site"].iat[n],
                i=int(grid["i"].iat[n]),
                j=int(grid["j"].iat[n]),
                **row,
            )
        )
    return pd.DataFrame(rows), radius
