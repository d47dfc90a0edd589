"""NPT molecular dynamics with an ASE calculator, written as a resumable HDF5 trajectory.

Integrator: ASE's :class:`~ase.md.langevinbaoab.LangevinBAOAB` -- Langevin thermostat on the
particles and Langevin-Hoover barostat on the fully flexible cell (anisotropic), the protocol of
the study (300 K, 0.1 MPa, thermostat ~100 fs, barostat ~1 ps, 0.5 fs step).

Trajectory file (HDF5, one frame per ``frame_interval_fs``): ``numbers`` (N,), ``time_fs`` (F,),
``positions`` (F, N, 3) A, ``cell`` (F, 3, 3) A, ``energy_eV`` (F,), ``temperature_K`` (F,),
``stress_eV_per_A3`` (F, 6); run settings as attributes. While running, frames go to
``<output>.partial`` together with a ``checkpoint`` group (full-precision positions, momenta,
cell, barostat momentum and force, forces, random-generator state) written every
``checkpoint_every`` frames. Re-running after a crash resumes from the last checkpoint and, on the
CPU with the same thread count, produces bit-identical frames to an uninterrupted run (on a GPU,
CUDA's atomic scatter-adds already make two uninterrupted runs differ in the last bits); the
finished file is renamed into place only at the end.

A single-model MACE calculator (:func:`octastem.md.mace_calculator`) runs the dynamics through
:class:`octastem.md.neighbours.MACEVerletCalculator`: the same model on the same inputs, but the
neighbour list is kept across steps with a skin and the model's input is built directly, instead
of a full neighbour search and graph construction every step. Its edges are those within the
cutoff of the current positions and cell, in a fixed order, however long ago the list was built,
so they are the same in a resumed run; the forces agree with the plain calculator's to float
round-off (the edges are summed in another order).

These make the resumed frames identical rather than merely close, whatever ran earlier in the process:

- The integrator's forces are carried over, not recomputed. ``LangevinBAOAB`` evaluates the cell
  force at the end of a step from the momenta *before* the last half kick, while its constructor
  evaluates it from the momenta after it, so a freshly constructed integrator would start from a
  different cell force than the uninterrupted run had at the same step.
- TorchScript's optimising executor is off. It executes the first calls of a scripted module
  (e3nn's inside MACE) with a profiling graph and later ones with an optimised graph whose float32
  results differ in the last bits, and once a function has its optimised graph, switching the
  optimisation off no longer brings the unoptimised one back; so it is switched off when a model
  is loaded (:func:`octastem.md.load_mace_model`), before any evaluation, and again while the
  dynamics runs. Unoptimised execution costs nothing measurable on the CPU.
- The calculator's cached results are dropped at the start. ASE calculators keep the results of
  their last call, so a structure evaluated just before (under other torch settings, e.g. outside
  the settings below) would hand the run its first forces from that call instead of a fresh one.
- torch's deterministic algorithms are switched on and the thread count is set to the one the
  calculator was made for (``torch_threads`` of :func:`octastem.md.mace_calculator`) while the
  dynamics runs, both restored afterwards. With more than one thread MACE's scatter-adds otherwise
  sum in an order that varies between calls, so forces, and with them a resumed run, would differ
  in the last bits; and the thread count would be whatever code run earlier in the process left.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path

import h5py
import numpy as np
from ase import Atoms, units
from ase.data import atomic_masses
from ase.md.langevinbaoab import LangevinBAOAB
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary

from octastem.io import InputError, provenance
from octastem.md.neighbours import verlet_calculator
from octastem.rng import generator

log = logging.getLogger(__name__)

#: Mass of H (u) recorded for a run that keeps the natural masses.
_NATURAL_H_MASS_U = float(atomic_masses[1])

#: Settings that must match for a partial trajectory to be resumed.
_RESUME_KEYS = (
    "temperature_K",
    "pressure_MPa",
    "timestep_fs",
    "frame_interval_fs",
    "T_tau_fs",
    "P_tau_fs",
    "seed",
    "hydrogen_mass_u",
)


def repartition_hydrogen_mass(atoms: Atoms, hydrogen_mass_u: float | None) -> Atoms:
    """A copy of ``atoms`` with every H at ``hydrogen_mass_u`` (u), the added mass taken from the
    heavy atom it is bonded to (nearest non-H atom, minimum image), so each molecule and the cell
    keep their total mass (hydrogen mass repartitioning). None leaves the masses as they are.

    Equilibrium averages (positions, angles, the time-averaged potential) do not depend on the
    masses; heavier H slows the fastest vibrations (C-H, N-H) so that a 2 fs step stays stable."""
    out = atoms.copy()
    if hydrogen_mass_u is None:
        return out
    masses = out.get_masses()
    h = np.flatnonzero(out.numbers == 1)
    heavy = np.flatnonzero(out.numbers != 1)
    if h.size == 0:
        return out
    delta = float(hydrogen_mass_u) - masses[h]
    if heavy.size == 0:
        raise InputError("md: hydrogen_mass_u needs heavy atoms to take the mass from; the structure has only H")
    for k, i in enumerate(h):
        dist = out.get_distances(i, heavy, mic=True)
        j = heavy[int(np.argmin(dist))]
        masses[j] -= delta[k]
        masses[i] = float(hydrogen_mass_u)
    if (masses <= 0).any():
        raise InputError(f"md: hydrogen_mass_u = {hydrogen_mass_u} u leaves an atom with no mass left")
    out.set_masses(masses)
    return out


def partial_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".partial")


def _create(path: Path, atoms: Atoms, settings: dict) -> None:
    n = len(atoms)
    with h5py.File(path, "w") as f:
        f.create_dataset("numbers", data=atoms.numbers)
        f.create_dataset("time_fs", shape=(0,), maxshape=(None,), dtype="f8", chunks=(256,))
        f.create_dataset("positions", shape=(0, n, 3), maxshape=(None, n, 3), dtype="f4", chunks=(8, n, 3))
        f.create_dataset("cell", shape=(0, 3, 3), maxshape=(None, 3, 3), dtype="f8", chunks=(256, 3, 3))
        for name in ("energy_eV", "temperature_K"):
            f.create_dataset(name, shape=(0,), maxshape=(None,), dtype="f8", chunks=(256,))
        f.create_dataset("stress_eV_per_A3", shape=(0, 6), maxshape=(None, 6), dtype="f8", chunks=(256, 6))
        for k, v in settings.items():
            f.attrs[k] = v
        f.attrs["provenance"] = provenance(**settings)


def _append(f: h5py.File, atoms: Atoms, time_fs: float) -> None:
    k = f["time_fs"].shape[0]
    for name in ("time_fs", "positions", "cell", "energy_eV", "temperature_K", "stress_eV_per_A3"):
        f[name].resize(k + 1, axis=0)
    f["time_fs"][k] = time_fs
    f["positions"][k] = atoms.positions
    f["cell"][k] = atoms.cell.array
    f["energy_eV"][k] = atoms.get_potential_energy()
    f["temperature_K"][k] = atoms.get_temperature()
    f["stress_eV_per_A3"][k] = atoms.get_stress(include_ideal_gas=True)


def _truncate(f: h5py.File, n_frames: int) -> None:
    for name in ("time_fs", "positions", "cell", "energy_eV", "temperature_K", "stress_eV_per_A3"):
        f[name].resize(n_frames, axis=0)


@contextlib.contextmanager
def _reproducible_forces(calc):
    """Every force evaluation runs the same code path, however many came before and whatever the
    process set meanwhile (see module doc); torch's previous settings are restored on exit."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    threads = getattr(calc, "torch_threads", None)
    previous = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    # warn_only: an operation without a deterministic implementation (some CUDA kernels) warns
    # instead of raising; on the CPU MACE's scatter-adds then sum in a fixed order
    torch.use_deterministic_algorithms(True, warn_only=True)
    if threads:
        torch.set_num_threads(int(threads))
    try:
        with torch.jit.optimized_execution(False):
            yield
    finally:
        torch.set_num_threads(previous[0])
        torch.use_deterministic_algorithms(previous[1], warn_only=previous[2])


