"""A small, fast MACE "student" distilled from the study's reference potential.

Three steps, each a pipeline stage:

1. :func:`sample_configurations` -- configurations of small FAPbBr3 cells (pristine and with
   FABr vacancies) from short Langevin MD driven by the reference potential (or by an earlier
   student, whose frames are then re-labelled), plus strained and rattled copies; every frame is
   labelled with the reference energy, forces and stress and written as extxyz with the keys
   mace-torch reads (``REF_energy`` eV, ``REF_forces`` eV/A, ``REF_stress`` eV/A^3 Voigt).
2. :func:`train_student` -- mace-torch's own trainer (``python -m mace.cli.run_train``) on a
   small MACE (few channels, scalar hidden features, low correlation order, shorter cutoff),
   with the reference's isolated-atom energies as E0s so energies stay on the reference's scale.
3. :func:`validate_student` -- energy/force/stress errors on held-out frames and the speed
   ratio on the same cell in the same process; :func:`compare_md` runs the same short MD with
   both potentials and compares the Pb-Br-Pb angle and Br displacement statistics.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from ase import Atoms, units

from octastem.io import InputError

log = logging.getLogger("octastem")

ENERGY_KEY, FORCES_KEY, STRESS_KEY = "REF_energy", "REF_forces", "REF_stress"


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


NPT_T_TAU_FS, NPT_P_TAU_FS = 100.0, 1000.0  # the study's thermostat and barostat time constants


def default_runs() -> list[SampleRun]:
    """The data set of the committed student: 2x2x2 cells (96 / 85 atoms), pristine at 300 K and
    with one FABr vacancy at 400 K, 100 fs each, a snapshot every 4 fs (+ one perturbed copy)."""
    return [
        SampleRun((2, 2, 2), 0, 300.0, 100, 4, "2x2x2_300K"),
        SampleRun((2, 2, 2), 1, 400.0, 100, 4, "2x2x2_vac1_400K"),
    ]


def model_e0s(model_path) -> dict[int, float]:
    """Isolated-atom energies (eV) stored in a MACE model, by atomic number.

    The student is trained with the reference's E0s so both predict total energies on one scale
    and the student only learns the interaction part.
    """
    from octastem.md.mlp import load_mace_model

    model = load_mace_model(model_path, device="cpu")
    e0 = model.atomic_energies_fn.atomic_energies.detach().cpu().numpy().reshape(-1)
    return {int(z): float(e) for z, e in zip(model.atomic_numbers.tolist(), e0, strict=True)}


def _calculator(model_path, threads: int | None, device: str = "cpu", dtype: str = "float32"):
    from octastem.md.mlp import load_mace_model, mace_calculator

    model = load_mace_model(model_path, device=device, dtype=dtype)
    return model, mace_calculator(model, device=device, dtype=dtype, threads=threads)


def label(atoms: Atoms, calc) -> Atoms:
    """A copy of ``atoms`` carrying ``calc``'s energy, forces and stress under the REF_ keys."""
    a = atoms.copy()
    a.calc = calc
    e = a.get_potential_energy()
    f = a.get_forces()
    s = a.get_stress(voigt=True)
    out = Atoms(numbers=a.numbers, positions=a.positions, cell=a.cell, pbc=True)
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


