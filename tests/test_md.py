import hashlib
import io
from pathlib import Path

import h5py
import numpy as np
import pytest

from octastem import stages
from octastem.io import InputError
from octastem.md import (
    check_elements,
    load_mace_model,
    mace_calculator,
    model_elements,
    partial_path,
    read_frames,
    run_npt,
)
from octastem.md.mlp import recorded_model_sha256
from octastem.structure import build_fapbbr3

STUDENT = Path(__file__).resolve().parents[1] / "resources" / "student" / "fapbbr3_student.model"


class _Marker:
    """Unpickling this creates the file ``path``: the stand-in for code a model file could run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (io.open, (self.path, "w"))


def _file_that_runs_code_when_unpickled(tmp_path) -> tuple[Path, Path]:
    import torch

    marker = tmp_path / "code_ran"
    path = tmp_path / "own.model"
    torch.save(_Marker(marker), path)
    assert not marker.exists()
    return path, marker


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
    with pytest.raises(InputError, match="bad.model: unverified"):
        load_mace_model(bad, device="cpu")
    with pytest.raises(InputError, match="bad.model: not a loadable MACE model"):
        load_mace_model(bad, device="cpu", trust=True)
    with pytest.raises(InputError, match="not found"):
        load_mace_model(tmp_path / "missing.model", device="cpu")


def test_committed_student_is_verified_by_its_recorded_sha256():
    record = STUDENT.with_name(STUDENT.name + ".sha256").read_text().split()
    sha = hashlib.sha256(STUDENT.read_bytes()).hexdigest()
    assert record == [sha, STUDENT.name]  # sha256sum format: `sha256sum -c` checks it too
    assert sha in recorded_model_sha256()
    assert model_elements(load_mace_model(STUDENT, device="cpu")) == [1, 6, 7, 35, 82]


def test_unknown_model_file_is_not_unpickled_unless_trusted(tmp_path):
    path, marker = _file_that_runs_code_when_unpickled(tmp_path)
    with pytest.raises(InputError, match=r"own.model: unverified MACE model file .* set md.trust_model_file: true"):
        load_mace_model(path, device="cpu")
    assert not marker.exists()
    # trusted, it is unpickled (and then found not to be a MACE model)
    with pytest.raises(InputError, match="own.model: unpickled object is a TextIOWrapper, not a MACE model"):
        load_mace_model(path, device="cpu", trust=True)
    assert marker.exists()


def test_student_rules_name_their_own_trust_key(tmp_path):
    from octastem.md.student import model_e0s

    path, marker = _file_that_runs_code_when_unpickled(tmp_path)
    with pytest.raises(InputError, match="own.model: unverified .* set student.trust_model_file: true"):
        model_e0s(path)
    assert not marker.exists()


def test_own_model_loads_with_trust(tmp_path):
    import torch

    model = load_mace_model(STUDENT, device="cpu")
    own = tmp_path / "retrained.model"
    torch.save(model, own)
    with pytest.raises(InputError, match="retrained.model: unverified"):
        load_mace_model(own, device="cpu")
    assert model_elements(load_mace_model(own, device="cpu", trust=True)) == model_elements(model)


def test_replaced_reference_cache_copy_is_refused(reference_model_path, tmp_path, monkeypatch):
    """A file in the cache's place of the reference, not the reference: refused by the registry and the loader."""
    import shutil

    from octastem.registry import fetch

    # the cache as the registry leaves it: the verified archive and, next to it, its unpacked member
    untar = reference_model_path.parent
    cache = tmp_path / "cache"
    (cache / untar.name).mkdir(parents=True)
    archive = untar.name.removesuffix(".untar")
    shutil.copyfile(untar.parent / archive, cache / archive)
    unpacked = cache / untar.name / reference_model_path.name
    path, marker = _file_that_runs_code_when_unpickled(tmp_path)
    shutil.copyfile(path, unpacked)
    monkeypatch.setenv("OCTASTEM_CACHE", str(cache))
    with pytest.raises(InputError, match="reference_mace': unpacked copy .* changed after unpacking"):
        fetch("reference_mace")
    with pytest.raises(InputError, match="psiflow3_model.model: unverified"):
        load_mace_model(unpacked, device="cpu")
    assert not marker.exists()