def _write_checkpoint(f: h5py.File, atoms: Atoms, dyn: LangevinBAOAB, n_frames: int) -> None:
    if "checkpoint" in f:
        del f["checkpoint"]
    g = f.create_group("checkpoint")
    g.create_dataset("positions", data=atoms.positions)
    g.create_dataset("momenta", data=atoms.get_momenta())
    g.create_dataset("cell", data=atoms.cell.array)
    g.create_dataset("p_eps", data=np.asarray(getattr(dyn, "p_eps", 0.0), dtype=float))
    # the integrator's cached forces: recomputing them on resume would not give the same numbers
    g.create_dataset("accel", data=dyn.accel)
    g.create_dataset("force_eps", data=np.asarray(getattr(dyn, "force_eps", 0.0), dtype=float))
    g.attrs["rng_state"] = json.dumps(dyn.rng.bit_generator.state)
    g.attrs["nsteps"] = int(dyn.nsteps)
    g.attrs["n_frames"] = int(n_frames)
    f.flush()


def _resume_or_start(part: Path, atoms: Atoms, settings: dict, *, temperature_K: float, seed: int) -> dict | None:
    """The checkpoint state in ``part`` to resume from, or None after starting afresh: velocities
    drawn at ``temperature_K`` and a new partial file."""
    resumed = None
    if part.exists():
        resumed = _read_checkpoint(part, atoms, settings)
    if resumed is None:
        rng = generator(seed, "md_velocities")
        MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)
        Stationary(atoms)
        _create(part, atoms, settings)
    return resumed


