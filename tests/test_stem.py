"""Simulated 4D-STEM: normalisation, dose, symmetry, orientation and file round trip."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from ase import Atoms

from octastem.io import STEM_ATTRS, InputError, read_4dstem, write_4dstem
from octastem.stem import add_poisson_noise, center_of_mass, simulate_4dstem
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
