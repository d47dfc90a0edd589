"""Simulated 4D-STEM: normalisation, dose, symmetry, orientation, file round trip, and PRISM against multislice."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from ase import Atoms

from octastem.io import STEM_ATTRS, InputError, read_4dstem, write_4dstem
from octastem.stem import add_poisson_noise, build_nanocrystal, center_of_mass, icom, simulate_4dstem
from octastem.stem.prism import _detector_operators, _patterns, interpolation_factors
from octastem.stem.simulate import _rebin_axis
from octastem.structure import build_fapbbr3

STEP = 0.3
OPTICS = {"energy_eV": 300e3, "semiangle_mrad": 25.0}
FAST = {**OPTICS, "scan_step_A": STEP, "sampling_A": 0.05, "slice_thickness_A": 2.0, "num_workers": 2}


@pytest.fixture(scope="module")
def clean():
    """Noise-free 4D-STEM of one ideal FAPbBr3 cell (6 A cube; 20 x 20 positions)."""
    return simulate_4dstem(build_fapbbr3((1, 1, 1)), **FAST)


def test_shape_and_normalisation(clean):
    assert clean.data.dtype == np.float32
    assert clean.data.shape[:2] == (20, 20)
    assert clean.scan_step_A == pytest.approx(STEP)
    assert clean.scan_shape == [20, 20]
    sums = clean.data.sum(axis=(2, 3))
    # each pattern holds the fraction of the beam inside max_angle: ~1, never more (the heavy
    # Pb-Br column scatters ~9 % beyond 2x the semi-angle)
    assert np.all(sums <= 1.0 + 1e-3) and np.all(sums > 0.85) and sums.mean() > 0.98
    n_ky, n_kx = clean.data.shape[2:]
    assert n_ky % 2 == 1 and n_kx % 2 == 1  # odd, centred on the optical axis
    assert math.isinf(clean.dose_e_per_A2) and clean.extra["intensity_unit"] == "fraction_of_beam"


def test_vacuum_patterns_hold_the_whole_beam():
    vacuum = Atoms("H", positions=[(0.0, 0.0, 0.5)], cell=[3.0, 3.0, 1.0], pbc=True)
    stem = simulate_4dstem(vacuum, scan_step_A=1.0, sampling_A=0.05, slice_thickness_A=1.0, num_workers=2, **OPTICS)
    assert np.allclose(stem.data.sum(axis=(2, 3)), 1.0, atol=2e-3)


def test_com_vanishes_on_the_pb_column(clean):
    # the cell is centrosymmetric in projection about the Pb column, so the deflection at
    # scan position (0, 0) must vanish while it is large next to the column
    com_x, com_y = center_of_mass(clean, origin="axis")
    magnitude = np.hypot(com_x, com_y)
    assert magnitude.max() > 0.5  # mrad
    assert magnitude[0, 0] < 1e-3 * magnitude.max()


def test_dose_scaling(clean):
    rng = np.random.default_rng(0)
    fraction = clean.data.sum(axis=(2, 3)).mean()
    n_pos = clean.data.shape[0] * clean.data.shape[1]
    means = {}
    for dose in (48.0, 144.0):
        counts = add_poisson_noise(clean.data, dose, STEP, rng)
        assert counts.dtype == np.float32 and np.all(counts == np.round(counts)) and counts.min() >= 0
        expected = dose * STEP**2 * fraction
        means[dose] = counts.sum(axis=(2, 3)).mean()
        assert abs(means[dose] - expected) < 4 * math.sqrt(expected / n_pos)
    assert means[144.0] / means[48.0] == pytest.approx(3.0, rel=0.1)


def test_seeded_noisy_simulation_round_trips(clean, tmp_path):
    atoms = build_fapbbr3((1, 1, 1))
    noisy = simulate_4dstem(atoms, dose_e_per_A2=48.0, seed=3, provenance_extra={"system": "pristine"}, **FAST)
    again = add_poisson_noise(clean.data, 48.0, STEP, np.random.default_rng(3))
    assert np.array_equal(noisy.data, again)  # same seed, same counts
    assert noisy.extra["electrons_per_position"] == pytest.approx(48.0 * STEP**2)
    assert noisy.extra["intensity_unit"] == "counts"
    assert json.loads(noisy.provenance)["system"] == "pristine"
    assert json.loads(noisy.provenance)["seed"] == 3

    for stem in (noisy, clean):
        path = tmp_path / f"{stem.extra['intensity_unit']}.h5"
        write_4dstem(path, stem)
        back = read_4dstem(path)
        assert np.array_equal(back.data, stem.data)
        for key in STEM_ATTRS:
            assert getattr(back, key) == getattr(stem, key), key
        assert set(back.extra) == set(stem.extra)
        for key, value in stem.extra.items():
            assert back.extra[key] == value, key


def test_orientation_and_deflection_sign():
    # single Pb atom at (x = 1.5, y = 0) in a non-square cell: 15 x 10 scan positions. The
    # beam is deflected towards the atom (attractive potential), so a probe left of the atom
    # sees +x deflection and a probe above it (larger y) sees -y deflection.
    atoms = Atoms("Pb", positions=[(1.5, 0.0, 1.0)], cell=[4.5, 3.0, 2.0], pbc=True)
    stem = simulate_4dstem(atoms, scan_step_A=0.3, sampling_A=0.05, slice_thickness_A=2.0, num_workers=2, **OPTICS)
    assert stem.data.shape[:2] == (10, 15)
    assert stem.cell_A == pytest.approx([4.5, 3.0, 2.0])
    kx, ky = stem.k_sampling_x_mrad, stem.k_sampling_y_mrad
    assert ky / kx == pytest.approx(4.5 / 3.0)  # k sampling = lambda / L per axis
    assert stem.data.shape[3] * kx == pytest.approx(stem.data.shape[2] * ky, rel=0.1)
    com_x, com_y = center_of_mass(stem, origin="axis")
    left = com_x[0, 3], com_y[0, 3]  # (x, y) = (0.9, 0)
    above = com_x[2, 5], com_y[2, 5]  # (x, y) = (1.5, 0.6)
    assert left[0] > 0.3 and abs(left[1]) < 1e-2 * left[0]
    assert above[1] < -0.3 and abs(above[0]) < 1e-2 * abs(above[1])


def test_bad_settings():
    atoms = build_fapbbr3((1, 1, 1))
    with pytest.raises(InputError, match="max_angle_mrad"):
        simulate_4dstem(atoms, sampling_A=0.2, max_angle_mrad=80.0, scan_step_A=0.3, slice_thickness_A=1.0, **OPTICS)
    with pytest.raises(InputError, match="scan_step_A"):
        simulate_4dstem(atoms, scan_step_A=0.0, sampling_A=0.05, slice_thickness_A=1.0, **OPTICS)
    with pytest.raises(InputError, match="dose"):
        add_poisson_noise(np.ones((2, 2, 4, 4)), -1.0, 0.3, 0)


# ----------------------------------------------------------------------------------------------
# PRISM (stem.method = prism) against the plain multislice of the same finite specimen
# ----------------------------------------------------------------------------------------------

#: Stem4D fields a PRISM dataset must share with the multislice one (the pattern grid and calibration).
CALIBRATION = (*STEM_ATTRS[:6], "scan_step_x_A", "scan_step_y_A", "k_sampling_x_mrad", "k_sampling_y_mrad")


@pytest.fixture(scope="module")
def crystal():
    """A 2 x 2 x 2-cell nanocrystal (12 A) in a 15 A box, its scan settings (6 x 6 positions) and multislice."""
    nc = build_nanocrystal([build_fapbbr3((1, 1, 1))], edge_A=12.0, vacuum_A=2.0, scan_cells=0.5, min_margin_A=0.0)
    settings = {
        **OPTICS,
        "scan_step_A": 0.5,
        "sampling_A": None,
        "slice_thickness_A": 2.0,
        "max_angle_mrad": 60.0,
        "detector_sampling_mrad": 1.5,
        "num_workers": 2,
        "specimen": "finite",
        "scan_start_A": nc.scan_start_A,
        "scan_period_A": nc.scan_period_A,
        "scan_periods": 0.5,
    }
    return nc.frames, settings, simulate_4dstem(nc.frames, method="multislice", **settings)


def _largest_difference(a, b) -> float:
    """Largest pixel difference of two datasets relative to the pattern's total intensity."""
    diff = np.abs(a.data.astype(np.float64) - b.data)
    return float((diff.max(axis=(2, 3)) / b.data.sum(axis=(2, 3))).max())