def _restore(dyn: LangevinBAOAB, resumed: dict) -> int:
    """Put the integrator into the state of a checkpoint (:func:`_read_checkpoint`); its frame count."""
    dyn.p_eps = resumed["p_eps"] if resumed["p_eps"].ndim else float(resumed["p_eps"])
    dyn.accel = resumed["accel"]
    dyn.force_eps = resumed["force_eps"]
    dyn.rng.bit_generator.state = resumed["rng_state"]
    dyn.nsteps = resumed["nsteps"]
    return resumed["n_frames"]


def _write_frames(
    part: Path,
    atoms: Atoms,
    dyn: LangevinBAOAB,
    n_done: int,
    n_frames_total: int,
    *,
    steps_per_frame: int,
    frame_interval_fs: float,
    checkpoint_every: int,
    max_frames: int | None,
    bar,
) -> int:
    """Run ``dyn`` frame by frame into ``part`` from frame ``n_done`` on; the number of frames done.

    Frame 0 is the start itself; a checkpoint follows every ``checkpoint_every`` frames and the last
    one. ``max_frames``: stop after that many new frames; ``bar``: a tqdm progress bar or None.
    """
    new = 0
    with h5py.File(part, "a") as f:
        _truncate(f, n_done)
        if n_done == 0:
            _append(f, atoms, 0.0)
            n_done = 1
            _write_checkpoint(f, atoms, dyn, n_done)
            if bar:
                bar.update(1)
        while n_done < n_frames_total:
            if max_frames is not None and new >= max_frames:
                break
            dyn.run(steps_per_frame)
            _append(f, atoms, n_done * frame_interval_fs)
            n_done += 1
            new += 1
            if n_done % checkpoint_every == 0 or n_done == n_frames_total:
                _write_checkpoint(f, atoms, dyn, n_done)
            if bar:
                bar.update(1)
                bar.set_postfix(T=f"{atoms.get_temperature():.0f}K")
    return n_done


def run_npt(
    atoms: Atoms,
    calc,
    output: str | os.PathLike,
    *,
    temperature_K: float = 300.0,
    pressure_MPa: float = 0.1,
    timestep_fs: float = 0.5,
    total_fs: float = 1000.0,
    frame_interval_fs: float = 50.0,
    T_tau_fs: float = 100.0,
    P_tau_fs: float = 1000.0,
    seed: int = 0,
    checkpoint_every: int = 10,
    progress: bool = True,
    max_frames: int | None = None,
    hydrogen_mass_u: float | None = None,
) -> Path:
    """Run NPT MD of ``atoms`` with ``calc``; write the trajectory to ``output`` (HDF5).

    ``hydrogen_mass_u``: H at that mass, taken from its bonded heavy atom
    (:func:`repartition_hydrogen_mass`); None keeps the masses of ``atoms``.

    ``max_frames`` stops after that many new frames without finishing (used to test resuming).
    Returns the path of the finished trajectory (or of the partial file when stopped early).
    """
    output = Path(output)
    steps_per_frame = round(frame_interval_fs / timestep_fs)
    if steps_per_frame < 1 or abs(steps_per_frame * timestep_fs - frame_interval_fs) > 1e-9:
        raise InputError(
            f"md: frame_interval_fs={frame_interval_fs} must be a positive multiple of timestep_fs={timestep_fs}"
        )
    n_frames_total = int(round(total_fs / frame_interval_fs)) + 1  # frame 0 at t = 0
    settings = dict(
        temperature_K=float(temperature_K),
        pressure_MPa=float(pressure_MPa),
        timestep_fs=float(timestep_fs),
        frame_interval_fs=float(frame_interval_fs),
        T_tau_fs=float(T_tau_fs),
        P_tau_fs=float(P_tau_fs),
        seed=int(seed),
        total_fs=float(total_fs),
        hydrogen_mass_u=float(hydrogen_mass_u) if hydrogen_mass_u is not None else _NATURAL_H_MASS_U,
        integrator="ase.md.langevinbaoab.LangevinBAOAB (anisotropic cell)",
    )
    atoms = repartition_hydrogen_mass(atoms, hydrogen_mass_u)
    # results the calculator cached for these positions before (under other torch settings)
    # would stand in for the first forces; every force of the run is computed under its settings
    if hasattr(calc, "reset"):
        calc.reset()
    # a MACE calculator runs on a Verlet list kept across steps (same forces, see module doc)
    atoms.calc = verlet_calculator(calc)
    with _reproducible_forces(calc):
        return _run(atoms, output, settings, steps_per_frame, n_frames_total, checkpoint_every, max_frames, progress)


