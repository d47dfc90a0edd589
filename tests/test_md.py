import h5py
import numpy as np
import pytest

from octastem.io import InputError
from octastem.md import check_elements, load_mace_model, partial_path, read_frames, run_npt
from octastem.structure import build_fapbbr3


def test_reference_potential_loads_on_cpu(reference_calc):
    model, calc = reference_calc
    assert float(model.r_max) == pytest.approx(7.0)
    atoms = build_fapbbr3((1, 1, 1))
    atoms.calc = calc
    f = atoms.get_forces()
    assert f.shape == (12, 3) and np.isfinite(f).all()
    # Newton's third law: total force on a periodic cell vanishes
    assert np.abs(f.sum(0)).max() < 1e-3
    # ideal cubic cell: Pb sits on an inversion centre of the inorganic frame, stress is finite
    assert np.isfinite(atoms.get_stress()).all()


def test_element_check_and_bad_model(reference_calc, tmp_path):
    model, _ = reference_calc
    atoms = build_fapbbr3((1, 1, 1))
    atoms[0].symbol = "Cs"
    with pytest.raises(InputError, match="Cs"):
        check_elements(atoms, model)
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(InputError, match="bad.model"):
        load_mace_model(bad, device="cpu")
    with pytest.raises(InputError, match="not found"):
        load_mace_model(tmp_path / "missing.model", device="cpu")


def test_md_frames_and_resume(reference_calc, tmp_path):
    _, calc = reference_calc
    atoms = build_fapbbr3((1, 1, 1))
    kw = dict(total_fs=6.0, frame_interval_fs=1.0, checkpoint_every=2, progress=False, seed=4)
    full = run_npt(atoms, calc, tmp_path / "full.h5", **kw)
    # interrupted after 3 new frames, then resumed from the last checkpoint
    out = tmp_path / "resumed.h5"
    part = run_npt(atoms, calc, out, max_frames=3, **kw)
    assert part == partial_path(out) and part.exists() and not out.exists()
    run_npt(atoms, calc, out, **kw)
    assert out.exists() and not part.exists()
    with h5py.File(full) as f, h5py.File(out) as g:
        t_full, t_res = f["time_fs"][()], g["time_fs"][()]
        assert np.array_equal(t_full, np.arange(7.0)) and np.array_equal(t_res, t_full)
        assert np.array_equal(g["positions"][()], f["positions"][()])
        assert "checkpoint" not in g
        assert np.isfinite(f["energy_eV"][()]).all()
    frames = read_frames(out, start_fs=2.0, every_fs=2.0)
    assert [a.info["time_fs"] for a in frames] == [2.0, 4.0, 6.0]


def test_resume_refuses_changed_settings(reference_calc, tmp_path):
    _, calc = reference_calc
    atoms = build_fapbbr3((1, 1, 1))
    out = tmp_path / "t.h5"
    run_npt(atoms, calc, out, total_fs=4.0, frame_interval_fs=1.0, checkpoint_every=1, progress=False, max_frames=1)
    with pytest.raises(InputError, match="temperature_K"):
        run_npt(atoms, calc, out, total_fs=4.0, frame_interval_fs=1.0, temperature_K=400, progress=False)


def test_frame_interval_must_be_multiple_of_step(reference_calc, tmp_path):
    _, calc = reference_calc
    with pytest.raises(InputError, match="frame_interval_fs"):
        run_npt(build_fapbbr3(), calc, tmp_path / "x.h5", timestep_fs=0.5, frame_interval_fs=0.75, progress=False)


def test_nve_energy_conserved_and_momentum_zero(reference_calc):
    """Velocity Verlet with the reference potential: total energy drift bounded, momentum conserved."""
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
    from ase.md.verlet import VelocityVerlet

    _, calc = reference_calc
    atoms = build_fapbbr3((1, 1, 1))
    atoms.calc = calc
    MaxwellBoltzmannDistribution(atoms, temperature_K=100, rng=np.random.default_rng(0))
    Stationary(atoms)
    e0 = atoms.get_total_energy()
    dyn = VelocityVerlet(atoms, 0.25 * units.fs)
    energies = []
    for _ in range(8):
        dyn.run(2)
        energies.append(atoms.get_total_energy())
    drift = np.abs(np.array(energies) - e0).max() / len(atoms)
    assert drift < 2e-3, f"NVE energy drift {drift * 1e3:.2f} meV/atom"
    p = atoms.get_momenta().sum(0)
    assert np.abs(p).max() < 1e-3 * np.abs(atoms.get_momenta()).sum() / len(atoms)
