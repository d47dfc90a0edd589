"""The noise bias of the ellipticity, from the fitted structure re-synthesised and fitted again.

:func:`round_baseline` renders the structure found by :func:`octastem.fit.fit_columns` with every
column made round, adds noise of the measured level and fits it again with the same settings: the
median ellipticity it returns is what noise alone produces, the baseline for the measured value.

:func:`noise_bias` measures the bias of the measured median itself (a parametric bootstrap): the
fitted structure, with its fitted shapes, is rendered without noise, the image's own residual
(image minus that model: its noise, with the noise's spatial correlation) is added back shifted by
a random number of pixels along each axis, and the result is fitted again. The mean of the refitted
medians minus the median of the rendered structure is the bias the noise adds at this SNR; the
measured median minus that bias is the bias-corrected value, whose SE adds the SE of the bias
estimate (the spread of the draws over sqrt(draws)) to the measured SE in quadrature. The bias
depends on the shape (it is largest for round columns), so a second pass renders the shapes less
the first bias and measures the bias there.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from octastem.config import schema_defaults
from octastem.fit.columns import fit_columns
from octastem.fit.fast import _fit_fast
from octastem.fit.lattice import _check_geometry, column_grid, refine_origin
from octastem.fit.model import FAST_MAX_PIXELS, FAST_WINDOW_FRAC, WINDOW_MAX_PIXELS, cov_to_axes, model_image
from octastem.fit.stats import median_se
from octastem.io import InputError
from octastem.rng import generator


def _structure(image, s, df, n_cells, cell_A):
    """All lattice columns as (x, y, height, sigma_major, ratio, angle_deg) with the fitted values
    where ``df`` has a successful fit and values of the fast fit (all columns) elsewhere; and the
    background."""
    img, s, (nx, ny), (lx, ly), (ax, ay) = _check_geometry(image, s, n_cells, cell_A)
    a = min(ax, ay)
    origin = df.attrs.get("origin_A") or refine_origin(img, s, (nx, ny), (lx, ly))
    grid = column_grid((nx, ny), (lx, ly), origin)
    p, *_ = _fit_fast(img, s, grid, (lx, ly), a, 0.5 * (FAST_WINDOW_FRAC * a), FAST_MAX_PIXELS)
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
    se_method=None,
    n_boot=2000,
    seed=0,
    max_pixels=WINDOW_MAX_PIXELS,
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
    plus ``noise_sigma``, ``noise`` and ``seed`` entries. ``se_method``: default the schema's
    ``fit.se_method``. ``seed`` seeds the noise, the fit's restarts and the bootstrap.
    """
    img, cols, fitted, bg = _structure(image, sampling_A, df, n_cells, cell_A)
    s = float(sampling_A)
    if noise not in ("gaussian", "poisson"):
        raise InputError(f"noise: expected 'gaussian' or 'poisson', got {noise!r}")
    if se_method is None:
        se_method = schema_defaults("fit", "se_method")
    measured = model_image(img.shape, s, cols, bg)
    if noise_sigma is None:
        res = (img - measured).ravel()
        noise_sigma = float(1.4826 * np.median(np.abs(res - np.median(res))))
    round_cols = cols.copy()
    round_cols["sigma_major"] = cols["sigma_major"] / np.sqrt(cols["ratio"])  # sqrt(major * minor)
    round_cols["ratio"] = 1.0
    clean = model_image(img.shape, s, round_cols, bg)
    rng = generator(seed)
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


