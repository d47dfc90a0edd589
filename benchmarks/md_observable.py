"""The CPU student against the study's MACE potential on what Table 1 measures.

Both potentials run NPT MD of the same cell (the project's :func:`octastem.md.run_npt`: 300 K,
0.1 MPa, anisotropic Langevin barostat) from the same start (:func:`octastem.structure.build_fapbbr3`)
and seed; the observables of the last ``--analysis-fs`` are compared, each with a block-bootstrap
SE over time blocks of the trajectory:

- Br displacement from the Pb-Pb midpoint, perpendicular and parallel RMS (A);
- the Pb-Br-Pb angle: mean and SD (deg), and the distance between the two angle histograms
  (1-Wasserstein, deg) against its null distribution (the blocks of both runs pooled and redrawn
  into two sets: the distance two samples of one distribution show);
- the lattice parameter (A, the mean of a, b, c per cell);
- the Br ellipticity of the time-averaged projected potential, pooled over x, y and z, fitted by
  the pipeline's own stages (``snapshot_potential``, ``fit``, ``md_statistics``: window-engine
  fits, a two-stage block bootstrap as the SE).

An observable passes when the two potentials differ by at most 2 combined SE (the histogram by
at most the 95th percentile of its null distance). Further runs of the student check that the
cell and the time step do not move the observable: 4 x 4 x 4 (the study's cell) beside
3 x 3 x 3, and a 0.5 fs run with natural masses beside the 2 fs run with hydrogen mass
repartitioning (H at 4 u, ``md.hydrogen_mass_u``).

Each run is one resumable trajectory under ``--workdir`` (``run_npt`` checkpoints: kill it and
start it again, it goes on where it stopped), so the reference can run in pieces in the
background:

    nice python benchmarks/md_observable.py run reference   # 3 x 3 x 3, 2 fs, ~1.5 h on 2 cores
    python benchmarks/md_observable.py run student
    python benchmarks/md_observable.py run student_r4
    python benchmarks/md_observable.py run student_dt0.5
    python benchmarks/md_observable.py analyse               # -> benchmarks/results/md_observable.json

``python benchmarks/md_observable.py smoke`` runs every step on 20 MD steps of the 2 x 2 x 2 cell
with the student (the test of this benchmark).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import mace  # noqa: F401, I001  (before e3nn/torch extensions)
import numpy as np
import torch
from scipy.stats import wasserstein_distance

from octastem import stages
from octastem.io import machine_info, write_json
from octastem.md import load_mace_model, mace_calculator, read_frames, run_npt
from octastem.md.analysis import analyse_frames, br_geometry
from octastem.registry import resolve
from octastem.rng import generator
from octastem.structure import build_fapbbr3

REPO = Path(__file__).resolve().parents[1]
STUDENT = REPO / "resources" / "student" / "fapbbr3_student.model"
RESULT = REPO / "benchmarks" / "results" / "md_observable.json"
SENSITIVITY_RESULT = REPO / "benchmarks" / "results" / "md_sensitivity.json"
WORKDIR = REPO / "benchmarks" / "results" / "md_observable"

#: The protocol shared by every run (the study's thermostat and barostat, a frame every 20 fs).
PROTOCOL = dict(
    temperature_K=300.0,
    pressure_MPa=0.1,
    T_tau_fs=100.0,
    P_tau_fs=1000.0,
    frame_interval_fs=20.0,
    total_fs=2500.0,
    seed=0,
    checkpoint_every=2,
)
ANALYSIS_FS = 2000.0  # the last 2 ps; the first 0.5 ps lets the ideal cubic start settle
BLOCK_FS = 200.0  # time blocks of the bootstrap (10 over the analysis window)
BOOT = 400  # replicates of the scalar observables' block bootstrap

#: name -> potential, supercell, time step (fs), H mass (u; None: natural)
RUNS = {
    "reference": dict(potential="reference_mace", reps=3, timestep_fs=2.0, hydrogen_mass_u=4.0),
    "student": dict(potential="student", reps=3, timestep_fs=2.0, hydrogen_mass_u=4.0),
    "student_r4": dict(potential="student", reps=4, timestep_fs=2.0, hydrogen_mass_u=4.0),
    "student_dt0.5": dict(potential="student", reps=3, timestep_fs=0.5, hydrogen_mass_u=None),
}
#: runs for the sensitivity table only (the cell that holds the Br back)
EXTRA_RUNS = {"student_r2": dict(potential="student", reps=2, timestep_fs=2.0, hydrogen_mass_u=4.0)}
#: pairs compared: (a, b, what the comparison shows)
COMPARISONS = [
    ("student", "reference", "the student against the study's potential (3 x 3 x 3, 2 fs, H at 4 u)"),
    ("student", "student_r4", "3 x 3 x 3 against the study's 4 x 4 x 4 cell (student)"),
    ("student", "student_dt0.5", "2 fs with H at 4 u against 0.5 fs with natural masses (student)"),
]


def model_path(potential: str) -> Path:
    return STUDENT if potential == "student" else resolve(potential)


def run(name: str, workdir: Path, threads: int, protocol: dict | None = None, reps: int | None = None) -> dict:
    """Run (or resume) the MD of ``name``; its trajectory path and wall time of this call."""
    spec = RUNS.get(name) or EXTRA_RUNS[name]
    protocol = dict(PROTOCOL if protocol is None else protocol)
    reps = spec["reps"] if reps is None else reps
    out = workdir / f"{name}.h5"
    if out.exists():
        return {"trajectory": str(out), "wall_s_this_call": 0.0}
    torch.set_num_threads(threads)
    model = load_mace_model(model_path(spec["potential"]), device="cpu", dtype="float32")
    calc = mace_calculator(model, device="cpu", dtype="float32", threads=threads)
    atoms = build_fapbbr3((reps, reps, reps), 6.0)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    run_npt(
        atoms,
        calc,
        out,
        timestep_fs=spec["timestep_fs"],
        hydrogen_mass_u=spec["hydrogen_mass_u"],
        **protocol,
    )
    wall = time.perf_counter() - t0
    record = {
        "name": name,
        **spec,
        "reps": reps,
        "atoms": len(atoms),
        "wall_s_last_piece": wall,
        "threads": threads,
        "machine": machine_info(torch=torch.__version__, torch_threads=threads),
    }
    (workdir / f"{name}.run.json").write_text(json.dumps(record, indent=1))
    return {"trajectory": str(out), "wall_s_this_call": wall}


def _blocks(n_frames: int, n_blocks: int) -> list[np.ndarray]:
    return [b for b in np.array_split(np.arange(n_frames), n_blocks) if b.size]


def scalar_observables(frames, reps: int, n_blocks: int, seed: int) -> dict:
    """Per-frame Br geometry and lattice; each observable's value and block-bootstrap SE, and the
    per-block angle samples (for the histogram distance)."""
    per_frame = []
    for a in frames:
        g = br_geometry(a)
        per_frame.append(
            dict(
                perp2=g.disp_perpendicular_A**2,
                par2=g.disp_parallel_A**2,
                angle=g.angle_deg,
                a=float(np.mean(a.cell.lengths())) / reps,
            )
        )
    blocks = _blocks(len(frames), n_blocks)

    def values(frame_idx) -> dict:
        perp2 = np.concatenate([per_frame[i]["perp2"] for i in frame_idx])
        par2 = np.concatenate([per_frame[i]["par2"] for i in frame_idx])
        ang = np.concatenate([per_frame[i]["angle"] for i in frame_idx])
        return {
            "br_perpendicular_rms_A": float(np.sqrt(perp2.mean())),
            "br_parallel_rms_A": float(np.sqrt(par2.mean())),
            "pb_br_pb_angle_mean_deg": float(ang.mean()),
            "pb_br_pb_angle_sd_deg": float(ang.std()),
            "lattice_a_A": float(np.mean([per_frame[i]["a"] for i in frame_idx])),
        }

    full = values(range(len(frames)))
    rng = generator(seed, "fit_block_bootstrap", 1)  # time blocks of the scalar observables
    reps_ = [
        values(np.concatenate([blocks[j] for j in rng.integers(0, len(blocks), len(blocks))])) for _ in range(BOOT)
    ]
    out = {k: {"value": v, "se": float(np.std([r[k] for r in reps_], ddof=1))} for k, v in full.items()}
    block_angles = [np.concatenate([per_frame[i]["angle"] for i in b]) for b in blocks]
    return {"observables": out, "block_angles": block_angles}


def ellipticity(trajectory: Path, reps: int, start_fs: float, workdir: Path, name: str, replicates: int) -> dict:
    """Pooled Br ellipticity of the time-averaged potential along x, y, z, by the pipeline's stages."""
    d = workdir / f"{name}_fit"
    d.mkdir(parents=True, exist_ok=True)
    axes = ("x", "y", "z")
    pots, tables, sums = [], [], []
    for axis in axes:
        pot, table, summ = d / f"potential_{axis}.h5", d / f"fit_{axis}.csv", d / f"fit_{axis}.json"
        if not pot.exists():
            stages.snapshot_potential(
                trajectory=trajectory,
                output=pot,
                start_fs=start_fs,
                every_fs=PROTOCOL["frame_interval_fs"],
                n_cells=[reps] * 3,
                sampling_A=0.05,
                slice_thickness_A=None,
                axis=axis,
                block_fs=BLOCK_FS,
            )
        if not summ.exists():
            stages.fit(
                image_path=pot, table=table, summary=summ, types=["Br"], window_A=None, se_method="asymptotic", seed=0
            )
        pots.append(pot)
        tables.append(table)
        sums.append(summ)
    summary = d / "pooled.json"
    if not summary.exists():
        stages.md_statistics(
            tables=tables,
            summaries=sums,
            potentials=pots,
            axes=axes,
            table=d / "pooled.csv",
            summary=summary,
            figure=d / "convergence.png",
            types=["Br"],
            window_A=None,
            se_method="asymptotic",
            replicates=replicates,
            frame_interval_fs=PROTOCOL["frame_interval_fs"],
            seed=0,
        )
    br = json.loads(summary.read_text())["summary"]["Br"]
    return {
        "value": br["median_ellipticity"],
        "se": br["se"],
        "se_method": br["se_method"],
        "n": br["n"],
        "by_axis": {a: v["median_ellipticity"] for a, v in br["by_axis"].items()},
    }