def sample_configurations(
    reference_path,
    output,
    settings: SampleSettings | None = None,
    *,
    driver_path=None,
    threads: int | None = None,
    progress: bool = False,
) -> dict:
    """Sample and label configurations; write them to ``output`` (extxyz). Returns a summary.

    MD is Langevin NVT (ASE LangevinBAOAB without barostat) at each run's temperature from the
    ideal cubic structure with Maxwell-Boltzmann velocities at twice the target temperature
    (equipartition brings the kinetic temperature to the target within tens of fs). With
    ``driver_path`` (a student model) the MD is driven by that model and every sampled frame is
    labelled by the reference afterwards, so each reference call yields one training frame.
    """
    from ase.io import write
    from ase.md.langevinbaoab import LangevinBAOAB
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary

    from octastem.io import atomic_path
    from octastem.md.mlp import check_elements
    from octastem.structure import build_fapbbr3, remove_fabr_pairs

    s = settings or SampleSettings(runs=default_runs())
    if not s.runs:
        raise InputError("student: no sampling runs given")
    ref_model, ref_calc = _calculator(reference_path, threads)
    drive_calc = ref_calc if driver_path is None else _calculator(driver_path, threads)[1]
    rng = np.random.default_rng(s.seed)
    frames: list[Atoms] = []
    n_ref_calls = 0
    t0 = time.perf_counter()
    for k, run in enumerate(s.runs):
        atoms = build_fapbbr3(tuple(run.reps), s.a_A)
        if run.n_vacancies:
            atoms = remove_fabr_pairs(atoms, run.n_vacancies, seed=s.seed + k)
        check_elements(atoms, ref_model, name=f"student sampling run {k}")
        diag = 1.0 + rng.uniform(-s.strain, s.strain, size=3)
        atoms.set_cell(atoms.cell.array * diag[:, None], scale_atoms=True)
        atoms = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=True)
        atoms.calc = drive_calc
        npt = run.pressure_MPa is not None
        dt_fs = run.timestep_fs or s.timestep_fs
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
        dyn = LangevinBAOAB(
            atoms,
            dt_fs * units.fs,
            temperature_K=run.temperature_K,
            T_tau=(NPT_T_TAU_FS if npt else s.T_tau_fs) * units.fs,
            rng=np.random.default_rng(s.seed + 1000 + k),
            **barostat,
        )
        tag = run.tag or f"{'x'.join(map(str, run.reps))}_v{run.n_vacancies}_{run.temperature_K:.0f}K"
        n_run = 0
        for step in range(run.sample_every, run.steps + 1, run.sample_every):
            dyn.run(run.sample_every)
            if driver_path is None:
                n_ref_calls += run.sample_every
            snap = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=True)
            snap.info.update(config_type=tag, time_fs=step * dt_fs, kind="md")
            frames.append(label(snap, ref_calc))
            n_ref_calls += driver_path is not None
            for _ in range(s.n_perturbed):
                p = _strained(snap, rng, s.perturb_strain, s.rattle_A)
                p.info.update(config_type=tag, time_fs=step * dt_fs, kind="perturbed")
                frames.append(label(p, ref_calc))
                n_ref_calls += 1
            n_run += 1
            if progress:
                print(
                    f"[{time.perf_counter() - t0:7.0f} s] {tag} step {step}/{run.steps} "
                    f"T={atoms.get_temperature():.0f} K, cell {np.round(atoms.cell.lengths(), 2)} A, "
                    f"{len(frames)} frames",
                    file=sys.stderr,
                    flush=True,
                )
        log.info("student sampling %s: %d atoms, %d frames", tag, len(atoms), n_run * (1 + s.n_perturbed))
        # frames so far, for inspection while the remaining runs go on
        write(str(output) + ".partial", frames, format="extxyz")
    for i, a in enumerate(frames):
        a.info["frame"] = i
    with atomic_path(output) as tmp:
        write(tmp, frames, format="extxyz")
    Path(str(output) + ".partial").unlink(missing_ok=True)
    summary = {
        "output": str(output),
        "n_frames": len(frames),
        "n_atoms_total": int(sum(len(a) for a in frames)),
        "n_reference_calls": int(n_ref_calls),
        "wall_s": time.perf_counter() - t0,
        "driver": str(driver_path) if driver_path else "reference",
        "settings": asdict(s),
    }
    return summary


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


def split_frames(paths, train_output, valid_output, test_output, valid_fraction=0.1, test_fraction=0.15, seed=0):
    """Split labelled file(s) into train / validation / held-out test files (extxyz); returns the counts.

    Whole MD snapshots and their perturbed copies stay together (grouped by ``config_type`` and
    ``time_fs``), so no held-out frame has a near-duplicate in the training set. Each group's
    part follows from a hash of (seed, group) alone, so a data set that grows by more runs keeps
    every earlier frame in the part it had.
    """
    import zlib

    from ase.io import write

    from octastem.io import atomic_path

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


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------


@dataclass
class StudentSettings:
    """Architecture and training settings of the student (mace-torch run_train arguments)."""

    num_channels: int = 16
    max_L: int = 0
    max_ell: int = 2
    correlation: int = 2
    num_interactions: int = 2
    r_max: float = 5.0
    num_radial_basis: int = 6
    radial_MLP: str = "[32, 32]"
    batch_size: int = 4
    valid_batch_size: int = 8
    max_num_epochs: int = 60
    lr: float = 0.01
    energy_weight: float = 1.0
    forces_weight: float = 100.0
    stress_weight: float = 10.0
    ema_decay: float | None = 0.95  # None: no exponential moving average of the weights
    seed: int = 0
    default_dtype: str = "float32"
    extra_args: list[str] = field(default_factory=list)


