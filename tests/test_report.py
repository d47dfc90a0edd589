"""Table 1 report: the comparisons the study needs, per-projection values and the convergence table."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from octastem.config import schema_defaults
from octastem.io import InputError
from octastem.report import comparisons, write_table1


def _summary(path, median, se, n, by_axis=None, convergence=None):
    br = {"n": n, "median_ellipticity": median, "se": se, "se_method": "block_bootstrap" if by_axis else "asymptotic"}
    if by_axis:
        br["by_axis"] = by_axis
    path.write_text(json.dumps({"summary": {"Br": br}, "convergence": convergence or []}))
    return path


SAMPLES = {
    "low": {"dose_e_per_A2": 48.0, "system": "pristine"},
    "measured": {"dose_e_per_A2": 48.0, "raw": {"path": "data/x.h5"}},
}
SYSTEMS = {"pristine": 0, "vac": 11}
COLUMNS = [
    {"label": "Low", "sample": "low"},
    {"label": "Measured", "sample": "measured"},
    {"label": "MD pristine", "system": "pristine"},
    {"label": "MD vac", "system": "vac"},
]


def test_comparisons_and_report_sections(tmp_path):
    axes = {
        a: {"n": 32, "median_ellipticity": m, "se": 0.02, "se_method": "asymptotic"}
        for a, m in zip("xyz", (1.30, 1.31, 1.32))
    }
    conv = [
        {
            "blocks": k,
            "frames": 20 * k,
            "window_fs": 1000.0 * k,
            "n": 96,
            "median_ellipticity": 1.3 + 0.01 / k,
            "se": 0.02,
            "per_axis_median": {"x": 1.3, "y": 1.31, "z": 1.32},
        }
        for k in (1, 2, 5)
    ]
    fits = [
        _summary(tmp_path / "low.json", 1.40, 0.03, 32),
        _summary(tmp_path / "measured.json", 1.35, 0.03, 32),
        _summary(tmp_path / "pristine.json", 1.31, 0.01, 96, axes, conv),
        _summary(tmp_path / "vac.json", 1.33, 0.02, 96, axes, conv),
    ]
    out = {k: tmp_path / f"table1.{k}" for k in ("csv", "md", "html")}
    df = write_table1(
        out["csv"],
        out["md"],
        out["html"],
        COLUMNS,
        fits,
        SAMPLES,
        "cnn",
        [],
        schema_defaults("md"),
        schema_defaults("stem"),
        schema_defaults("structure"),
        SYSTEMS,
        comparisons_csv=tmp_path / "cmp.csv",
    )
    cmp = pd.read_csv(tmp_path / "cmp.csv")
    # the simulated sample against its system; the measured sample has no MD twin; vacancies vs pristine
    assert list(zip(cmp["a"], cmp["b"])) == [("Low", "MD pristine"), ("MD vac", "MD pristine")]
    assert cmp["difference"].tolist() == pytest.approx([0.09, 0.02])
    assert cmp["se"].tolist() == pytest.approx([(0.03**2 + 0.01**2) ** 0.5, (0.02**2 + 0.01**2) ** 0.5])
    assert cmp["significant"].tolist() == [True, False]
    md = out["md"].read_text()
    assert "Low minus MD pristine: +0.090 ± 0.032 (+2.8 SE, significant at 2 SE)" in md
    assert "MD vac minus MD pristine: +0.020 ± 0.022 (+0.9 SE, not significant at 2 SE)" in md
    assert "- MD pristine: x: 1.300 ± 0.020 (n = 32); y: 1.310 ± 0.020 (n = 32); z: 1.320 ± 0.020 (n = 32)" in md
    assert "| 5 | 100 | 96 | 1.302 ± 0.020 | 1.300 | 1.310 | 1.320 |" in md
    assert "significant at 2 SE" in out["html"].read_text()
    assert df.loc[2, "per_axis"].startswith("x: 1.300")


def test_no_pairs_without_md():
    df = pd.DataFrame({"label": ["M"], "median_ellipticity": [1.2], "se_median": [0.01]})
    assert comparisons(df, [COLUMNS[1]], SAMPLES, {}).empty


def test_headline_is_the_noise_corrected_median_with_measured_value_beside_it(tmp_path):
    low = tmp_path / "low.json"
    br = {
        "n": 32,
        "median_ellipticity": 1.40,
        "se": 0.03,
        "se_method": "asymptotic",
        "noise_bias": 0.05,
        "noise_bias_se": 0.01,
        "corrected_median_ellipticity": 1.35,
        "corrected_se": (0.03**2 + 0.01**2) ** 0.5,
        "baseline_median_ellipticity": 1.08,
    }
    low.write_text(json.dumps({"summary": {"Br": br}}))
    md = _summary(tmp_path / "pristine.json", 1.31, 0.01, 96)
    columns = [COLUMNS[0], COLUMNS[2]]
    tables = {}
    for headline in ("corrected", "measured"):
        out = {k: tmp_path / f"{headline}.{k}" for k in ("csv", "md", "html")}
        args = (columns, [low, md], SAMPLES, "icom", [], schema_defaults("md"), schema_defaults("stem"))
        args += (schema_defaults("structure"), SYSTEMS)
        tables[headline] = write_table1(out["csv"], out["md"], out["html"], *args, headline=headline)
        text = out["md"].read_text()
        assert "noise alone (round columns, same SNR) gives 1.080" in text
    got = tables["corrected"].set_index("label")
    assert got.loc["Low", "median_ellipticity"] == pytest.approx(1.35) and got.loc["Low", "value"] == "corrected"
    assert got.loc["Low", "measured_median_ellipticity"] == pytest.approx(1.40)
    assert got.loc["MD pristine", "value"] == "measured"  # noise-free projected potential: nothing to remove
    assert tables["measured"].set_index("label").loc["Low", "median_ellipticity"] == pytest.approx(1.40)
    with pytest.raises(InputError, match="headline"):
        write_table1(out["csv"], out["md"], out["html"], *args, headline="best")


def _suite_table(path):
    rows = []
    for method, step, dose, cells, delta, truth, read in [
        ("cnn", 0.2, 48.0, 64, 0.0, 1.02, 1.06),
        ("cnn", 0.2, 48.0, 64, 0.1, 1.20, 1.15),
        ("cnn", 0.2, None, 1, 0.1, 1.20, 1.18),
        ("cnn", 0.4, 48.0, 64, 0.1, 1.20, 1.40),
        ("icom", 0.2, 48.0, 64, 0.1, 1.20, 1.10),
    ]:
        rows.append(
            {
                "method": method,
                "case": f"FA_d{delta:.2f}_static_t4_s{step:.2f}",
                "cation": "FA",
                "delta_A": delta,
                "thickness_cells": 4,
                "scan_step_A": step,
                "dose_e_per_A2": dose,
                "averaged_cells": cells,
                "n_seeds": 3 if dose else 1,
                "br_ellipticity": read,
                "br_ellipticity_std": 0.01,
                "truth_band_limited": truth,
                "bias_band_limited": read - truth,
            }
        )
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_method_check_takes_the_suite_cases_nearest_to_the_acquisition(tmp_path):
    """The cases are chosen by step, dose, averaging and thickness, never by the measured value: a round
    and an elongated crystal measured the same way get the same check, listing every structure there."""
    from octastem.report import method_check, method_check_notes

    suite = pd.read_csv(_suite_table(tmp_path / "suite.csv"))
    rows = method_check(suite, "cnn", 48.0, 0.2, 24.0)
    assert rows["case"].tolist() == ["FA_d0.00_static_t4_s0.20", "FA_d0.10_static_t4_s0.20"]
    assert rows["bias_band_limited"].tolist() == pytest.approx([0.04, -0.05])
    assert (rows["step_mismatch"] == 0.0).all() and (rows["averaged_cells"] == 64).all()
    assert method_check(suite, "cnn", 48.0, 0.4, 24.0)["bias_band_limited"].tolist() == pytest.approx([0.20])
    assert method_check(suite, "wdd", 48.0, 0.2, 24.0) is None
    df = pd.DataFrame(
        [
            {
                "source": "4D-STEM",
                "dataset": d,
                "label": d,
                "method": "cnn",
                "dose_e_per_A2": 48.0,
                "median_ellipticity": m,
            }
            for d, m in (("round", 1.0), ("elongated", 1.6))
        ]
    )
    samples = {"round": {"dose_e_per_A2": 48.0}, "elongated": {"dose_e_per_A2": 48.0}}
    notes = method_check_notes(df, samples, {"scan_step_A": 0.3}, {}, tmp_path / "suite.csv", {"round": 60.0})
    assert "bias +0.040" in notes[0] and "bias -0.050" in notes[0] and "0.3 A) is not in the suite" in notes[0]
    assert notes[0].split(": on")[1] == notes[1].split(": on")[1]  # the measured value chooses nothing
    assert "60 cells averaged" in notes[0]
    assert "no known-truth suite" in method_check_notes(df, {}, {}, {}, tmp_path / "none.csv")[0]


def test_like_for_like_rows_and_the_comparisons_that_decide(tmp_path):
    """Each sample beside its MD system through the same chain: one noise-free row shared by the simulated
    samples of a system, one simulated twin per measured sample; comparisons like for like, the study's
    (against the raw potential, labelled), increased minus low dose and vacancies minus pristine."""
    samples = {
        "low": {"dose_e_per_A2": 48.0, "system": "pristine"},
        "high": {"dose_e_per_A2": 144.0, "system": "pristine"},
        "measured": {"dose_e_per_A2": 48.0, "system": "pristine", "raw": {"path": "data/x.h5"}},
    }
    columns = [
        {"label": "Low", "sample": "low"},
        {"label": "High", "sample": "high"},
        {"label": "Measured", "sample": "measured"},
        {"label": "MD pristine", "system": "pristine"},
        {"label": "MD vac", "system": "vac"},
    ]
    fits = [
        _summary(tmp_path / "low.json", 1.40, 0.03, 32),
        _summary(tmp_path / "high.json", 1.30, 0.02, 32),
        _summary(tmp_path / "measured.json", 1.35, 0.03, 40),
        _summary(tmp_path / "pristine.json", 1.45, 0.01, 96),
        _summary(tmp_path / "vac.json", 1.47, 0.02, 96),
    ]
    like = {"low": "noisefree-pristine", "high": "noisefree-pristine", "measured": "measured-md-pristine"}
    like_fits = {
        "noisefree-pristine": str(_summary(tmp_path / "nf.json", 1.28, 0.02, 32)),
        "measured-md-pristine": str(_summary(tmp_path / "twin.json", 1.33, 0.03, 40)),
    }
    out = {k: tmp_path / f"table1.{k}" for k in ("csv", "md", "html")}
    df = write_table1(
        out["csv"],
        out["md"],
        out["html"],
        columns,
        fits,
        samples,
        "cnn",
        [],
        schema_defaults("md"),
        schema_defaults("stem"),
        schema_defaults("structure"),
        SYSTEMS,
        comparisons_csv=tmp_path / "cmp.csv",
        like=like,
        like_fits=like_fits,
    )
    assert df["label"].tolist()[5:] == ["MD pristine through the chain (noise free)", "MD pristine through the chain"]
    assert df["like_for"].tolist()[5:] == ["low,high", "measured"]
    assert df["median_ellipticity"].tolist()[5:] == pytest.approx([1.28, 1.33])
    cmp = pd.read_csv(tmp_path / "cmp.csv")
    got = {(r.comparison.split(" (")[0], r.a, r.b): r.difference for r in cmp.itertuples()}
    assert got == pytest.approx(
        {
            (
                "4D-STEM vs its MD system through the same chain",
                "Low",
                "MD pristine through the chain (noise free)",
            ): 0.12,
            ("4D-STEM vs the MD projected potential", "Low", "MD pristine"): -0.05,
            (
                "4D-STEM vs its MD system through the same chain",
                "High",
                "MD pristine through the chain (noise free)",
            ): 0.02,
            ("4D-STEM vs the MD projected potential", "High", "MD pristine"): -0.15,
            ("4D-STEM vs its MD system through the same chain", "Measured", "MD pristine through the chain"): 0.02,
            ("4D-STEM vs the MD projected potential", "Measured", "MD pristine"): -0.10,
            ("increased vs low dose", "High", "Low"): -0.10,
            ("vacancies vs pristine", "MD vac", "MD pristine"): 0.02,
        }
    )
    row = cmp[(cmp["a"] == "High") & (cmp["b"] == "Low")].iloc[0]
    assert row["se"] == pytest.approx((0.02**2 + 0.03**2) ** 0.5) and row["significant"]  # -2.8 SE
    md = out["md"].read_text()
    assert "| comparison | a | b | a - b | combined SE | z | exceeds 2 SE |" in md
    assert "MD pristine through the chain (noise free): beside low, high: the same simulated specimen" in md
    assert "Br columns behind each value: Low 32, High 32, Measured 40" in md


def test_md_sensitivity_table_in_the_report(tmp_path):
    from octastem.report import sensitivity_lines

    doc = {
        "runs": {
            "reference": {"pipeline": {"median": 1.457, "se": 0.050}, "blur 0.15 A": {"median": 1.328, "se": 0.038}},
            "student": {"pipeline": {"median": 1.359, "se": 0.059}},
        }
    }
    path = tmp_path / "md_sensitivity.json"
    path.write_text(json.dumps(doc))
    lines = sensitivity_lines(path)
    assert "| analysis choice | reference | student |" in lines
    assert "| pipeline | 1.457 ± 0.050 | 1.359 ± 0.059 |" in lines
    assert "| blur 0.15 A | 1.328 ± 0.038 |  |" in lines
    path.write_text("{}")
    with pytest.raises(InputError, match="md_sensitivity.json: unreadable MD sensitivity table"):
        sensitivity_lines(path)


def test_alignment_measured_at_ingest_is_stated(tmp_path):
    from octastem.report import alignment_notes

    summary = tmp_path / "my_nc.json"
    record = {
        "fit": "plane",
        "disc": {"centre_px": [111.8, 25.2], "radius_px": 24.6},
        "disc_radius_mrad": 24.6,
        "rotation": {"source": "measured", "applied_deg": 17.02, "measured_deg": 17.02, "flip": True},
    }
    summary.write_text(json.dumps({"alignment": record}))
    off = tmp_path / "off.json"
    off.write_text(json.dumps({"alignment": None}))
    df = pd.DataFrame(
        [
            {"source": "4D-STEM", "dataset": "my_nc", "label": "Mine"},
            {"source": "4D-STEM", "dataset": "raw_off", "label": "Off"},
            {"source": "4D-STEM", "dataset": "simulated", "label": "Sim"},
        ]
    )
    notes = alignment_notes(df, {"my_nc": summary, "raw_off": off})
    assert len(notes) == 2
    assert "(111.8, 25.2) px, radius 24.6 px" in notes[0] and "(plane)" in notes[0]
    assert "scan rotation 17.02 deg applied (measured, measured 17.02 deg), flip yes" in notes[0]
    assert "origin: off" in notes[1]
