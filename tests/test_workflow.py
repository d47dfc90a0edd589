"""The whole DAG on a tiny config, and what Snakemake re-plans when an input changes; configs of
measured samples only (config/own_data.yaml) or MD only, and the notes of the report."""

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from octastem.io import Stem4D, write_4dstem

REPO = Path(__file__).resolve().parents[1]
OWN_DATA = REPO / "config" / "own_data.yaml"
MD_JOBS = {"structure", "md", "md_analysis", "snapshot_potential", "fit_md", "md_statistics", "md_figures"}
STEM_JOBS = {"simulate_4dstem", "simulate_nanocrystal", "dose", "dose_nanocrystal", "ingest", "average", "reconstruct"}


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
        "MD pristine through the chain (noise free)",
    ]
    assert list(table["source"]) == ["4D-STEM", "4D-STEM", "MD", "MD", "MD through the chain"]
    assert table["like_for"].iloc[-1] == "low_dose,increased_dose"
    assert table["median_ellipticity"].between(1.0, 3.0).all()
    assert (table["se_median"] >= 0).all() and table["se_median"].notna().all()
    assert list(table["simulated"]) == [True, True, True, True, True]
    cmp = pd.read_csv(tiny_run / "results/report/comparisons.csv")
    kinds = cmp["comparison"].tolist()
    assert sum("like for like" in k for k in kinds) == 2 and sum("study's comparison" in k for k in kinds) == 2
    assert sum("increased vs low dose" in k for k in kinds) == 1 and sum("vacancies" in k for k in kinds) == 1
    assert {"difference", "se", "z", "significant"} <= set(cmp.columns)
    md = (tiny_run / "results/report/table1.md").read_text()
    assert "SIMULATED" in md and "reference_mace" in md
    for name in (
        "table1",
        "low_dose_icom",
        "increased_dose_icom",
        *(f"md_{system}_{axis}" for system in ("pristine", "FABr_vac1") for axis in "xyz"),
        "convergence_pristine",
    ):
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
    assert set(jobs) == {"fit_md", "md_statistics", "fit_stem", "figure", "table1", "table1_plot", "all"}


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
            # one MD frame tiled: the tiny MD's three frames lie 1 fs apart, so distinct tiles differ by 1-2 fs of
            # motion only, and the lattice search of this 4 x 4-period scan at 48 e/A^2 is marginal (with distinct
            # tiles it found a period 5.1 % off and was refused); the embedded default runs distinct tiles
            "nanocrystal": {
                "edge_A": 36.0,
                "vacuum_A": 3.0,
                "scan_cells": 2,
                "detector_sampling_mrad": 1.5,
                "tiles": "same",
            },
        },
        average={"weights": "linear", "image": "adf"},
        reconstruct={"methods": ["icom"], "table_method": "icom", "sampling_A": 0.1},
    )
    jobs = planned_jobs(run_snakemake(tiny_run, "-n", configfile=cfg))
    # two noisy samples and their noise-free twin (the same scan, template-averaged without noise)
    assert jobs["simulate_nanocrystal"] == 1 and jobs["dose_nanocrystal"] == 2 and jobs["average"] == 3
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
    twin = table[table["source"] == "MD through the chain"]
    assert twin["dataset"].tolist() == ["noisefree-pristine"] and twin["median_ellipticity"].between(1.0, 3.0).all()
    clean = json.loads((tiny_run / "results/stem/averaged/noisefree-pristine.json").read_text())
    assert clean["cell_shape"] == [30, 30] and clean["supercell"] == [2, 2]


# ----------------------------------------------------------------------------------------------
# Samples only, MD only
# ----------------------------------------------------------------------------------------------


def test_samples_only_config_plans_no_md(tmp_path, run_snakemake, planned_jobs):
    """config/own_data.yaml as shipped (its dataset written where it points) plans the measured
    sample's chain and the report, and not one MD, structure or simulation job."""
    (tmp_path / "data").mkdir()
    counts = np.random.default_rng(0).poisson(0.5, (12, 12, 8, 8)).astype(np.uint16)
    write_4dstem(tmp_path / "data/my_nc.h5", Stem4D(counts, 300e3, 25.0, 0.4, 1.0, 48.0, source="measured"))
    jobs = planned_jobs(run_snakemake(tmp_path, "-n", configfile=OWN_DATA))
    assert jobs == {
        "ingest": 1,
        "average": 1,
        "reconstruct": 2,
        "fit_stem": 2,
        "figure": 2,
        "table1": 1,
        "table1_plot": 1,
        "all": 1,
    }
    # a simulated sample still needs its MD system
    cfg = yaml.safe_load(OWN_DATA.read_text())
    cfg["samples"]["sim"] = {"dose_e_per_A2": 48.0, "system": "pristine"}
    path = tmp_path / "sim.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = run_snakemake(tmp_path, "-n", check=False, configfile=path)
    assert proc.returncode != 0 and "samples.sim.system" in proc.stdout + proc.stderr


