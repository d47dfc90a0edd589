"""benchmarks/md_observable.py on 20 MD steps: every step of the student-against-reference benchmark
(runs, scalar observables with block-bootstrap SEs, the pooled Br ellipticity through the pipeline's
own stages, the comparisons and their 2-SE verdicts) on the 2 x 2 x 2 cell with the student."""

import importlib.util
import math
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "md_observable.py"
OBSERVABLES = {
    "br_perpendicular_rms_A",
    "br_parallel_rms_A",
    "pb_br_pb_angle_mean_deg",
    "pb_br_pb_angle_sd_deg",
    "lattice_a_A",
    "br_ellipticity_pooled",
}


@pytest.mark.slow
def test_md_observable_benchmark_in_20_steps(tmp_path):
    spec = importlib.util.spec_from_file_location("md_observable", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    doc = bench.smoke(tmp_path / "md_observable.json")
    assert (tmp_path / "md_observable.json").stat().st_size > 1000
    assert set(doc["runs"]) == {"student", "student_dt0.5"} and not doc["missing_runs"]
    for run in doc["runs"].values():
        assert set(run["observables"]) == OBSERVABLES
        for name, o in run["observables"].items():
            assert math.isfinite(o["value"]) and o["se"] >= 0, name
        assert 1.0 <= run["observables"]["br_ellipticity_pooled"]["value"] < 3.0
        assert 150.0 < run["observables"]["pb_br_pb_angle_mean_deg"]["value"] <= 180.0
    (cmp,) = doc["comparisons"]
    assert cmp["a"] == "student" and cmp["b"] == "student_dt0.5"
    rows = cmp["observables"]
    assert set(rows) == OBSERVABLES | {"pb_br_pb_angle_histogram_w1_deg"}
    for name in OBSERVABLES:
        r = rows[name]
        assert r["difference"] == pytest.approx(r["a"] - r["b"])
        assert r["within_2se"] == (abs(r["difference"]) <= 2 * r["combined_se"])
    assert cmp["passes"] == all(r.get("within_2se", r.get("passes")) for r in rows.values())
