"""The `octastem` command: the workflow driver, and the single-step commands (inspect, reconstruct, fit)
on data the tests make and on the real detector files of the registry."""

import json
import subprocess
import sys
import zipfile

import numpy as np
import pandas as pd
import pytest
from ase.io import read
from matplotlib.image import imread

from octastem.cli import main
from octastem.io import read_4dstem, read_image, write_4dstem, write_image
from octastem.structure import composition


def test_structure_command(tmp_path):
    out = tmp_path / "s.extxyz"
    assert main(["structure", str(out), "--reps", "2", "2", "2", "--vacancies", "1", "--seed", "3"]) == 0
    assert composition(read(out)) == {"Pb": 8, "Br": 23, "C": 7, "N": 14, "H": 35}


def test_run_dry_run_of_paper_preset(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "octastem.cli", "run", "--paper", "--directory", str(tmp_path), "--", "-n"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert "FABr_vac11" in text and "md" in text


def test_run_dry_run_of_workstation_preset(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "octastem.cli", "run", "--workstation", "--directory", str(tmp_path), "--", "-n"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    # the study's cell and vacancy fraction, the three projections, the nanocrystal scan
    assert "FABr_vac11" in text and "results/potential/pristine/z.h5" in text and "simulate_nanocrystal" in text
    assert main(["run", "--paper", "--workstation", "--directory", str(tmp_path), "--", "-n"]) == 2


def test_missing_table_is_a_clear_error(tmp_path, capsys):
    assert main(["table1", "--directory", str(tmp_path)]) == 2
    assert "octastem run" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- single steps


STEP_A = 0.3
DOSE = 5000.0  # e/A^2: 450 electrons per position, enough for a clean iCOM of one cell


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    """A Poisson-noisy simulated scan of one ideal FAPbBr3 cell (20 x 20 positions) in the internal format."""
    from octastem.stem import simulate_4dstem
    from octastem.structure import build_fapbbr3

    stem = simulate_4dstem(
        build_fapbbr3((1, 1, 1)),
        energy_eV=300e3,
        semiangle_mrad=25.0,
        scan_step_A=STEP_A,
        sampling_A=0.05,
        slice_thickness_A=2.0,
        num_workers=2,
        dose_e_per_A2=DOSE,
        seed=1,
    )
    stem.extra["n_cells"] = [1, 1]  # as the simulate_4dstem stage records it
    path = tmp_path_factory.mktemp("scan") / "cell.h5"
    write_4dstem(path, stem)
    return path, stem


def _registry_file(name):
    from octastem.io import InputError
    from octastem.registry import fetch, load_registry

    if name not in load_registry():
        pytest.skip(f"resources/external.yaml has no entry '{name}'")
    try:
        return fetch(name)
    except InputError as e:
        pytest.skip(f"external data '{name}' not available: {e}")


@pytest.fixture(scope="module")
def merlin(tmp_path_factory):
    """The real Merlin 4 x 2 acquisition (256 x 256 frames, 6-bit) of the registry, unpacked."""
    archive = _registry_file("rsciio_merlin_4x2")
    folder = tmp_path_factory.mktemp("merlin")
    with zipfile.ZipFile(archive) as z:
        z.extract("001_4x2_6bit.mib", folder)
        z.extract("001_4x2_6bit.hdr", folder)
    return folder / "001_4x2_6bit.mib"


def cli(capsys, *args):
    """(exit status, stdout, stderr) of ``octastem args``."""
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def grey(png):
    """Grey levels (0..1) of a PNG written with a grey colour map."""
    return imread(png)[..., 0].astype(float)


def normalised(a):
    a = np.asarray(a, dtype=float)
    return (a - a.min()) / (a.max() - a.min())


def assert_refused(capsys, path, folder, *args, match=""):
    """Exit status 2, a message naming ``path`` (and ``match``), and nothing in ``folder``."""
    rc, _, err = cli(capsys, *args)
    assert rc == 2, err
    assert f"error: {path}" in err and match in err, err
    assert not folder.exists() or not list(folder.iterdir()), list(folder.iterdir())


def test_single_steps_have_help(capsys):
    for command, option in (("inspect", "--calibration"), ("reconstruct", "--method"), ("fit", "--types")):
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0
        assert option in capsys.readouterr().out


def test_inspect_simulated_scan(scan, tmp_path, capsys):
    from octastem.inspect import pattern_image
    from octastem.stem import virtual_image

    path, stem = scan
    rc, out, err = cli(capsys, "inspect", path, "--out", tmp_path / "out")
    assert rc == 0, err
    assert "inspect cell.h5" in err  # the progress bar
    found = json.loads((tmp_path / "out" / "cell_inspect.json").read_text())
    assert found["shape"] == [20, 20, 33, 33] and found["dtype"] == "float32" and found["internal"]
    assert found["missing"] == [] and found["problems"] == []
    assert found["calibration_in_file"]["energy_eV"] == 300e3
    assert found["calibration_in_file"]["scan_step_A"] == pytest.approx(STEP_A)
    assert found["recorded"]["dose_e_per_A2"] == DOSE and found["whole_counts"]
    electrons = float(stem.data.sum(dtype=np.float64)) / 400
    assert found["electrons_per_position"] == pytest.approx(electrons, rel=1e-9)
    assert found["dose_e_per_A2"] == pytest.approx(electrons / STEP_A**2, rel=1e-9)
    assert found["dose_e_per_A2"] == pytest.approx(DOSE, rel=0.02)  # Poisson counts at the simulated dose
    assert f"{found['dose_e_per_A2']:.6g} e/A^2" in out and "missing      nothing" in out
    # the images: the pipeline's virtual detectors, one pixel per scan position / detector pixel
    for role, expected in (("bf", virtual_image(stem, "bf")), ("adf", virtual_image(stem, "adf"))):
        np.testing.assert_allclose(grey(tmp_path / "out" / f"cell_{role}.png"), normalised(expected), atol=2 / 255)
    pattern = grey(tmp_path / "out" / "cell_mean_pattern.png")
    np.testing.assert_allclose(pattern, normalised(pattern_image(stem.data.mean(axis=(0, 1)))), atol=2 / 255)
    adf = virtual_image(stem, "adf")
    assert np.unravel_index(adf.argmax(), adf.shape) == (0, 0)  # the Pb-Br column at the cell origin
    assert found["disk"]["radius_px"] * stem.k_sampling_mrad == pytest.approx(25.0, rel=0.1)  # the semi-angle
    assert not found["disk"]["off_centre"]


def test_inspect_real_merlin_file(merlin, tmp_path, capsys):
    from rsciio.quantumdetector import file_reader

    data = file_reader(str(merlin))[0]["data"].astype(np.float64)  # rosettasciio's own reading
    rc, out, err = cli(capsys, "inspect", merlin, "--out", tmp_path / "a", "--quiet")
    assert rc == 0, err
    found = json.loads((tmp_path / "a" / "001_4x2_6bit_inspect.json").read_text())
    assert found["format"] == "mib" and found["shape"] == [2, 4, 256, 256] and found["dtype"] == "uint8"
    assert found["calibration_in_file"] == {}
    assert found["missing"] == ["energy_eV", "semiangle_mrad", "scan_step_A", "k_sampling_mrad"]
    assert found["counts_per_position"]["mean"] == pytest.approx(data.sum(axis=(2, 3)).mean(), rel=1e-12)
    assert found["dose_e_per_A2"] is None and "scan step is not in the file" in out
    # the disk of this acquisition lies near the left edge of the detector: flagged
    assert found["disk"]["off_centre"] and found["disk"]["centre_px"][1] < 64 and "cut by the detector edge" in out
    ky, kx = np.indices((256, 256))
    k = np.hypot(ky - found["disk"]["centre_px"][0], kx - found["disk"]["centre_px"][1])
    bf = data[..., k <= found["disk"]["radius_px"]].sum(axis=-1)
    np.testing.assert_allclose(grey(tmp_path / "a" / "001_4x2_6bit_bf.png"), normalised(bf), atol=2 / 255)
    rc, out, err = cli(
        capsys, "inspect", merlin, "--out", tmp_path / "b", "--quiet", "--calibration", "scan_step_A=0.5"
    )
    assert rc == 0, err
    found = json.loads((tmp_path / "b" / "001_4x2_6bit_inspect.json").read_text())
    assert found["dose_e_per_A2"] == pytest.approx(data.sum(axis=(2, 3)).mean() / 0.25, rel=1e-12)
    assert "scan_step_A" not in found["missing"]


def test_inspect_real_arina_file(tmp_path, capsys):
    pytest.importorskip("hdf5plugin")
    master = _registry_file("rsciio_arina_master")
    for name in ("rsciio_arina_data", "rsciio_arina_scan_metadata"):
        if _registry_file(name).parent != master.parent:
            pytest.skip("the ARINA files are not side by side in the cache")
    rc, out, err = cli(capsys, "inspect", master, "--out", tmp_path, "--quiet")
    assert rc == 0, err
    found = json.loads((tmp_path / "test_00_master_inspect.json").read_text())
    assert found["format"] == "arina" and found["shape"] == [4, 4, 192, 192] and found["dtype"] == "uint32"
    assert found["calibration_in_file"]["energy_eV"] == 300e3
    assert found["total_counts"] == 0 and "every pattern is empty" in out  # the test acquisition holds zeros


def test_inspect_refuses_bad_files(scan, tmp_path, capsys):
    out = tmp_path / "out"
    notes = tmp_path / "notes.h5"
    notes.write_text("not HDF5")
    assert_refused(capsys, notes, out, "inspect", notes, "--out", out, match="not a readable HDF5")
    folder = tmp_path / "scan_folder"
    folder.mkdir()
    assert_refused(capsys, folder, out, "inspect", folder, "--out", out, match="is a directory")
    # a header that reads but damaged data: the failure names the rows
    damaged = tmp_path / "damaged.h5"
    raw = bytearray(scan[0].read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 4000] = bytes(4000)
    damaged.write_bytes(bytes(raw))
    assert_refused(capsys, damaged, out, "inspect", damaged, "--out", out, "--quiet", match="scan rows")
    assert_refused(capsys, scan[0], out, "inspect", scan[0], "--out", out, "--calibration", "step=1", match="'step'")


def test_reconstruct_icom_and_cnn(scan, tmp_path, capsys):
    from octastem.stem import reconstruct

    path, stem = scan
    rc, out, err = cli(capsys, "reconstruct", path, "--method", "icom", "-o", tmp_path / "icom.h5")
    assert rc == 0, err
    image, attrs = read_image(tmp_path / "icom.h5")
    expected, sampling = reconstruct(read_4dstem(path), "icom", sampling_A=0.1)  # the rule's call
    np.testing.assert_array_equal(image, expected)
    assert attrs["kind"] == "phase_icom" and attrs["sampling_A"] == sampling == pytest.approx(0.1)
    assert attrs["n_cells"] == [1, 1] and attrs["cell_A"] == pytest.approx([6.0, 6.0])
    assert image.shape == (60, 60) and np.unravel_index(image.argmax(), image.shape) == (0, 0)  # Pb-Br column
    rc, out, err = cli(capsys, "reconstruct", path, "--method", "cnn", "--device", "cpu", "-o", tmp_path / "cnn.h5")
    assert rc == 0, err
    image, attrs = read_image(tmp_path / "cnn.h5")
    assert attrs["kind"] == "phase_cnn" and attrs["n_cells"] == [1, 1] and np.isfinite(image).all()
    iy, ix = np.unravel_index(image.argmax(), image.shape)
    assert min(iy, image.shape[0] - iy) <= 2 and min(ix, image.shape[1] - ix) <= 2  # the Pb-Br column
    out = tmp_path / "bad"
    assert_refused(capsys, path, out, "reconstruct", path, "-o", out / "x.h5", "--sampling", "-1", match="--sampling")
    assert_refused(capsys, path, out, "reconstruct", path, "-o", out / "x.h5", "--n-cells", "2", "2", match="[1, 1]")
    before = path.read_bytes()
    rc, _, err = cli(capsys, "reconstruct", path, "-o", path)
    assert rc == 2 and f"error: {path}: -o must differ" in err
    assert path.read_bytes() == before and [p.name for p in path.parent.iterdir()] == [path.name]


def test_reconstruct_real_merlin_file(merlin, tmp_path, capsys):
    from rsciio.quantumdetector import file_reader

    from octastem.io import Stem4D
    from octastem.stem import reconstruct

    out = tmp_path / "out"
    cal = ["energy_eV=300000", "semiangle_mrad=2", "scan_step_A=0.5", "k_sampling_mrad=0.1"]
    options = [x for c in cal for x in ("--calibration", c)]
    args = ["reconstruct", merlin, "--method", "icom", "-o", out / "phase.h5"]
    assert_refused(capsys, merlin, out, *args, match="'energy_eV' is missing")
    # the disc of this acquisition touches the detector edge (column 0): refused, nothing left behind
    assert_refused(capsys, merlin, out, *args, *options, "--n-cells", "1", "1", match="cut by the detector edge")
    # as stored (no centring), with the rotation given, it is reconstructed as before
    options += ["--origin", "off", "--calibration", "scan_rotation_deg=0"]
    assert_refused(capsys, merlin, out, *args, *options, match="--n-cells")
    assert_refused(capsys, merlin, out, *args, *options, "--n-cells", "1", "1", "--dose", "48", match="dose_e_per_A2")
    rc, _, err = cli(capsys, *args, *options, "--n-cells", "1", "1")
    assert rc == 0, err
    assert "ingest 001_4x2_6bit.mib" in err  # the ingest's progress bar
    assert [p.name for p in out.iterdir()] == ["phase.h5"]  # the temporary internal file is gone
    image, attrs = read_image(out / "phase.h5")
    data = file_reader(str(merlin))[0]["data"].astype(np.float32)
    stem = Stem4D(data, 300e3, 2.0, 0.5, 0.1, float("nan"))
    expected, sampling = reconstruct(stem, "icom", sampling_A=0.1)
    np.testing.assert_allclose(image, expected, rtol=1e-5, atol=1e-7)
    assert image.shape == (10, 20) and attrs["sampling_A"] == pytest.approx(sampling)
    assert attrs["source"] == str(merlin) and attrs["cell_A"] == pytest.approx([2.0, 1.0])


def synthetic_image(tmp_path, ratio=1.25, noise=0.01, **attrs):
    """A 2 x 2 cell phase image: Br columns elliptical (major axis perpendicular to the bond), others round."""
    from octastem.fit import column_grid, model_image

    cols = column_grid((2, 2), (12.0, 12.0), (0.3, -0.2))
    cols["height"] = cols["type"].map({"PbBr": 3.0, "Br": 1.0, "FA": 0.3})
    cols["sigma_major"] = cols["type"].map({"PbBr": 0.45, "Br": 0.45, "FA": 0.6})
    cols["ratio"] = np.where(cols["type"] == "Br", ratio, 1.0)
    cols["angle_deg"] = np.where(cols["site"] == "Br_x", 90.0, 0.0)
    img = model_image((120, 120), 0.1, cols, 0.1) + np.random.default_rng(2).normal(0.0, noise, (120, 120))
    path = tmp_path / "phase.h5"
    write_image(path, img, 0.1, "phase_icom", **attrs)
    return path


def test_fit_writes_table_summary_and_figure(tmp_path, capsys):
    image = synthetic_image(tmp_path, n_cells=[2, 2], cell_A=[12.0, 12.0])
    rc, out, err = cli(capsys, "fit", image, "--types", "Br", "PbBr", "-o", tmp_path / "res" / "phase")
    assert rc == 0, err
    assert "fit columns" in err  # the progress bar
    table = pd.read_csv(tmp_path / "res" / "phase.csv")
    assert sorted(table["type"].value_counts().items()) == [("Br", 8), ("PbBr", 4)]
    summary = json.loads((tmp_path / "res" / "phase.json").read_text())
    assert summary["summary"]["Br"]["median_ellipticity"] == pytest.approx(1.25, abs=0.03)
    assert summary["summary"]["PbBr"]["median_ellipticity"] == pytest.approx(1.0, abs=0.03)
    assert summary["n_cells"] == [2, 2] and summary["types"] == ["Br", "PbBr"]
    assert f"Br: median ellipticity {summary['summary']['Br']['median_ellipticity']:.4f}" in out
    figure = imread(tmp_path / "res" / "phase.png")
    assert figure.shape[0] > 300 and figure[..., :3].std() > 0.05
    assert sorted(p.name for p in (tmp_path / "res").iterdir()) == ["phase.csv", "phase.json", "phase.png"]


def test_fit_refuses_bad_input(tmp_path, capsys):
    out = tmp_path / "res"
    image = synthetic_image(tmp_path)  # no n_cells / cell_A recorded
    assert_refused(capsys, image, out, "fit", image, "-o", out / "x", match="n_cells")
    assert_refused(capsys, image, out, "fit", image, "-o", out / "x", "--window", "50", match="fit.window_A")
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(image.read_bytes()[:3000])
    assert_refused(capsys, truncated, out, "fit", truncated, "-o", out / "x", match="truncated")
    rc, _, err = cli(capsys, "fit", image, "-o", out / "x", "--n-cells", "2", "2", "--cell-A", "12", "12", "--quiet")
    assert rc == 0, err
    assert json.loads((out / "x.json").read_text())["cell_A"] == [12.0, 12.0]