def analyse_run(name: str, workdir: Path, replicates: int, analysis_fs: float, reps: int | None = None) -> dict:
    spec = RUNS[name]
    reps = spec["reps"] if reps is None else reps
    traj = workdir / f"{name}.h5"
    frames_all = read_frames(traj)
    t_end = frames_all[-1].info["time_fs"]
    start = t_end - analysis_fs + 1e-6
    frames = [f for f in frames_all if f.info["time_fs"] >= start]
    n_blocks = max(2, round(analysis_fs / BLOCK_FS))
    scal = scalar_observables(frames, reps, n_blocks, seed=0)
    obs = scal["observables"]
    obs["br_ellipticity_pooled"] = ellipticity(traj, reps, start, workdir, name, replicates)
    info = analyse_frames(frames, (reps, reps, reps))
    run_json = workdir / f"{name}.run.json"
    return {
        "spec": {**spec, "reps": reps},
        "atoms": len(frames[0]),
        "analysed_frames": len(frames),
        "analysis_window_fs": [float(frames[0].info["time_fs"]), float(t_end)],
        "time_blocks": n_blocks,
        "observables": obs,
        "angle_histogram": info["pb_br_pb_angle_deg"]["histogram"],
        "run": json.loads(run_json.read_text()) if run_json.exists() else None,
        "_block_angles": scal["block_angles"],
    }


