"""MD throughput of the reference MACE and the distilled student; JSON to benchmarks/results/md.json.

For each potential (reference, student), device (cpu, and cuda when visible) and cell (2x2x2 =
96 atoms, 4x4x4 = 768 atoms) it measures wall-clock ms per MD step and ms per atom-step through

- ``octastem``: :func:`octastem.md.run_npt` (LangevinBAOAB anisotropic NPT, HDF5 trajectory with
  a frame and checkpoint every few steps), calculator from :func:`octastem.md.load_mace_model`;
- ``ase_baseline``: plain ASE, ``MACECalculator(model_paths=...)`` + ``ase.md.langevin.Langevin``
  (NVT), no output -- the loop a user would write without this package.

Both paths use the same model file, dtype (float32) and thread count, in the same process, and
start with a warm calculator (one force call before timing). The reference potential was pickled
on a CUDA device: where ``MACECalculator(model_paths=...)`` cannot load it on this device, the
baseline loads it with octastem's loader instead and the JSON says so.

Usage: python benchmarks/md.py [--cells 2,4] [--steps-96 N] [--steps-768 N] [--ref-steps-96 N] [--ref-steps-768 N]
                               [--threads 2] [--devices cpu,cuda] [--output benchmarks/results/md.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

# OpenMP threads sleep instead of spinning while waiting (set before torch loads): on a CPU shared
# with other jobs spinning makes small MACE calls several times slower. Override from the shell.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import mace  # noqa: F401, I001  (before e3nn/torch extensions)
import numpy as np
import torch
from ase import units
from ase.md.langevin import Langevin
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
    atoms.get_forces()  # warm-up; run_npt's frame 0 reuses this result (same positions)
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


def bench_ase(model_path, device, reps, steps) -> dict:
    from mace.calculators import MACECalculator

    note = "MACECalculator(model_paths=...)"
    try:
        calc = MACECalculator(model_paths=str(model_path), device=device, default_dtype="float32")
    except Exception as e:  # the CUDA-pickled reference on a CPU-only machine
        with _jit_load_on(device):
            calc = MACECalculator(model_paths=str(model_path), device=device, default_dtype="float32")
        note += f" inside octastem's device remap (plain call failed: {type(e).__name__})"
    atoms = _atoms(reps)
    atoms.calc = calc
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    atoms.get_forces()
    dyn = Langevin(
        atoms, TIMESTEP_FS * units.fs, temperature_K=300, friction=0.01 / units.fs, rng=np.random.default_rng(1)
    )
    _sync(device)
    t = time.perf_counter()
    dyn.run(steps)
    _sync(device)
    wall = time.perf_counter() - t
    return _row(wall, steps, len(atoms)) | {"loader": note}


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
    ap.add_argument("--cells", default="2,4", help="comma list of n for n x n x n cells (2: 96, 4: 768 atoms)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--devices", default="cpu,cuda", help="comma list; cuda is skipped when not visible")
    ap.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "md.json"))
    args = ap.parse_args(argv)

    os.environ.setdefault("OCTASTEM_MIRROR", str(REPO.parent / "shared" / "data"))
    torch.set_num_threads(args.threads)
    ref_path = fetch(args.reference) if not Path(args.reference).exists() else Path(args.reference)
    models = {"reference": ref_path, "student": Path(args.student)}
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
                    for path_kind, fn in (("octastem", bench_octastem), ("ase_baseline", bench_ase)):
                        args_ = (
                            (path, device, reps, steps, work)
                            if path_kind == "octastem"
                            else (path, device, reps, steps)
                        )
                        row = {"potential": name, "device": device, "path": path_kind} | fn(*args_)
                        rows.append(row)
                        print(
                            f"{name:9s} {device:5s} {row['n_atoms']:4d} atoms {path_kind:12s} "
                            f"{row['ms_per_step']:9.1f} ms/step {row['ms_per_atom_step']:7.3f} ms/atom-step",
                            file=sys.stderr,
                            flush=True,
                        )
    result["rows"] = rows
    speed = {}
    for device in devices:
        for n in sorted({r["n_atoms"] for r in rows}):
            sel = {
                (r["potential"], r["path"]): r["ms_per_step"]
                for r in rows
                if r["device"] == device and r["n_atoms"] == n
            }
            for path_kind in ("octastem", "ase_baseline"):
                if ("reference", path_kind) in sel and ("student", path_kind) in sel:
                    speed[f"{device}_{n}_{path_kind}"] = sel[("reference", path_kind)] / sel[("student", path_kind)]
            for pot in ("reference", "student"):
                if (pot, "octastem") in sel and (pot, "ase_baseline") in sel:
                    speed[f"{device}_{n}_{pot}_octastem_over_baseline_time"] = (
                        sel[(pot, "octastem")] / sel[(pot, "ase_baseline")]
                    )
    result["student_speedup_and_overhead"] = speed
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.output, result)
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