def test_measured_sample_with_a_system_plans_its_simulated_twin(tmp_path, run_snakemake, planned_jobs):
    """A measured sample compared with an MD system: the system's MD frames are simulated through the
    sample's own chain (simulate_like reads the ingested file's calibration), averaged, reconstructed
    and fitted by the Table's method, and Table 1 takes that fit beside the sample's; without the
    specimen thickness the config is refused before any job, naming the key."""
    (tmp_path / "data").mkdir()
    counts = np.random.default_rng(0).poisson(0.5, (12, 12, 8, 8)).astype(np.uint16)
    write_4dstem(tmp_path / "data/my_nc.h5", Stem4D(counts, 300e3, 25.0, 0.4, 1.0, 48.0, source="measured"))
    cfg = yaml.safe_load(OWN_DATA.read_text())
    tiny = yaml.safe_load((REPO / "tests/configs/tiny.yaml").read_text())
    cfg.update(systems={"pristine": 0}, md=tiny["md"], structure=tiny["structure"])
    cfg["samples"]["my_nc"]["system"] = "pristine"
    path = tmp_path / "own_md.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = run_snakemake(tmp_path, "-n", check=False, configfile=path)
    assert proc.returncode != 0 and "reconstruct.thickness_A" in proc.stdout + proc.stderr
    cfg["reconstruct"]["thickness_A"] = 36.0
    path.write_text(yaml.safe_dump(cfg))
    proc = run_snakemake(tmp_path, "-n", configfile=path)
    jobs = planned_jobs(proc)
    assert jobs["simulate_like"] == 1 and jobs["ingest"] == 1 and jobs["md"] == 1
    assert jobs["average"] == 2 and jobs["reconstruct"] == 3 and jobs["fit_stem"] == 3
    assert "simulate_nanocrystal" not in jobs and "snapshot_potential" not in jobs  # no MD column asked for
    out = proc.stdout + proc.stderr
    assert "results/stem/raw/my_nc-md-pristine.h5" in out and "results/fit/my_nc-md-pristine_cnn.json" in out
    # switched off, the sample is analysed alone (the listed system's MD still runs for its analysis)
    cfg["samples"]["my_nc"]["like_for_like"] = False
    path.write_text(yaml.safe_dump(cfg))
    jobs = planned_jobs(run_snakemake(tmp_path, "-n", configfile=path))
    assert "simulate_like" not in jobs and jobs["reconstruct"] == 2 and jobs["fit_stem"] == 2


def test_every_method_of_the_schema_plans_through_the_default_target(tmp_path, run_snakemake, planned_jobs):
    """Every method the schema allows, underscores included (icom_wiener), with sample names that hold
    underscores too: the default target plans one reconstruction, fit and figure per sample and method."""
    schema = yaml.safe_load((REPO / "config/schema.yaml").read_text())
    methods = schema["properties"]["reconstruct"]["properties"]["methods"]["items"]["enum"]
    assert "icom_wiener" in methods
    path = _tiny_variant(tmp_path, reconstruct={"methods": methods, "table_method": "icom_wiener"})
    proc = run_snakemake(tmp_path, "-n", configfile=path)
    jobs = planned_jobs(proc)
    n = 2 * len(methods) + 1  # two samples by every method, and the noise-free twin by the Table's method
    assert jobs["reconstruct"] == n and jobs["fit_stem"] == n
    assert jobs["figure"] == n + 6  # and the three projections of the two MD systems
    out = proc.stdout + proc.stderr
    for m in methods:
        assert f"results/reconstruct/low_dose/{m}.h5" in out and f"results/report/figures/increased_dose_{m}.png" in out
    assert "results/reconstruct/noisefree-pristine/icom_wiener.h5" in out


def test_coarse_step_for_a_scan_grid_table_method_is_refused(tmp_path, run_snakemake):
    path = _tiny_variant(tmp_path, reconstruct={"allow_coarse_step": False})
    proc = run_snakemake(tmp_path, "-n", check=False, configfile=path)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "stem.scan_step_A" in text and "allow_coarse_step" in text
    fine = _tiny_variant(tmp_path, reconstruct={"allow_coarse_step": False}, stem={"scan_step_A": 0.2})
    assert run_snakemake(tmp_path, "-n", configfile=fine).returncode == 0


