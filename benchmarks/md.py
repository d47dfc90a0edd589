"""MD throughput of the reference MACE and the distilled student; JSON to benchmarks/results/md.json.

For each potential (reference, student), device (cpu, and cuda when visible) and cell (2x2x2 =
96 atoms, 4x4x4 = 768 atoms) it measures wall-clock ms per MD step and ms per atom-step through

- ``octastem``: :func:`octastem.md.run_npt` (LangevinBAOAB anisotropic NPT, HDF5 trajectory with
  a frame and checkpoint every few steps), calculator from :func:`octastem.md.load_mace_model`;
- ``ase_baseline``: plain ASE, ``MACECalculator(model_paths=...)`` + ``ase.md.langevin.Langevin``
  (NVT), no output -- the loop a user would write without this package;
- ``ase_npt_baseline``: plain ASE, the same calculator + ``ase.md.langevinbaoab.LangevinBAOAB``
  with the settings :func:`octastem.md.run_npt` uses (anisotropic NPT, which needs the stress every
  step), no output.

All paths use the same model file, dtype (float32) and thread count, in the same process, and
start with a warm model (one force call before timing, then the calculator's results cleared, so
every path computes its first forces inside the timed run, as ``run_npt`` does). ``speedup`` gives, per potential,
device and size, ``speedup_vs_ase_nvt`` and ``speedup_vs_ase_npt``: baseline ms/step over
octastem ms/step (above 1: octastem is faster). The octastem time includes everything
``run_npt`` does (its first force call, the HDF5 file, frames and checkpoints). The reference potential was pickled
on a CUDA device: where ``MACECalculator(model_paths=...)`` cannot load it on this device, the
baseline loads it with octastem's loader instead and the JSON says so.

Each path is timed ``--repeats`` times, the paths taking turns; a row gives the median (the machine
may be shared) and every repeat's wall time.

Usage: python benchmarks/md.py [--potentials reference,student] [--cells 2,4] [--repeats 3]
                               [--steps-96 N] [--steps-768 N] [--ref-steps-96 N] [--ref-steps-768 N]
                               [--threads 2] [--devices cpu,cuda] [--output benchmarks/results/md.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

# OpenMP threads sleep instead of spinning while waiting (set before torch loads): on a CPU shared
# with other jobs spinning makes small MACE calls several times slower. Override from the shell.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import mace  # noqa: F401, I001  (before e3nn/torch extensions)
import numpy as np
import torch
from ase import units
from ase.md.langevin import Langevin
from ase.md.langevinbaoab import LangevinBAOAB
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

from octastem.io import machine_info
from octastem.io import write_json
from octastem.md import load_mace_model, mace_calculator, run_npt
from octastem.md.mlp import _jit_load_on
from octastem.registry import fetch
from octastem.structure import build_fapbbr3

REPO = Path(__file__).resolve().parents[1]
STUDENT = REPO / "resources" / "student" / "fapbbr3_student.model"
TIMESTEP_FS = 0.5


def machine(threads: int) -> dict:
    return machine_info(
        torch=torch.__version__,
        torch_threads=threads,
        OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY"),
        cuda_device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        note="wall-clock times; the CPU machine may be shared with other jobs (see load average)",
    )


def _atoms(reps):
    a = build_fapbbr3(reps)
    a.rattle(0.02, seed=3)
    return a


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_octastem(model_path, device, reps, steps, workdir) -> dict:
    model = load_mace_model(model_path, device=device)
    calc = mace_calculator(model, device=device)
    atoms = _atoms(reps)
    atoms.calc = calc
    atoms.get_forces()  # warm-up of the model; run_npt resets the calculator and computes its first forces itself
    out = Path(workdir) / f"octastem_{device}_{len(atoms)}.h5"
    interval = min(steps, 5) * TIMESTEP_FS
    total = steps * TIMESTEP_FS
    total = interval * max(1, round(total / interval))
    n_steps = round(total / TIMESTEP_FS)
    _sync(device)
    t = time.perf_counter()
    run_npt(atoms, calc, out, timestep_fs=TIMESTEP_FS, total_fs=total, frame_interval_fs=interval, progress=False)
    _sync(device)
    wall = time.perf_counter() - t
    return _row(wall, n_steps, len(atoms))


def _ase_calculator(model_path, device):
    """``MACECalculator(model_paths=...)`` and how it was loaded."""
    from mace.calculators import MACECalculator

    note = "MACECalculator(model_paths=...)"
    try:
        calc = MACECalculator(model_paths=str(model_path), device=device, default_dtype="float32")
    except Exception as e:  # the CUDA-pickled reference on a CPU-only machine
        with _jit_load_on(device):
            calc = MACECalculator(model_paths=str(model_path), device=device, default_dtype="float32")
        note += f" inside octastem's device remap (plain call failed: {type(e).__name__})"
    return calc, note


def bench_ase(model_path, device, reps, steps) -> dict:
    calc, note = _ase_calculator(model_path, device)
    atoms = _atoms(reps)
    atoms.calc = calc
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    atoms.get_forces()  # warm-up of the model
    calc.reset()  # the run computes its first forces, as run_npt does
    dyn = Langevin(
        atoms, TIMESTEP_FS * units.fs, temperature_K=300, friction=0.01 / units.fs, rng=np.random.default_rng(1)
    )
    _sync(device)
    t = time.perf_counter()
    dyn.run(steps)
    _sync(device)
    wall = time.perf_counter() - t
    return _row(wall, steps, len(atoms)) | {"loader": note}


def bench_ase_npt(model_path, device, reps, steps) -> dict:
    calc, note = _ase_calculator(model_path, device)
    atoms = _atoms(reps)
    atoms.calc = calc
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    atoms.get_forces()  # warm-up of the model
    calc.reset()  # the run computes its first forces and stress, as run_npt does
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the heuristic barostat mass, as in run_npt
        dyn = LangevinBAOAB(
            atoms,
            TIMESTEP_FS * units.fs,
            temperature_K=300.0,
            externalstress=-0.1 * 1e6 * units.Pascal,
            hydrostatic=False,
            T_tau=100.0 * units.fs,
            P_tau=1000.0 * units.fs,
            rng=np.random.default_rng(1),
        )
    _sync(device)
    t = time.perf_counter()
    dyn.run(steps)
    _sync(device)
    wall = time.perf_counter() - t
    return _row(wall, steps, len(atoms)) | {"loader": note}


PATHS = (("octastem", bench_octastem), ("ase_baseline", bench_ase), ("ase_npt_baseline", bench_ase_npt))


def _row(wall, steps, n_atoms):
    ms = 1e3 * wall / steps
    return {"n_atoms": n_atoms, "steps": steps, "wall_s": wall, "ms_per_step": ms, "ms_per_atom_step": ms / n_atoms}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", default=str(STUDENT))
    ap.add_argument("--reference", default="reference_mace", help="registry entry or model file")
    ap.add_argument("--steps-96", type=int, default=40, help="student steps on 96 atoms (GPU: x10)")
    ap.add_argument("--steps-768", type=int, default=10, help="student steps on 768 atoms")
    ap.add_argument("--ref-steps-96", type=int, default=5, help="reference steps on 96 atoms")
    ap.add_argument("--ref-steps-768", type=int, default=2, help="reference steps on 768 atoms")
    ap.add_argument("--potentials", default="reference,student", help="comma list of reference, student")
    ap.add_argument("--cells", default="2,4", help="comma list of n for n x n x n cells (2: 96, 4: 768 atoms)")
    ap.add_argument("--repeats", type=int, default=3, help="timings per path (median reported)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--devices", default="cpu,cuda", help="comma list; cuda is skipped when not visible")
    ap.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "md.json"))
    args = ap.parse_args(argv)

    os.environ.setdefault("OCTASTEM_MIRROR", str(REPO.parent / "shared" / "data"))
    torch.set_num_threads(args.threads)
    ref_path = Path(args.reference)
    if "reference" in args.potentials.split(",") and not ref_path.exists():
        ref_path = fetch(args.reference)
    wanted = args.potentials.split(",")
    models = {"reference": ref_path, "student": Path(args.student)}
    models = {k: v for k, v in models.items() if k in wanted}
    devices = [d for d in args.devices.split(",") if d == "cpu" or (d.startswith("cuda") and torch.cuda.is_available())]
    result = {
        "machine": machine(args.threads),
        "timestep_fs": TIMESTEP_FS,
        "models": {k: str(v) for k, v in models.items()},
    }
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for device in devices:
            gpu = 10 if device.startswith("cuda") else 1
            for reps in [(int(n),) * 3 for n in args.cells.split(",")]:
                for name, path in models.items():
                    if name == "reference":
                        steps = args.ref_steps_96 if reps == (2, 2, 2) else args.ref_steps_768
                    else:
                        steps = args.steps_96 if reps == (2, 2, 2) else args.steps_768
                    steps *= gpu
                    walls = {}
                    for _ in range(args.repeats):
                        for path_kind, fn in PATHS:
                            extra = (work,) if path_kind == "octastem" else ()
                            walls.setdefault(path_kind, []).append(fn(path, device, reps, steps, *extra))
                    for path_kind, runs in walls.items():
                        row = {"potential": name, "device": device, "path": path_kind}
                        row |= _row(float(np.median([r["wall_s"] for r in runs])), steps, runs[0]["n_atoms"])
                        row["wall_s_repeats"] = [r["wall_s"] for r in runs]
                        if "loader" in runs[0]:
                            row["loader"] = runs[0]["loader"]
                        rows.append(row)
                        print(
                            f"{name:9s} {device:5s} {row['n_atoms']:4d} atoms {path_kind:16s} "
                            f"{row['ms_per_step']:9.1f} ms/step {row['ms_per_atom_step']:7.3f} ms/atom-step",
                            file=sys.stderr,
                            flush=True,
                        )
    result["rows"] = rows
    speedup = {}
    ratio = {}
    for device in devices:
        for n in sorted({r["n_atoms"] for r in rows}):
            sel = {
                (r["potential"], r["path"]): r["ms_per_step"]
                for r in rows
                if r["device"] == device and r["n_atoms"] == n
            }
            for pot in models:
                own = sel.get((pot, "octastem"))
                if own:
                    speedup[f"{pot}_{device}_{n}"] = {
                        f"speedup_vs_ase_{kind}": sel[(pot, base)] / own
                        for kind, base in (("nvt", "ase_baseline"), ("npt", "ase_npt_baseline"))
                        if (pot, base) in sel
                    }
            for path_kind, _ in PATHS:
                if ("reference", path_kind) in sel and ("student", path_kind) in sel:
                    ratio[f"{device}_{n}_{path_kind}"] = sel[("reference", path_kind)] / sel[("student", path_kind)]
    result["speedup"] = speedup
    result["student_over_reference_speed"] = ratio
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.output, result)
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