def histogram_distance(a: list[np.ndarray], b: list[np.ndarray], seed: int, draws: int = 400) -> dict:
    """1-Wasserstein distance of the two angle samples and its null distribution (blocks pooled, redrawn)."""
    d = float(wasserstein_distance(np.concatenate(a), np.concatenate(b)))
    pool = a + b
    rng = generator(seed, "fit_block_bootstrap", 2)  # null draws of the histogram distance
    null = []
    for _ in range(draws):
        ia = rng.integers(0, len(pool), len(a))
        ib = rng.integers(0, len(pool), len(b))
        null.append(wasserstein_distance(np.concatenate([pool[i] for i in ia]), np.concatenate([pool[i] for i in ib])))
    p95 = float(np.quantile(null, 0.95))
    return {"value": d, "null_p95": p95, "passes": bool(d <= p95)}


def compare(ra: dict, rb: dict, seed: int) -> dict:
    rows = {}
    for k, oa in ra["observables"].items():
        ob = rb["observables"][k]
        diff = oa["value"] - ob["value"]
        se = math.hypot(oa["se"], ob["se"])
        rows[k] = {
            "a": oa["value"],
            "a_se": oa["se"],
            "b": ob["value"],
            "b_se": ob["se"],
            "difference": diff,
            "combined_se": se,
            "within_2se": bool(abs(diff) <= 2 * se),
        }
    rows["pb_br_pb_angle_histogram_w1_deg"] = histogram_distance(ra["_block_angles"], rb["_block_angles"], seed)
    passes = all(r.get("within_2se", r.get("passes")) for r in rows.values())
    return {"observables": rows, "passes": passes}