def _tiny_variant(tmp_path, **changes):
    cfg = yaml.safe_load((REPO / "tests/configs/tiny.yaml").read_text())
    for key, value in changes.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    path = tmp_path / f"variant_{len(list(tmp_path.glob('variant_*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_md_only_config_plans_no_4dstem(tmp_path, run_snakemake, planned_jobs):
    cfg = yaml.safe_load((REPO / "tests/configs/tiny.yaml").read_text())
    del cfg["samples"]
    cfg["table1"] = [col for col in cfg["table1"] if "system" in col]
    path = tmp_path / "md_only.yaml"
    path.write_text(yaml.safe_dump(cfg))
    jobs = planned_jobs(run_snakemake(tmp_path, "-n", configfile=path))
    assert MD_JOBS <= set(jobs) and not STEM_JOBS & set(jobs) and "fit_stem" not in jobs
    # three projections of each of the 2 systems, pooled per system
    assert jobs["fit_md"] == 6 and jobs["md_statistics"] == 2 and jobs["figure"] == 6 and jobs["table1"] == 1


def _fit_summary(path, n, median=1.1, se=0.02):
    path.write_text(
        json.dumps({"summary": {"Br": {"n": n, "median_ellipticity": median, "se": se, "se_method": "asymptotic"}}})
    )
    return path


def test_table1_of_samples_only_warns_on_few_columns(tmp_path, caplog):
    """Table 1 has exactly the configured columns; without MD systems there is no MD note; an
    entry resting on fewer than 16 Br columns is warned about in the log and in the notes."""
    from octastem.config import schema_defaults
    from octastem.report import write_table1

    samples = {
        "wide": {"dose_e_per_A2": 48.0, "raw": {"path": "data/wide.h5"}},
        "one_cell": {"dose_e_per_A2": 48.0, "raw": {"path": "data/one_cell.h5"}},
    }
    columns = [{"label": "Wide", "sample": "wide"}, {"label": "One cell", "sample": "one_cell"}]
    fits = [_fit_summary(tmp_path / "wide.json", 18), _fit_summary(tmp_path / "one.json", 2)]
    out = {k: tmp_path / f"table1.{k}" for k in ("csv", "md", "html")}
    with caplog.at_level(logging.WARNING, logger="octastem"):
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
            {},
        )
    assert list(df["label"]) == ["Wide", "One cell"] and list(pd.read_csv(out["csv"])["n_columns"]) == [18, 2]
    md = out["md"].read_text()
    assert "MD:" not in md and "MACE" not in md
    assert "One cell rests on 2 Br columns, fewer than 16" in md and "Wide rests on" not in md
    assert [r.getMessage() for r in caplog.records if "rests on" in r.getMessage()] == [
        next(line[2:] for line in md.splitlines() if "rests on" in line)
    ]


def _measured_scan(path):
    """A measured-style dataset: abTEM 4D-STEM (0.4 A step) of the periodic ideal FAPbBr3 cell, 5
    cells (30 A) thick, tiled over 8 x 8 unit cells (120 x 120 positions), Poisson counts at 48 e/A^2."""
    from octastem.stem.simulate import add_poisson_noise, simulate_4dstem
    from octastem.structure import build_fapbbr3

    clean = simulate_4dstem(
        build_fapbbr3((1, 1, 5)),
        energy_eV=300e3,
        semiangle_mrad=25.0,
        scan_step_A=0.4,
        sampling_A=0.05,
        slice_thickness_A=2.0,
        max_angle_mrad=50.0,
        num_workers=2,
    )
    counts = add_poisson_noise(np.tile(clean.data, (8, 8, 1, 1)), 48.0, 0.4, np.random.default_rng(5))
    cal = (clean.energy_eV, clean.semiangle_mrad, 0.4, clean.k_sampling_mrad, 48.0)
    write_4dstem(path, Stem4D(counts.astype(np.uint16), *cal, source="measured"))


@pytest.mark.slow
def test_samples_only_config_runs_end_to_end(tmp_path, run_snakemake):
    """config/own_data.yaml on a measured-style dataset: ingest -> average -> reconstruct -> fit ->
    Table 1, no MD anywhere (about 2 minutes on 2 cores)."""
    (tmp_path / "data").mkdir()
    _measured_scan(tmp_path / "data/my_nc.h5")
    run_snakemake(tmp_path, configfile=OWN_DATA)
    table = pd.read_csv(tmp_path / "results/report/table1.csv")
    assert list(table["label"]) == ["My nanocrystal (48 e/A^2)"]
    row = table.iloc[0]
    assert row["n_columns"] == 18 and not row["simulated"] and row["origin"] == "data/my_nc.h5"
    assert 1.0 <= row["median_ellipticity"] < 1.3 and 0 < row["se_median"] < 0.1
    md = (tmp_path / "results/report/table1.md").read_text()
    assert "MD:" not in md and "WARNING" not in md
    assert not (tmp_path / "results/md").exists() and not (tmp_path / "results/structure").exists()
    assert (tmp_path / "results/report/figures/my_nc_cnn.png").stat().st_size > 5000
