"""The whole DAG on a tiny config, and what Snakemake re-plans when an input changes."""

import numpy as np
import pandas as pd
import pytest


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, reference_model_path, run_snakemake):
    work = tmp_path_factory.mktemp("tiny")
    run_snakemake(work)
    return work


@pytest.mark.slow
def test_full_dag_makes_table1(tiny_run):
    table = pd.read_csv(tiny_run / "results/report/table1.csv")
    assert list(table["label"]) == [
        "Low dose (48 e/A^2) 4D-STEM",
        "Increased dose (144 e/A^2) 4D-STEM",
        "MD pristine",
        "MD FABr vacancies",
    ]
    assert table["median_ellipticity"].between(1.0, 3.0).all()
    assert (table["se_median"] >= 0).all() and table["se_median"].notna().all()
    assert list(table["simulated"]) == [True, True, True, True]
    md = (tiny_run / "results/report/table1.md").read_text()
    assert "SIMULATED" in md and "reference_mace" in md
    for name in ("table1", "low_dose_icom", "increased_dose_icom", "md_pristine", "md_FABr_vac1"):
        png = tiny_run / f"results/report/figures/{name}.png"
        assert png.stat().st_size > 5000, png
    # nothing half-written left behind
    assert not list((tiny_run / "results").rglob("*.part*"))


@pytest.mark.slow
def test_nothing_left_to_do(tiny_run, run_snakemake, planned_jobs):
    assert planned_jobs(run_snakemake(tiny_run, "-n")) == {}


@pytest.mark.slow
def test_fit_change_replans_only_fit_and_report(tiny_run, run_snakemake, variant, planned_jobs):
    cfg = variant(tiny_run, "fit_window", fit={"window_A": 6.5})
    jobs = planned_jobs(run_snakemake(tiny_run, "-n", configfile=cfg))
    assert set(jobs) == {"fit_md", "fit_stem", "figure", "table1", "table1_plot", "all"}


@pytest.mark.slow
def test_dose_change_never_replans_md_or_multislice(tiny_run, run_snakemake, variant, planned_jobs):
    cfg = variant(tiny_run, "dose", samples={"low_dose": {"dose_e_per_A2": 30.0, "system": "pristine"}})
    jobs = planned_jobs(run_snakemake(tiny_run, "-n", configfile=cfg))
    assert {"dose", "reconstruct", "fit_stem", "table1"} <= set(jobs)
    assert not {"structure", "md", "simulate_4dstem", "snapshot_potential", "fit_md"} & set(jobs)
    assert jobs["dose"] == 1  # only the changed sample


def test_bad_config_fails_before_any_job(tmp_path, run_snakemake, variant):
    proc = run_snakemake(tmp_path, "-n", check=False, configfile=variant(tmp_path, "typo", fit={"windw_A": 6.0}))
    assert proc.returncode != 0
    assert "windw_A" in proc.stdout + proc.stderr
    bad = variant(tmp_path, "nosuch", samples={"low_dose": {"dose_e_per_A2": 48.0, "system": "nosuch"}})
    proc = run_snakemake(tmp_path, "-n", check=False, configfile=bad)
    assert proc.returncode != 0 and "samples.low_dose.system" in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists() and not (tmp_path / "logs").exists()


@pytest.mark.slow
def test_raw_dataset_through_ingest_and_average(tiny_run, run_snakemake, variant):
    """A measured-style dataset (.npy, a scan over 4x4 copies of the cell, Poisson counts) enters
    through ingest, is template-matching averaged back onto the cell and reaches Table 1."""
    import json

    import numpy as np

    from octastem.io import read_4dstem

    clean = read_4dstem(tiny_run / "results/stem/clean/pristine.h5")
    dose = 2000.0
    step = clean.scan_step_A
    rng = np.random.default_rng(7)
    tiled = np.tile(clean.data, (4, 4, 1, 1))
    counts = rng.poisson(tiled * dose * step**2).astype(np.uint16)
    np.save(tiny_run / "measured.npy", counts)
    cal = {
        "energy_eV": clean.energy_eV,
        "semiangle_mrad": clean.semiangle_mrad,
        "scan_step_A": step,
        "k_sampling_mrad": clean.k_sampling_mrad,
        "scan_rotation_deg": 0.0,
    }
    sample = {"dose_e_per_A2": dose, "raw": {"path": "measured.npy", "calibration": cal}}
    columns = [
        {"label": "Measured", "sample": "measured"},
        {"label": "MD pristine", "system": "pristine"},
    ]
    cfg = variant(
        tiny_run,
        "measured",
        samples={"measured": sample},
        table1=columns,
        average={"cell_shape": [30, 30], "supercell": [2, 2]},
    )
    run_snakemake(tiny_run, configfile=cfg)
    table = pd.read_csv(tiny_run / "results/report/table1.csv")
    row = table.set_index("label").loc["Measured"]
    assert not row["simulated"] and row["origin"] == "measured.npy"
    assert 1.0 <= row["median_ellipticity"] < 2.0 and np.isfinite(row["se_median"])
    averaged = json.loads((tiny_run / "results/stem/averaged/measured.json").read_text())
    assert averaged  # the averaging summary records the lattice and the contributions per bin
    ingested = json.loads((tiny_run / "results/stem/raw/measured.json").read_text())
    assert ingested


