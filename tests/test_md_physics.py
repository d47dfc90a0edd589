"""Physical sanity of MD with the committed student potential: thermostat, barostat, conservation laws."""

import os
from pathlib import Path

# OpenMP threads that sleep instead of spinning while they wait: on a machine shared with other
# jobs, spinning threads make every small MACE call several times slower (set before torch loads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import h5py
import numpy as np
import pytest
from ase import units
from ase.md.langevinbaoab import LangevinBAOAB
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
from ase.md.verlet import VelocityVerlet

from octastem.md import run_npt
from octastem.mlp import load_mace_model, mace_calculator
from octastem.structure import build_fapbbr3

STUDENT = Path(__file__).resolve().parents[1] / "resources" / "student" / "fapbbr3_student.model"


@pytest.fixture(scope="module")
def calc():
    return mace_calculator(load_mace_model(STUDENT, device="cpu"), device="cpu", threads=2)


def test_nvt_average_temperature(calc):
    """Langevin NVT, 2x2x2 (96 atoms), 300 K, 250 steps of 1 fs, averaged over the last 150 fs.

    The instantaneous temperature of 96 atoms fluctuates by sqrt(2 / 3N) ~ 8 % (~25 K); with a
    25 fs thermostat the 150 fs window holds about 6-10 independent samples, so the mean has a
    standard error of ~10 K: the tolerance is 35 K (~3.5 sigma). A potential that is unstable or
    a thermostat that heats/cools would miss it by far more.
    """
    atoms = build_fapbbr3((2, 2, 2))
    atoms.calc = calc
    rng = np.random.default_rng(7)
    MaxwellBoltzmannDistribution(atoms, temperature_K=600, rng=rng)  # equipartition -> ~300 K
    Stationary(atoms)
    dyn = LangevinBAOAB(atoms, 1.0 * units.fs, temperature_K=300, T_tau=25 * units.fs, rng=rng)
    dyn.run(100)
    temps = []
    for _ in range(150):
        dyn.run(1)
        temps.append(atoms.get_temperature())
    assert abs(np.mean(temps) - 300.0) < 35.0, np.mean(temps)
    assert np.isfinite(atoms.get_potential_energy())


def test_npt_pristine_cell_stays_cubic(calc, tmp_path):
    """Anisotropic NPT (octastem.md.run_npt) with the study's settings (1 ps barostat), 200 fs.

    The pseudo-cubic a, b, c averaged over the last 2/3 of the run stay within 1.5 % of each other,
    the shear (off-diagonal cell) below 2 % of a, and the lattice parameter within 2 % of the 6.0 A
    start. (The ideal start has all FA cations aligned, so it is not cubic in symmetry: with a
    300 fs barostat a trial stretched one axis by ~4-5 % within 150 fs -- a transient of the
    start and barostat, not a property of the potential; the stress itself is checked against
    the reference in test_student.py.)
    """
    out = run_npt(
        build_fapbbr3((2, 2, 2)),
        calc,
        tmp_path / "npt.h5",
        temperature_K=300,
        timestep_fs=0.5,
        total_fs=200.0,
        frame_interval_fs=5.0,
        T_tau_fs=50.0,
        P_tau_fs=1000.0,
        seed=3,
        progress=False,
    )
    with h5py.File(out) as f:
        cells = f["cell"][()]
        temps = f["temperature_K"][()]
    late = cells[len(cells) // 3 :]
    lengths = np.linalg.norm(late, axis=2).mean(0) / 2.0  # pseudo-cubic a, b, c
    assert (lengths.max() - lengths.min()) / lengths.mean() < 0.015, lengths
    shear = np.abs(late - np.einsum("fii->fi", late)[:, :, None] * np.eye(3)).max()
    assert shear < 0.02 * 2 * lengths.mean(), shear
    assert abs(lengths.mean() / 6.0 - 1.0) < 0.02, lengths
    assert np.all(np.isfinite(temps)) and temps[len(temps) // 3 :].mean() < 450


def test_nve_momentum_and_energy_conserved(calc):
    """Velocity Verlet, 0.5 fs, 100 steps: total momentum stays ~0, total energy drifts < 2 meV/atom."""
    atoms = build_fapbbr3((2, 2, 2))
    atoms.rattle(0.02, seed=5)
    atoms.calc = calc
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(2))
    Stationary(atoms)
    typical_p = np.sqrt(np.mean(np.sum(atoms.get_momenta() ** 2, axis=1)))
    dyn = VelocityVerlet(atoms, 0.5 * units.fs)
    e0 = atoms.get_total_energy()
    energies, momenta = [], []
    for _ in range(20):
        dyn.run(5)
        energies.append(atoms.get_total_energy())
        momenta.append(np.linalg.norm(atoms.get_momenta().sum(0)))
    assert max(momenta) < 1e-3 * typical_p, (max(momenta), typical_p)
    assert np.abs(np.array(energies) - e0).max() / len(atoms) < 2e-3