def analyse(workdir: Path, output: Path, replicates: int, analysis_fs: float, runs=None, reps=None) -> dict:
    names = [n for n in (runs or RUNS) if (workdir / f"{n}.h5").exists()]
    results = {n: analyse_run(n, workdir, replicates, analysis_fs, reps) for n in names}
    comparisons = []
    for a, b, what in COMPARISONS:
        if a in results and b in results:
            comparisons.append({"a": a, "b": b, "what": what, **compare(results[a], results[b], seed=0)})
    missing = [n for n in (runs or RUNS) if n not in results]
    for r in results.values():
        r.pop("_block_angles")
    doc = {
        "benchmark": "md_observable",
        "protocol": {**PROTOCOL, "analysis_fs": analysis_fs, "block_fs": BLOCK_FS, "bootstrap": BOOT},
        "runs": results,
        "comparisons": comparisons,
        "missing_runs": missing,
        "machine": machine_info(torch=torch.__version__),
    }
    write_json(output, doc)
    return doc


#: The analysis choices of the sensitivity table: name -> (pixel A, blur sigma A, engine, window A, window fs).
#: The first row is the pipeline's own choice; each other row changes one thing.
SENSITIVITY = {
    "pipeline (0.05 A, window engine, 1.2 a window, 2 ps)": (0.05, 0.0, "window", None, None),
    "pixel 0.1 A": (0.1, 0.0, "window", None, None),
    "pixel 0.2 A": (0.2, 0.0, "window", None, None),
    "blur 0.10 A": (0.05, 0.10, "window", None, None),
    "blur 0.15 A": (0.05, 0.15, "window", None, None),
    "blur 0.25 A": (0.05, 0.25, "window", None, None),
    "joint engine": (0.05, 0.0, "joint", None, None),
    "fast engine": (0.05, 0.0, "fast", None, None),
    "window 0.8 a": (0.05, 0.0, "window", 0.8, None),
    "window 1.6 a": (0.05, 0.0, "window", 1.6, None),
    "last 0.5 ps": (0.05, 0.0, "window", None, 500.0),
    "last 1 ps": (0.05, 0.0, "window", None, 1000.0),
}


def _frame_images(frames, sampling_A: float) -> dict:
    """Per-frame projected potentials along x, y, z (float32), on each axis' common in-plane cell."""
    from octastem.potential import common_frames, projected_potential

    frames, _ = common_frames(frames)  # every frame on the mean cell, so the images share one grid
    out = {}
    for axis in ("x", "y", "z"):
        imgs = []
        cell = None
        for f in frames:
            img, samp, cell = projected_potential([f], sampling_A=sampling_A, axis=axis, progress=False)
            imgs.append(img)
        out[axis] = (np.stack(imgs), samp, cell)
    return out


def _pooled(images: dict, idx, reps: int, blur_A: float, engine: str, window_A) -> dict:
    from scipy.ndimage import gaussian_filter

    from octastem.fit.columns import fit_columns
    from octastem.fit.stats import median_se

    values, per_axis = [], {}
    for axis, (stack, samp, cell) in images.items():
        img = stack[idx].mean(axis=0)
        if blur_A > 0:
            img = gaussian_filter(img.astype(np.float64), blur_A / samp, mode="wrap").astype(np.float32)
        df = fit_columns(img, samp, (reps, reps), cell[:2], types=("Br",), window_A=window_A, method=engine, seed=0)
        ok = df[(df["type"] == "Br") & df["success"].astype(bool)]["ellipticity"].to_numpy(float)
        per_axis[axis] = float(np.median(ok))
        values.append(ok)
    v = np.concatenate(values)
    med, se = median_se(v, method="asymptotic")
    return {"median": med, "se": se, "n": int(v.size), "per_axis": per_axis}