def run_train_args(
    train_xyz, valid_xyz, work_dir, name: str, s: StudentSettings, e0s: dict[int, float], device: str = "cpu"
) -> list[str]:
    """Command-line arguments of ``mace.cli.run_train`` for the student (``e0s``: eV by atomic number)."""
    work_dir = Path(work_dir)
    e0s = "{" + ", ".join(f"{z}: {e!r}" for z, e in sorted(e0s.items())) + "}"
    args = [
        f"--name={name}",
        f"--seed={s.seed}",
        f"--work_dir={work_dir}",
        f"--model_dir={work_dir}",
        f"--log_dir={work_dir / 'logs'}",
        f"--checkpoints_dir={work_dir / 'checkpoints'}",
        f"--results_dir={work_dir / 'results'}",
        f"--train_file={train_xyz}",
        f"--valid_file={valid_xyz}",
        f"--energy_key={ENERGY_KEY}",
        f"--forces_key={FORCES_KEY}",
        f"--stress_key={STRESS_KEY}",
        f"--E0s={e0s}",
        "--model=MACE",
        "--interaction_first=RealAgnosticInteractionBlock",
        "--interaction=RealAgnosticResidualInteractionBlock",
        f"--num_channels={s.num_channels}",
        f"--max_L={s.max_L}",
        f"--max_ell={s.max_ell}",
        f"--correlation={s.correlation}",
        f"--num_interactions={s.num_interactions}",
        f"--r_max={s.r_max}",
        f"--num_radial_basis={s.num_radial_basis}",
        f"--radial_MLP={s.radial_MLP}",
        "--MLP_irreps=16x0e",
        "--scaling=rms_forces_scaling",
        "--loss=weighted" if s.stress_weight == 0 else "--loss=stress",
        f"--energy_weight={s.energy_weight}",
        f"--forces_weight={s.forces_weight}",
        f"--stress_weight={s.stress_weight}",
        "--compute_stress=True",
        f"--batch_size={s.batch_size}",
        f"--valid_batch_size={s.valid_batch_size}",
        f"--max_num_epochs={s.max_num_epochs}",
        f"--lr={s.lr}",
        "--amsgrad",
        *(["--ema", f"--ema_decay={s.ema_decay}"] if s.ema_decay else []),
        "--scheduler_patience=5",
        f"--patience={max(10, s.max_num_epochs)}",
        "--eval_interval=1",
        "--error_table=PerAtomRMSEstressvirials",
        f"--default_dtype={s.default_dtype}",
        f"--device={device}",
        "--save_cpu",
        "--restart_latest",
        "--num_workers=0",
    ]
    return args + list(s.extra_args)


