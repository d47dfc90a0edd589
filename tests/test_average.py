"""Template-matching average: lattice recovery, sqrt(N) noise reduction, streaming, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest

from octastem.io import InputError, Stem4D, read_4dstem, write_4dstem
from octastem.stem import Lattice, average_file, average_to_cell, find_lattice, virtual_image

N_K = 15  # detector pixels per side, 1 mrad each
CELL = (8, 8)  # output bins (rows along a2, cols along a1)
ELECTRONS = 80.0  # electrons per pattern
STEP_A = 0.75


def rotation(deg):
    t = math.radians(deg)
    return np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])


# a rotated (10 deg), slightly sheared (2 deg) and anisotropic lattice, in scan pixels (x, y)
TRUE = Lattice(
    a1=rotation(10.0) @ np.array([8.3, 0.0]),
    a2=rotation(10.0) @ np.array([0.28, 7.9]),
    origin=np.array([3.2, 5.1]),
)


def clean_pattern(u1, u2):
    """Pattern (fraction of the beam) at fractional cell position (u1, u2): a shifted bright-field
    disk (a phase-gradient signal) and dark-field intensity peaked on the lattice points."""
    k = np.arange(N_K) - N_K // 2
    kx, ky = np.meshgrid(k, k)
    sx, sy = 0.8 * math.sin(2 * math.pi * u1), 0.6 * math.sin(2 * math.pi * u2)
    disk = 1.0 / (1.0 + np.exp((np.hypot(kx - sx, ky - sy) - 3.0) / 0.4))
    d1, d2 = u1 - round(u1), u2 - round(u2)
    dark = (0.02 + 0.3 * math.exp(-(d1**2 + d2**2) / (2 * 0.12**2))) * (np.hypot(kx, ky) > 4.2)
    p = disk + dark
    return p / p.sum()


def clean_cell(shape=CELL):
    nr, nc = shape
    return np.array([[clean_pattern(q / nc, p / nr) for q in range(nc)] for p in range(nr)])


def synthetic_scan(scan_shape=(64, 64), lattice=TRUE, electrons=ELECTRONS, seed=0, piecewise=False):
    """Noisy scan of the clean patterns at each position's fractional cell coordinates (or, with
    ``piecewise``, at the centre of its nearest output bin); returns (noisy, expected, stem)."""
    ny, nx = scan_shape
    y, x = np.mgrid[0:ny, 0:nx].astype(float)
    u1, u2 = lattice.fractional(x, y)
    if piecewise:
        u1 = np.round(u1 * CELL[1]) / CELL[1]
        u2 = np.round(u2 * CELL[0]) / CELL[0]
    expected = np.array([clean_pattern(a, b) for a, b in zip(u1.ravel(), u2.ravel())]) * electrons
    expected = expected.reshape(ny, nx, N_K, N_K)
    rng = np.random.default_rng(seed)
    noisy = rng.poisson(expected).astype(np.float32) if electrons < 1e6 else expected.astype(np.float32)
    stem = Stem4D(
        data=noisy,
        energy_eV=300e3,
        semiangle_mrad=3.0,
        scan_step_A=STEP_A,
        k_sampling_mrad=1.0,
        dose_e_per_A2=electrons / STEP_A**2,
        scan_rotation_deg=5.0,
        source="synthetic",
    )
    return noisy, expected, stem


def wrapped_origin_error(found: Lattice, true: Lattice) -> float:
    """Origin difference in fractional cell units, wrapped to [-0.5, 0.5)."""
    d = true.reciprocal @ (found.origin - true.origin)
    return float(np.abs(d - np.round(d)).max())


def test_find_lattice_recovers_rotated_sheared_lattice():
    _, _, stem = synthetic_scan()
    found = find_lattice(stem)
    for got, want in ((found.a1, TRUE.a1), (found.a2, TRUE.a2)):
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.005
    assert wrapped_origin_error(found, TRUE) < 0.1 / CELL[0]
    # |COM| ~ |(0.8 sin 2 pi u1, 0.6 sin 2 pi u2)| repeats every half cell: the COM image finds a / 2
    found_com = find_lattice(stem, "com")
    assert np.linalg.norm(found_com.a1 - TRUE.a1 / 2) / np.linalg.norm(TRUE.a1 / 2) < 0.01
    assert np.linalg.norm(found_com.a2 - TRUE.a2 / 2) / np.linalg.norm(TRUE.a2 / 2) < 0.01


def test_find_lattice_of_image_is_subpixel():
    ny, nx = 48, 40
    y, x = np.mgrid[0:ny, 0:nx].astype(float)
    lat = Lattice(np.array([5.37, 0.9]), np.array([-0.6, 6.11]), np.array([1.3, 2.2]))
    u1, u2 = lat.fractional(x, y)
    img = np.cos(2 * np.pi * u1) + np.cos(2 * np.pi * u2) + 0.5 * np.cos(2 * np.pi * (u1 + u2))
    found = find_lattice(img)
    np.testing.assert_allclose(found.a1, lat.a1, atol=2e-3 * 5.4)
    np.testing.assert_allclose(found.a2, lat.a2, atol=2e-3 * 6.1)
    assert wrapped_origin_error(found, lat) < 0.01


def test_average_noise_free_is_exact():
    _, expected, stem = synthetic_scan(electrons=1e6, piecewise=True)
    avg = average_to_cell(stem, TRUE, CELL)
    np.testing.assert_allclose(avg.data, clean_cell() * 1e6, rtol=1e-5, atol=1e-3)
    assert avg.extra["n_contributions"].sum() == 64 * 64


def test_average_snr_gain_is_sqrt_n():
    noisy, expected, stem = synthetic_scan()
    avg = average_to_cell(stem, cell_shape=CELL)  # lattice found from the data
    # the clean cell: noise-free patterns averaged with the true lattice, close to the patterns at
    # the bin centres (binning blurs them slightly)
    clean = average_to_cell(Stem4D(**{**stem.__dict__, "data": expected}), TRUE, CELL).data
    blur = np.sqrt(((clean - clean_cell() * ELECTRONS) ** 2).sum(axis=(2, 3)).mean())
    assert blur < 0.1 * np.sqrt(ELECTRONS)
    n = avg.extra["n_effective"]
    assert n.min() >= 40 and avg.extra["n_contributions"].sum() == pytest.approx(64 * 64)
    err_single = np.sqrt(((noisy - expected) ** 2).sum(axis=(2, 3)).mean())
    err_avg = np.sqrt(((avg.data - clean) ** 2).sum(axis=(2, 3)).mean())
    gain = err_single / err_avg
    expected_gain = 1.0 / np.sqrt(np.mean(1.0 / n))
    assert abs(gain / expected_gain - 1) < 0.2, (gain, expected_gain)
    assert abs(gain / avg.extra["snr_gain_expected"] - 1) < 0.2
    assert abs(avg.extra["snr_gain_split_half"] / gain - 1) < 0.2, (avg.extra["snr_gain_split_half"], gain)
    # calibration of the cell: lattice axes become the output scan axes
    a1 = np.hypot(*TRUE.a1) * STEP_A
    assert avg.scan_step_x_A == pytest.approx(a1 / CELL[1], rel=5e-3)
    assert avg.scan_rotation_deg == pytest.approx(5.0 - 10.0, abs=0.2)
    assert avg.extra["cell_angle_deg"] == pytest.approx(90 - math.degrees(math.atan2(0.28, 7.9)), abs=0.3)


def test_linear_weights_and_supercell():
    noisy, expected, stem = synthetic_scan(seed=1)
    lin = average_to_cell(stem, TRUE, CELL, weights="linear")
    assert lin.extra["n_contributions"].sum() == pytest.approx(64 * 64)
    # bilinear weights spread each position over 4 bins: more, partial contributions per bin
    n = lin.extra["n_effective"]
    assert np.all(n >= lin.extra["n_contributions"])
    clean = average_to_cell(Stem4D(**{**stem.__dict__, "data": expected}), TRUE, CELL, weights="linear").data
    gain = np.sqrt(
        ((noisy - expected) ** 2).sum(axis=(2, 3)).mean() / ((lin.data - clean) ** 2).sum(axis=(2, 3)).mean()
    )
    assert abs(gain * np.sqrt(np.mean(1.0 / n)) - 1) < 0.2
    sup = average_to_cell(stem, TRUE, (CELL[0], 2 * CELL[1]), supercell=(2, 1))
    assert sup.data.shape == (CELL[0], 2 * CELL[1], N_K, N_K)
    ref = clean_cell() * ELECTRONS
    for half in (sup.data[:, : CELL[1]], sup.data[:, CELL[1] :]):  # both unit cells of the supercell
        err = np.sqrt(((half - ref) ** 2).sum(axis=(2, 3)).mean())
        assert err < 0.3 * np.sqrt(ELECTRONS)


def test_average_file_streams_like_in_memory(tmp_path):
    _, _, stem = synthetic_scan(scan_shape=(40, 48), seed=2)
    write_4dstem(tmp_path / "scan.h5", stem)
    summary = average_file(
        tmp_path / "scan.h5", tmp_path / "cell.h5", cell_shape=CELL, chunk_positions=48 * 3, progress=False
    )
    got = read_4dstem(tmp_path / "cell.h5")
    want = average_to_cell(stem, cell_shape=CELL)
    np.testing.assert_allclose(got.data, want.data, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(summary["lattice_a1_px"], want.extra["lattice_a1_px"], rtol=1e-9)
    assert summary["snr_gain_expected"] == pytest.approx(want.extra["snr_gain_expected"])
    assert np.asarray(got.extra["n_contributions"]).shape == CELL


def test_bad_input(tmp_path):
    _, _, stem = synthetic_scan(scan_shape=(24, 24))
    with pytest.raises(InputError, match="received no scan position"):
        average_to_cell(stem, TRUE, (32, 32))
    with pytest.raises(InputError, match="collinear"):
        average_to_cell(stem, Lattice(np.array([4.0, 0.0]), np.array([8.0, 0.0]), np.zeros(2)), CELL)
    with pytest.raises(InputError, match="'image'"):
        virtual_image(stem, "haadf2")
    flat = Stem4D(**{**stem.__dict__, "data": np.ones((16, 16, N_K, N_K), np.float32)})
    with pytest.raises(InputError, match="no periodic contrast"):
        find_lattice(flat)
    with pytest.raises(InputError, match="not found"):
        average_file(tmp_path / "missing.h5", tmp_path / "out.h5")