def _same_grid(a, b) -> None:
    assert a.data.shape == b.data.shape and a.scan_shape == b.scan_shape and a.cell_A == b.cell_A
    for key in CALIBRATION:
        assert getattr(a, key) == getattr(b, key), key
    assert a.extra == b.extra


def test_prism_without_interpolation_is_the_multislice(crystal):
    # f = 1: the S-matrix holds every plane wave of the aperture on the box's k-lattice, so PRISM
    # is exact; this checks the padding, normalisation, orientation and rebinning of the fast path
    frames, settings, reference = crystal
    prism = simulate_4dstem(frames, method="prism", prism_interpolation=1, **settings)
    _same_grid(prism, reference)
    assert _largest_difference(prism, reference) < 1e-6
    assert json.loads(prism.provenance)["prism_interpolation"] == [1, 1]
    assert "method" not in json.loads(reference.provenance)  # the default path's record is unchanged


def test_prism_window_agrees_with_multislice(crystal):
    # f = 2: a 7.5 A window; benchmarks/results/multislice.json has 4e-4 (13.7 A window), 6e-4 (10.3 A, the
    # schema's) and 9e-4 (6.9 A) on a 36 A nanocrystal, with iCOM phase correlations above 0.99999
    frames, settings, reference = crystal
    prism = simulate_4dstem(frames, method="prism", prism_interpolation=2, **settings)
    _same_grid(prism, reference)
    largest = _largest_difference(prism, reference)
    assert 1e-6 < largest <= 1e-3  # an approximation, within the accuracy target
    assert np.allclose(prism.data.sum(axis=(2, 3)), reference.data.sum(axis=(2, 3)), atol=2e-3)
    phase_prism, phase_reference = icom(prism)[0], icom(reference)[0]
    assert np.corrcoef(phase_prism.ravel(), phase_reference.ravel())[0, 1] >= 0.999
    record = json.loads(prism.provenance)
    assert record["method"] == "prism" and record["prism_window_A"] == pytest.approx([L / 2 for L in prism.cell_A[:2]])