def _run(
    atoms: Atoms,
    output: Path,
    settings: dict,
    steps_per_frame: int,
    n_frames_total: int,
    checkpoint_every: int,
    max_frames: int | None,
    progress: bool,
) -> Path:
    """The body of :func:`run_npt` once its settings are checked: start or resume, run, finish."""
    s = settings
    frame_interval_fs = s["frame_interval_fs"]
    part = partial_path(output)
    resumed = _resume_or_start(part, atoms, s, temperature_K=s["temperature_K"], seed=s["seed"])
    dyn = LangevinBAOAB(
        atoms,
        s["timestep_fs"] * units.fs,
        temperature_K=s["temperature_K"],
        externalstress=-s["pressure_MPa"] * 1e6 * units.Pascal,  # stress = -pressure
        hydrostatic=False,
        T_tau=s["T_tau_fs"] * units.fs,
        P_tau=s["P_tau_fs"] * units.fs,
        rng=generator(s["seed"], "md_langevin"),
    )
    n_done = 0
    if resumed is not None:
        n_done = _restore(dyn, resumed)
        log.info("%s: resuming at frame %d (t = %g fs)", part, n_done, (n_done - 1) * frame_interval_fs)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_frames_total, initial=n_done, desc=f"MD {output.parent.name}", unit="frame")
    n_done = _write_frames(
        part,
        atoms,
        dyn,
        n_done,
        n_frames_total,
        steps_per_frame=steps_per_frame,
        frame_interval_fs=frame_interval_fs,
        checkpoint_every=checkpoint_every,
        max_frames=max_frames,
        bar=bar,
    )
    if bar:
        bar.close()
    if n_done < n_frames_total:
        return part
    with h5py.File(part, "a") as f:
        del f["checkpoint"]
        f.attrs["n_frames"] = n_done
    os.replace(part, output)
    return output


def _read_checkpoint(part: Path, atoms: Atoms, settings: dict) -> dict | None:
    """State of the last checkpoint in ``part`` (positions, momenta and cell set on ``atoms``).

    None when there is nothing to resume from: no checkpoint yet, or a file left unreadable by a
    crash while it was being written (it is then removed and the run starts over).
    """
    try:
        f = h5py.File(part, "r")
    except OSError as e:
        log.warning("%s: unreadable partial trajectory (%s); starting over", part, e)
        part.unlink()
        return None
    with f:
        if "checkpoint" not in f:
            return None
        for k in _RESUME_KEYS:
            # a partial file written before the key existed ran at the natural H mass
            stored = f.attrs.get(k, _NATURAL_H_MASS_U if k == "hydrogen_mass_u" else None)
            if stored is None or not np.isclose(float(stored), float(settings[k])):
                raise InputError(
                    f"{part}: partial trajectory was run with {k}={stored}, now {settings[k]}; delete it to start over"
                )
        if not np.array_equal(f["numbers"][()], atoms.numbers):
            raise InputError(f"{part}: partial trajectory holds a different structure; delete it to start over")
        try:
            g = f["checkpoint"]
            state = dict(
                cell=g["cell"][()],
                positions=g["positions"][()],
                momenta=g["momenta"][()],
                p_eps=g["p_eps"][()],
                accel=g["accel"][()],
                force_eps=g["force_eps"][()],
                rng_state=json.loads(g.attrs["rng_state"]),
                nsteps=int(g.attrs["nsteps"]),
                n_frames=int(g.attrs["n_frames"]),
            )
            n_stored = f["time_fs"].shape[0]
        except (KeyError, OSError, ValueError) as e:
            # a crash while the checkpoint was being rewritten, or a file from an older version
            log.warning("%s: incomplete checkpoint (%s); starting over", part, e)
            state = None
    if state is None or n_stored < state["n_frames"]:
        part.unlink()
        return None
    atoms.set_cell(state.pop("cell"), scale_atoms=False)
    atoms.positions = state.pop("positions")
    atoms.set_momenta(state.pop("momenta"))
    return state


