"""Known-truth evaluation suite of the phase reconstructions (octastem.evaluation) on a tiny grid."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from octastem.evaluation import SUITE_COLUMNS, cases, checkpoint_key, load_checkpoint, run_suite, split_cubic
from octastem.io import InputError

TINY = {
    "cations": ["FA"],
    "delta_A": [0.0, 0.3],
    "phonons": ["static"],
    "thickness_cells": [2],
    "scan_step_A": [0.4],
    "in_plane_cells": 2,
    "methods": ["icom", "icom_wiener", "cnn"],
    "n_seeds": 1,
    "acquisitions": [{"dose_e_per_A2": None}, {"dose_e_per_A2": 48.0, "averaged_cells": 64}],
}
COARSE = {"sampling_A": 0.1, "slice_thickness_A": 2.0}


def test_split_cubic_moves_br_perpendicular_and_alternating():
    atoms = split_cubic("Cs", (1, 1, 2), 0.2)
    br = atoms.positions[atoms.arrays["site"] == "Br"]
    on_x = np.isclose(br[:, 0] % 5.87, 2.935)  # x-bond Br: moved along y by +-0.2, opposite in the two layers
    dy = (br[on_x, 1] + 1.0) % 5.87 - 1.0
    np.testing.assert_allclose(np.sort(dy), [-0.2, 0.2], atol=1e-9)
    with pytest.raises(InputError, match="cations"):
        cases({**TINY, "cations": ["MA"]})


def test_tiny_suite_table_truth_and_plot(tmp_path):
    record = run_suite(tmp_path, settings=TINY, optics=COARSE, threads=2)
    with open(tmp_path / "suite.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == SUITE_COLUMNS
    # 3 methods x 2 cases x 2 acquisitions
    assert len(rows) == 12 and {r["method"] for r in rows} == {"icom", "icom_wiener", "cnn"}
    truth = {c["delta_A"]: c for c in record["cases"]}
    # a round column (delta = 0, static) is round in both truths; a 0.6 A split is far from round
    for kind in ("truth_potential", "truth_band_limited"):
        assert truth[0.0][kind] == pytest.approx(1.0, abs=0.05)
        assert truth[0.3][kind] > truth[0.0][kind] + 0.5
    for r in rows:
        bias = float(r["br_ellipticity"]) - float(r["truth_band_limited"])
        assert float(r["bias_band_limited"]) == pytest.approx(bias, abs=1e-4)  # 6 digits in the table
        assert 0.5 < float(r["pearson"]) <= 1.0 and int(r["n_failed_fits"]) == 0
    assert (tmp_path / "suite.png").stat().st_size > 10_000
    md = (tmp_path / "suite.md").read_text()
    assert "## 48x64" in md and "| icom_wiener |" in md and md.count("\n| cnn |") == 2
    assert record["machine"]["load_average_at_start"] and record["n_cases"] == 2


def test_suite_resumes_from_case_checkpoints(tmp_path):
    settings = {**TINY, "delta_A": [0.0], "acquisitions": [{"dose_e_per_A2": None}]}
    first = run_suite(tmp_path, settings=settings, optics=COARSE, methods=["icom"], threads=2)
    assert first["n_cases_resumed"] == 0
    checkpoint = tmp_path / "cases" / "FA_d0.00_static_t2_s0.40.json"
    assert checkpoint.is_file()
    # a rerun with the same settings takes the case from its checkpoint: same table, no simulation
    again = run_suite(tmp_path, settings=settings, optics=COARSE, methods=["icom"], threads=2)
    assert again["n_cases_resumed"] == 1 and again["table"] == first["table"]
    # anything the result depends on changes the key, and a stale or broken file is not used
    key = checkpoint_key({**TINY}, COARSE, ["icom"], None, 0)
    assert key != checkpoint_key({**TINY}, COARSE, ["icom"], None, 1)
    assert key != checkpoint_key({**TINY, "n_seeds": 2}, COARSE, ["icom"], None, 0)
    assert key == checkpoint_key({**TINY, "delta_A": [0.1]}, COARSE, ["icom"], None, 0)  # the grid is not in it
    assert load_checkpoint(checkpoint, key + "0") is None
    checkpoint.write_text("{ half written")
    assert load_checkpoint(checkpoint, key) is None


def test_scan_steps_within_the_band_keep_column_shape_coarser_ones_alias():
    # the sampling theorem on the fit: the band-limited projected potential of a 0.6 A Br split
    # point-sampled at 0.2 A (<= lambda / (4 alpha)) and interpolated back reads the truth; at
    # 0.4 A the band folds onto itself and the shape is lost (benchmarks/sampling.py)
    from octastem.cnn.evaluate import br_ellipticity
    from octastem.cnn.input import band_limit
    from octastem.evaluation import scan_grid_ellipticity
    from octastem.potential import projected_potential

    atoms = split_cubic("FA", (2, 2, 2), 0.3)
    image, sampling, cell = projected_potential(atoms, sampling_A=0.05, progress=False)
    ny, nx = image.shape
    limited = band_limit(image, (cell[0] / nx, cell[1] / ny), 300e3, 25.0)
    truth = br_ellipticity(limited, sampling, (2, 2), cell, "fast")
    assert truth > 1.8
    assert scan_grid_ellipticity(limited, cell, 2, 0.2, 300e3, 25.0) == pytest.approx(truth, abs=0.01)
    assert abs(scan_grid_ellipticity(limited, cell, 2, 0.4, 300e3, 25.0) - truth) > 0.2
