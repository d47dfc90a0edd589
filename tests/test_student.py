"""The committed student potential: loads, is physical, is fast, and agrees with the reference."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from octastem.io import InputError
from octastem.md import load_mace_model, mace_calculator, model_elements
from octastem.structure import build_fapbbr3, remove_fabr_pairs

# sleeping (not spinning) OpenMP waits: keeps the timing fair on a machine shared with other jobs
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
STUDENT = REPO / "resources" / "student" / "fapbbr3_student.model"
METRICS = REPO / "resources" / "student" / "metrics.json"


@pytest.fixture(scope="module")
def student():
    model = load_mace_model(STUDENT, device="cpu")
    return model, mace_calculator(model, device="cpu", threads=2)


def test_student_file_small_and_documented():
    assert STUDENT.exists(), f"{STUDENT} missing"
    assert STUDENT.stat().st_size < 20 * 2**20
    assert (STUDENT.parent / "MODEL_CARD.md").exists()
    metrics = json.loads(METRICS.read_text())
    assert metrics["held_out"]["force_rmse_meV_per_A"] > 0


def test_student_loads_and_obeys_newton(student):
    model, calc = student
    assert model_elements(model) == [1, 6, 7, 35, 82]  # H C N Br Pb
    atoms = remove_fabr_pairs(build_fapbbr3((2, 2, 2)), 1, seed=2)
    atoms.rattle(0.05, seed=0)
    atoms.calc = calc
    f = atoms.get_forces()
    assert f.shape == (len(atoms), 3) and np.isfinite(f).all()
    assert np.abs(f).max() > 1e-2  # a rattled cell has forces
    # Newton's third law: no net force on a periodic cell
    assert np.abs(f.sum(0)).max() < 2e-3
    assert np.isfinite(atoms.get_stress()).all() and np.isfinite(atoms.get_potential_energy())


def test_student_translation_and_rotation_invariant(student):
    _, calc = student
    a = build_fapbbr3((1, 1, 1))
    a.rattle(0.05, seed=1)
    a.calc = calc
    e0, f0 = a.get_potential_energy(), a.get_forces()
    b = a.copy()
    b.calc = calc
    b.translate([0.37, -1.1, 2.3])
    b.wrap()
    assert b.get_potential_energy() == pytest.approx(e0, abs=1e-4)
    # rotate the whole periodic system (cell and positions) by 90 degrees about z
    c = a.copy()
    c.calc = calc
    rot = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    c.set_cell(a.cell.array @ rot.T, scale_atoms=False)
    c.positions = a.positions @ rot.T
    assert c.get_potential_energy() == pytest.approx(e0, abs=1e-4)
    np.testing.assert_allclose(c.get_forces(), f0 @ rot.T, atol=1e-4)


def test_student_unknown_element_refused(student):
    from octastem.md import check_elements

    model, _ = student
    atoms = build_fapbbr3((1, 1, 1))
    atoms[0].symbol = "Cs"
    with pytest.raises(InputError, match="Cs"):
        check_elements(atoms, model)


def _thermal_frames(calc, n_frames=2, seed=0):
    """Fresh 2x2x2 frames from a short student Langevin run at 300 K (not in any data set)."""
    from ase import units
    from ase.md.langevinbaoab import LangevinBAOAB
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary

    atoms = build_fapbbr3((2, 2, 2), a_A=6.02)
    atoms.calc = calc
    rng = np.random.default_rng(100 + seed)
    MaxwellBoltzmannDistribution(atoms, temperature_K=600, rng=rng)  # equipartition -> ~300 K
    Stationary(atoms)
    dyn = LangevinBAOAB(atoms, 1.0 * units.fs, temperature_K=300, T_tau=25 * units.fs, rng=rng)
    frames = []
    for _ in range(n_frames):
        dyn.run(25)
        frames.append(atoms.copy())
    return frames


def test_student_matches_reference_on_fresh_frames(student, reference_calc):
    from octastem.md.student import errors, label

    _, calc = student
    _, ref = reference_calc
    frames = [label(a, ref) for a in _thermal_frames(calc)]
    err = errors(calc, frames)
    card = json.loads(METRICS.read_text())["held_out"]["force_rmse_meV_per_A"]
    # fresh frames come from the student's own dynamics, slightly off the training distribution:
    # allow 1.5x the held-out RMSE of the model card (and never more than 60 meV/A)
    assert err["force_rmse_meV_per_A"] < min(1.5 * card, 60.0), err
    assert err["energy_rmse_meV_per_atom"] < 5.0, err
    # stress drives the barostat: model card 0.5 meV/A^3 on held-out frames
    assert err["stress_rmse_meV_per_A3"] < 2.0, err
    # the errors are small compared with the forces themselves
    assert err["force_rmse_meV_per_A"] < 0.1 * err["force_rms_reference_meV_per_A"]


def test_student_much_faster_than_reference(student, reference_calc):
    """Same 2x2x2 cell, same process, calls interleaved so both see the same background load."""
    from octastem.md.student import time_force_calls

    _, calc = student
    _, ref = reference_calc
    atoms = build_fapbbr3((2, 2, 2))
    atoms.rattle(0.05, seed=4)
    t = time_force_calls({"reference": ref, "student": calc}, atoms, n_calls=2)
    assert t["reference"] / t["student"] >= 10.0, t


def test_split_keeps_snapshots_together_and_is_stable(tmp_path):
    """Perturbed copies stay with their snapshot; adding data never moves earlier frames."""
    from ase import Atoms
    from ase.io import read, write

    from octastem.md.student import ENERGY_KEY, FORCES_KEY, split_frames

    def frames(tag, n):
        out = []
        for t in range(n):
            for kind in ("md", "perturbed"):
                a = Atoms("PbBr", positions=[[0, 0, 0], [3, 0, 0]], cell=[6, 6, 6], pbc=True)
                a.info.update(config_type=tag, time_fs=float(t), kind=kind, **{ENERGY_KEY: -1.0})
                a.arrays[FORCES_KEY] = np.zeros((2, 3))
                out.append(a)
        return out

    write(tmp_path / "a.xyz", frames("a", 60))
    write(tmp_path / "b.xyz", frames("b", 60))
    parts = [tmp_path / f"{k}.xyz" for k in ("train", "valid", "test")]
    n1 = split_frames(tmp_path / "a.xyz", *parts)
    first = {k: {(f.info["config_type"], f.info["time_fs"]) for f in read(p, ":")} for k, p in zip("tvs", parts)}
    n2 = split_frames([tmp_path / "a.xyz", tmp_path / "b.xyz"], *parts)
    second = {k: {(f.info["config_type"], f.info["time_fs"]) for f in read(p, ":")} for k, p in zip("tvs", parts)}
    assert sum(n1.values()) == 120 and sum(n2.values()) == 240
    assert n1["test"] > 0 and n1["valid"] > 0 and n1["train"] > n1["test"]
    for k in "tvs":
        assert first[k] <= second[k]  # stable when data are added
    assert not (second["t"] & second["s"]) and not (second["t"] & second["v"])
    assert n2["test"] % 2 == 0  # snapshot + perturbed copy always together


def test_npt_sampling_run_moves_the_cell_and_labels_every_frame(tmp_path):
    """A sampling run with ``pressure_MPa`` is NPT (the barostat changes the cell); every sampled
    frame and perturbed copy carries energy, forces and stress of the labelling potential.
    (The student labels itself here so the test stays cheap; the pipeline labels with the reference.)"""
    from octastem.md.student import (
        ENERGY_KEY,
        FORCES_KEY,
        STRESS_KEY,
        SampleRun,
        SampleSettings,
        read_labelled,
        sample_configurations,
    )

    run = SampleRun((1, 1, 1), 0, 300.0, 40, 20, "npt", pressure_MPa=0.1, timestep_fs=0.5)
    settings = SampleSettings(runs=[run], strain=0.0, n_perturbed=1, perturb_strain=0.04, seed=3)
    out = tmp_path / "npt.xyz"
    summary = sample_configurations(STUDENT, out, settings, driver_path=STUDENT, threads=1)
    frames = read_labelled(out)
    assert summary["n_frames"] == len(frames) == 4  # 2 snapshots + 2 perturbed copies
    md = [f for f in frames if f.info["kind"] == "md"]
    assert [f.info["time_fs"] for f in md] == [10.0, 20.0]  # 0.5 fs steps of this run, not the 1 fs default
    assert not np.allclose(md[-1].cell.array, np.diag([6.0, 6.0, 6.0]), atol=1e-6)  # the barostat acted
    for f in frames:
        assert np.isfinite(f.info[ENERGY_KEY]) and f.arrays[FORCES_KEY].shape == (len(f), 3)
        assert np.asarray(f.info[STRESS_KEY]).shape == (6,)


def test_warm_start_copies_the_previous_rounds_last_checkpoint(tmp_path):
    """Round r continues from round r-1's newest checkpoint, under round r's run name; a round that
    already has checkpoints of its own (an interrupted training) is left to resume from them."""
    from octastem.md.student import latest_checkpoint, seed_checkpoint

    prev_ck = tmp_path / "student_r0_training" / "work" / "checkpoints"
    prev_ck.mkdir(parents=True)
    for e in (9, 93, 57):
        (prev_ck / f"student_r0_run-0_epoch-{e}.pt").write_bytes(f"epoch {e}".encode())
    prev_model = tmp_path / "student_r0.model"
    own = tmp_path / "student_r1_training" / "work" / "checkpoints"
    assert seed_checkpoint(prev_model, own, "student_r1", 0) == 93
    assert (own / "student_r1_run-0_epoch-93.pt").read_bytes() == b"epoch 93"
    (own / "student_r1_run-0_epoch-120.pt").write_bytes(b"epoch 120")  # training went on, then stopped
    assert seed_checkpoint(prev_model, own, "student_r1", 0) == 93
    assert latest_checkpoint(own)[1] == 120 and len(list(own.iterdir())) == 2
    with pytest.raises(InputError, match="no mace checkpoint"):
        seed_checkpoint(tmp_path / "missing.model", tmp_path / "x", "student_r1", 0)


def test_npt_stability_report(tmp_path):
    """The NPT check runs the production protocol and compares stresses and forces frame by frame:
    against itself the student differs only by float noise, and the cell statistics are sane."""
    from octastem.md.student import npt_stability

    r = npt_stability(
        STUDENT,
        STUDENT,
        tmp_path,
        reps=(1, 1, 1),
        total_fs=20.0,
        frame_interval_fs=5.0,
        analysis_start_fs=5.0,
        n_stress_frames=2,
        threads=1,
    )
    assert r["n_frames"] == 4 and r["stress_student_minus_reference_GPa"]["n_frames"] == 2
    assert r["stress_student_minus_reference_GPa"]["rms"] < 1e-5  # two instances of one model: float noise
    assert r["force_rmse_on_own_frames_meV_per_A"] < 1e-2
    assert all(5.5 < v < 6.5 for v in r["pseudo_cubic_A"].values())
    assert (tmp_path / "student_npt.h5").exists()


class _RunsCode:
    """Unpickling this object creates the file ``marker`` (what a malicious model file could do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_trust_model_file_defaults_to_false_for_md_and_student():
    from octastem.config import schema_defaults

    assert schema_defaults("student", "trust_model_file") is False
    assert schema_defaults("md", "trust_model_file") is False


def test_round_model_verified_by_the_record_written_with_it(tmp_path):
    """A round model is handed on only while its bytes match the sha256 written beside it; an unrecorded
    student.reference is not unpickled under the default config."""
    import pickle

    from octastem.md.student import model_e0s
    from octastem.stages.student import model_trust, sha256_record, write_sha256_record

    marker = tmp_path / "code_ran"
    model = tmp_path / "student_r0.model"
    model.write_bytes(pickle.dumps(_RunsCode(marker)))
    assert not model_trust([model], trust_model_file=False)  # no record yet
    record = write_sha256_record(model)
    assert record == sha256_record(model) and record.read_text().split()[1] == "student_r0.model"
    assert model_trust([model, STUDENT], trust_model_file=False)  # own record + resources/student record
    model.write_bytes(model.read_bytes() + b"\0")  # replaced after training: the record no longer matches
    assert not model_trust([model], trust_model_file=False)
    assert model_trust([model], trust_model_file=True)
    # what student_data / train_student then do with an unverified reference: refuse it, run nothing
    with pytest.raises(InputError, match=r"student_r0.model: unverified .* set student.trust_model_file: true"):
        model_e0s(model, trust=model_trust([model], trust_model_file=False))
    assert not marker.exists()