def train_student(
    train_xyz,
    valid_xyz,
    out_dir,
    settings: StudentSettings | None = None,
    *,
    e0s: dict[int, float],
    name: str = "student",
    device: str = "cpu",
    threads: int | None = None,
    log_path=None,
) -> Path:
    """Train the student with mace-torch's trainer; return the path of ``out_dir/<name>.model``.

    ``e0s``: isolated-atom energies (eV by atomic number), normally :func:`model_e0s` of the
    reference.
    Runs ``python -m mace.cli.run_train`` in a subprocess (``threads`` OpenMP threads) with a
    working folder ``out_dir/work``; ``--restart_latest`` makes an interrupted training resume
    from its last checkpoint. The model file is the plain pickled MACE module (CPU tensors),
    loadable with :func:`octastem.mlp.load_mace_model`.
    """
    from octastem.io import atomic_path

    s = settings or StudentSettings()
    for p in (train_xyz, valid_xyz):
        read_labelled(p)  # fail early, naming the file, before the trainer starts
    out_dir = Path(out_dir)
    work = out_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "mace.cli.run_train",
        *run_train_args(train_xyz, valid_xyz, work, name, s, e0s, device),
    ]
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.setdefault("WANDB_MODE", "disabled")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # no spinning threads on a shared machine
    log.info("training student: %s", " ".join(cmd))
    out = open(log_path, "w") if log_path else None  # noqa: SIM115 (closed below)
    try:
        res = subprocess.run(cmd, env=env, stdout=out or subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    finally:
        if out:
            out.close()
    if res.returncode != 0:
        tail = (res.stdout or "")[-3000:] if not log_path else Path(log_path).read_text()[-3000:]
        raise RuntimeError(f"mace run_train failed (exit {res.returncode}):\n{tail}")
    model = work / f"{name}.model"
    if not model.exists():
        raise RuntimeError(f"mace run_train finished but wrote no {model}")
    final = out_dir / f"{name}.model"
    with atomic_path(final) as tmp:
        shutil.copyfile(model, tmp)
    (out_dir / f"{name}_settings.json").write_text(json.dumps({**asdict(s), "command": cmd[1:]}, indent=1))
    return final


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------


def _rmse(a, b) -> float:
    return float(np.sqrt(np.mean((np.asarray(a) - np.asarray(b)) ** 2)))


def errors(calc, frames: list[Atoms]) -> dict:
    """RMSE of ``calc`` against the REF_ labels: energy per atom (meV), forces (meV/A), stress (meV/A^3)."""
    de, f_pred, f_ref, s_pred, s_ref = [], [], [], [], []
    for a in frames:
        b = Atoms(numbers=a.numbers, positions=a.positions, cell=a.cell, pbc=True)
        b.calc = calc
        de.append((b.get_potential_energy() - a.info[ENERGY_KEY]) / len(a))
        f = b.get_forces()
        f_pred.append(f)
        f_ref.append(a.arrays[FORCES_KEY])
        if STRESS_KEY in a.info:
            s_pred.append(b.get_stress(voigt=True))
            s_ref.append(np.asarray(a.info[STRESS_KEY]))
    f_pred, f_ref = np.concatenate(f_pred), np.concatenate(f_ref)
    out = {
        "n_frames": len(frames),
        "n_atoms": int(len(f_ref)),
        "energy_rmse_meV_per_atom": 1e3 * float(np.sqrt(np.mean(np.square(de)))),
        "energy_mean_error_meV_per_atom": 1e3 * float(np.mean(de)),
        "force_rmse_meV_per_A": 1e3 * _rmse(f_pred, f_ref),
        "force_mae_meV_per_A": 1e3 * float(np.mean(np.abs(f_pred - f_ref))),
        "force_rms_reference_meV_per_A": 1e3 * float(np.sqrt(np.mean(f_ref**2))),
    }
    if s_ref:
        out["stress_rmse_meV_per_A3"] = 1e3 * _rmse(s_pred, s_ref)
    from ase.data import chemical_symbols

    z_all = np.concatenate([a.numbers for a in frames])
    out["force_rmse_by_element_meV_per_A"] = {
        chemical_symbols[z]: 1e3 * _rmse(f_pred[z_all == z], f_ref[z_all == z]) for z in np.unique(z_all)
    }
    return out


def time_force_calls(calcs: dict, atoms: Atoms, n_calls: int = 5, warmup: int = 1) -> dict:
    """Median wall time (s) of one energy+forces+stress call per calculator, calls interleaved.

    Interleaving (A, B, A, B, ...) exposes both calculators to the same background load, so the
    ratio is meaningful on a shared machine even when the absolute times are not.
    """
    rng = np.random.default_rng(0)
    work = {k: atoms.copy() for k in calcs}
    for k, c in calcs.items():
        work[k].calc = c
        for _ in range(warmup):
            work[k].positions += rng.normal(0, 1e-3, size=atoms.positions.shape)
            work[k].get_forces()
    times = {k: [] for k in calcs}
    for _ in range(n_calls):
        shift = rng.normal(0, 1e-3, size=atoms.positions.shape)
        for k in calcs:
            work[k].positions = atoms.positions + shift
            t = time.perf_counter()
            work[k].get_forces()
            work[k].get_stress()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()} | {f"{k}_all": v for k, v in times.items()}


