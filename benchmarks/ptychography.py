"""Direct ptychography (quantem SSB and WDD) against iCOM and the CNN; JSON to benchmarks/results/ptychography.json.

Two measurements, both on split-cubic cells of :mod:`octastem.evaluation` at the pipeline's
``stem`` optics (schema defaults) unless ``--quick``:

- ``cost``: wall-clock seconds per 1,000 scan positions of :func:`octastem.stem.reconstruct` per
  method (``--threads`` torch/BLAS threads, default 2), on one noise-free scan (FA, delta 0,
  static, 4 cells thick, 0.4 A step, ``evaluation.in_plane_cells`` cells a side): the first call
  (``cold_s``: imports, model or library set-up) and the median of ``--repeats`` further calls.
  On the same scan, ``upsampling``: the Br ellipticity of quantem's SSB and WDD on the scan grid
  (as the ``ssb`` / ``wdd`` methods do) and with quantem's ``upsampling_factor`` = 4 (the CNN's
  output grid), against the band-limited truth: why the methods do not upsample.
- ``suite``: :func:`octastem.evaluation.run_suite` with methods icom, cnn, ssb, wdd on FA and Cs,
  delta 0 and 0.3 A, static, 4 cells thick, 0.4 A step, noise free and 48 e/A^2 averaged over
  64 cells (``evaluation.n_seeds`` noise draws); per method, case and acquisition the median Br
  ellipticity (mean over the seeds), the band-limited truth, the bias and the Pearson
  correlation with the band-limited true phase, and per method and acquisition the mean |bias|.

Heavy (minutes on 2 cores): run under ``flock /tmp/octastem-bench.lock``.

Usage: python benchmarks/ptychography.py [--threads 2] [--repeats 3] [--quick] [--output PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from octastem.config import schema_defaults  # noqa: E402
from octastem.io import machine_info, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
METHODS = ["icom", "cnn", "ssb", "wdd"]
#: the coarse optics and small cells of ``--quick`` (a check of the script, not a measurement)
QUICK_OPTICS = {"sampling_A": 0.1, "slice_thickness_A": 2.0}


def optics_of(quick: bool) -> dict:
    optics = schema_defaults("stem")
    optics = {**optics, **(QUICK_OPTICS if quick else {})}
    return {k: optics[k] for k in ("energy_eV", "semiangle_mrad", "max_angle_mrad", "sampling_A", "slice_thickness_A")}


def cost_and_upsampling(optics: dict, cells: int, thickness: int, repeats: int, threads: int) -> dict:
    """Seconds per 1,000 positions per method, and the SSB/WDD upsampling check, on one round-column scan."""
    from abtem.core.energy import energy2sigma
    from quantem.core.datastructures import Dataset4dstem
    from quantem.diffractive_imaging import DirectPtychography

    from octastem.cnn.evaluate import br_ellipticity, pearson
    from octastem.cnn.input import UPSAMPLE, band_limit, target_phase
    from octastem.evaluation import Case, case_frames, simulate_case, truths
    from octastem.stem import fourier_upsample, reconstruct

    ev = schema_defaults("evaluation")
    case = Case("FA", 0.0, "static", thickness, 0.4)
    frames = case_frames(case, cells, ev["frames"], ev["rattle_A"], 0)
    truth = truths(frames, cells, optics, ev["fit_method"])
    stem = simulate_case(frames, case, optics, threads)
    ny, nx = stem.data.shape[:2]
    positions = ny * nx
    sampling = case.scan_step_A / UPSAMPLE
    rows = []
    for method in METHODS:
        t0 = time.perf_counter()
        reconstruct(stem, method, sampling_A=sampling, device="cpu")
        cold = time.perf_counter() - t0
        walls = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            reconstruct(stem, method, sampling_A=sampling, device="cpu")
            walls.append(time.perf_counter() - t0)
        median = statistics.median(walls)
        rows.append(
            {
                "method": method,
                "cold_s": round(cold, 3),
                "median_s": round(median, 3),
                "walls_s": [round(w, 3) for w in walls],
                "s_per_1000_positions": round(1000 * median / positions, 3),
            }
        )
        print(f"cost {method}: {rows[-1]['s_per_1000_positions']} s / 1000 positions (cold {cold:.1f} s)", flush=True)

    e, alpha = optics["energy_eV"], optics["semiangle_mrad"]
    cell_A = truth["cell_A"]
    out_shape = (ny * UPSAMPLE, nx * UPSAMPLE)
    truth_phase = target_phase(
        energy2sigma(e) * np.asarray(truth["potential"], np.float64), out_shape, cell_A, e, alpha
    )
    data = Dataset4dstem.from_array(
        np.asarray(stem.data, dtype=np.float32),
        sampling=(stem.scan_step_y_A, stem.scan_step_x_A, stem.k_sampling_y_mrad, stem.k_sampling_x_mrad),
        units=("A", "A", "mrad", "mrad"),
    )
    ptycho = DirectPtychography.from_dataset4d(
        data, energy=e, semiangle_cutoff=alpha, rotation_angle=0.0, device="cpu", verbose=False
    )
    upsampling = []
    for kernel in ("ssb", "wdd"):
        for factor in (1, UPSAMPLE):
            t0 = time.perf_counter()
            ptycho.reconstruct(deconvolution_kernel=kernel, upsampling_factor=factor, verbose=False)
            wall = time.perf_counter() - t0
            image = fourier_upsample(np.asarray(ptycho.obj, dtype=np.float64), UPSAMPLE // factor)
            image = band_limit(image, (sampling, sampling), e, alpha)
            upsampling.append(
                {
                    "kernel": kernel,
                    "upsampling_factor": factor,
                    "br_ellipticity": br_ellipticity(image, sampling, (cells, cells), cell_A, ev["fit_method"]),
                    "pearson": pearson(truth_phase, image),
                    "seconds": round(wall, 3),
                }
            )
            print(f"upsampling {upsampling[-1]}", flush=True)
    return {
        "case": case.name,
        "in_plane_cells": cells,
        "scan_shape": [int(ny), int(nx)],
        "detector_shape": [int(n) for n in stem.data.shape[2:]],
        "positions": positions,
        "rows": rows,
        "upsampling": {
            "truth_band_limited": truth["truth_band_limited"],
            "truth_potential": truth["truth_potential"],
            "rows": upsampling,
        },
    }


def suite(optics: dict, cells: int, thickness: int, threads: int, n_seeds: int | None) -> dict:
    """The known-truth suite on the brief's cases; its table rows and the mean |bias| per method and acquisition."""
    from octastem.evaluation import run_suite

    settings = {
        "cations": ["FA", "Cs"],
        "delta_A": [0.0, 0.3],
        "phonons": ["static"],
        "thickness_cells": [thickness],
        "scan_step_A": [0.4],
        "in_plane_cells": cells,
        "acquisitions": [{"dose_e_per_A2": None}, {"dose_e_per_A2": 48.0, "averaged_cells": 64}],
    }
    if n_seeds is not None:
        settings["n_seeds"] = n_seeds
    with tempfile.TemporaryDirectory() as tmp:
        record = run_suite(tmp, settings=settings, optics=optics, methods=METHODS, device="cpu", threads=threads)
    keys = ("method", "case", "acquisition", "n_seeds", "br_ellipticity", "br_ellipticity_std")
    keys += ("truth_band_limited", "bias_band_limited", "truth_potential", "pearson", "n_failed_fits")
    table = [{k: r[k] for k in keys} for r in record["table"]]
    summary = []
    for method in METHODS:
        for label in dict.fromkeys(r["acquisition"] for r in table):
            sel = [r["bias_band_limited"] for r in table if r["method"] == method and r["acquisition"] == label]
            summary.append(
                {
                    "method": method,
                    "acquisition": label,
                    "mean_abs_bias_band_limited": float(np.mean(np.abs(sel))),
                    "max_abs_bias_band_limited": float(np.max(np.abs(sel))),
                }
            )
    return {
        "settings": record["settings"],
        "seconds_total": round(record["seconds_total"], 1),
        "seconds_per_case": {c["case"]: {k: round(v, 1) for k, v in c["seconds"].items()} for c in record["cases"]},
        "table": table,
        "summary": summary,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--quick", action="store_true", help="coarse optics, 2 cells a side, 2 thick, 1 seed: a script check"
    )
    p.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "ptychography.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    optics = optics_of(args.quick)
    cells = 2 if args.quick else int(schema_defaults("evaluation")["in_plane_cells"])
    thickness = 2 if args.quick else 4
    machine = machine_info(threads=args.threads, torch=torch.__version__)
    import quantem

    t0 = time.perf_counter()
    record = {
        "description": "quantem direct ptychography (reconstruct methods ssb, wdd) against icom and cnn",
        "quantem": quantem.__version__,
        "quick": bool(args.quick),
        "optics": optics,
        "machine": machine,
        "cost": cost_and_upsampling(optics, cells, thickness, args.repeats, args.threads),
        "suite": suite(optics, cells, thickness, args.threads, 1 if args.quick else None),
    }
    record["machine"]["load_average_at_end"] = list(os.getloadavg())
    record["seconds_total"] = round(time.perf_counter() - t0, 1)
    write_json(args.output, record)
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
