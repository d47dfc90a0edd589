"""Plain multislice against PRISM (``stem.method``) for the nanocrystal scan -> benchmarks/results/multislice.json.

Every comparison runs both paths of :func:`octastem.stem.simulate_4dstem` end to end on the same
scan of one frozen-phonon frame and records wall and CPU seconds (the CPU time of all threads of
this process, less sensitive than the wall time to other jobs on a shared machine), their
ratios, the largest pixel difference relative to the pattern's total intensity, the mean and
largest L1 difference (sum |difference| / total), and the Pearson correlation and relative RMS
difference of the iCOM phase images.

- ``scaling``: the embedded default's specimen, a 36 A FAPbBr3 nanocrystal (6 x 6 x 6 cells, 3 A
  of vacuum) cut from a 2 x 2 x 2 cell whose atoms carry seeded 0.08 A random displacements (in
  place of an MD frame); 300 kV, 25 mrad, 0.4 A steps, 1 A slices, patterns to 60 mrad rebinned
  to 1.5 mrad. Central scans of ``--periods`` MD cells per side (2/3 -> 20 x 20 = 400
  positions, 2 -> 60 x 60 = 3,600, the default's scan of one frame); PRISM with the schema's
  window (``stem.prism_margin_A``). The top-level ``speedup`` and accuracy are those of the largest
  scan, beside the targets (pattern difference <= 1e-3, iCOM correlation >= 0.999, speedup >= 10).
- ``windows``: PRISM at other interpolation factors on the first scan (accuracy against cost).
- ``thick``: 168 A thick crystals (the paper preset's thickness; 4 A slices to halve the cost,
  the same for both paths; 1 mrad pixels), columns of 3 x 3 cells in a 24 A box (PRISM f = 2, a
  12 A window: too small), in a 32 A box (the schema's window: f = 2, 16 A, about the smallest
  the schema gives at this thickness) and 5 x 5 cells in a 37 A box (the schema's window: f = 2,
  18.5 A), scanned over 2/3 of the central cell.
- ``paper_model``: the paper preset's nanocrystal cost (config/paper.yaml: 178 A box, 84 slices
  of 2 A, 57,600 positions, 20 frames) as a MODEL from components measured on its grid: one
  multislice probe position, one S-matrix plane wave and the S-matrix's per-frame set-up (from two builds
  of 1 and 13 plane waves) through a vacuum potential of its box, grid and slices (the cost of a slice
  does not depend on the atoms), and the PRISM reduction,
  patterns and rebinning of a 16 x 16 tile of positions with its window and number of plane
  waves (random S-matrix values). Building the potentials, the same for both paths, is left out.

Usage: python benchmarks/multislice.py [--periods 0.6667 2] [--windows 3 5 6 7] [--parts scaling windows thick paper]
       [--merge] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from ase import Atoms

from octastem.config import schema_defaults
from octastem.io import import_abtem, machine_info, write_json
from octastem.potential import grid_gpts
from octastem.stem import build_nanocrystal, icom, simulate_4dstem
from octastem.stem.prism import (
    _coefficients,
    _detector_operators,
    _native_shape,
    _patterns,
    _plane_wave_basis,
    _reduce,
    interpolation_factors,
)
from octastem.stem.simulate import _fft_size, _rebin_axis, antialias_sampling_A
from octastem.structure import build_fapbbr3

OPTICS = {
    "energy_eV": 300e3,
    "semiangle_mrad": 25.0,
    "scan_step_A": 0.4,
    "sampling_A": None,
    "slice_thickness_A": 1.0,
    "max_angle_mrad": 60.0,
    "detector_sampling_mrad": 1.5,
    "specimen": "finite",
    "num_workers": 2,
}
#: The paper preset's nanocrystal scan (config/paper.yaml).
PAPER = {
    "edge_A": 168.0,
    "vacuum_A": 5.0,
    "slice_thickness_A": 2.0,
    "scan_step_A": 0.2,
    "scan_A": 48.0,
    "frames": 20,
    "detector_sampling_mrad": 1.0,
}
CALIBRATION = ("k_sampling_x_mrad", "k_sampling_y_mrad", "scan_step_x_A", "scan_step_y_A", "scan_shape", "cell_A")


def rattled(reps, seed: int = 0, rms_A: float = 0.08) -> Atoms:
    """An ideal FAPbBr3 supercell with seeded random displacements (rms per component, A)."""
    atoms = build_fapbbr3(reps)
    atoms.positions += np.random.default_rng(seed).normal(0.0, rms_A, atoms.positions.shape)
    atoms.wrap()
    return atoms


def timed(fn, *args, **kwargs):
    """(result, {wall_s, cpu_s, load_before})."""
    load = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "load_before": load}


def compare(prism, reference) -> dict:
    """Pattern and iCOM phase agreement of two datasets of the same scan."""
    ref = reference.data.astype(np.float64)
    diff = np.abs(prism.data.astype(np.float64) - ref)
    total = ref.sum(axis=(2, 3))
    l1 = diff.sum(axis=(2, 3)) / total
    phase_p, phase_r = icom(prism)[0].astype(np.float64), icom(reference)[0].astype(np.float64)
    same = prism.data.shape == reference.data.shape and all(
        getattr(prism, k) == getattr(reference, k) for k in CALIBRATION
    )
    return {
        "largest_pattern_difference": float((diff.max(axis=(2, 3)) / total).max()),
        "l1_difference_mean": float(l1.mean()),
        "l1_difference_max": float(l1.max()),
        "icom_correlation": float(np.corrcoef(phase_p.ravel(), phase_r.ravel())[0, 1]),
        "icom_rms_difference_relative": float(np.std(phase_p - phase_r) / np.std(phase_r)),
        "same_grid_and_calibration": bool(same),
    }


def run_pair(frames, settings: dict, prism_kwargs: dict, reference=None) -> tuple[dict, object]:
    """Multislice (unless ``reference`` is given) and PRISM on one scan: times, ratios and agreement."""
    row = {}
    if reference is None:
        reference, row["multislice"] = timed(simulate_4dstem, frames, method="multislice", **settings)
    prism, row["prism"] = timed(simulate_4dstem, frames, method="prism", **prism_kwargs, **settings)
    record = json.loads(prism.provenance)
    row["prism"].update(interpolation=record["prism_interpolation"], window_A=record["prism_window_A"])
    row["prism"]["plane_waves"] = plane_waves(prism.cell_A, record["prism_interpolation"], settings)
    row["positions"] = int(np.prod(reference.data.shape[:2]))
    if "multislice" in row:
        row["speedup_wall"] = row["multislice"]["wall_s"] / row["prism"]["wall_s"]
        row["speedup_cpu"] = row["multislice"]["cpu_s"] / row["prism"]["cpu_s"]
    row.update(compare(prism, reference))
    print(json.dumps(row), flush=True)
    return row, reference


def plane_waves(cell_A, interpolation, settings: dict | None = None, gpts=None) -> int:
    """Number of plane waves of the S-matrix of a box (A), its grid and interpolation."""
    abtem = import_abtem()
    if gpts is None:
        sampling = antialias_sampling_A(OPTICS["energy_eV"], settings["max_angle_mrad"])
        gpts = tuple(_fft_size(n) for n in grid_gpts(np.asarray(cell_A[:2]), sampling))
    s_matrix = abtem.SMatrix(
        semiangle_cutoff=OPTICS["semiangle_mrad"],
        energy=OPTICS["energy_eV"],
        extent=tuple(float(v) for v in cell_A[:2]),
        gpts=tuple(gpts),
        interpolation=tuple(interpolation),
    )
    return len(s_matrix)


def bench_scaling(args) -> tuple[dict, list[dict], tuple]:
    nc = build_nanocrystal([rattled((2, 2, 2))], edge_A=36.0, vacuum_A=3.0, scan_cells=2)
    case = {
        "specimen": "36 A FAPbBr3 nanocrystal (the embedded default's), one frame, 0.08 A random displacements",
        "box_A": [round(v, 3) for v in nc.box_A],
        "atoms": len(nc.frames[0]),
        "optics": {k: v for k, v in OPTICS.items() if k != "num_workers"},
        "threads": OPTICS["num_workers"],
        "prism_defaults": {k: v for k, v in schema_defaults("stem").items() if k.startswith("prism")},
    }
    rows, first = [], None
    for periods in args.periods:
        settings = {**OPTICS, "scan_start_A": nc.scan_start_A, "scan_period_A": nc.scan_period_A}
        settings["scan_periods"] = periods
        row, reference = run_pair(nc.frames, settings, {})
        rows.append({"scan_periods": periods, **row})
        first = first or (nc.frames, settings, reference)
    return case, rows, first


def bench_windows(args, first) -> list[dict]:
    frames, settings, reference = first
    return [run_pair(frames, settings, {"prism_interpolation": f}, reference=reference)[0] for f in args.windows]


def thick_column(cells: int, vacuum_A: float) -> tuple[Atoms, dict]:
    """A cells x cells x 28-cell (168 A) FAPbBr3 column in vacuum and a scan of 2/3 of its central cell."""
    column = rattled((cells, cells, 28), seed=1)
    lengths = column.cell.lengths()
    box = [lengths[0] + 2 * vacuum_A, lengths[1] + 2 * vacuum_A, lengths[2] + 1.0]
    atoms = Atoms(column.numbers, positions=column.positions + [vacuum_A, vacuum_A, 0.5], cell=box, pbc=False)
    period = (lengths[0] / cells, lengths[1] / cells)
    settings = {
        **OPTICS,
        "slice_thickness_A": 4.0,
        "detector_sampling_mrad": PAPER["detector_sampling_mrad"],
        "scan_start_A": (vacuum_A + period[0] * (cells // 2), vacuum_A + period[1] * (cells // 2)),
        "scan_period_A": period,
        "scan_periods": 2.0 / 3.0,
    }
    return atoms, settings


def bench_thick() -> list[dict]:
    rows = []
    for cells, vacuum_A, prism in ((3, 3.0, {"prism_interpolation": 2}), (3, 7.0, {}), (5, 3.5, {})):
        atoms, settings = thick_column(cells, vacuum_A)
        row, _ = run_pair([atoms], settings, prism)
        box = atoms.cell.lengths()
        rows.append(
            {"specimen": f"{cells} x {cells} x 28-cell column, {box[2] - 1:.0f} A thick, {box[0]:.1f} A box", **row}
        )
    return rows


def paper_wave_costs(abtem, box: float, n: int, slices: int, f) -> tuple[float, float, float]:
    """CPU s of one multislice probe position (two, halved), of one S-matrix plane wave and of the S-matrix's
    per-frame set-up (transmission functions, propagators) of the PRISM path
    (:func:`octastem.stem.prism._plane_wave_basis`) through a vacuum potential of ``slices`` slices of an
    ``n`` x ``n`` grid over ``box`` A. The PRISM costs are the slope and intercept of two builds, with 0.5 and
    2.5 mrad cutoffs (1 and about 13 plane waves)."""
    potential = abtem.PotentialArray(
        np.zeros((slices, n, n), np.float32), sampling=box / n, slice_thickness=PAPER["slice_thickness_A"]
    )
    probe = abtem.Probe(energy=OPTICS["energy_eV"], semiangle_cutoff=OPTICS["semiangle_mrad"])
    probe.grid.match(potential)
    scan = abtem.CustomScan(np.array([[box / 2, box / 2], [box / 2 + 0.2, box / 2]]))
    measurement = probe.scan(potential, scan=scan, detectors=abtem.PixelatedDetector(max_angle=60.0))
    _, position = timed(measurement.compute, scheduler="threads", num_workers=2, progress_bar=False)
    one = SimpleNamespace(n_scan=(1, 1), start=(box / 2, box / 2), steps=(PAPER["scan_step_A"],) * 2)
    builds = []
    for cutoff_mrad in (0.5, 2.5):
        basis, cost = timed(_plane_wave_basis, abtem, potential, OPTICS["energy_eV"], cutoff_mrad, f, one, 2)
        builds.append((len(basis["array"]), cost["cpu_s"]))
        del basis
    (n1, t1), (n2, t2) = builds
    per_wave = (t2 - t1) / (n2 - n1)
    return position["cpu_s"] / 2, per_wave, t1 - n1 * per_wave


def paper_reduce_cost(abtem, box: float, n: int, f, tile: int = 16) -> dict:
    """CPU s per position of the PRISM reduction, patterns and rebinning (octastem.stem.prism) of a ``tile`` x
    ``tile`` tile of positions, with the window and plane waves of the S-matrix of this box, grid and ``f``."""
    full = abtem.SMatrix(
        semiangle_cutoff=OPTICS["semiangle_mrad"],
        energy=OPTICS["energy_eV"],
        extent=(box, box),
        gpts=(n, n),
        interpolation=f,
    )
    beams, ds, window = len(full), tuple(full.downsampled_gpts), tuple(full.window_gpts)
    sampling = box / ds[0]
    region = window[0] + int(math.ceil(tile * PAPER["scan_step_A"] / sampling)) + 4
    rng = np.random.default_rng(0)
    basis = {
        "array": rng.standard_normal((beams, region, region), np.float32).astype(np.complex64) / ds[0],
        "wave_vectors": np.asarray(full.wave_vectors, np.float64),
        "sampling": (sampling, sampling),
        "window": window,
        "offset": (0, 0),
        "gpts": ds,
        "probe": full.dummy_probes(),
    }
    start = (window[0] // 2 + 2) * sampling
    xs = start + np.arange(tile) * PAPER["scan_step_A"]
    y, x = (v.ravel() for v in np.meshgrid(xs, xs, indexing="ij"))
    ctf = abtem.CTF(semiangle_cutoff=OPTICS["semiangle_mrad"], energy=OPTICS["energy_eV"])
    native, dk = _native_shape(abtem, (n, n), (box, box), OPTICS["energy_eV"], 60.0)
    half = tuple((m - 1) // 2 for m in native)
    rebin = _rebin_axis(2 * half[0] + 1, dk[0], PAPER["detector_sampling_mrad"])

    def reduce_and_detect():
        operators = _detector_operators(ds, window, half, rebin, rebin)
        return _patterns(_reduce(basis, _coefficients(basis, ctf, x, y), x, y), operators)

    _, reduce = timed(reduce_and_detect)
    return {
        "plane_waves": beams,
        "prism_s_matrix_gpts": list(ds),
        "prism_cpu_s_per_position": reduce["cpu_s"] / tile**2,
        "prism_s_matrix_GB": beams * (PAPER["scan_A"] / sampling + window[0]) ** 2 * 8 / 1e9,
    }


def bench_paper(margin_A: float) -> dict:
    """The paper preset's cost from components measured on its grid (see the module docstring)."""
    abtem = import_abtem()
    box = PAPER["edge_A"] + 2 * PAPER["vacuum_A"]
    n = _fft_size(grid_gpts(np.array([box, box]), antialias_sampling_A(OPTICS["energy_eV"], 60.0))[0])
    slices = int(math.ceil(PAPER["edge_A"] / PAPER["slice_thickness_A"]))
    positions = int(round(PAPER["scan_A"] / PAPER["scan_step_A"])) ** 2
    f = interpolation_factors((box, box, PAPER["edge_A"]), None, margin_A, OPTICS["semiangle_mrad"])
    t_position, t_beam, t_frame = paper_wave_costs(abtem, box, n, slices, f)
    reduce = paper_reduce_cost(abtem, box, n, f)
    beams, t_reduce = reduce["plane_waves"], reduce.pop("prism_cpu_s_per_position")
    frames = PAPER["frames"]
    multislice_h = frames * positions * t_position / 3600
    prism_h = frames * (t_frame + beams * t_beam + positions * t_reduce) / 3600
    return {
        "measured": "the per-position, per-plane-wave and per-position-reduction CPU costs; the totals are a model",
        "box_A": box,
        "gpts": [n, n],
        "slices": slices,
        "positions_per_frame": positions,
        "frames": frames,
        "multislice_cpu_s_per_position": t_position,
        "prism_interpolation": list(f),
        "prism_window_A": box / f[0],
        "prism_cpu_s_per_plane_wave": t_beam,
        "prism_cpu_s_per_frame_setup": t_frame,
        "prism_reduce_and_pattern_cpu_s_per_position": t_reduce,
        **reduce,
        "multislice_cpu_core_hours": multislice_h,
        "prism_cpu_core_hours": prism_h,
        "speedup_model": multislice_h / prism_h,
    }