def validate_student(
    student_path,
    reference_path,
    test_xyz,
    *,
    threads: int | None = None,
    speed_reps=(2, 2, 2),
    n_timing_calls: int = 5,
) -> dict:
    """Held-out errors of the student against the reference labels of ``test_xyz`` and the speed ratio.

    Speed: median time of one energy+forces+stress call on the ``speed_reps`` cubic cell, student
    and reference interleaved in this process with ``threads`` threads.
    """
    from octastem.structure import build_fapbbr3

    frames = read_labelled(test_xyz)
    _, stu = _calculator(student_path, threads)
    _, ref = _calculator(reference_path, threads)
    result = {"test_file": str(test_xyz), "student": str(student_path), "errors": errors(stu, frames)}
    atoms = build_fapbbr3(tuple(speed_reps))
    atoms.rattle(0.05, seed=1)
    t = time_force_calls({"reference": ref, "student": stu}, atoms, n_calls=n_timing_calls)
    result["speed"] = {
        "cell": list(speed_reps),
        "n_atoms": len(atoms),
        "threads": threads or _torch_threads(),
        "reference_s_per_call": t["reference"],
        "student_s_per_call": t["student"],
        "speedup": t["reference"] / t["student"],
        "reference_s_all": t["reference_all"],
        "student_s_all": t["student_all"],
    }
    return result


def _torch_threads() -> int:
    import mace  # noqa: F401
    import torch

    return torch.get_num_threads()


def compare_md(
    student_path,
    reference_path,
    out_dir,
    *,
    start_xyz=None,
    reps=(2, 2, 2),
    temperature_K: float = 300.0,
    total_fs: float = 200.0,
    timestep_fs: float = 0.5,
    frame_interval_fs: float = 5.0,
    analysis_start_fs: float = 50.0,
    T_tau_fs: float = 100.0,
    P_tau_fs: float = 1000.0,
    seed: int = 0,
    threads: int | None = None,
    potentials=("reference", "student"),
) -> dict:
    """Same NPT MD (octastem.md.run_npt, same start and seed) with both potentials; structure statistics.

    The start is ``start_xyz`` (e.g. a thermalised frame) or the ideal cubic ``reps`` cell.
    Trajectories go to ``out_dir/<potential>.h5`` (resumable). Returns, per potential, the mean
    Pb-Br-Pb angle, Br perpendicular RMS displacement, mean temperature and lattice parameters over
    ``t >= analysis_start_fs``, and the student-minus-reference differences.
    """
    from ase.io import read

    from octastem.md.analysis import analyse_frames
    from octastem.md.run import read_frames, run_npt
    from octastem.structure import build_fapbbr3

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atoms = read(start_xyz) if start_xyz else build_fapbbr3(tuple(reps))
    atoms = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=True)
    paths = {"reference": reference_path, "student": student_path}
    result: dict = {
        "settings": dict(
            temperature_K=temperature_K,
            total_fs=total_fs,
            timestep_fs=timestep_fs,
            frame_interval_fs=frame_interval_fs,
            analysis_start_fs=analysis_start_fs,
            seed=seed,
            n_atoms=len(atoms),
            reps=list(reps),
        )
    }
    for name in potentials:
        _, calc = _calculator(paths[name], threads)
        traj = out_dir / f"{name}.h5"
        t0 = time.perf_counter()
        if not traj.exists():
            run_npt(
                atoms,
                calc,
                traj,
                temperature_K=temperature_K,
                timestep_fs=timestep_fs,
                total_fs=total_fs,
                frame_interval_fs=frame_interval_fs,
                T_tau_fs=T_tau_fs,
                P_tau_fs=P_tau_fs,
                seed=seed,
                checkpoint_every=5,
                progress=False,
            )
        wall = time.perf_counter() - t0
        frames = read_frames(traj, start_fs=analysis_start_fs)
        res = analyse_frames(frames, tuple(reps))
        import h5py

        with h5py.File(traj) as f:
            t = f["time_fs"][()]
            T = f["temperature_K"][()][t >= analysis_start_fs - 1e-6]
        result[name] = {
            "trajectory": str(traj),
            "wall_s": wall,
            "n_frames": len(frames),
            "mean_angle_deg": res["pb_br_pb_angle_deg"]["mean"],
            "angle_std_deg": res["pb_br_pb_angle_deg"]["std"],
            "br_perpendicular_rms_A": res["br_displacement_A"]["perpendicular_rms"],
            "br_parallel_rms_A": res["br_displacement_A"]["parallel_rms"],
            "temperature_K": float(T.mean()),
            "lattice_A": {k: res["lattice_A"][k]["mean"] for k in "abc"},
        }
    if "reference" in result and "student" in result:
        r, s = result["reference"], result["student"]
        result["difference"] = {
            "mean_angle_deg": s["mean_angle_deg"] - r["mean_angle_deg"],
            "br_perpendicular_rms_relative": s["br_perpendicular_rms_A"] / r["br_perpendicular_rms_A"] - 1.0,
        }
    return result


