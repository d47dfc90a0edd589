"""MD statistics: per-axis fits pooled, the two-stage block bootstrap and the convergence table."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from test_fit import synth

from octastem.fit import fit_image_file
from octastem.fit.pooled import pool_md_fits
from octastem.io import write_image

N = (2, 2)


def write_axis(tmp_path, axis, ratio, n_blocks=4, block_noise=0.0, seed=0):
    """An averaged 'potential' of Br ratio ``ratio`` with ``n_blocks`` time blocks: noise-free mean,
    the blocks differing from it by zero-sum Gaussian noise of ``block_noise``; fitted as fit_md does."""
    img, s, n, cell, _ = synth(n=N, ratio=ratio, seed=seed)
    rng = np.random.default_rng(seed + 100)
    noise = rng.normal(0.0, block_noise, (n_blocks, *img.shape))
    noise -= noise.mean(axis=0)
    means = (img[None] + noise).astype(np.float32)
    path = tmp_path / f"{axis}.h5"
    write_image(
        path,
        img,
        s,
        "projected_potential",
        blocks=(means, np.full(n_blocks, 5)),
        n_cells=list(n),
        cell_A=list(cell),
        every_fs=50.0,
    )
    table, summary = tmp_path / f"fit_{axis}.csv", tmp_path / f"fit_{axis}.json"
    fit_image_file(path, table, summary, types=("Br",), baseline=False)
    return str(table), str(summary), str(path)


def pooled(tmp_path, ratios, replicates=60, **kw):
    files = {axis: write_axis(tmp_path, axis, r, seed=i, **kw) for i, (axis, r) in enumerate(ratios.items())}
    out_csv, out_json = tmp_path / "md.csv", tmp_path / "md.json"
    result = pool_md_fits(
        {a: f[0] for a, f in files.items()},
        {a: f[1] for a, f in files.items()},
        {a: f[2] for a, f in files.items()},
        out_csv,
        out_json,
        replicates=replicates,
        seed=3,
    )
    return result, pd.read_csv(out_csv), json.loads(out_json.read_text())


def test_three_projections_pooled(tmp_path):
    result, table, saved = pooled(tmp_path, {"x": 1.2, "y": 1.3, "z": 1.4})
    br = saved["summary"]["Br"]
    assert br["n"] == 3 * 8 and len(table) == 24 and set(table["axis"]) == {"x", "y", "z"}
    for axis, ratio in (("x", 1.2), ("y", 1.3), ("z", 1.4)):
        assert br["by_axis"][axis]["n"] == 8
        assert br["by_axis"][axis]["median_ellipticity"] == pytest.approx(ratio, abs=0.01)
    assert br["median_ellipticity"] == pytest.approx(np.median(table["ellipticity"]))
    assert 1.2 < br["median_ellipticity"] < 1.4
    assert br["se_method"] == "block_bootstrap" and br["se"] == br["se_block_bootstrap"] > 0
    # identical time blocks: the time draw alone moves nothing, the SE is the columns' spread
    assert br["se_time"] == pytest.approx(0.0, abs=1e-4)
    assert br["se"] == pytest.approx(br["se_bootstrap"], rel=0.35)
    conv = saved["convergence"]
    assert [r["blocks"] for r in conv] == [1, 2, 4] and [r["window_fs"] for r in conv] == [250.0, 500.0, 1000.0]
    assert conv[-1]["median_ellipticity"] == pytest.approx(br["median_ellipticity"], abs=1e-3)
    assert result["summary"]["Br"]["n"] == 24


def test_correlated_blocks_widen_the_error(tmp_path):
    (tmp_path / "calm").mkdir()
    (tmp_path / "noisy").mkdir()
    calm, _, _ = pooled(tmp_path / "calm", {"z": 1.3}, replicates=80)
    noisy, _, _ = pooled(tmp_path / "noisy", {"z": 1.3}, replicates=80, block_noise=0.15)
    assert noisy["summary"]["Br"]["se_time"] > 0.005
    assert noisy["summary"]["Br"]["se"] > calm["summary"]["Br"]["se"]
    # the 1-block point of the convergence table is one noisy block: further from the truth on average
    first, last = noisy["convergence"][0], noisy["convergence"][-1]
    assert first["frames"] == 5 and last["frames"] == 20
    assert last["median_ellipticity"] == pytest.approx(1.3, abs=0.02)


def test_one_block_keeps_the_asymptotic_error(tmp_path):
    result, _, saved = pooled(tmp_path, {"z": 1.3}, n_blocks=1)
    br = saved["summary"]["Br"]
    assert "at least 2" in saved["block_bootstrap"]["error"]
    assert br["se_method"] == "asymptotic" and br["se"] == br["se_asymptotic"]
    assert np.isnan(br["se_block_bootstrap"]) if br["se_block_bootstrap"] is not None else True