def spread(frames: list, n: int) -> list:
    """``n`` of ``frames`` spread evenly from the first to the last (all of them if there are fewer)."""
    pick = np.unique(np.linspace(0, len(frames) - 1, min(int(n), len(frames))).round().astype(int))
    return [frames[i] for i in pick]


#: Datasets with one entry per frame.
FRAME_DATASETS = ("time_fs", "positions", "cell", "energy_eV", "temperature_K", "stress_eV_per_A3")


def check_trajectory(f: h5py.File, path: str | os.PathLike) -> int:
    """The frame count of the open trajectory file ``f`` (at ``path``), after its consistency checks.

    Every per-frame dataset present must hold the same number of frames, ``positions`` one row per
    entry of ``numbers``, and a finished file as many frames as its attributes promise (``n_frames``,
    and ``total_fs`` / ``frame_interval_fs`` + 1); an :class:`InputError` names the file and the
    numbers otherwise (e.g. an interrupted copy).
    """
    for name in ("numbers", "time_fs", "positions", "cell"):
        if name not in f:
            raise InputError(f"{path}: trajectory lacks dataset '{name}'")
    lengths = {name: int(f[name].shape[0]) for name in FRAME_DATASETS if name in f and f[name].ndim}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{k} {v}" for k, v in lengths.items())
        raise InputError(f"{path}: trajectory datasets hold different numbers of frames ({listed}); expected one each")
    n = lengths["time_fs"]
    n_atoms = int(f["numbers"].shape[0])
    if f["positions"].ndim != 3 or f["positions"].shape[1:] != (n_atoms, 3):
        raise InputError(
            f"{path}: trajectory dataset 'positions' has shape {f['positions'].shape}, expected (frames, {n_atoms}, 3)"
        )
    promised = []
    if "n_frames" in f.attrs:
        expected = int(f.attrs["n_frames"])
        promised.append((expected, f"its attribute n_frames promises {expected}"))
    if "total_fs" in f.attrs and "frame_interval_fs" in f.attrs and float(f.attrs["frame_interval_fs"]) > 0:
        total, every = float(f.attrs["total_fs"]), float(f.attrs["frame_interval_fs"])
        expected = int(round(total / every)) + 1
        promise = f"its attributes total_fs={total:g}, frame_interval_fs={every:g} promise {expected} (t = 0 included)"
        promised.append((expected, promise))
    for expected, promise in promised:
        if n != expected:
            raise InputError(f"{path}: trajectory holds {n} frames, {promise}; an interrupted copy? Copy or rerun it")
    return n


def read_frames(path: str | os.PathLike, start_fs: float | None = None, every_fs: float | None = None) -> list[Atoms]:
    """Frames of a trajectory file as ASE Atoms (periodic), from ``start_fs`` on, every ``every_fs``.

    The file is checked first (:func:`check_trajectory`)."""
    from octastem.io import open_hdf5

    path = Path(path)
    with open_hdf5(path, "trajectory", ", truncated or corrupt") as f:
        check_trajectory(f, path)
        try:
            return _frames(f, path, start_fs, every_fs)
        except OSError as e:  # the header was readable, a data block is not
            raise InputError(f"{path}: trajectory data unreadable, truncated or corrupt ({e})") from e


def _frames(f: h5py.File, path: Path, start_fs: float | None, every_fs: float | None) -> list[Atoms]:
    t = f["time_fs"][()]
    if len(t) == 0:
        raise InputError(f"{path}: trajectory holds no frames")
    sel = np.ones(len(t), bool)
    if start_fs is not None:
        sel &= t >= start_fs - 1e-6
    if every_fs is not None:
        t0 = t[sel][0] if sel.any() else 0.0
        phase = ((t - t0) / every_fs) % 1.0
        sel &= np.isclose(phase, 0.0, atol=1e-6) | np.isclose(phase, 1.0, atol=1e-6)
    idx = np.flatnonzero(sel)
    if len(idx) == 0:
        raise InputError(f"{path}: no frames at or after {start_fs} fs (trajectory ends at {t[-1]} fs)")
    numbers = f["numbers"][()]
    frames = []
    for i in idx:
        a = Atoms(numbers=numbers, positions=f["positions"][i], cell=f["cell"][i], pbc=True)
        a.info["time_fs"] = float(t[i])
        frames.append(a)
    return frames
