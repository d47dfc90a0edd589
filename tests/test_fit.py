"""Elliptical Gaussian column fits (octastem.fit) on synthetic images with known parameters."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from octastem.fit import (
    SITES,
    axes_to_cov,
    column_grid,
    cov_to_axes,
    elliptical_gaussian,
    fit_columns,
    fit_image_file,
    model_image,
    noise_bias,
    pixel_grid,
    plot_model,
    refine_origin,
    round_baseline,
    summarize,
)
from octastem.fit.crlb import crlb
from octastem.io import InputError, write_image

A = 6.0  # lattice constant, A
HEIGHT = {"PbBr": 3.0, "Br": 1.0, "FA": 0.3}
SIGMA = {"PbBr": 0.45, "Br": 0.45, "FA": 0.6}


def synth(n=(3, 3), ratio=1.3, angle_deg=None, offset=(0.3, -0.2), disp=0.15, noise=0.0, s=0.1, seed=1, widen=1.0):
    """Periodic image of the model: Br elliptical (major axis at ``angle_deg``, or perpendicular
    to the Pb-Br-Pb bond when None), PbBr and FA round, columns randomly displaced; ``widen``
    scales all widths (overlapping neighbours)."""
    rng = np.random.default_rng(seed)
    cell = (n[0] * A, n[1] * A)
    shape = (round(cell[1] / s), round(cell[0] / s))
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]] * s
    img = np.full(shape, 0.1)
    truth = column_grid(n, cell, offset)
    truth["x"] = (truth["x"] + rng.uniform(-disp, disp, len(truth))) % cell[0]
    truth["y"] = (truth["y"] + rng.uniform(-disp, disp, len(truth))) % cell[1]
    angles = []
    for r in truth.itertuples():
        if r.type == "Br":
            ang = angle_deg if angle_deg is not None else (90.0 if r.site == "Br_x" else 0.0)
            rr = ratio
        else:
            ang, rr = 0.0, 1.0
        angles.append(ang)
        for kx in (-1, 0, 1):
            for ky in (-1, 0, 1):
                img += elliptical_gaussian(
                    x,
                    y,
                    r.x + kx * cell[0],
                    r.y + ky * cell[1],
                    HEIGHT[r.type],
                    SIGMA[r.type] * widen,
                    rr,
                    math.radians(ang),
                )
    truth["angle_deg"] = angles
    if noise:
        img += rng.normal(0.0, noise, shape)
    return img, s, n, cell, truth


def compare(df, truth, cell):
    m = df.merge(truth, on=["type", "site", "i", "j"], suffixes=("", "_true"))
    assert len(m) == len(df)
    dx = (m["x"] - m["x_true"] + cell[0] / 2) % cell[0] - cell[0] / 2
    dy = (m["y"] - m["y_true"] + cell[1] / 2) % cell[1] - cell[1] / 2
    dang = (m["angle_deg"] - m["angle_deg_true"] + 90) % 180 - 90
    return np.hypot(dx, dy), np.abs(dang)


def test_parametrisations_agree():
    y, x = np.mgrid[-20:21, -20:21] * 0.1
    for major, ratio, ang in [(0.5, 1.0, 0.3), (0.5, 1.4, 1.2), (0.4, 2.0, -1.5), (0.6, 1.1, math.pi / 2)]:
        sx, sy, rho = axes_to_cov(major, ratio, ang)
        a, b, t = cov_to_axes(sx, sy, rho)
        assert a == pytest.approx(major) and a / b == pytest.approx(ratio)
        if ratio > 1:
            assert (math.degrees(t - ang) + 90) % 180 - 90 == pytest.approx(0, abs=1e-6)
        assert -math.pi / 2 < t <= math.pi / 2
        g1 = elliptical_gaussian(x, y, 0.1, -0.2, 2.0, major, ratio, ang)
        sigma_x, sigma_y, r = axes_to_cov(major, ratio, ang)
        cov = np.array([[sigma_x**2, r * sigma_x * sigma_y], [r * sigma_x * sigma_y, sigma_y**2]])
        d = np.stack([x - 0.1, y + 0.2], -1)
        g2 = 2.0 * np.exp(-0.5 * np.einsum("...i,ij,...j", d, np.linalg.inv(cov), d))
        np.testing.assert_allclose(g1, g2, atol=1e-12)
    with pytest.raises(ValueError):
        elliptical_gaussian(x, y, 0, 0, 1, 0.5, 0.9, 0)


def test_column_grid():
    g = column_grid((2, 3), (12.0, 18.0), origin_A=(-0.5, 0.25))
    assert len(g) == 24
    assert g["type"].value_counts().to_dict() == {"Br": 12, "PbBr": 6, "FA": 6}
    pb = g[(g["site"] == "PbBr") & (g["i"] == 0) & (g["j"] == 0)].iloc[0]
    assert (pb["x"], pb["y"]) == pytest.approx((11.5, 0.25))
    brx = g[(g["site"] == "Br_x") & (g["i"] == 1) & (g["j"] == 2)].iloc[0]
    assert (brx["x"], brx["y"]) == pytest.approx((8.5, 12.25))
    assert g["x"].between(0, 12).all() and g["y"].between(0, 18).all()


def test_refine_origin():
    img, s, n, cell, _ = synth(n=(3, 3), offset=(0.35, -0.25), disp=0.1)
    ox, oy = refine_origin(img, s, n, cell)
    assert (ox, oy) == pytest.approx((0.35, -0.25), abs=0.05)


@pytest.mark.parametrize("ratio", [1.0, 1.15, 1.3, 1.5])
def test_noise_free_recovery(ratio):
    img, s, n, cell, truth = synth(n=(3, 3), ratio=ratio)
    df = fit_columns(img, s, n, cell, types=("Br",))
    assert len(df) == 18 and df["success"].all()
    assert df["ellipticity"].median() == pytest.approx(ratio, abs=0.01)
    dpos, dang = compare(df, truth, cell)
    assert dpos.max() < 0.02
    if ratio >= 1.15:
        assert dang.max() < 1.0
        # elongation perpendicular to the Pb-Br-Pb bond
        assert df["angle_to_bond_deg"].min() > 89.0
    assert df.attrs["origin_A"] == pytest.approx((0.3, -0.2), abs=0.05)
    assert df["sigma_major"].median() == pytest.approx(0.45, abs=0.01)


def test_all_types_and_generic_angle():
    img, s, n, cell, truth = synth(n=(2, 2), ratio=1.3, angle_deg=30.0)
    df = fit_columns(img, s, n, cell, types=("PbBr", "Br", "FA"))
    assert df["type"].value_counts().to_dict() == {"Br": 8, "PbBr": 4, "FA": 4}
    med = df.groupby("type")["ellipticity"].median()
    assert med["Br"] == pytest.approx(1.3, abs=0.01)
    assert med["PbBr"] == pytest.approx(1.0, abs=0.01)
    assert med["FA"] == pytest.approx(1.0, abs=0.01)
    dpos, dang = compare(df, truth, cell)
    assert dpos.max() < 0.02
    assert dang[df["type"] == "Br"].max() < 1.0
    summary = summarize(df)
    assert summary["Br"]["n"] == 8
    assert summary["Br"]["mean_angle_deg"] == pytest.approx(30.0, abs=1.0)
    assert summary["PbBr"]["median_ellipticity"] == pytest.approx(1.0, abs=0.01)


def test_moderate_noise():
    img, s, n, cell, truth = synth(n=(4, 4), ratio=1.3, angle_deg=-40.0, noise=0.05, seed=3)
    df = fit_columns(img, s, n, cell, types=("Br",))
    assert df["success"].all()
    assert df["ellipticity"].median() == pytest.approx(1.3, abs=0.03)
    dpos, dang = compare(df, truth, cell)
    assert np.median(dang) < 3.0
    assert np.median(dpos) < 0.02
    # fit uncertainties describe the scatter between equivalent columns
    ratio_se = df["ellipticity_stderr"].median()
    assert 0.5 < ratio_se / df["ellipticity"].std() < 2.0
    s = summarize(df, se_method="bootstrap")
    assert 0 < s["Br"]["se"] < 0.02 and s["Br"]["se_method"] == "bootstrap"


def test_round_columns_noise_bias_is_small():
    img, s, n, cell, _ = synth(n=(4, 4), ratio=1.0, noise=0.02, seed=4)
    med = fit_columns(img, s, n, cell)["ellipticity"].median()
    assert 1.0 < med < 1.02


def test_round_neighbour_model():
    img, s, n, cell, _ = synth(n=(2, 2), ratio=1.15)
    df = fit_columns(img, s, n, cell, neighbours="round")
    assert df["ellipticity"].median() == pytest.approx(1.15, abs=0.01)


def test_bad_inputs():
    img, s, n, cell, _ = synth(n=(2, 2))
    bad = img.copy()
    bad[3, 5] = np.nan
    with pytest.raises(InputError, match="non-finite"):
        fit_columns(bad, s, n, cell)
    with pytest.raises(InputError, match="does not repeat"):
        fit_columns(synth(n=(3, 3))[0], s, (2, 2), (18.0, 18.0))
    with pytest.raises(InputError, match="unit-cell size"):
        fit_columns(img, s, n, (A, A))
    with pytest.raises(InputError, match="quarter cell"):
        fit_columns(synth(n=(2, 2), offset=(A / 2, 0.0))[0], s, n, cell)
    with pytest.raises(InputError, match="too small"):
        fit_columns(img[::8, ::8], 8 * s, n, cell)
    with pytest.raises(InputError, match="columns not found"):
        fit_columns(np.random.default_rng(0).normal(size=img.shape), s, n, cell)
    with pytest.raises(InputError, match="types"):
        fit_columns(img, s, n, cell, types=("Cs",))


def test_fit_image_file(tmp_path):
    img, s, n, cell, _ = synth(n=(2, 2), ratio=1.2, noise=0.01)
    path = tmp_path / "phase.h5"
    write_image(path, img, s, "phase", n_cells=list(n), cell_A=list(cell))
    out_csv, out_json, png = tmp_path / "fit.csv", tmp_path / "fit.json", tmp_path / "fit.png"
    summary = fit_image_file(path, out_csv, out_json, types=("Br", "PbBr"), plot_path=png)
    df = pd.read_csv(out_csv)
    assert len(df) == 12 and {"ellipticity", "angle_deg", "sigma_minor", "x_stderr"} <= set(df)
    saved = json.loads(out_json.read_text())
    br = saved["summary"]["Br"]
    assert br["median_ellipticity"] == pytest.approx(1.2, abs=0.02)
    assert br["se_method"] == "asymptotic" and br["se"] == br["se_asymptotic"] and br["se_bootstrap"] > 0
    # noise bias baseline beside the measured value: round columns at this noise stay close to 1
    assert 1.0 <= br["baseline_median_ellipticity"] < 1.02 and br["baseline_se"] > 0
    assert saved["baseline"]["noise_sigma"] == pytest.approx(0.01, rel=0.2)
    assert saved["summary"] == json.loads(json.dumps(summary["summary"]))
    assert png.stat().st_size > 1000
    assert not list(tmp_path.glob(".*.part"))

    write_image(tmp_path / "nolattice.h5", img, s, "phase")
    with pytest.raises(InputError, match="nolattice.h5.*n_cells"):
        fit_image_file(tmp_path / "nolattice.h5", out_csv, out_json)
    bad = img.copy()
    bad[0, 0] = np.nan
    write_image(tmp_path / "nan.h5", bad, s, "phase", n_cells=list(n), cell_A=list(cell))
    with pytest.raises(InputError, match="nan.h5.*non-finite"):
        fit_image_file(tmp_path / "nan.h5", out_csv, out_json)


def test_plot_model(tmp_path):
    img, s, n, cell, _ = synth(n=(2, 2))
    df = fit_columns(img, s, n, cell)
    plot_model(img, s, df, tmp_path / "model.png")
    assert (tmp_path / "model.png").read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------------------------
# Fast path, joint fit, summary, bias baseline
# ----------------------------------------------------------------------------------------------


def test_fast_and_window_paths_agree_noise_free():
    img, s, n, cell, truth = synth(n=(2, 2), ratio=1.3, angle_deg=25.0)
    fast = fit_columns(img, s, n, cell, types=("Br", "PbBr"), method="fast")
    ref = fit_columns(img, s, n, cell, types=("Br", "PbBr"), method="window")
    assert fast["success"].all() and fast.attrs["method"] == "fast"
    for typ in ("Br", "PbBr"):
        a = fast.loc[fast["type"] == typ, "ellipticity"].median()
        b = ref.loc[ref["type"] == typ, "ellipticity"].median()
        assert abs(a - b) < 0.005, typ
    dpos, dang = compare(fast, truth, cell)
    assert dpos.max() < 0.005 and dang[fast["type"] == "Br"].max() < 0.5


@pytest.mark.parametrize("ratio", [1.0, 1.15, 1.3, 1.5])
def test_fast_path_overlapping_columns_high_snr(ratio):
    # widths x1.6: neighbouring Br and PbBr columns (3 A apart) overlap at sigma = 0.72 A
    img, s, n, cell, truth = synth(n=(4, 4), ratio=ratio, noise=0.005, seed=7, widen=1.6)
    df = fit_columns(img, s, n, cell, types=("Br", "PbBr", "FA"), method="fast")
    br = df[df["type"] == "Br"]
    assert br["success"].all()
    assert br["ellipticity"].median() == pytest.approx(ratio, abs=0.01)
    assert br["sigma_major"].median() == pytest.approx(0.45 * 1.6, abs=0.01)
    dpos, _ = compare(df, truth, cell)
    assert np.median(dpos) < 0.01
    if ratio >= 1.15:
        s_ = summarize(df)["Br"]
        assert s_["fraction_perpendicular"] == 1.0 and s_["median_angle_to_bond_deg"] > 85


def test_fast_path_spread_near_crlb():
    """Spread of the fast-path positions and widths over noise realisations vs the joint bound."""
    noise = 0.05
    img0, s, n, cell, truth = synth(n=(2, 2), ratio=1.3, disp=0.0)
    clean = img0.copy()
    rng = np.random.default_rng(21)
    runs = []
    for _ in range(40):
        df = fit_columns(clean + rng.normal(0, noise, clean.shape), s, n, cell, types=("Br",), method="fast")
        runs.append(df[["x", "y", "sigma_major"]].to_numpy())
    sd = np.std(np.array(runs), axis=0, ddof=1)  # (8 Br columns, 3)
    # Bound of the periodic image: the image extended by 3 A on each side (periodic copies of
    # the pixels and columns), so that every column of the image has all its pixels and neighbours.
    pad = 30
    X, Y = pixel_grid((clean.shape[0] + 2 * pad, clean.shape[1] + 2 * pad), s)
    X, Y = X - pad * s, Y - pad * s
    cols = truth.assign(
        height=truth["type"].map(HEIGHT),
        sigma_major=truth["type"].map(SIGMA),
        ratio=np.where(truth["type"] == "Br", 1.3, 1.0),
    )
    tiles = pd.concat(
        [cols.assign(x=cols["x"] + kx * cell[0], y=cols["y"] + ky * cell[1]) for kx in (-1, 0, 1) for ky in (-1, 0, 1)],
        ignore_index=True,
    )
    inner = (tiles["x"] > -4.5) & (tiles["x"] < cell[0] + 4.5) & (tiles["y"] > -4.5) & (tiles["y"] < cell[1] + 4.5)
    tiles = tiles[inner].reset_index(drop=True)
    b = crlb(X, Y, tiles, sigma=noise, background=0.1)
    key = ["type", "site", "i", "j"]
    central = (tiles["x"].between(0, cell[0], inclusive="left")) & (tiles["y"].between(0, cell[1], inclusive="left"))
    bound = tiles[central][key].join(b[central])
    m = df[key].merge(bound, on=key)
    ratio = np.median(sd / m[["x_crlb", "y_crlb", "sigma_major_crlb"]].to_numpy(), axis=0)
    assert np.all(np.abs(ratio - 1) < 0.2), ratio


def test_joint_method_small_image():
    img, s, n, cell, truth = synth(n=(2, 2), ratio=1.15, noise=0.002, seed=5)
    df = fit_columns(img, s, n, cell, types=("Br",), method="joint")
    assert len(df) == 8 and df["success"].all()
    assert df["ellipticity"].median() == pytest.approx(1.15, abs=0.01)
    dpos, _ = compare(df, truth, cell)
    assert dpos.max() < 0.01


def test_model_image_matches_synthetic():
    img, s, n, cell, truth = synth(n=(2, 2), ratio=1.3, angle_deg=30.0)
    cols = truth.assign(
        height=truth["type"].map(HEIGHT),
        sigma_major=truth["type"].map(SIGMA),
        ratio=np.where(truth["type"] == "Br", 1.3, 1.0),
    )
    np.testing.assert_allclose(model_image(img.shape, s, cols, 0.1, reach=8.0), img, atol=1e-9)


def test_summary_reports_both_standard_errors():
    img, s, n, cell, _ = synth(n=(3, 3), ratio=1.3, noise=0.03, seed=9)
    df = fit_columns(img, s, n, cell, types=("Br", "PbBr"), method="fast")
    out = summarize(df, se_method="bootstrap", n_boot=500)
    for typ in ("Br", "PbBr"):
        e = out[typ]
        assert e["se_method"] == "bootstrap" and e["se"] == e["se_bootstrap"]
        assert 0.3 < e["se_asymptotic"] / e["se_bootstrap"] < 3
    assert out["Br"]["fraction_perpendicular"] == 1.0
    assert "fraction_perpendicular" not in out["PbBr"]


def test_round_baseline_measures_noise_bias():
    noise = 0.06
    img, s, n, cell, _ = synth(n=(4, 4), ratio=1.0, noise=noise, seed=13)
    df = fit_columns(img, s, n, cell, method="fast")
    base = round_baseline(img, s, df, n, cell, seed=2)
    assert base["noise_sigma"] == pytest.approx(noise, rel=0.1)
    meas = summarize(df)["Br"]
    assert base["Br"]["median_ellipticity"] > 1.005  # noise alone pushes the ratio above 1
    combined = math.hypot(meas["se"], base["Br"]["se"])
    assert abs(meas["median_ellipticity"] - base["Br"]["median_ellipticity"]) < 3 * combined

    img, s, n, cell, _ = synth(n=(4, 4), ratio=1.3, noise=noise, seed=13)
    df = fit_columns(img, s, n, cell, method="fast")
    base = round_baseline(img, s, df, n, cell, seed=2)
    meas = summarize(df)["Br"]
    assert meas["median_ellipticity"] - base["Br"]["median_ellipticity"] > 10 * math.hypot(meas["se"], base["Br"]["se"])


def test_fast_path_bad_inputs():
    img, s, n, cell, _ = synth(n=(2, 2))
    bad = img.copy()
    bad[4, 4] = np.nan
    with pytest.raises(InputError, match="non-finite"):
        fit_columns(bad, s, n, cell, method="fast")
    with pytest.raises(InputError, match="columns not found"):
        fit_columns(np.random.default_rng(1).normal(size=img.shape), s, n, cell, method="fast")
    with pytest.raises(InputError, match="quarter cell"):
        fit_columns(synth(n=(2, 2), offset=(A / 2, 0.0))[0], s, n, cell, method="fast")
    with pytest.raises(InputError, match="method"):
        fit_columns(img, s, n, cell, method="gradient")


def test_failed_baseline_leaves_the_measurement(tmp_path, monkeypatch):
    """When the round-column baseline cannot be fitted (too noisy an image for round columns), the
    measured values are still written, with a NaN baseline and the reason in the summary."""
    import octastem.fit.files as fit_module

    img, s, n, cell, _ = synth(n=(2, 2), ratio=1.2, noise=0.01)
    path = tmp_path / "phase.h5"
    write_image(path, img, s, "phase", n_cells=list(n), cell_A=list(cell))

    def fails(*args, **kwargs):
        raise InputError("image: columns not found: only 3 of 8 Br column fits succeeded")

    monkeypatch.setattr(fit_module, "round_baseline", fails)
    out_csv, out_json = tmp_path / "fit.csv", tmp_path / "fit.json"
    fit_image_file(path, out_csv, out_json, types=("Br",))
    saved = json.loads(out_json.read_text())
    br = saved["summary"]["Br"]
    assert br["median_ellipticity"] == pytest.approx(1.2, abs=0.02)
    assert np.isnan(br["baseline_median_ellipticity"]) and np.isnan(br["baseline_se"])
    assert "columns not found" in saved["baseline"]["error"]
    assert len(pd.read_csv(out_csv)) == 8


def test_fit_file_runs_its_fits_on_one_blas_thread(tmp_path, monkeypatch):
    """A threaded BLAS sums in a load-dependent order (results move in the 13th digit between runs);
    every fit of an image file runs with the BLAS pools at one thread, the caller's setting restored after."""
    from threadpoolctl import threadpool_info, threadpool_limits

    import octastem.fit.files as fit_module

    img, s, n, cell, _ = synth(n=(2, 2), ratio=1.2, noise=0.01)
    path = tmp_path / "phase.h5"
    write_image(path, img, s, "phase", n_cells=list(n), cell_A=list(cell))
    seen = []
    real = fit_module.fit_columns

    def recording(*args, **kwargs):
        seen.append({p["filepath"]: p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"})
        return real(*args, **kwargs)

    monkeypatch.setattr(fit_module, "fit_columns", recording)
    with threadpool_limits(limits=2, user_api="blas"):
        fit_module.fit_image_file(path, tmp_path / "fit.csv", tmp_path / "fit.json", types=("Br",), baseline=False)
        after = {p["filepath"]: p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"}
    assert seen and all(pools and set(pools.values()) == {1} for pools in seen)
    assert set(after.values()) == {2}


# ----------------------------------------------------------------------------------------------
# Any contrast order of the columns
# ----------------------------------------------------------------------------------------------

#: Column heights of perovskites whose columns come in different contrast orders.
CONTRASTS = {
    "PbBr brightest": {"PbBr": 3.0, "Br": 1.0, "FA": 0.3},
    "A site brightest": {"PbBr": 1.14, "Br": 0.6, "FA": 1.22},
    "Br brightest": {"PbBr": 0.8, "Br": 2.0, "FA": 0.4},
}
#: Known widths: sigma_major of every type, the Br columns elliptical (ratio BR_RATIO).
WIDTHS = {"PbBr": 0.42, "Br": 0.5, "FA": 0.55}
BR_RATIO = 1.3


def contrast_image(heights, n=(3, 3), offset=(0.3, -0.2), noise=0.01, s=0.1, seed=2):
    """Periodic image (model_image) of columns of the given heights per type, the Br columns
    elongated perpendicular to their Pb-Br-Pb bond, all displaced at random by up to 0.1 A."""
    rng = np.random.default_rng(seed)
    cell = (n[0] * A, n[1] * A)
    truth = column_grid(n, cell, offset)
    truth["x"] = (truth["x"] + rng.uniform(-0.1, 0.1, len(truth))) % cell[0]
    truth["y"] = (truth["y"] + rng.uniform(-0.1, 0.1, len(truth))) % cell[1]
    br = truth["type"] == "Br"
    truth["height"] = truth["type"].map(heights)
    truth["sigma_major"] = truth["type"].map(WIDTHS)
    truth["ratio"] = np.where(br, BR_RATIO, 1.0)
    truth["angle_deg"] = np.where(truth["site"] == "Br_x", 90.0, 0.0)
    shape = (round(cell[1] / s), round(cell[0] / s))
    img = model_image(shape, s, truth, 0.1) + rng.normal(0.0, noise, shape)
    return img, s, n, cell, truth


@pytest.mark.parametrize("order", list(CONTRASTS))
@pytest.mark.parametrize("method", ["window", "fast"])
def test_any_contrast_order_finds_the_br_sites(order, method):
    img, s, n, cell, truth = contrast_image(CONTRASTS[order])
    df = fit_columns(img, s, n, cell, types=("Br", "PbBr", "FA"), method=method)
    assert df.attrs["origin_A"] == pytest.approx((0.3, -0.2), abs=0.05)
    # the fitted Br columns are the Br sites of the image
    dpos, _ = compare(df, truth, cell)
    assert dpos.max() < 0.03
    br = df[df["type"] == "Br"]
    assert len(br) == 18 and br["success"].all()
    assert br["ellipticity"].median() == pytest.approx(BR_RATIO, abs=0.03)
    assert br["sigma_major"].median() == pytest.approx(WIDTHS["Br"], abs=0.02)
    assert br["angle_to_bond_deg"].min() > 80.0  # elongated across the bond of its own site
    for typ in ("PbBr", "FA"):
        other = df[df["type"] == typ]
        assert other["sigma_major"].median() == pytest.approx(WIDTHS[typ], abs=0.02), typ
        assert other["ellipticity"].median() == pytest.approx(1.0, abs=0.03), typ
    # the lattice search records the contrast order it found
    heights = dict(zip((site for site, *_ in SITES), df.attrs["site_heights"]))
    type_of = {site: typ for site, typ, *_ in SITES}
    assert type_of[max(heights, key=heights.get)] == max(CONTRASTS[order], key=CONTRASTS[order].get)


@pytest.mark.parametrize("order", list(CONTRASTS))
def test_pbbr_half_a_cell_from_the_origin_is_refused(order):
    """Shifted by half a cell along x, the image's columns at the sites of the model's Br pair
    differ in height: whatever the contrast order that is an error, never a fit."""
    img, s, n, cell, _ = contrast_image(CONTRASTS[order], offset=(A / 2 + 0.3, -0.2))
    with pytest.raises(InputError, match="quarter cell"):
        fit_columns(img, s, n, cell, types=("Br",))


def test_noise_bias_moves_the_median_towards_the_truth():
    # known truth: Br ratio 1.0 (round) and 1.3; white noise at the level of a low-dose phase image
    for ratio, noise in ((1.0, 0.1), (1.3, 0.1)):
        measured, corrected = [], []
        for seed in (3, 4):
            img, s, n, cell, _ = synth(n=(4, 4), ratio=ratio, noise=noise, seed=seed)
            df = fit_columns(img, s, n, cell, method="fast")
            m = summarize(df)["Br"]["median_ellipticity"]
            b = noise_bias(img, s, df, n, cell, draws=6, method="fast", seed=seed)
            assert b["noise_sigma"] == pytest.approx(noise, rel=0.15)
            assert b["Br"]["n_draws"] == 6 and np.isfinite(b["Br"]["bias_se"])
            measured.append(m)
            corrected.append(m - b["Br"]["bias"])
        if ratio == 1.0:
            # noise makes round columns elongated; the correction removes at least a third of that
            assert np.mean(measured) - 1.0 > 0.015
            assert abs(np.mean(corrected) - 1.0) < 0.67 * (np.mean(measured) - 1.0)
        else:
            assert abs(np.mean(corrected) - ratio) < 0.02
    with pytest.raises(InputError, match="draws"):
        noise_bias(img, s, df, n, cell, draws=1)


def test_fit_file_reports_noise_bias_and_corrected_value(tmp_path):
    img, s, n, cell, _ = synth(n=(3, 3), ratio=1.0, noise=0.1, seed=5)
    path = tmp_path / "phase.h5"
    write_image(path, img, s, "phase", n_cells=list(n), cell_A=list(cell))
    out = fit_image_file(
        path, tmp_path / "f.csv", tmp_path / "f.json", types=("Br",), method="fast", noise_bias_draws=4
    )
    br = out["summary"]["Br"]
    assert br["corrected_median_ellipticity"] == pytest.approx(br["median_ellipticity"] - br["noise_bias"])
    assert br["corrected_se"] >= br["se"] and br["noise_bias"] > 0  # round columns: noise only elongates
    assert out["noise_bias"]["draws"] == 4
    saved = json.loads((tmp_path / "f.json").read_text())
    assert saved["summary"]["Br"]["noise_bias_draws"] == 4