def noise_bias(
    image,
    sampling_A,
    df,
    n_cells,
    cell_A,
    draws=8,
    types=None,
    window_A=None,
    method=None,
    seed=0,
    max_pixels=WINDOW_MAX_PIXELS,
    neighbours="elliptical",
    iterations=2,
) -> dict:
    """Noise bias of the median ellipticity of each type and the bias-corrected median (module doc).

    ``df``: the fit of ``image`` (:func:`fit_columns`); ``draws``: refits of the rendered structure
    plus the shifted residual (at least 2), with the same settings (``types``, ``window_A``,
    ``method``; default those in ``df``). ``seed`` draws the shifts and seeds the refits. Returns
    ``{type: {bias, bias_se, draw_medians, rendered_median, n_draws}}`` plus ``draws``,
    ``noise_sigma`` (robust SD of the residual) and ``seed``. A refit that fails (too few columns)
    is left out of the mean; a type with fewer than 2 good draws gets a NaN bias. ``iterations``:
    passes; each after the first renders the fitted shapes less the previous pass's bias (ratios
    kept >= 1) and measures the bias there, closer to the shapes behind the noisy measurement
    (the bias is largest for round columns, so the first pass at the elongated fitted shapes
    underestimates it); the last pass's bias is returned. ``draws`` refits per pass.
    """
    if isinstance(draws, bool) or not isinstance(draws, (int, np.integer)) or draws < 2:
        raise InputError(f"noise_bias: draws must be an integer >= 2, got {draws!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) or iterations < 1:
        raise InputError(f"noise_bias: iterations must be an integer >= 1, got {iterations!r}")
    img, cols, fitted, bg = _structure(image, sampling_A, df, n_cells, cell_A)
    s = float(sampling_A)
    residual = img - model_image(img.shape, s, cols, bg)
    flat = residual.ravel()
    noise_sigma = float(1.4826 * np.median(np.abs(flat - np.median(flat))))
    types = tuple(sorted(set(df["type"]))) if types is None else ((types,) if isinstance(types, str) else tuple(types))
    settings = dict(
        types=types,
        window_A=window_A if window_A is not None else df.attrs.get("window_A"),
        max_pixels=max_pixels,
        neighbours=neighbours,
        method=method if method is not None else df.attrs.get("method", "window"),
    )
    rng = generator(seed)
    shapes, result = cols, {}
    for it in range(int(iterations)):
        rendered = model_image(img.shape, s, shapes, bg)
        if not np.all(np.isfinite(rendered)) or not np.all(np.isfinite(residual)):
            raise InputError("noise_bias: the fitted structure renders non-finite values")
        medians = {typ: [] for typ in types}
        for d in range(int(draws)):
            shift = (int(rng.integers(1, img.shape[0])), int(rng.integers(1, img.shape[1])))
            try:
                refit = fit_columns(
                    rendered + np.roll(residual, shift, axis=(0, 1)),
                    s,
                    n_cells,
                    cell_A,
                    seed=seed + it * int(draws) + d,
                    **settings,
                )
            except (InputError, ValueError):  # too few columns found, or a fit that diverged
                continue
            for typ in types:
                ok = refit[(refit["type"] == typ) & refit["success"].astype(bool)]
                if len(ok):
                    medians[typ].append(float(np.median(ok["ellipticity"])))
        result = {}
        for typ in types:
            # the structure as rendered: the shapes of the successful fits of this type
            own = shapes[fitted & (shapes["type"] == typ).to_numpy()]
            rendered_median = float(np.median(own["ratio"])) if len(own) else math.nan
            m = np.asarray(medians[typ])
            if len(m) >= 2 and np.isfinite(rendered_median):
                bias, bias_se = float(m.mean() - rendered_median), float(m.std(ddof=1) / np.sqrt(len(m)))
            else:
                bias, bias_se = math.nan, math.nan
            result[typ] = {
                "bias": bias,
                "bias_se": bias_se,
                "draw_medians": [float(v) for v in m],
                "rendered_median": rendered_median,
                "n_draws": int(len(m)),
            }
        if it + 1 < iterations:
            # the next pass renders the measured shapes less this bias (ratio >= 1, same mean width)
            shapes = cols.copy()
            for typ in types:
                bias = result[typ]["bias"]
                rows = (fitted & (cols["type"] == typ).to_numpy()) & np.isfinite(bias)
                ratio = np.maximum(1.0, cols.loc[rows, "ratio"] - bias)
                mean_width = cols.loc[rows, "sigma_major"] / np.sqrt(cols.loc[rows, "ratio"])
                shapes.loc[rows, "ratio"] = ratio
                shapes.loc[rows, "sigma_major"] = mean_width * np.sqrt(ratio)
    out = {"draws": int(draws), "iterations": int(iterations), "noise_sigma": noise_sigma, "seed": int(seed)}
    return out | result
