"""Reproducibility: the tiny config run twice gives the same Table 1, and a change re-runs only
what depends on it (MD length -> everything downstream of MD; a plotting script -> the report).

The fit-parameter and dose cases are in test_workflow.py. The reference run (fixture ``reference``
in conftest.py) is shared with test_faults.py.
"""

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]

#: Every rule of the tiny DAG except `structure` (and `all`).
DOWNSTREAM_OF_MD = {
    "md",
    "md_analysis",
    "md_figures",
    "snapshot_potential",
    "simulate_4dstem",
    "dose",
    "reconstruct",
    "fit_stem",
    "fit_md",
    "md_statistics",
    "figure",
    "table1",
    "table1_plot",
}


@pytest.fixture(scope="module")
def second_run(tmp_path_factory, reference_model_path, run_snakemake):
    work = tmp_path_factory.mktemp("second-tiny")
    run_snakemake(work)
    return work


def test_two_runs_give_identical_table1(reference, second_run):
    first = (reference / "results/report/table1.csv").read_bytes()
    second = (second_run / "results/report/table1.csv").read_bytes()
    assert first == second
    # and the intermediate results behind it, to point at the stage if it ever differs
    for system in ("pristine", "FABr_vac1"):
        with (
            h5py.File(reference / f"results/md/{system}/trajectory.h5") as a,
            h5py.File(second_run / f"results/md/{system}/trajectory.h5") as b,
        ):
            for name in ("time_fs", "positions", "cell", "energy_eV"):
                assert np.array_equal(a[name][()], b[name][()]), f"{system}: {name}"
    for name in ("low_dose", "increased_dose"):
        path = f"results/stem/{name}.h5"
        with h5py.File(reference / path) as a, h5py.File(second_run / path) as b:
            assert np.array_equal(a["data"][()], b["data"][()]), name
    for fit in sorted((reference / "results/fit").glob("*.csv")):
        assert fit.read_bytes() == (second_run / "results/fit" / fit.name).read_bytes(), fit.name


def test_md_length_change_reruns_everything_downstream_of_md(reference, run_snakemake, variant, planned_jobs):
    cfg = variant(reference, "md_length", md={"total_fs": 4.0})
    jobs = planned_jobs(run_snakemake(reference, "-n", configfile=cfg))
    assert set(jobs) - {"all"} == DOWNSTREAM_OF_MD
    assert jobs["md"] == 2 and "structure" not in jobs


def copy_workflow(dest: Path) -> Path:
    """The workflow's code (Snakefile, workflow/, config/, profiles/) copied with its timestamps."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(REPO / "Snakefile", dest / "Snakefile")
    for folder in ("workflow", "config", "profiles"):
        shutil.copytree(REPO / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return dest / "Snakefile"


def test_plot_script_edit_reruns_only_the_report(reference, tmp_path, run_snakemake, planned_jobs):
    snakefile = copy_workflow(tmp_path / "code")
    # unchanged copy: nothing to do
    assert planned_jobs(run_snakemake(reference, "-n", snakefile=snakefile)) == {}
    for script in ("figure.py", "table1_plot.py"):
        path = tmp_path / "code/workflow/scripts" / script
        path.write_text(path.read_text() + "# edited: larger labels\n")
    jobs = planned_jobs(run_snakemake(reference, "-n", snakefile=snakefile))
    assert set(jobs) == {"figure", "table1_plot", "all"}
    tiny = yaml.safe_load((REPO / "tests/configs/tiny.yaml").read_text())
    schema = yaml.safe_load((REPO / "config/schema.yaml").read_text())
    axes = tiny.get("potential", {}).get("axes", schema["properties"]["potential"]["properties"]["axes"]["default"])
    # one figure per sample and method, one per MD system and projection axis, and the noise-free twin
    # of the simulated samples by the Table's method
    n_figures = len(tiny["samples"]) * len(tiny["reconstruct"]["methods"]) + len(tiny["systems"]) * len(axes) + 1
    assert jobs["figure"] == n_figures