def npt_stability(
    student_path,
    reference_path,
    out_dir,
    *,
    reps=(2, 2, 2),
    temperature_K: float = 300.0,
    pressure_MPa: float = 0.1,
    total_fs: float = 3000.0,
    timestep_fs: float = 0.5,
    frame_interval_fs: float = 50.0,
    analysis_start_fs: float = 1000.0,
    n_stress_frames: int = 8,
    seed: int = 1,
    threads: int | None = None,
) -> dict:
    """Picosecond NPT of the pristine ``reps`` cell with the student: does its cell stay cubic?

    Runs :func:`octastem.md.run_npt` (the production protocol) with the student from the ideal
    cubic start and reports, over ``t >= analysis_start_fs``: the mean pseudo-cubic a, b, c, their
    largest relative spread, the largest deviation of any cell angle from 90 deg and the drift of
    the mean lattice parameter between the two halves of the window. Cross-check of the driving
    force of the barostat: on ``n_stress_frames`` frames of that window the virial stress of the
    reference and of the student are compared (mean difference per Voigt component, GPa); a
    student whose cell wanders off shows a systematic difference there (the reference pulls back).
    The force RMSE on those frames measures the student on the configurations it visits itself.
    """
    from ase.units import GPa

    from octastem.md.run import read_frames, run_npt, spread
    from octastem.structure import build_fapbbr3

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    traj = out_dir / "student_npt.h5"
    _, stu = _calculator(student_path, threads)
    t0 = time.perf_counter()
    if not traj.exists():
        run_npt(
            build_fapbbr3(tuple(reps)),
            stu,
            traj,
            temperature_K=temperature_K,
            pressure_MPa=pressure_MPa,
            timestep_fs=timestep_fs,
            total_fs=total_fs,
            frame_interval_fs=frame_interval_fs,
            seed=seed,
            progress=False,
        )
    wall = time.perf_counter() - t0
    frames = read_frames(traj, start_fs=analysis_start_fs)
    if len(frames) < 2:
        raise InputError(f"student npt check: fewer than 2 frames after analysis_start_fs={analysis_start_fs}")
    n = np.asarray(reps, float)
    lengths = np.array([a.cell.lengths() / n for a in frames])
    angles = np.array([a.cell.angles() for a in frames])
    mean = lengths.mean(0)
    half = len(frames) // 2
    _, ref = _calculator(reference_path, threads)
    picks = spread(frames, n_stress_frames)
    diffs, force_diffs = [], []
    for frame in picks:
        out, forces = [], []
        for calc in (ref, stu):
            b = frame.copy()
            b.calc = calc
            out.append(b.get_stress(voigt=True) / GPa)
            forces.append(b.get_forces())
        diffs.append(out[1] - out[0])
        force_diffs.append(forces[1] - forces[0])
    diffs = np.array(diffs)
    return {
        "settings": dict(
            reps=list(reps),
            temperature_K=temperature_K,
            pressure_MPa=pressure_MPa,
            total_fs=total_fs,
            timestep_fs=timestep_fs,
            analysis_start_fs=analysis_start_fs,
            seed=seed,
        ),
        "trajectory": str(traj),
        "wall_s": wall,
        "n_frames": len(frames),
        "pseudo_cubic_A": {k: float(v) for k, v in zip("abc", mean, strict=True)},
        "pseudo_cubic_min_max_A": [float(lengths.min()), float(lengths.max())],
        "spread_relative": float((mean.max() - mean.min()) / mean.mean()),
        "max_angle_deviation_deg": float(np.abs(angles - 90.0).max()),
        "lattice_drift_relative": float(lengths[half:].mean() / lengths[:half].mean() - 1.0),
        "stress_student_minus_reference_GPa": {
            "n_frames": len(picks),
            "mean_voigt": diffs.mean(0).tolist(),
            "rms": float(np.sqrt(np.mean(diffs**2))),
        },
        # the student's own 300 K NPT frames: the configurations production MD visits, never trained on
        "force_rmse_on_own_frames_meV_per_A": float(1e3 * np.sqrt(np.mean(np.concatenate(force_diffs) ** 2))),
    }


