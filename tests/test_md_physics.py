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

from octastem.md import load_mace_model, mace_calculator, run_npt
from octastem.structure import build_fapbbr3

STUDENT = Path(__file__).resolve().parents[1] / "resources" / "student" / "fapbbr3_student.model"


@pytest.fixture(scope="module")
def calc():
    return mace_calculator(load_mace_model(STUDENT, device="cpu"), device="cpu", threads=2)


def test_nvt_average_temperature(calc):
    """Langevin NVT at the production step (0.5 fs), 2x2x2 (96 atoms), 300 K target: the kinetic
    temperature averaged over two independent 1 ps runs is within 10 K of the target.

    96 atoms fluctuate by ~25 K per sample and slow lattice and FA+ rotor modes correlate the
    samples: single 1 ps runs of this cell were measured between 289.6 and 304.7 K (eight runs,
    0.25-0.5 fs steps, NVT and NPT; mean 298.6 K), so the mean of two carries ~3-4 K of
    scatter and 10 K is a ~3 sigma band. In addition, the kinetic temperature of BAOAB at full
    steps is biased low by O(dt^2) for the stiff X-H modes of FA+ (~2 %, ~6-7 K, measured at
    1 fs; ~0.5 % at 0.5 fs) while configurations are sampled correctly. The 5 K target is a
    longer-run property (resources/student/MODEL_CARD.md); a thermostat off by several percent,
    or a potential that heats or cools, misses this band too.
    """
    means = []
    for seed in (7, 11):
        atoms = build_fapbbr3((2, 2, 2))
        atoms.calc = calc
        rng = np.random.default_rng(seed)
        MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=rng)
        Stationary(atoms)
        dyn = LangevinBAOAB(atoms, 0.5 * units.fs, temperature_K=300, T_tau=25 * units.fs, rng=rng)
        dyn.run(200)
        temps = []
        for _ in range(500):
            dyn.run(4)
            temps.append(atoms.get_temperature())
        means.append(np.mean(temps))
        assert np.isfinite(atoms.get_potential_energy())
    assert abs(np.mean(means) - 300.0) < 10.0, means


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