PARTS = ("scaling", "windows", "thick", "paper")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--periods", type=float, nargs="+", default=[2.0 / 3.0, 2.0])
    parser.add_argument("--windows", type=int, nargs="*", default=[3, 5, 6, 7])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="windows needs scaling")
    parser.add_argument("--merge", action="store_true", help="update the parts run in an existing --out file")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "multislice.json"))
    args = parser.parse_args(argv)
    abtem = import_abtem()
    t0 = time.perf_counter()
    out = json.loads(Path(args.out).read_text()) if args.merge and Path(args.out).exists() else {}
    out.setdefault("runs", []).append(
        {
            "parts": args.parts,
            "machine": machine_info(abtem=abtem.__version__, note="2-core CPU VM shared with other jobs"),
        }
    )
    if "scaling" in args.parts:
        case, scaling, first = bench_scaling(args)
        out.update(case=case, **summary(scaling, out["runs"][-1]["machine"]), scaling=scaling)
        write_json(args.out, out)  # after each part: a later failure keeps what was measured
        if "windows" in args.parts:
            out["windows"] = bench_windows(args, first)
            write_json(args.out, out)
    if "thick" in args.parts:
        out["thick"] = bench_thick()
        write_json(args.out, out)
    if "paper" in args.parts:
        out["paper_model"] = bench_paper(schema_defaults("stem", "prism_margin_A"))
    out["runs"][-1].update(seconds=time.perf_counter() - t0, load_average_at_end=list(os.getloadavg()))
    write_json(args.out, out)
    print(f"wrote {args.out} in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


#: The accuracy targets of the fast path on the nanocrystal scan.
TARGETS = {"largest_pattern_difference_max": 1e-3, "icom_correlation_min": 0.999, "speedup_min": 10.0}


def summary(scaling: list[dict], machine: dict) -> dict:
    """The headline numbers: speed and agreement on the largest scan (PRISM at the schema's default), the worst
    agreement over all scans, the targets and whether they are met, and the machine that measured them."""
    largest = scaling[-1]
    worst_difference = max(r["largest_pattern_difference"] for r in scaling)
    worst_icom = min(r["icom_correlation"] for r in scaling)
    return {
        "speedup": largest["speedup_cpu"],
        "speedup_definition": "multislice CPU time / PRISM CPU time, end to end, on the largest scan",
        "speedup_wall": largest["speedup_wall"],
        "speedup_at_positions": largest["positions"],
        "prism_interpolation": largest["prism"]["interpolation"],
        "prism_window_A": largest["prism"]["window_A"],
        "prism_plane_waves": largest["prism"]["plane_waves"],
        "largest_pattern_difference": largest["largest_pattern_difference"],
        "icom_correlation": largest["icom_correlation"],
        "largest_pattern_difference_all_scans": worst_difference,
        "icom_correlation_all_scans": worst_icom,
        "targets": TARGETS,
        "targets_met": bool(
            worst_difference <= TARGETS["largest_pattern_difference_max"]
            and worst_icom >= TARGETS["icom_correlation_min"]
            and largest["speedup_cpu"] >= TARGETS["speedup_min"]
        ),
        "machine": machine,
    }


if __name__ == "__main__":
    sys.exit(main())