@pytest.mark.slow
def test_outputs_record_provenance(tiny_run):
    """Trajectory, images and fit summaries carry versions, config hash, params (seeds) and input checksums."""
    import hashlib
    import json

    import h5py

    with h5py.File(tiny_run / "results/md/pristine/trajectory.h5") as f:
        prov = json.loads(f.attrs["provenance"])
    assert prov["run"]["rule"] == "md" and prov["seed"] == 0
    assert len(prov["run"]["config_sha256"]) == 64 and "mace-torch" in prov["versions"]
    structure = "results/structure/pristine.extxyz"
    sha = hashlib.sha256((tiny_run / structure).read_bytes()).hexdigest()
    assert prov["run"]["inputs_sha256"][structure] == sha
    fit = json.loads((tiny_run / "results/fit/low_dose_icom.json").read_text())
    fit_prov = json.loads(fit["provenance"]) if isinstance(fit["provenance"], str) else fit["provenance"]
    assert fit_prov["run"]["rule"] == "fit_stem"
    # the report (re-made by whichever config ran last in this folder) shows its own config hash
    record = json.loads((tiny_run / "results/report/provenance.json").read_text())
    assert len(record["run"]["config_sha256"]) == 64
    assert record["run"]["config_sha256"] in (tiny_run / "results/report/table1.md").read_text()


@pytest.mark.slow
def test_nanocrystal_samples_are_averaged_like_measured_data(tiny_run, run_snakemake, variant, planned_jobs):
    """Simulated samples from a nanocrystal: noisy scan of the crystal's centre -> template-matching
    average onto one MD cell -> reconstruct -> fit -> Table 1 (MD and its trajectories are reused)."""
    import json

    from octastem.io import read_4dstem

    cfg = variant(
        tiny_run,
        "nanocrystal",
        stem={
            "specimen": "nanocrystal",
            "slice_thickness_A": 2.0,
            "nanocrystal": {"edge_A": 36.0, "vacuum_A": 3.0, "scan_cells": 2, "detector_sampling_mrad": 1.5},
        },
        average={"weights": "linear", "image": "adf"},
        reconstruct={"methods": ["icom"], "table_method": "icom", "sampling_A": 0.1},
    )
    jobs = planned_jobs(run_snakemake(tiny_run, "-n", configfile=cfg))
    assert jobs["simulate_nanocrystal"] == 1 and jobs["dose_nanocrystal"] == 2 and jobs["average"] == 2
    assert not {"md", "simulate_4dstem", "dose"} & set(jobs)
    run_snakemake(tiny_run, configfile=cfg)

    raw = read_4dstem(tiny_run / "results/stem/raw/low_dose.h5")
    assert raw.extra["specimen"] == "finite" and raw.scan_shape == [60, 60]  # 2 x 2 cells of 12 A, 0.4 A
    assert raw.extra["averaged_cells"] == 1  # one acquisition at the dose: dose * step^2 electrons per position
    counts = raw.data.sum(axis=(2, 3)).mean()
    assert 0.85 * 48.0 * 0.4**2 < counts <= 48.0 * 0.4**2 * 1.05
    for sample in ("low_dose", "increased_dose"):
        summary = json.loads((tiny_run / f"results/stem/averaged/{sample}.json").read_text())
        assert summary["cell_shape"] == [30, 30] and summary["supercell"] == [2, 2]
        averaged = read_4dstem(tiny_run / f"results/stem/{sample}.h5")
        assert averaged.data.shape[:2] == (30, 30) and averaged.extra["supercell"] == [2, 2]
        # 3600 scan positions onto 900 bins: 4 contributions per bin; bilinear weights spread each
        # position over 4 bins, so the effective count (sum w)^2 / sum w^2 is larger
        assert np.mean(averaged.extra["n_contributions"]) == pytest.approx(4.0)
        assert summary["n_mean"] >= 4.0 and summary["snr_gain_expected"] == pytest.approx(np.sqrt(summary["n_mean"]))
        # the noise measured between the two checkerboard halves falls as expected
        assert summary["snr_gain_split_half"] == pytest.approx(summary["snr_gain_expected"], rel=0.25)
        # the template-matching lattice is the perovskite cell: 6 A = 15 scan positions
        for a in (summary["lattice_a1_px"], summary["lattice_a2_px"]):
            assert np.hypot(*a) == pytest.approx(15.0, rel=0.04)
    table = pd.read_csv(tiny_run / "results/report/table1.csv")
    stem_rows = table[table["source"] == "4D-STEM"]
    assert len(stem_rows) == 2 and stem_rows["simulated"].all()
    assert stem_rows["median_ellipticity"].between(1.0, 3.0).all() and stem_rows["se_median"].notna().all()
    assert "nanocrystal" in (tiny_run / "results/report/table1.md").read_text()
