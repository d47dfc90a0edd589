"""Cramér-Rao lower bounds (octastem.fit.crlb) against the Monte Carlo spread of joint fits."""

import math

import numpy as np
import pandas as pd
import pytest

from octastem.fit import design, elliptical_gaussian, fisher_information, fit_joint, pixel_grid
from octastem.fit.crlb import crlb
from octastem.io import InputError

S = 0.1  # A/px
SHAPE = (36, 44)
# Two overlapping elliptical columns (1.3 A apart, widths 0.4 A) and a round one.
COLUMNS = pd.DataFrame(
    {
        "x": [1.6, 2.8, 2.2],
        "y": [1.7, 1.9, 0.6],
        "height": [1.0, 0.8, 0.5],
        "sigma_major": [0.42, 0.40, 0.45],
        "ratio": [1.3, 1.15, 1.0],
        "angle_deg": [70.0, -20.0, 0.0],
    }
)
BG = 0.2


def render(columns, background, shape=SHAPE, s=S):
    X, Y = pixel_grid(shape, s)
    img = np.full(shape, float(background))
    for r in columns.itertuples():
        img += elliptical_gaussian(X, Y, r.x, r.y, r.height, r.sigma_major, r.ratio, math.radians(r.angle_deg))
    return img


def monte_carlo(noise, n_rep, seed, scale=1.0):
    """Fit ``n_rep`` noisy copies; returns per-parameter standard deviations (n_columns, params)."""
    rng = np.random.default_rng(seed)
    clean = render(COLUMNS, BG) * scale
    init = COLUMNS.assign(height=COLUMNS["height"] * scale)
    out = []
    for _ in range(n_rep):
        if noise == "poisson":
            img = rng.poisson(clean).astype(float)
            w = 1.0 / np.sqrt(np.maximum(img, 1.0))
        else:
            img = clean + rng.normal(0.0, noise, clean.shape)
            w = None
        df = fit_joint(img, S, init, background=BG * scale, weights=w)
        out.append(df[["x", "y", "sigma_major", "ellipticity", "sigma_x", "sigma_y"]].to_numpy())
    return np.std(np.array(out), axis=0, ddof=1)


def test_design_jacobian_matches_finite_differences():
    X, Y = pixel_grid(SHAPE, S)
    for par in ("axes", "cov"):
        m, J, names, df = design(X, Y, COLUMNS, BG, parametrisation=par)
        assert m.shape == (X.size,) and J.shape == (X.size, 6 * 3 + 1)
        np.testing.assert_allclose(m, render(COLUMNS, BG).ravel(), atol=1e-12)
    # derivative w.r.t. ratio and angle of column 0 in the axes parametrisation
    m, J, names, _ = design(X, Y, COLUMNS, BG)
    for p, key, step in (("ratio", "ratio", 1e-6), ("angle_deg", "angle_deg", 1e-5)):
        c2 = COLUMNS.copy()
        c2.loc[0, key] += step
        fd = (render(c2, BG) - render(COLUMNS, BG)).ravel() / (math.radians(step) if p == "angle_deg" else step)
        np.testing.assert_allclose(J[:, names.index((0, p))], fd, atol=1e-4 * np.abs(fd).max())


def test_gaussian_bound_matches_monte_carlo_spread():
    sigma = 0.05
    X, Y = pixel_grid(SHAPE, S)
    b = crlb(X, Y, COLUMNS, noise="gaussian", sigma=sigma, background=BG)
    bc = crlb(X, Y, COLUMNS, noise="gaussian", sigma=sigma, background=BG, parametrisation="cov")
    # round column: angle not identifiable, ratio on its boundary (no regular bound)
    assert math.isinf(b.loc[2, "angle_deg_crlb"]) and math.isnan(b.loc[2, "ratio_crlb"])
    np.testing.assert_allclose(b[["x_crlb", "y_crlb"]], bc[["x_crlb", "y_crlb"]])
    sd = monte_carlo(sigma, 150, seed=11)
    bound = np.column_stack(
        [b["x_crlb"], b["y_crlb"], b["sigma_major_crlb"], b["ratio_crlb"], bc["sigma_x_crlb"], bc["sigma_y_crlb"]]
    )
    ratio = sd / bound
    ratio[2, 2:4] = 1.0  # round column: sigma_major and ratio have no regular bound (checked via sigma_x/y)
    assert np.all(np.abs(ratio - 1) < 0.2), ratio


def test_poisson_bound_scales_with_dose_and_matches_spread():
    X, Y = pixel_grid(SHAPE, S)
    dose = 400.0
    cols = COLUMNS.assign(height=COLUMNS["height"] * dose)
    b1 = crlb(X, Y, cols, noise="poisson", background=BG * dose)
    b4 = crlb(X, Y, cols.assign(height=cols["height"] * 4), noise="poisson", background=BG * dose * 4)
    # lengths and the ratio: bound ~ 1/sqrt(dose)
    for p in ("x", "y", "sigma_major", "ratio"):
        np.testing.assert_allclose(b4[f"{p}_crlb"].iloc[:2] / b1[f"{p}_crlb"].iloc[:2], 0.5, rtol=1e-9)
    # Gaussian noise of the same variance everywhere is a different bound
    bg = crlb(X, Y, cols, noise="gaussian", sigma=math.sqrt(BG * dose), background=BG * dose)
    assert (bg["x_crlb"] < b1["x_crlb"]).all()
    sd = monte_carlo("poisson", 120, seed=12, scale=dose)
    ratio = sd[:2, :3] / b1[["x_crlb", "y_crlb", "sigma_major_crlb"]].to_numpy()[:2]
    assert np.all(np.abs(ratio - 1) < 0.2), ratio


def test_more_noise_or_overlap_raises_the_bound():
    X, Y = pixel_grid(SHAPE, S)
    b1 = crlb(X, Y, COLUMNS, sigma=0.05)
    b2 = crlb(X, Y, COLUMNS, sigma=0.1)
    np.testing.assert_allclose(b2["x_crlb"] / b1["x_crlb"], 2.0)
    alone = crlb(X, Y, COLUMNS.iloc[[0]], sigma=0.05)
    assert alone["x_crlb"].iat[0] < b1["x_crlb"].iat[0]
    F, names = fisher_information(X, Y, COLUMNS, sigma=0.05, background=BG, background_terms=3)
    assert F.shape == (21, 21) and np.allclose(F, F.T)


def test_bad_input():
    X, Y = pixel_grid(SHAPE, S)
    with pytest.raises(InputError, match="sigma"):
        crlb(X, Y, COLUMNS, noise="gaussian")
    with pytest.raises(InputError, match="model > 0"):
        crlb(X, Y, COLUMNS, noise="poisson", background=-0.1)
    with pytest.raises(InputError, match="noise"):
        crlb(X, Y, COLUMNS, noise="laplace", sigma=1)
    with pytest.raises(InputError, match="ratio >= 1"):
        crlb(X, Y, COLUMNS.assign(ratio=0.8), sigma=1)
    with pytest.raises(InputError, match="missing"):
        crlb(X, Y, COLUMNS.drop(columns="height"), sigma=1)