def test_prism_patterns_are_the_padded_fft():
    # the patterns of windowed waves: the matrix products at the kept frequencies equal the FFT of the
    # wave zero-padded to the box grid, fftshifted, cropped centred to 2 half + 1 and rebinned
    rng = np.random.default_rng(3)
    waves = (rng.standard_normal((3, 7, 6)) + 1j * rng.standard_normal((3, 7, 6))).astype(np.complex64)
    full, half = (16, 15), (7, 6)
    rx, ry = _rebin_axis(2 * half[0] + 1, 0.5, 1.2), _rebin_axis(2 * half[1] + 1, 0.6, 1.2)
    padded = np.zeros((3, *full), np.complex128)
    padded[:, :7, :6] = waves
    intensity = np.fft.fftshift(np.abs(np.fft.fft2(padded)) ** 2, axes=(1, 2)) * (7 * 6 / (16 * 15))
    crop = np.zeros((3, 2 * half[0] + 1, 2 * half[1] + 1))
    for i in range(2 * half[0] + 1):
        for j in range(2 * half[1] + 1):
            m, n = i - half[0], j - half[1]
            if abs(m) <= min(full[0] // 2, full[0] - 1 - full[0] // 2) and abs(n) <= full[1] // 2:
                crop[:, i, j] = intensity[:, full[0] // 2 + m, full[1] // 2 + n]
    expected = np.einsum("pi,oj,nij->nop", rx, ry, crop)
    got = _patterns(waves, _detector_operators(full, (7, 6), half, rx, ry))
    assert got.shape == expected.shape == (3, ry.shape[0], rx.shape[0])
    assert np.abs(got - expected).max() < 1e-5 * expected.max()


def test_prism_settings():
    # the window holds the probe's spread through the thickness (2 t alpha) plus the margin
    assert interpolation_factors((41.2, 39.3, 34.8), None, 10.0, 25.0) == (3, 3)  # window >= 11.7 A
    assert interpolation_factors((178.0, 178.0, 168.0), None, 10.0, 25.0) == (9, 9)  # window >= 18.4 A
    assert interpolation_factors((8.0, 8.0, 8.0), None, 10.0, 25.0) == (1, 1)  # a box smaller than the window
    assert interpolation_factors((41.2, 39.3, 34.8), 4, 10.0, 25.0) == (4, 4)
    for bad in (0, 2.5, True):
        with pytest.raises(InputError, match="prism_interpolation"):
            interpolation_factors((41.2, 39.3, 34.8), bad, 10.0, 25.0)
    with pytest.raises(InputError, match="prism_margin_A"):
        interpolation_factors((41.2, 39.3, 34.8), None, 0.0, 25.0)
    atoms = build_fapbbr3((1, 1, 1))
    with pytest.raises(InputError, match="finite specimen"):
        simulate_4dstem(atoms, method="prism", scan_step_A=0.3, sampling_A=0.05, slice_thickness_A=1.0, **OPTICS)
    with pytest.raises(InputError, match="method"):
        simulate_4dstem(atoms, method="bloch", scan_step_A=0.3, sampling_A=0.05, slice_thickness_A=1.0, **OPTICS)
