"""Training data of the student: short MD sampling runs, perturbed copies, labels of the reference.

:func:`sample_configurations` runs short Langevin MD of small FAPbBr3 cells (pristine and with FABr
vacancies) driven by the reference potential (or by an earlier student, whose frames are then
re-labelled), adds strained and rattled copies and labels every frame with the reference energy,
forces and stress, written as extxyz with the keys mace-torch reads (``REF_energy`` eV,
``REF_forces`` eV/A, ``REF_stress`` eV/A^3 Voigt). :func:`read_labelled` reads such a file back;
:func:`split_frames` divides labelled files into train / validation / held-out test files.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from ase import Atoms, units

from octastem.io import InputError
from octastem.rng import generator

log = logging.getLogger("octastem")

ENERGY_KEY, FORCES_KEY, STRESS_KEY = "REF_energy", "REF_forces", "REF_stress"
#: The config key that lets the student rules unpickle a model file whose sha256 is recorded nowhere.
TRUST_KEY = "student.trust_model_file"

NPT_T_TAU_FS, NPT_P_TAU_FS = 100.0, 1000.0  # the study's thermostat and barostat time constants


@dataclass
class SampleRun:
    """One short MD run that contributes frames to the data set.

    ``reps`` supercell of the cubic cell with ``n_vacancies`` FABr pairs removed; its lattice
    parameter is ``a_A`` scaled by ``1 + strain`` (a random strain in +-``strain`` per axis per run).
    With ``pressure_MPa`` set the run is NPT with the production protocol of :func:`octastem.md.run_npt`
    (anisotropic cell, thermostat ``NPT_T_TAU_FS``, barostat ``NPT_P_TAU_FS``), so the data cover the
    cell shapes the potential visits in production MD; otherwise NVT. ``timestep_fs`` overrides the
    settings' time step for this run.
    """

    reps: tuple[int, int, int] = (2, 2, 2)
    n_vacancies: int = 0
    temperature_K: float = 300.0
    steps: int = 100
    sample_every: int = 5
    tag: str = ""
    pressure_MPa: float | None = None
    timestep_fs: float | None = None


@dataclass
class SampleSettings:
    runs: list[SampleRun] = field(default_factory=list)
    a_A: float = 6.0
    timestep_fs: float = 1.0
    T_tau_fs: float = 25.0
    strain: float = 0.02
    n_perturbed: int = 1  # strained + rattled copies per sampled frame (each costs one reference call)
    rattle_A: float = 0.03
    perturb_strain: float = 0.02
    seed: int = 0


def default_runs() -> list[SampleRun]:
    """The data set of the committed student: 2x2x2 cells (96 / 85 atoms), pristine at 300 K and
    with one FABr vacancy at 400 K, 100 fs each, a snapshot every 4 fs (+ one perturbed copy)."""
    return [
        SampleRun((2, 2, 2), 0, 300.0, 100, 4, "2x2x2_300K"),
        SampleRun((2, 2, 2), 1, 400.0, 100, 4, "2x2x2_vac1_400K"),
    ]


def sample_settings(runs: list[dict] | None = None, **fields) -> SampleSettings:
    """:class:`SampleSettings` from plain data (a config round): ``runs`` as dicts of :class:`SampleRun`
    fields (None or empty: :func:`default_runs`), other :class:`SampleSettings` fields as keywords."""
    runs = [SampleRun(**{**r, "reps": tuple(r["reps"])}) for r in runs] if runs else default_runs()
    return SampleSettings(runs=runs, **fields)


def _calculator(model_path, threads: int | None, device: str = "cpu", dtype: str = "float32", *, trust: bool = False):
    """A model file loaded (:func:`octastem.md.load_mace_model`: unpickled only when its sha256 is
    recorded or ``trust`` is set) and its calculator."""
    from octastem.md.mlp import load_mace_model, mace_calculator

    model = load_mace_model(model_path, device=device, dtype=dtype, trust=trust, trust_key=TRUST_KEY)
    return model, mace_calculator(model, device=device, dtype=dtype, threads=threads)


def _bare(atoms: Atoms) -> Atoms:
    """A periodic copy of ``atoms`` with numbers, positions and cell only (no calculator, no info)."""
    return Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=True)


def label(atoms: Atoms, calc) -> Atoms:
    """A copy of ``atoms`` carrying ``calc``'s energy, forces and stress under the REF_ keys."""
    a = atoms.copy()
    a.calc = calc
    e = a.get_potential_energy()
    f = a.get_forces()
    s = a.get_stress(voigt=True)
    out = _bare(a)
    out.info.update({k: v for k, v in atoms.info.items() if isinstance(v, (int, float, str))})
    out.info[ENERGY_KEY] = float(e)
    out.info[STRESS_KEY] = np.asarray(s, float)
    out.arrays[FORCES_KEY] = np.asarray(f, float)
    return out


