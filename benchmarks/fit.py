"""Timing of the elliptical Gaussian column fit (octastem.fit) against the number of columns.

Builds periodic synthetic images of the FAPbBr3 [001] lattice in which every column is an
elliptical Gaussian (Br ratio 1.3 perpendicular to the bond, PbBr and FA ratio 1.1 at random
angles), with Gaussian noise, and times ``fit_columns(..., types=all)`` for the fast path and
(for the smallest sizes) the lmfit window path. Writes JSON with the machine, seconds per size,
columns per second, the fitted median Br ellipticity and the scaling exponent of time with N.

    python benchmarks/fit.py --sizes 100 300 1000 2000 --out benchmarks/results/fit.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np

from octastem.fit import TYPES, column_grid, fit_columns, model_image

A = 6.0
HEIGHT = {"PbBr": 3.0, "Br": 1.0, "FA": 0.3}
SIGMA = {"PbBr": 0.45, "Br": 0.45, "FA": 0.6}


def synthetic(n_columns: int, sampling: float, noise: float, seed: int):
    """Image with about ``n_columns`` elliptical columns (4 per unit cell)."""
    rng = np.random.default_rng(seed)
    cells = max(1, round(n_columns / 4))
    nx = math.ceil(math.sqrt(cells))
    ny = max(1, round(cells / nx))
    cell = (nx * A, ny * A)
    grid = column_grid((nx, ny), cell, (0.2, -0.1))
    grid["x"] = (grid["x"] + rng.uniform(-0.1, 0.1, len(grid))) % cell[0]
    grid["y"] = (grid["y"] + rng.uniform(-0.1, 0.1, len(grid))) % cell[1]
    br = grid["type"] == "Br"
    grid["height"] = grid["type"].map(HEIGHT)
    grid["sigma_major"] = grid["type"].map(SIGMA)
    grid["ratio"] = np.where(br, 1.3, 1.1)
    grid["angle_deg"] = np.where(br, np.where(grid["site"] == "Br_x", 90.0, 0.0), rng.uniform(-90, 90, len(grid)))
    shape = (round(cell[1] / sampling), round(cell[0] / sampling))
    img = model_image(shape, sampling, grid, 0.1) + rng.normal(0.0, noise, shape)
    return img, (nx, ny), cell, len(grid)


def time_fit(img, sampling, n_cells, cell, method, repeat):
    best, df = math.inf, None
    for _ in range(repeat):
        t0 = time.perf_counter()
        df = fit_columns(img, sampling, n_cells, cell, types=TYPES, method=method)
        best = min(best, time.perf_counter() - t0)
    return best, df


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 300, 1000, 2000], help="numbers of columns")
    ap.add_argument("--sampling", type=float, default=0.1, help="pixel size (A)")
    ap.add_argument("--noise", type=float, default=0.02, help="pixel noise SD (Br peak height 1)")
    ap.add_argument("--window-max", type=int, default=100, help="largest N also timed with the lmfit window path")
    ap.add_argument("--repeat", type=int, default=1, help="timings per size (the best is kept)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/fit.json"))
    args = ap.parse_args(argv)

    # warm up (imports, caches) on a small image
    img, n_cells, cell, _ = synthetic(16, args.sampling, args.noise, args.seed)
    fit_columns(img, args.sampling, n_cells, cell, types=TYPES, method="fast")

    runs = []
    for n in args.sizes:
        img, n_cells, cell, n_cols = synthetic(n, args.sampling, args.noise, args.seed)
        entry = {"n_columns": n_cols, "n_cells": list(n_cells), "image_shape": list(img.shape)}
        for method in ("fast", "window"):
            if method == "window" and n_cols > args.window_max:
                continue
            sec, df = time_fit(img, args.sampling, n_cells, cell, method, args.repeat if method == "fast" else 1)
            br = df[(df["type"] == "Br") & df["success"]]
            entry[method] = {
                "seconds": sec,
                "columns_per_second": n_cols / sec,
                "success_fraction": float(df["success"].mean()),
                "median_br_ellipticity": float(br["ellipticity"].median()),
            }
            print(
                f"N={n_cols:5d} {method:6s} {sec:8.3f} s  {n_cols / sec:8.1f} col/s  "
                f"median Br ratio {entry[method]['median_br_ellipticity']:.4f} (true 1.3)",
                flush=True,
            )
        runs.append(entry)

    ns = np.array([r["n_columns"] for r in runs], dtype=float)
    ts = np.array([r["fast"]["seconds"] for r in runs])
    exponent = float(np.polyfit(np.log(ns), np.log(ts), 1)[0]) if len(runs) >= 2 else math.nan
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        affinity = os.cpu_count()
    result = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "cpu_count": os.cpu_count(),
            "cpus_available": affinity,
        },
        "settings": {
            "sampling_A": args.sampling,
            "noise": args.noise,
            "seed": args.seed,
            "repeat": args.repeat,
            "types": list(TYPES),
            "true_br_ratio": 1.3,
        },
        "runs": runs,
        "fast_scaling_exponent": exponent,
        "seconds_per_1000_columns_fast": float(np.interp(1000, ns, ts * 1000 / ns)),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"scaling exponent {exponent:.2f}; wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