def test_md_stage_refuses_an_unverified_potential_and_writes_nothing(tmp_path):
    """The md stage as the rule calls it: an unknown model file is refused, the committed student runs."""
    from ase.io import write

    structure = tmp_path / "pristine.extxyz"
    write(structure, build_fapbbr3((1, 1, 1)), format="extxyz")
    path, marker = _file_that_runs_code_when_unpickled(tmp_path)
    out = tmp_path / "md" / "trajectory.h5"
    out.parent.mkdir()  # as Snakemake makes it
    settings = dict(device="cpu", dtype="float32", total_fs=1.0, frame_interval_fs=0.5, progress=False)
    with pytest.raises(InputError, match="own.model: unverified .* md.trust_model_file"):
        stages.md(structure_path=structure, output=out, potential=str(path), trust_model_file=False, **settings)
    assert not marker.exists() and not out.exists() and not partial_path(out).exists()
    # the committed student, verified by its recorded sha256, needs no trust
    stages.md(structure_path=structure, output=out, potential=str(STUDENT), trust_model_file=False, **settings)
    assert len(read_frames(out)) == 3


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


def test_md_does_not_depend_on_what_the_process_ran_before(tmp_path):
    """Forces evaluated before a run, under other torch settings (nondeterministic algorithms,
    another thread count) and often enough for TorchScript to have optimised its graphs, leave the
    run's frames unchanged."""
    import torch

    calc = mace_calculator(load_mace_model(STUDENT, device="cpu"), device="cpu", threads=2)
    atoms = build_fapbbr3((2, 2, 2))
    kw = dict(total_fs=2.0, frame_interval_fs=1.0, progress=False, seed=1)
    fresh = run_npt(atoms, calc, tmp_path / "fresh.h5", **kw)
    previous = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    try:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(1)
        for rattle_A in (0.01, 0.0):  # ending with the start structure, evaluated outside the run
            before = atoms.copy()
            before.rattle(rattle_A, seed=0)
            before.calc = calc
            before.get_stress()
        after = run_npt(atoms, calc, tmp_path / "after.h5", **kw)
        assert torch.get_num_threads() == 1 and not torch.are_deterministic_algorithms_enabled()  # restored
    finally:
        torch.set_num_threads(previous[0])
        torch.use_deterministic_algorithms(previous[1], warn_only=True)
    with h5py.File(fresh) as f, h5py.File(after) as g:
        for name in ("cell", "temperature_K", "stress_eV_per_A3", "positions"):
            assert np.array_equal(f[name][()], g[name][()]), name


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


def test_hydrogen_mass_repartitioning_keeps_every_molecule_mass():
    from octastem.md.run import repartition_hydrogen_mass

    atoms = build_fapbbr3((2, 1, 1))
    heavy = repartition_hydrogen_mass(atoms, 4.0)
    h = atoms.numbers == 1
    assert np.allclose(heavy.get_masses()[h], 4.0)
    assert heavy.get_masses().sum() == pytest.approx(atoms.get_masses().sum())
    # the added mass comes from each molecule's own C and N atoms: every FA molecule keeps its mass
    for m in np.unique(atoms.arrays["fa_id"][atoms.arrays["fa_id"] >= 0]):
        sel = atoms.arrays["fa_id"] == m
        assert heavy.get_masses()[sel].sum() == pytest.approx(atoms.get_masses()[sel].sum())
    assert np.array_equal(
        heavy.get_masses()[~np.isin(atoms.numbers, [1, 6, 7])], atoms.get_masses()[~np.isin(atoms.numbers, [1, 6, 7])]
    )
    assert np.array_equal(repartition_hydrogen_mass(atoms, None).get_masses(), atoms.get_masses())
    with pytest.raises(InputError, match="no mass left"):
        repartition_hydrogen_mass(atoms, 8.0 + 20.0)


def test_hmr_run_records_its_masses_and_resumes_only_with_them(tmp_path):
    calc = mace_calculator(load_mace_model(STUDENT, device="cpu"), device="cpu", threads=1)
    atoms = build_fapbbr3((1, 1, 1))
    out = tmp_path / "hmr.h5"
    kw = dict(total_fs=8.0, frame_interval_fs=2.0, timestep_fs=2.0, checkpoint_every=1, progress=False)
    part = run_npt(atoms, calc, out, hydrogen_mass_u=4.0, max_frames=2, **kw)
    with h5py.File(part) as f:
        assert float(f.attrs["hydrogen_mass_u"]) == 4.0
    with pytest.raises(InputError, match="hydrogen_mass_u"):
        run_npt(atoms, calc, out, **kw)  # natural masses cannot continue a repartitioned run
    run_npt(atoms, calc, out, hydrogen_mass_u=4.0, **kw)
    with h5py.File(out) as f:
        assert np.isfinite(f["positions"][()]).all() and f["time_fs"].shape == (5,)
        assert 100.0 < float(np.mean(f["temperature_K"][1:])) < 600.0  # a 2 fs step stays stable with H at 4 u
