"""Template-matching average: lattice recovery, sqrt(N) noise reduction, streaming, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest

from octastem.io import InputError, Stem4D, read_4dstem, write_4dstem
from octastem.stem import (
    Lattice,
    average_file,
    average_to_cell,
    check_lattice,
    find_lattice,
    gauss_reduce,
    virtual_image,
)
from octastem.stem.lattice import is_reduced

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


# ----------------------------------------------------------------------------------------------
# Lattice search on a simulated perovskite with an inorganic A site
# ----------------------------------------------------------------------------------------------

CS_A = 5.9  # cubic CsPbBr3 lattice parameter, A
CS_PERIOD = 15  # scan positions per cell: 5.9 A / 15 = 0.393 A, the closest whole number at 0.4 A


@pytest.fixture(scope="module")
def cspbbr3_cell():
    """Noise-free abTEM patterns over one cell of cubic CsPbBr3 (4 cells = 23.6 A thick, [001]), 15 x 15
    positions: in its ADF image the (1, 0) family is the ninth-strongest, so noise often pushes a
    first-order peak out of the 12 strongest. Simulated once for this module (a few seconds)."""
    from ase import Atoms

    from octastem.stem import simulate_4dstem

    frac = [[0, 0, 0], [0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5], [0.5, 0.5, 0.5]]
    cell = Atoms(["Pb", "Br", "Br", "Br", "Cs"], scaled_positions=frac, cell=[CS_A] * 3, pbc=True)
    stem = simulate_4dstem(
        cell.repeat((1, 1, 4)),
        energy_eV=300e3,
        semiangle_mrad=25.0,
        scan_step_A=0.4,
        sampling_A=None,
        slice_thickness_A=1.0,
        max_angle_mrad=60.0,
        num_workers=1,
    )
    assert stem.data.shape[:2] == (CS_PERIOD, CS_PERIOD)
    return stem


def cspbbr3_scan(cell: Stem4D, shape, dose, seed, offset=(2, 5)) -> Stem4D:
    """The cell tiled over ``shape`` scan positions (from ``offset`` in the tiling), Poisson counts at ``dose``."""
    from octastem.stem import add_poisson_noise

    reps = [int(np.ceil((n + o) / CS_PERIOD)) for n, o in zip(shape, offset)]
    clean = np.tile(cell.data, (*reps, 1, 1))[offset[0] : offset[0] + shape[0], offset[1] : offset[1] + shape[1]]
    steps = (cell.scan_step_x_A, cell.scan_step_y_A)
    data = add_poisson_noise(clean, dose, steps, np.random.default_rng(seed))
    return Stem4D(**{**cell.__dict__, "data": data, "dose_e_per_A2": dose, "scan_shape": list(shape), "extra": {}})


def cspbbr3_adf(cell: Stem4D, shape, dose, seed, offset=(2, 5)) -> np.ndarray:
    """The ADF image of :func:`cspbbr3_scan` drawn directly: the sum of a pattern's Poisson counts over
    the detector is Poisson with the summed mean, so this is the same distribution at 1/1000 the cost."""
    adf = virtual_image(cell, "adf")
    reps = [int(np.ceil((n + o) / CS_PERIOD)) for n, o in zip(shape, offset)]
    clean = np.tile(adf, reps)[offset[0] : offset[0] + shape[0], offset[1] : offset[1] + shape[1]]
    electrons = dose * cell.scan_step_x_A * cell.scan_step_y_A
    return np.random.default_rng(seed).poisson(clean * electrons).astype(float)


def assert_right_cell(found: Lattice, period=CS_PERIOD, rtol=0.02):
    """The perovskite cell (period along x and y), reduced, in the conventional setting."""
    assert is_reduced(found.a1, found.a2)
    assert found.a1[0] > 0 and np.cross(found.a1, found.a2) > 0
    np.testing.assert_allclose(found.a1, [period, 0], atol=rtol * period)
    np.testing.assert_allclose(found.a2, [0, period], atol=rtol * period)


def first_order_rank(img: np.ndarray) -> int:
    """Rank (0 = strongest) of the weaker of the (1, 0), (0, 1) peaks among the Hann-windowed image's
    local Fourier maxima of one half plane (the old search kept the 12 strongest)."""
    from scipy import ndimage

    ny, nx = img.shape
    w = (img - img.mean()) * np.hanning(ny + 2)[1:-1, None] * np.hanning(nx + 2)[1:-1][None, :]
    power = np.abs(np.fft.fft2(w)) ** 2
    peaks = ndimage.maximum_filter(power, size=3, mode="wrap") == power
    ky, kx = np.meshgrid(np.fft.fftfreq(ny) * ny, np.fft.fftfreq(nx) * nx, indexing="ij")
    half = ((ky > 0) | ((ky == 0) & (kx > 0))) & (np.hypot(kx, ky) > 2.5)
    ranked = np.sort(power[peaks & half])[::-1]
    first = [power[0, nx // CS_PERIOD], power[ny // CS_PERIOD, 0]]
    return int(np.searchsorted(-ranked, -min(first)))


def test_gauss_reduction_gives_the_two_shortest_vectors():
    rng = np.random.default_rng(3)
    a, b = np.array([15.2, 0.4]), np.array([-0.3, 14.7])
    for _ in range(50):
        m = np.array([[1, 0], [0, 1]])
        for _ in range(4):  # a random unimodular change of basis
            shear = np.array([[1, rng.integers(-3, 4)], [0, 1]])
            m = m @ (shear if rng.random() < 0.5 else shear.T)
        v1, v2 = np.column_stack([a, b]) @ m[:, 0], np.column_stack([a, b]) @ m[:, 1]
        r1, r2 = gauss_reduce(v1, v2)
        assert is_reduced(r1, r2)
        assert {round(np.hypot(*r1), 9), round(np.hypot(*r2), 9)} == {round(np.hypot(*a), 9), round(np.hypot(*b), 9)}
    # the (a + b, b) basis of a skewed cell comes back as the conventional (a, b)
    skewed = Lattice(a + b, b, np.array([1.0, 2.0])).reduced()
    np.testing.assert_allclose(skewed.a1, a)
    np.testing.assert_allclose(skewed.a2, b)
    np.testing.assert_allclose(skewed.origin, [1.0, 2.0])
    assert not is_reduced(a + b, b)
    with pytest.raises(InputError, match="collinear"):
        gauss_reduce(a, 2 * a)


def test_skewed_cell_case_finds_the_perovskite_cell(cspbbr3_cell):
    """90 x 90 positions of CsPbBr3 at 0.393 A and 48 e/A^2, a draw in which the (0, 1) peak is not
    among the 12 strongest: the full scan gives the reduced perovskite cell and its averaged cell."""
    scan = cspbbr3_scan(cspbbr3_cell, (90, 90), 48.0, seed=0)
    assert first_order_rank(virtual_image(scan, "adf")) >= 12
    found = find_lattice(scan, lattice_A=CS_A)
    assert_right_cell(found)
    avg = average_to_cell(scan, cell_shape=(15, 15), weights="nearest", lattice_A=CS_A, lattice_tolerance=0.05)
    assert avg.extra["cell_angle_deg"] == pytest.approx(90.0, abs=1.5)
    assert avg.extra["lattice_deviation"] < 0.02
    # every output position gets about its 6 x 6 equivalents (the found lattice is a fraction of a % off)
    assert avg.extra["n_contributions"].sum() == 90 * 90 and avg.extra["n_contributions"].min() >= 30


@pytest.mark.parametrize("dose", [48.0, 144.0, 500.0])
@pytest.mark.parametrize("shape", [(90, 90), (89, 90), (90, 89), (80, 100), (100, 81)])
def test_lattice_of_cspbbr3_scans_over_doses_sizes_and_seeds(cspbbr3_cell, dose, shape):
    """Never a non-reduced or wrong cell: with and without the expected lattice parameter."""
    steps = (cspbbr3_cell.scan_step_x_A, cspbbr3_cell.scan_step_y_A)
    for seed in range(3):
        img = cspbbr3_adf(cspbbr3_cell, shape, dose, seed=100 * seed + shape[0] + shape[1])
        assert_right_cell(find_lattice(img, lattice_A=CS_A, scan_step_A=steps))
        assert_right_cell(find_lattice(img))


def test_first_order_peaks_outside_the_twelve_strongest(cspbbr3_cell):
    """The draws where a first-order peak is 13th or weaker (what a search over the 12 strongest peaks
    turns into a skewed or centred cell) give the right cell."""
    steps = (cspbbr3_cell.scan_step_x_A, cspbbr3_cell.scan_step_y_A)
    hard = 0
    for seed in range(24):
        img = cspbbr3_adf(cspbbr3_cell, (90, 90), 48.0, seed=seed, offset=(0, 0))
        if first_order_rank(img) < 12:
            continue
        hard += 1
        assert_right_cell(find_lattice(img, lattice_A=CS_A, scan_step_A=steps))
    assert hard >= 3


@pytest.mark.parametrize("lattice_A", [6.5, 5.3, CS_A * math.sqrt(2), 2 * CS_A])
def test_wrong_lattice_parameter_is_an_error(cspbbr3_cell, tmp_path, lattice_A):
    """A configured lattice parameter 10 % off, or of a larger cell of the crystal (sqrt 2, 2 x a),
    stops the average naming both periods and the scan step; nothing is written."""
    scan = cspbbr3_scan(cspbbr3_cell, (90, 90), 144.0, seed=1)
    with pytest.raises(
        InputError, match=r"1[45]\.\d\d px = 5\.[89]\d\d A.*scan steps 0\.3933 A.*structure\.a_A\) is \d"
    ):
        average_to_cell(scan, cell_shape=(15, 15), lattice_A=lattice_A, lattice_tolerance=0.05)
    write_4dstem(tmp_path / "scan.h5", scan)
    with pytest.raises(InputError, match=r"scan\.h5.*lattice_tolerance = 0\.05"):
        average_file(
            tmp_path / "scan.h5", tmp_path / "cell.h5", cell_shape=(15, 15), lattice_A=lattice_A, progress=False
        )
    assert not (tmp_path / "cell.h5").exists()


def test_lattice_check_in_the_average_summary(cspbbr3_cell, tmp_path):
    scan = cspbbr3_scan(cspbbr3_cell, (60, 60), 500.0, seed=2)
    write_4dstem(tmp_path / "scan.h5", scan)
    summary = average_file(
        tmp_path / "scan.h5", tmp_path / "cell.h5", cell_shape=(15, 15), lattice_A=CS_A, progress=False
    )
    assert summary["lattice_expected_A"] == CS_A and summary["lattice_tolerance"] == 0.05  # the schema default
    assert summary["lattice_deviation"] < 0.01
    np.testing.assert_allclose(summary["lattice_periods_A"], [CS_A, CS_A], rtol=0.01)
    assert read_4dstem(tmp_path / "cell.h5").extra["lattice_expected_A"] == CS_A
    # a given lattice is checked too
    wrong = Lattice(np.array([16.5, 0.0]), np.array([0.0, 15.0]), np.zeros(2))
    with pytest.raises(InputError, match="the given lattice"):
        average_to_cell(scan, wrong, (15, 15), lattice_A=CS_A)
    assert check_lattice(wrong, (0.3933, 0.3933), CS_A, 0.15)["lattice_deviation"] == pytest.approx(0.1, abs=0.01)
