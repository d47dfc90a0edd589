"""The "fast" engine: batched Levenberg-Marquardt on all windows at once, with neighbour subtraction.

Every column (all types) is fitted in a small window by an elliptical Gaussian plus a constant, in
StatSTEM-style sweeps over the four sites (the columns of one site fitted at once, with all other
columns subtracted), alternating with a global linear re-solve of the heights and background.
Thousands of columns per second.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from octastem.fit.lattice import SITES, moment_guesses
from octastem.fit.model import (
    DPOS_FRAC,
    FAST_MAX_PIXELS,
    FAST_WINDOW_FRAC,
    RHO_MAX,
    _gather,
    _gauss_cov,
    _gauss_values,
    _stencil,
    cov_to_axes,
    start_width,
    width_bounds,
    window_radius,
)
from octastem.fit.rows import rows_from_arrays, select_types


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


def _start(g, n, s, a):
    """Initial parameters (n, 7) from the moment guesses ``g``, their bounds (lo, hi), the guessed
    positions, the largest initial major width, the width bounds and the position range."""
    smin, smax = width_bounds(s, a)
    dpos = DPOS_FRAC * a
    sx = start_width(g["sx"], smin, smax)
    sy = start_width(g["sy"], smin, smax)
    p = np.column_stack([g["x"], g["y"], np.maximum(g["h"], 1e-12), sx, sy, g["rho"], g["bg"]])
    guess_xy = p[:, :2].copy()
    lo = np.column_stack(
        [guess_xy - dpos, np.zeros(n), np.full(n, smin), np.full(n, smin), np.full(n, -RHO_MAX), np.full(n, -np.inf)]
    )
    hi = np.column_stack(
        [
            guess_xy + dpos,
            np.full(n, np.inf),
            np.full(n, smax),
            np.full(n, smax),
            np.full(n, RHO_MAX),
            np.full(n, np.inf),
        ]
    )
    major0 = float(np.max(cov_to_axes(sx, sy, g["rho"])[0]))
    return p, lo, hi, guess_xy, major0, smin, smax, dpos


def _covariance(A_all, redchi):
    """Parameter covariances ``inv(J^T J) * redchi`` per window (NaN where singular)."""
    n = A_all.shape[0]
    cov = np.full((n, 7, 7), np.nan)
    try:
        cov = np.linalg.inv(A_all) * redchi[:, None, None]
    except np.linalg.LinAlgError:
        for k in range(n):
            try:
                cov[k] = np.linalg.inv(A_all[k]) * redchi[k]
            except np.linalg.LinAlgError:
                pass
    return cov


def _fit_fast(img, s, grid, period, a, radius, max_pixels, n_sweeps=3):
    """Fit all columns of ``grid``: StatSTEM-style sweeps (sites in turn, each site's columns fitted
    at once with all other columns subtracted) alternating with a global linear re-solve of the
    heights and background. Returns (p (n, 7), cov (n, 7, 7), guess positions, converged, nfev,
    redchi, n_pixels, smin, smax, dpos)."""
    shape = img.shape
    g = moment_guesses(img, s, grid, a)
    n = len(grid)
    p, lo, hi, guess_xy, major0, smin, smax, dpos = _start(g, n, s, a)
    ax_, ay_ = np.rint(guess_xy[:, 0] / s).astype(int), np.rint(guess_xy[:, 1] / s).astype(int)
    r_px = radius / s
    stride = max(1, math.ceil(math.sqrt(math.pi * r_px * r_px / max_pixels))) if max_pixels else 1
    fdi, fdj = _stencil(r_px, stride)
    # Neighbours are subtracted out to 4.5 major widths (the largest initial one), at least over
    # the fit window.
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
    cov = _covariance(A_all, redchi)
    return p, cov, guess_xy, converged, nfev, redchi, np.full(n, Lf.shape[1]), smin, smax, dpos


def fit_fast_lattice(img, lattice, grid, types, *, window_A, max_pixels, **_):
    """Engine "fast" of :func:`octastem.fit.fit_columns`: all columns of ``grid`` fitted by
    :func:`_fit_fast` in windows of diameter ``window_A`` (default :data:`FAST_WINDOW_FRAC` lattice
    constants) of at most :data:`FAST_MAX_PIXELS` pixels (fewer with ``max_pixels``); rows of the
    columns of ``types``. Returns (rows, window radius in A)."""
    s, a = lattice.sampling_A, lattice.a
    radius = window_radius(window_A, FAST_WINDOW_FRAC, a, s)
    cap = min(max_pixels, FAST_MAX_PIXELS) if max_pixels else FAST_MAX_PIXELS
    rows = pd.DataFrame(rows_from_arrays(*_fit_fast(img, s, grid, lattice.cell_A, a, radius, cap)))
    return select_types(grid, rows, types), radius
