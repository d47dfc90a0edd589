"""How the scan step limits a column-shape measurement; JSON to benchmarks/results/sampling.json.

A 4D-STEM phase method that gives one pixel per scan position (iCOM, deconvolved iCOM, SSB,
WDD) can at best return the object's phase band-limited to |q| <= 2 alpha / lambda, sampled at
the scan positions. This benchmark hands the fit exactly that best case: the band-limited
projected potential of split-cubic cells (:mod:`octastem.evaluation`, static, at the pipeline's
``stem`` optics) sampled at each scan step, Fourier-interpolated to ``reconstruct.sampling_A`` /
4 pixels per step as the pipeline does, band-limited again and fitted (``fit.method`` fast). Its
median Br ellipticity is compared with the band-limited truth on the simulation grid.

The steps at or below lambda / (4 alpha) (0.197 A at 300 kV, 25 mrad) hold the whole band and
reproduce the truth; coarser steps fold the band onto itself (aliasing), and the error depends
on the structure: no method that works on the scan grid can remove it, and no constant offset
corrects it. The suite's steps (0.2 and 0.4 A) are among those measured.

Cheap (no multislice: about a minute on 2 cores).

Usage: python benchmarks/sampling.py [--steps 0.1,0.15,0.2,0.25,0.3,0.4] [--output PATH]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from octastem.config import schema_defaults
from octastem.io import machine_info, write_json

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", default="0.1,0.15,0.2,0.25,0.3,0.4")
    parser.add_argument("--deltas", default="0,0.1,0.2,0.3")
    parser.add_argument("--cations", default="FA,Cs")
    parser.add_argument("--thickness", type=int, default=4)
    parser.add_argument("--output", default=str(REPO / "benchmarks/results/sampling.json"))
    args = parser.parse_args(argv)

    from octastem.cnn.evaluate import br_ellipticity
    from octastem.cnn.input import band_limit
    from octastem.evaluation import Case, case_frames, scan_grid_ellipticity
    from octastem.potential import projected_potential
    from octastem.stem import nyquist_step_A

    stem = schema_defaults("stem")
    optics = {k: stem[k] for k in ("energy_eV", "semiangle_mrad", "sampling_A")}
    cells = int(schema_defaults("evaluation")["in_plane_cells"])
    steps = [float(s) for s in args.steps.split(",")]
    limit = nyquist_step_A(optics["energy_eV"], optics["semiangle_mrad"])
    t0 = time.perf_counter()
    rows = []
    for cation in args.cations.split(","):
        for delta in (float(d) for d in args.deltas.split(",")):
            case = Case(cation, delta, "static", args.thickness, steps[0])
            frames = case_frames(case, cells, 1, 0.0, 0)
            image, sampling, cell = projected_potential(frames, sampling_A=optics["sampling_A"], progress=False)
            ny, nx = image.shape
            limited = band_limit(image, (cell[0] / nx, cell[1] / ny), optics["energy_eV"], optics["semiangle_mrad"])
            truth = br_ellipticity(limited, sampling, (cells, cells), cell, "fast")
            for step in steps:
                ell = scan_grid_ellipticity(limited, cell, cells, step, optics["energy_eV"], optics["semiangle_mrad"])
                rows.append(
                    {
                        "cation": cation,
                        "delta_A": delta,
                        "thickness_cells": args.thickness,
                        "scan_step_A": step,
                        "holds_band": bool(step <= limit * 1.02),
                        "truth_band_limited": truth,
                        "sampled": ell,
                        "error": ell - truth,
                    }
                )
                print(
                    f"{cation} delta {delta:.2f} step {step:.2f}: truth {truth:.3f} sampled {ell:.3f} "
                    f"error {ell - truth:+.3f}",
                    flush=True,
                )
    worst = {}
    for step in steps:
        errs = [abs(r["error"]) for r in rows if r["scan_step_A"] == step and np.isfinite(r["error"])]
        worst[f"{step:g}"] = max(errs) if errs else float("nan")
    record = {
        "benchmark": "sampling",
        "optics": optics,
        "in_plane_cells": cells,
        "nyquist_step_A": limit,
        "rows": rows,
        "max_abs_error_per_step": worst,
        "seconds": time.perf_counter() - t0,
        "machine": machine_info(),
    }
    write_json(args.output, record)
    print(
        f"lambda/(4 alpha) = {limit:.3f} A; max |error| per step: "
        + ", ".join(f"{k} A: {v:.3f}" for k, v in worst.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