def sensitivity(
    workdir: Path, output: Path, names=None, analysis_fs: float = ANALYSIS_FS, skip=(), keep: bool = False
) -> dict:
    """How the pooled MD Br ellipticity moves with each analysis choice (:data:`SENSITIVITY`), per run;
    asymptotic SE over the pooled columns (time correlation not included: a lower bound). ``skip``:
    choices left out (the joint engine costs minutes per image); ``keep``: the runs already in
    ``output`` stay (the file grows run by run)."""
    names = [n for n in (names or list(RUNS) + ["student_r2"]) if (workdir / f"{n}.h5").exists()]
    doc = {
        "choices": {
            k: dict(zip(("pixel_A", "blur_A", "engine", "window_a", "window_fs"), v)) for k, v in SENSITIVITY.items()
        }
    }
    rows = json.loads(output.read_text()).get("runs", {}) if keep and output.exists() else {}
    for name in names:
        spec = RUNS.get(name) or EXTRA_RUNS[name]
        reps = spec["reps"]
        frames_all = read_frames(workdir / f"{name}.h5")
        t_end = frames_all[-1].info["time_fs"]
        frames = [f for f in frames_all if f.info["time_fs"] >= t_end - analysis_fs + 1e-6]
        times = np.array([f.info["time_fs"] for f in frames])
        cache = {}
        rows[name] = {}
        for label, (pixel, blur, engine, window_a, window_fs) in SENSITIVITY.items():
            if label in skip:
                continue
            if pixel not in cache:
                cache[pixel] = _frame_images(frames, pixel)
            idx = np.arange(len(frames)) if window_fs is None else np.flatnonzero(times >= t_end - window_fs + 1e-6)
            a_A = float(np.mean([np.mean(f.cell.lengths()) for f in frames])) / reps
            window_A = None if window_a is None else window_a * a_A
            t0 = time.perf_counter()
            rows[name][label] = _pooled(cache[pixel], idx, reps, blur, engine, window_A) | {
                "wall_s": time.perf_counter() - t0
            }
            print(name, label, json.dumps(rows[name][label]), flush=True)
        doc["runs"] = rows
        doc["machine"] = machine_info(torch=torch.__version__)
        write_json(output, doc)
    return doc


def smoke(output: Path | None = None) -> dict:
    """Every step of the benchmark on 20 MD steps (2 x 2 x 2, student, 1 fs): the test of this script."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        protocol = dict(PROTOCOL, total_fs=20.0, frame_interval_fs=2.0, checkpoint_every=5)
        global RUNS, BLOCK_FS
        saved = RUNS, BLOCK_FS, PROTOCOL["frame_interval_fs"]
        RUNS = {
            "student": dict(potential="student", reps=2, timestep_fs=1.0, hydrogen_mass_u=4.0),
            "student_dt0.5": dict(potential="student", reps=2, timestep_fs=0.5, hydrogen_mass_u=None),
        }
        BLOCK_FS = 4.0
        PROTOCOL["frame_interval_fs"] = 2.0
        try:
            for name in RUNS:
                run(name, tmp, threads=1, protocol=protocol)
            doc = analyse(tmp, output or tmp / "md_observable.json", replicates=4, analysis_fs=16.0)
        finally:
            RUNS, BLOCK_FS, PROTOCOL["frame_interval_fs"] = saved
        return doc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run or resume one MD run")
    r.add_argument("name", choices=sorted(RUNS) + sorted(EXTRA_RUNS))
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--workdir", type=Path, default=WORKDIR)
    a = sub.add_parser("analyse", help="observables and comparisons of the finished runs -> JSON")
    a.add_argument("--workdir", type=Path, default=WORKDIR)
    a.add_argument("--output", type=Path, default=RESULT)
    a.add_argument("--replicates", type=int, default=200, help="block-bootstrap replicates of the ellipticity")
    v = sub.add_parser("sensitivity", help="the MD value against each analysis choice -> JSON")
    v.add_argument("--workdir", type=Path, default=WORKDIR)
    v.add_argument("--output", type=Path, default=SENSITIVITY_RESULT)
    v.add_argument("--runs", default=None, help="comma-separated run names (default: all finished runs)")
    v.add_argument("--skip", default="", help="comma-separated choices to leave out, e.g. 'joint engine'")
    v.add_argument("--keep", action="store_true", help="keep the runs already in the output file")
    s = sub.add_parser("smoke", help="every step on 20 MD steps (a test)")
    s.add_argument("--output", type=Path, default=None)
    args = p.parse_args(argv)
    if args.cmd == "run":
        print(json.dumps(run(args.name, args.workdir, args.threads)))
    elif args.cmd == "sensitivity":
        skip = [x for x in args.skip.split(",") if x]
        sensitivity(args.workdir, args.output, args.runs.split(",") if args.runs else None, skip=skip, keep=args.keep)
    elif args.cmd == "analyse":
        doc = analyse(args.workdir, args.output, args.replicates, ANALYSIS_FS)
        for c in doc["comparisons"]:
            print(c["what"], "passes" if c["passes"] else "FAILS")
            for k, v in c["observables"].items():
                print(f"  {k}: {json.dumps(v)}")
    else:
        doc = smoke(args.output)
        print(json.dumps({k: v["passes"] for k, v in enumerate(doc["comparisons"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