def machine() -> dict:
    """Platform, CPU model, visible cores, torch version and load average, for metrics files."""
    import mace  # noqa: F401
    import torch

    from octastem.io import machine_info

    return machine_info(
        torch=torch.__version__,
        torch_threads=torch.get_num_threads(),
        cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    )


# ----------------------------------------------------------------------------------------------
# pipeline stages (file in, file out)
# ----------------------------------------------------------------------------------------------


def _reference(potential: str):
    from octastem.registry import fetch, load_registry

    return fetch(potential) if potential in load_registry() else Path(potential)


def data_stage(
    output,
    summary,
    *,
    reference: str = "reference_mace",
    runs: list[dict] | None = None,
    driver: str | None = None,
    threads: int | None = None,
    **sampling,
) -> None:
    """Sample + label configurations into ``output`` (extxyz) and write a summary JSON.

    ``runs``: list of :class:`SampleRun` fields (``reps``, ``n_vacancies``, ``temperature_K``,
    ``steps``, ``sample_every``, ``tag``); other :class:`SampleSettings` fields as keywords;
    ``driver``: a student model that drives the MD (frames then labelled by the reference).
    """
    from octastem import io

    settings = SampleSettings(
        runs=[SampleRun(**{**r, "reps": tuple(r["reps"])}) for r in runs] if runs else default_runs(), **sampling
    )
    summ = sample_configurations(_reference(reference), output, settings, driver_path=driver, threads=threads)
    summ["machine"] = machine()
    io.write_json(summary, summ)


def latest_checkpoint(checkpoints_dir) -> tuple[Path, int] | None:
    """The mace-torch checkpoint with the highest epoch in ``checkpoints_dir`` and its epoch, or None."""
    import re

    found = []
    for p in Path(checkpoints_dir).glob("*_epoch-*.pt"):
        m = re.search(r"_epoch-(\d+)\.pt$", p.name)
        if m:
            found.append((int(m.group(1)), p))
    if not found:
        return None
    epoch, path = max(found)
    return path, epoch


def seed_checkpoint(previous_model, checkpoints_dir, name: str, seed: int) -> int:
    """Let a training run named ``name`` resume from the last checkpoint of the run that made ``previous_model``.

    mace-torch's ``--restart_latest`` loads the newest ``<name>_run-<seed>_epoch-N.pt`` of its
    checkpoint folder; the previous round's newest checkpoint (in ``<model stem>_training/work/
    checkpoints`` next to ``previous_model``) is copied there under this run's name unless this run
    already has checkpoints of its own (then it is resuming after an interruption). Returns the
    epoch training starts from.
    """
    checkpoints_dir = Path(checkpoints_dir)
    own = latest_checkpoint(checkpoints_dir)
    previous_model = Path(previous_model)
    prev_dir = previous_model.parent / (previous_model.stem + "_training") / "work" / "checkpoints"
    prev = latest_checkpoint(prev_dir)
    if prev is None:
        raise InputError(
            f"student warm start: no mace checkpoint in {prev_dir} (the training folder of {previous_model})"
        )
    if own is not None:
        return prev[1]
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(prev[0], checkpoints_dir / f"{name}_run-{seed}_epoch-{prev[1]}.pt")
    return prev[1]


def train_stage(
    data,
    output,
    split_dir,
    *,
    reference: str = "reference_mace",
    threads: int | None = None,
    log_path=None,
    valid_fraction: float = 0.1,
    test_fraction: float = 0.15,
    split_seed: int = 0,
    warm_start=None,
    epochs: int | None = None,
    **settings,
) -> None:
    """Split the labelled ``data`` file(s) into ``split_dir/{train,valid,test}.xyz``, train, write ``output``.

    The student uses the reference's E0s; ``settings`` are :class:`StudentSettings` fields. The
    mace-torch working folder is ``<output stem>_training`` next to ``output`` (checkpoints there
    let an interrupted training resume). ``warm_start``: the model file of the previous round;
    training then continues from that round's last checkpoint (weights, optimiser and schedule)
    for ``epochs`` more epochs on the grown data set, as the committed student was made.
    """
    from octastem.io import atomic_path

    split_dir = Path(split_dir)
    split_dir.mkdir(parents=True, exist_ok=True)
    train, valid, test = (split_dir / f"{k}.xyz" for k in ("train", "valid", "test"))
    split_frames(data, train, valid, test, valid_fraction, test_fraction, seed=split_seed)
    s = StudentSettings(**settings)
    output = Path(output)
    work = output.parent / (output.stem + "_training")
    if warm_start is not None:
        start = seed_checkpoint(warm_start, work / "work" / "checkpoints", output.stem, s.seed)
        s.max_num_epochs = start + (epochs if epochs is not None else s.max_num_epochs)
    elif epochs is not None:
        s.max_num_epochs = epochs
    model = train_student(
        train,
        valid,
        work,
        s,
        e0s=model_e0s(_reference(reference)),
        name=output.stem,
        threads=threads,
        log_path=log_path,
    )
    with atomic_path(output) as tmp:
        shutil.copyfile(model, tmp)


