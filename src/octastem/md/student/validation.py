"""Validation of the student against the reference: held-out errors, speed, MD comparison, NPT stability.

:func:`validate_student` gives energy/force/stress errors on held-out frames (:func:`errors`) and
the speed ratio on the same cell in the same process (:func:`time_force_calls`);
:func:`compare_md` runs the same short MD with both potentials and compares the Pb-Br-Pb angle and
Br displacement statistics; :func:`npt_stability` checks that the student's cell stays cubic in
picosecond NPT. Settings of the two MD checks left out take the defaults of ``student.md_compare``
and ``student.npt_check`` in config/schema.yaml (:class:`MDCompareSettings`, :class:`NPTCheckSettings`).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from ase import Atoms

from octastem.io import InputError

from .sampling import ENERGY_KEY, FORCES_KEY, STRESS_KEY, _bare, _calculator, read_labelled
from .training import _schema_field


def _rmse(a, b) -> float:
    return float(np.sqrt(np.mean((np.asarray(a) - np.asarray(b)) ** 2)))


def errors(calc, frames: list[Atoms]) -> dict:
    """RMSE of ``calc`` against the REF_ labels: energy per atom (meV), forces (meV/A), stress (meV/A^3)."""
    from ase.data import chemical_symbols

    de, f_pred, f_ref, s_pred, s_ref = [], [], [], [], []
    for a in frames:
        b = _bare(a)
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


def _torch_threads() -> int:
    import mace  # noqa: F401
    import torch

    return torch.get_num_threads()


def validate_student(
    student_path,
    reference_path,
    test_xyz,
    *,
    threads: int | None = None,
    speed_reps=(2, 2, 2),
    n_timing_calls: int = 5,
    trust: bool = False,
) -> dict:
    """Held-out errors of the student against the reference labels of ``test_xyz`` and the speed ratio.

    Speed: median time of one energy+forces+stress call on the ``speed_reps`` cubic cell, student
    and reference interleaved in this process with ``threads`` threads. ``trust``: unpickle model
    files whose sha256 is recorded nowhere (``student.trust_model_file``).
    """
    from octastem.structure import build_fapbbr3

    frames = read_labelled(test_xyz)
    _, stu = _calculator(student_path, threads, trust=trust)
    _, ref = _calculator(reference_path, threads, trust=trust)
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


# ----------------------------------------------------------------------------------------------
# MD with the student
# ----------------------------------------------------------------------------------------------


@dataclass
class MDCompareSettings:
    """Settings of :func:`compare_md` (``student.md_compare``); ``start_xyz``: a start frame instead
    of the ideal cubic ``reps`` cell."""

    start_xyz: str | None = None
    reps: tuple[int, int, int] = (2, 2, 2)
    temperature_K: float = 300.0
    total_fs: float = _schema_field("md_compare", "total_fs")
    timestep_fs: float = _schema_field("md_compare", "timestep_fs")
    frame_interval_fs: float = 5.0
    analysis_start_fs: float = _schema_field("md_compare", "analysis_start_fs")
    T_tau_fs: float = 100.0
    P_tau_fs: float = 1000.0
    seed: int = _schema_field("md_compare", "seed")


@dataclass
class NPTCheckSettings:
    """Settings of :func:`npt_stability` (``student.npt_check``)."""

    reps: tuple[int, int, int] = (2, 2, 2)
    temperature_K: float = 300.0
    pressure_MPa: float = 0.1
    total_fs: float = _schema_field("npt_check", "total_fs")
    timestep_fs: float = 0.5
    frame_interval_fs: float = _schema_field("npt_check", "frame_interval_fs")
    analysis_start_fs: float = _schema_field("npt_check", "analysis_start_fs")
    n_stress_frames: int = _schema_field("npt_check", "n_stress_frames")
    seed: int = _schema_field("npt_check", "seed")


def _pick(settings, names: str) -> dict:
    """The fields ``names`` (space separated) of a settings dataclass, as a dict in that order."""
    d = asdict(settings)
    return {k: d[k] for k in names.split()}


def _run_md(atoms: Atoms, calc, traj: Path, analysis_start_fs: float, **run) -> tuple[float, list[Atoms]]:
    """:func:`octastem.md.run_npt` into ``traj`` unless it exists (resumable); wall time (s) and the
    frames from ``analysis_start_fs`` on."""
    from octastem.md.run import read_frames, run_npt

    t0 = time.perf_counter()
    if not traj.exists():
        run_npt(atoms, calc, traj, progress=False, **run)
    wall = time.perf_counter() - t0
    return wall, read_frames(traj, start_fs=analysis_start_fs)


def _md_statistics(traj: Path, wall: float, frames: list[Atoms], reps, analysis_start_fs: float) -> dict:
    """Structure statistics of one :func:`compare_md` trajectory over ``t >= analysis_start_fs``."""
    import h5py

    from octastem.md.analysis import analyse_frames

    res = analyse_frames(frames, tuple(reps))
    with h5py.File(traj) as f:
        t = f["time_fs"][()]
        T = f["temperature_K"][()][t >= analysis_start_fs - 1e-6]
    return {
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


def compare_md(
    student_path,
    reference_path,
    out_dir,
    *,
    threads: int | None = None,
    potentials=("reference", "student"),
    trust: bool = False,
    **settings,
) -> dict:
    """Same NPT MD (octastem.md.run_npt, same start and seed) with both potentials; structure statistics.

    ``settings``: :class:`MDCompareSettings` fields. The start is ``start_xyz`` (e.g. a thermalised
    frame) or the ideal cubic ``reps`` cell. Trajectories go to ``out_dir/<potential>.h5``
    (resumable). Returns, per potential, the mean Pb-Br-Pb angle, Br perpendicular RMS
    displacement, mean temperature and lattice parameters over ``t >= analysis_start_fs``, and the
    student-minus-reference differences. ``trust``: as for :func:`validate_student`.
    """
    from ase.io import read

    from octastem.structure import build_fapbbr3

    s = MDCompareSettings(**settings)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atoms = _bare(read(s.start_xyz) if s.start_xyz else build_fapbbr3(tuple(s.reps)))
    paths = {"reference": reference_path, "student": student_path}
    result: dict = {
        "settings": _pick(s, "temperature_K total_fs timestep_fs frame_interval_fs analysis_start_fs seed")
        | dict(n_atoms=len(atoms), reps=list(s.reps))
    }
    run = _pick(s, "temperature_K timestep_fs total_fs frame_interval_fs T_tau_fs P_tau_fs seed")
    for name in potentials:
        _, calc = _calculator(paths[name], threads, trust=trust)
        traj = out_dir / f"{name}.h5"
        wall, frames = _run_md(atoms, calc, traj, s.analysis_start_fs, checkpoint_every=5, **run)
        result[name] = _md_statistics(traj, wall, frames, s.reps, s.analysis_start_fs)
    if "reference" in result and "student" in result:
        r, st = result["reference"], result["student"]
        result["difference"] = {
            "mean_angle_deg": st["mean_angle_deg"] - r["mean_angle_deg"],
            "br_perpendicular_rms_relative": st["br_perpendicular_rms_A"] / r["br_perpendicular_rms_A"] - 1.0,
        }
    return result


def _cell_statistics(frames: list[Atoms], reps) -> dict:
    """Pseudo-cubic lattice parameters of NPT frames: means, range, spread, angles and drift."""
    n = np.asarray(reps, float)
    lengths = np.array([a.cell.lengths() / n for a in frames])
    angles = np.array([a.cell.angles() for a in frames])
    mean = lengths.mean(0)
    half = len(frames) // 2
    return {
        "pseudo_cubic_A": {k: float(v) for k, v in zip("abc", mean, strict=True)},
        "pseudo_cubic_min_max_A": [float(lengths.min()), float(lengths.max())],
        "spread_relative": float((mean.max() - mean.min()) / mean.mean()),
        "max_angle_deviation_deg": float(np.abs(angles - 90.0).max()),
        "lattice_drift_relative": float(lengths[half:].mean() / lengths[:half].mean() - 1.0),
    }


def _stress_and_forces(picks: list[Atoms], ref, stu) -> dict:
    """Student-minus-reference virial stress (GPa) and force RMSE (meV/A) on the frames ``picks``."""
    from ase.units import GPa

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
        "stress_student_minus_reference_GPa": {
            "n_frames": len(picks),
            "mean_voigt": diffs.mean(0).tolist(),
            "rms": float(np.sqrt(np.mean(diffs**2))),
        },
        # the student's own 300 K NPT frames: the configurations production MD visits, never trained on
        "force_rmse_on_own_frames_meV_per_A": float(1e3 * np.sqrt(np.mean(np.concatenate(force_diffs) ** 2))),
    }


def npt_stability(
    student_path, reference_path, out_dir, *, threads: int | None = None, trust: bool = False, **settings
) -> dict:
    """Picosecond NPT of the pristine ``reps`` cell with the student: does its cell stay cubic?

    ``settings``: :class:`NPTCheckSettings` fields. Runs :func:`octastem.md.run_npt` (the production
    protocol) with the student from the ideal cubic start and reports, over
    ``t >= analysis_start_fs``: the mean pseudo-cubic a, b, c, their largest relative spread, the
    largest deviation of any cell angle from 90 deg and the drift of the mean lattice parameter
    between the two halves of the window. Cross-check of the driving force of the barostat: on
    ``n_stress_frames`` frames of that window the virial stress of the reference and of the student
    are compared (mean difference per Voigt component, GPa); a student whose cell wanders off shows
    a systematic difference there (the reference pulls back). The force RMSE on those frames
    measures the student on the configurations it visits itself. ``trust``: as for
    :func:`validate_student`.
    """
    from octastem.md.run import spread
    from octastem.structure import build_fapbbr3

    s = NPTCheckSettings(**settings)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    traj = out_dir / "student_npt.h5"
    _, stu = _calculator(student_path, threads, trust=trust)
    run = _pick(s, "temperature_K pressure_MPa timestep_fs total_fs frame_interval_fs seed")
    wall, frames = _run_md(build_fapbbr3(tuple(s.reps)), stu, traj, s.analysis_start_fs, **run)
    if len(frames) < 2:
        raise InputError(f"student npt check: fewer than 2 frames after analysis_start_fs={s.analysis_start_fs}")
    cell = _cell_statistics(frames, s.reps)
    _, ref = _calculator(reference_path, threads, trust=trust)
    return {
        "settings": {"reps": list(s.reps)}
        | _pick(s, "temperature_K pressure_MPa total_fs timestep_fs analysis_start_fs seed"),
        "trajectory": str(traj),
        "wall_s": wall,
        "n_frames": len(frames),
        **cell,
        **_stress_and_forces(spread(frames, s.n_stress_frames), ref, stu),
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