def _strained(atoms: Atoms, rng: np.random.Generator, strain: float, rattle_A: float) -> Atoms:
    """Random symmetric strain (each component in +-``strain``) and Gaussian rattle of ``rattle_A``."""
    a = atoms.copy()
    eps = rng.uniform(-strain, strain, size=(3, 3))
    eps = 0.5 * (eps + eps.T)
    a.set_cell(a.cell.array @ (np.eye(3) + eps), scale_atoms=True)
    a.positions += rng.normal(0.0, rattle_A, size=a.positions.shape)
    return a


def _start_cell(run: SampleRun, k: int, s: SampleSettings, rng: np.random.Generator, model) -> Atoms:
    """The ideal cubic start of sampling run ``k``: vacancies removed, each axis randomly strained."""
    from octastem.md.mlp import check_elements
    from octastem.structure import build_fapbbr3, remove_fabr_pairs

    atoms = build_fapbbr3(tuple(run.reps), s.a_A)
    if run.n_vacancies:
        atoms = remove_fabr_pairs(atoms, run.n_vacancies, seed=s.seed + k)
    check_elements(atoms, model, name=f"student sampling run {k}")
    diag = 1.0 + rng.uniform(-s.strain, s.strain, size=3)
    atoms.set_cell(atoms.cell.array * diag[:, None], scale_atoms=True)
    return _bare(atoms)


def _dynamics(atoms: Atoms, run: SampleRun, k: int, s: SampleSettings, rng: np.random.Generator):
    """Velocities from ``rng`` and the LangevinBAOAB integrator of sampling run ``k`` (NPT with a pressure)."""
    from ase.md.langevinbaoab import LangevinBAOAB
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary

    dt_fs = run.timestep_fs or s.timestep_fs
    npt = run.pressure_MPa is not None
    # NVT starts hot (equipartition halves it); NPT starts like production MD
    MaxwellBoltzmannDistribution(atoms, temperature_K=(1.0 if npt else 2.0) * run.temperature_K, rng=rng)
    Stationary(atoms)
    barostat = (
        dict(
            externalstress=-run.pressure_MPa * 1e6 * units.Pascal,
            hydrostatic=False,
            P_tau=NPT_P_TAU_FS * units.fs,
        )
        if npt
        else {}
    )
    return LangevinBAOAB(
        atoms,
        dt_fs * units.fs,
        temperature_K=run.temperature_K,
        T_tau=(NPT_T_TAU_FS if npt else s.T_tau_fs) * units.fs,
        rng=generator(s.seed + k, "student_langevin"),
        **barostat,
    )


def _sample_run(dyn, atoms: Atoms, run: SampleRun, s: SampleSettings, rng, ref_calc, frames: list, *, relabel, t0):
    """Run ``dyn``, labelling a snapshot (and its perturbed copies) every ``run.sample_every`` steps.

    Appends the labelled frames to ``frames``; returns the number of reference calls. ``relabel``:
    the MD is driven by another potential, so each snapshot costs one reference call of its own.
    ``t0``: start time for progress lines on stderr (None: no progress lines).
    """
    dt_fs = run.timestep_fs or s.timestep_fs
    tag = run.tag or f"{'x'.join(map(str, run.reps))}_v{run.n_vacancies}_{run.temperature_K:.0f}K"
    n_ref_calls = 0
    n_run = 0
    for step in range(run.sample_every, run.steps + 1, run.sample_every):
        dyn.run(run.sample_every)
        if not relabel:
            n_ref_calls += run.sample_every
        snap = _bare(atoms)
        snap.info.update(config_type=tag, time_fs=step * dt_fs, kind="md")
        frames.append(label(snap, ref_calc))
        n_ref_calls += relabel
        for _ in range(s.n_perturbed):
            p = _strained(snap, rng, s.perturb_strain, s.rattle_A)
            p.info.update(config_type=tag, time_fs=step * dt_fs, kind="perturbed")
            frames.append(label(p, ref_calc))
            n_ref_calls += 1
        n_run += 1
        if t0 is not None:
            print(
                f"[{time.perf_counter() - t0:7.0f} s] {tag} step {step}/{run.steps} "
                f"T={atoms.get_temperature():.0f} K, cell {np.round(atoms.cell.lengths(), 2)} A, "
                f"{len(frames)} frames",
                file=sys.stderr,
                flush=True,
            )
    log.info("student sampling %s: %d atoms, %d frames", tag, len(atoms), n_run * (1 + s.n_perturbed))
    return n_ref_calls