def validate_stage(
    student,
    test,
    output,
    *,
    reference: str = "reference_mace",
    threads: int | None = None,
    md_dir=None,
    md: dict | None = None,
    npt: dict | None = None,
    n_timing_calls: int = 5,
) -> None:
    """Held-out errors, speed ratio, (with ``md``: compare_md keywords) the MD comparison and (with
    ``npt``: npt_stability keywords) the picosecond NPT stability check, as JSON."""
    from octastem import io

    ref = _reference(reference)
    result = validate_student(student, ref, test, threads=threads, n_timing_calls=n_timing_calls)
    if md is not None:
        md_dir = Path(md_dir or Path(output).with_suffix(""))
        result["md"] = compare_md(student, ref, md_dir, threads=threads, **md)
    if npt is not None:
        npt_dir = Path(md_dir or Path(output).with_suffix("")) / "npt_stability"
        result["npt_stability"] = npt_stability(student, ref, npt_dir, threads=threads, **npt)
    result["machine"] = machine()
    io.write_json(output, result)


def main(argv: list[str] | None = None) -> int:
    """``python -m octastem.student data|train|validate ...``: the three stages from the shell."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m octastem.student", description=main.__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data", help="sample + label configurations")
    d.add_argument("--output", default="results/student/data.xyz")
    d.add_argument("--reference", default="reference_mace")
    d.add_argument("--driver", default=None, help="student model that drives the MD (frames re-labelled)")
    d.add_argument("--runs", default=None, help="JSON file: list of SampleRun fields (default: default_runs())")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--n-perturbed", type=int, default=1)
    d.add_argument("--threads", type=int, default=None)
    t = sub.add_parser("train", help="split the data and train the student with mace-torch")
    t.add_argument("data", nargs="+", help="labelled extxyz file(s)")
    t.add_argument("--output", default="results/student/fapbbr3_student.model")
    t.add_argument("--split-dir", default="results/student")
    t.add_argument("--reference", default="reference_mace")
    t.add_argument("--settings", default=None, help="JSON file of StudentSettings fields")
    t.add_argument("--threads", type=int, default=None)
    v = sub.add_parser("validate", help="held-out errors, speed ratio, MD comparison")
    v.add_argument("--student", default="results/student/fapbbr3_student.model")
    v.add_argument("--test", default="results/student/test.xyz")
    v.add_argument("--output", default="results/student/validation.json")
    v.add_argument("--reference", default="reference_mace")
    v.add_argument("--md-fs", type=float, default=150.0, help="length of the MD comparison (0: skip)")
    v.add_argument("--npt-fs", type=float, default=3000.0, help="length of the NPT stability check (0: skip)")
    v.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    if a.cmd == "data":
        runs = json.loads(Path(a.runs).read_text()) if a.runs else None
        data_stage(
            a.output,
            Path(a.output).with_suffix(".json"),
            reference=a.reference,
            runs=runs,
            driver=a.driver,
            seed=a.seed,
            n_perturbed=a.n_perturbed,
            threads=a.threads,
        )
    elif a.cmd == "train":
        settings = json.loads(Path(a.settings).read_text()) if a.settings else {}
        train_stage(
            a.data,
            a.output,
            a.split_dir,
            reference=a.reference,
            threads=a.threads,
            log_path=Path(a.output).with_suffix(".log"),
            **settings,
        )
    else:
        md = dict(total_fs=a.md_fs) if a.md_fs > 0 else None
        npt = dict(total_fs=a.npt_fs, analysis_start_fs=a.npt_fs / 3) if a.npt_fs > 0 else None
        validate_stage(a.student, a.test, a.output, reference=a.reference, threads=a.threads, md=md, npt=npt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