def sample_configurations(
    reference_path,
    output,
    settings: SampleSettings | None = None,
    *,
    driver_path=None,
    threads: int | None = None,
    progress: bool = False,
    trust: bool = False,
) -> dict:
    """Sample and label configurations; write them to ``output`` (extxyz). Returns a summary.

    MD is Langevin NVT (ASE LangevinBAOAB without barostat) at each run's temperature from the
    ideal cubic structure with Maxwell-Boltzmann velocities at twice the target temperature
    (equipartition brings the kinetic temperature to the target within tens of fs). With
    ``driver_path`` (a student model) the MD is driven by that model and every sampled frame is
    labelled by the reference afterwards, so each reference call yields one training frame.
    ``trust``: unpickle model files whose sha256 is recorded nowhere (``student.trust_model_file``).
    """
    from ase.io import write

    from octastem.io import atomic_path

    s = settings or SampleSettings(runs=default_runs())
    if not s.runs:
        raise InputError("student: no sampling runs given")
    ref_model, ref_calc = _calculator(reference_path, threads, trust=trust)
    drive_calc = ref_calc if driver_path is None else _calculator(driver_path, threads, trust=trust)[1]
    rng = generator(s.seed, "student_sampling")
    frames: list[Atoms] = []
    n_ref_calls = 0
    t0 = time.perf_counter()
    for k, run in enumerate(s.runs):
        atoms = _start_cell(run, k, s, rng, ref_model)
        atoms.calc = drive_calc
        dyn = _dynamics(atoms, run, k, s, rng)
        n_ref_calls += _sample_run(
            dyn, atoms, run, s, rng, ref_calc, frames, relabel=driver_path is not None, t0=t0 if progress else None
        )
        # frames so far, for inspection while the remaining runs go on
        write(str(output) + ".partial", frames, format="extxyz")
    for i, a in enumerate(frames):
        a.info["frame"] = i
    with atomic_path(output) as tmp:
        write(tmp, frames, format="extxyz")
    Path(str(output) + ".partial").unlink(missing_ok=True)
    return {
        "output": str(output),
        "n_frames": len(frames),
        "n_atoms_total": int(sum(len(a) for a in frames)),
        "n_reference_calls": int(n_ref_calls),
        "wall_s": time.perf_counter() - t0,
        "driver": str(driver_path) if driver_path else "reference",
        "settings": asdict(s),
    }


def read_labelled(path) -> list[Atoms]:
    """Frames of a labelled extxyz file; raises InputError naming missing REF_ keys."""
    from ase.io import read

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: labelled configuration file not found")
    frames = read(path, index=":", format="extxyz")
    for i, a in enumerate(frames):
        if ENERGY_KEY not in a.info or FORCES_KEY not in a.arrays:
            raise InputError(f"{path}: frame {i} lacks '{ENERGY_KEY}' or '{FORCES_KEY}'")
    return frames


def split_frames(
    paths, train_output, valid_output, test_output, valid_fraction=None, test_fraction=None, seed=None
) -> dict:
    """Split labelled file(s) into train / validation / held-out test files (extxyz); returns the counts.

    Whole MD snapshots and their perturbed copies stay together (grouped by ``config_type`` and
    ``time_fs``), so no held-out frame has a near-duplicate in the training set. Each group's
    part follows from a hash of (seed, group) alone, so a data set that grows by more runs keeps
    every earlier frame in the part it had. Fractions and seed left out take the defaults of
    ``student.split`` in config/schema.yaml.
    """
    import zlib

    from ase.io import write

    from octastem.config import schema_defaults
    from octastem.io import atomic_path

    d = schema_defaults("student", "split")
    valid_fraction = d["valid_fraction"] if valid_fraction is None else valid_fraction
    test_fraction = d["test_fraction"] if test_fraction is None else test_fraction
    seed = d["split_seed"] if seed is None else seed
    if not (0 <= valid_fraction and 0 < test_fraction and valid_fraction + test_fraction < 1):
        raise InputError(f"student: bad split fractions valid={valid_fraction}, test={test_fraction}")
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    frames = [a for p in paths for a in read_labelled(p)]
    parts = {"train": [], "valid": [], "test": []}
    for i, a in enumerate(frames):
        key = f"{seed}:{a.info.get('config_type', '')}:{float(a.info.get('time_fs', i)):.3f}"
        u = zlib.crc32(key.encode()) / 2**32
        parts["test" if u < test_fraction else "valid" if u < test_fraction + valid_fraction else "train"].append(a)
    for name in ("valid", "test"):
        if not parts[name] and (name == "test" or valid_fraction > 0):
            raise InputError(f"{paths}: too few frames ({len(frames)}) for a non-empty {name} set")
    for name, out in (("train", train_output), ("valid", valid_output), ("test", test_output)):
        with atomic_path(out) as tmp:
            write(tmp, parts[name], format="extxyz")
    return {k: len(v) for k, v in parts.items()}
