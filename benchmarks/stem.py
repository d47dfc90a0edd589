"""Throughput of raw 4D-STEM ingest and of the template-matching average; JSON to benchmarks/results/stem.json.

Measures
- ingest MB/s (source bytes per second) of a NumPy .npy and a chunked HDF5 file of uint16 counts,
  output float32 electrons (gzip level 1, the default, and uncompressed);
- the streamed average (virtual image, lattice, per-bin sums) of a float32 internal file of
  ``--scan`` x ``--scan`` positions of 128 x 128 patterns read from disk in chunks; with
  ``--scan`` below 256 the time for 256 x 256 is extrapolated linearly in the number of positions
  (the work per position is constant) and marked as such;
- peak memory: tracemalloc peak (numpy buffers) and the process's maximum resident set size.

Usage: python benchmarks/stem.py [--scan 128] [--ingest-mb 128] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import math
import resource
import shutil
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import h5py
import numpy as np

from octastem.io import machine_info, write_json
from octastem.stem import average_file, ingest

CAL = {"energy_eV": 300e3, "semiangle_mrad": 20.0, "scan_step_A": 0.3, "k_sampling_mrad": 0.5, "scan_rotation_deg": 0.0}
N_K = 128


def machine() -> dict:
    return machine_info(h5py=h5py.__version__, note="CPU machine shared with other jobs; times are wall-clock")


def cell_patterns(cell=16, period_px=10.0) -> tuple[np.ndarray, float]:
    """Clean 128x128 patterns (fraction of beam) for a cell of ``cell`` x ``cell`` positions: a bright
    disk shifted with position and a dark-field annulus brightest on the lattice points."""
    k = np.arange(N_K) - N_K // 2
    kx, ky = np.meshgrid(k, k)
    out = np.empty((cell, cell, N_K, N_K), np.float32)
    for p in range(cell):
        for q in range(cell):
            u1, u2 = q / cell, p / cell
            sx, sy = 2.0 * math.sin(2 * math.pi * u1), 2.0 * math.sin(2 * math.pi * u2)
            disk = 1.0 / (1.0 + np.exp((np.hypot(kx - sx, ky - sy) - 40.0) / 1.0))
            d = min(u1, 1 - u1) ** 2 + min(u2, 1 - u2) ** 2
            dark = (0.002 + 0.02 * math.exp(-d / (2 * 0.12**2))) * (np.hypot(kx, ky) > 48)
            pat = disk + dark
            out[p, q] = pat / pat.sum()
    return out, period_px


def write_scan(path: Path, scan: int, electrons: float = 200.0, seed: int = 0) -> None:
    """Internal-format file (float32, uncompressed, one scan row per HDF5 chunk), written row by row."""
    cell, period = cell_patterns()
    rng = np.random.default_rng(seed)
    theta = math.radians(7.0)
    a1 = period * np.array([math.cos(theta), math.sin(theta)])
    a2 = period * np.array([-math.sin(theta), math.cos(theta)])
    binv = np.linalg.inv(np.column_stack([a1, a2]))
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("data", shape=(scan, scan, N_K, N_K), dtype=np.float32, chunks=(1, scan, N_K, N_K))
        x = np.arange(scan, dtype=float)
        for r in range(scan):
            u = binv @ np.vstack([x, np.full(scan, float(r))])
            q = np.mod(np.round(u[0] * cell.shape[1]), cell.shape[1]).astype(int)
            p = np.mod(np.round(u[1] * cell.shape[0]), cell.shape[0]).astype(int)
            ds[r] = rng.poisson(cell[p, q] * electrons).astype(np.float32)
        attrs = dict(CAL, dose_e_per_A2=electrons / CAL["scan_step_A"] ** 2, source="benchmark", provenance="{}")
        for k, v in attrs.items():
            ds.attrs[k] = v


def bench_ingest(work: Path, megabytes: float) -> dict:
    rows = max(1, int(megabytes * 2**20 // (64 * N_K * N_K * 2)))
    shape = (rows, 64, N_K, N_K)
    rng = np.random.default_rng(1)
    npy = work / "raw.npy"
    arr = np.lib.format.open_memmap(npy, mode="w+", dtype=np.uint16, shape=shape)
    for r in range(rows):
        arr[r] = rng.poisson(0.02, size=shape[1:])
    arr.flush()
    del arr
    h5 = work / "raw.h5"
    with h5py.File(h5, "w") as f:
        ds = f.create_dataset("entry/data", shape=shape, dtype=np.uint16, chunks=(1, 64, N_K, N_K))
        src = np.load(npy, mmap_mode="r")
        for r in range(rows):
            ds[r] = src[r]
        del src
    out = {"source_shape": list(shape), "source_dtype": "uint16", "source_MB": npy.stat().st_size / 1e6}
    for name, path, kwargs in (
        ("npy_gzip", npy, {}),
        ("hdf5_gzip", h5, {"dataset": "entry/data"}),
        ("npy_uncompressed", npy, {"compression": None}),
    ):
        tracemalloc.start()
        summary = ingest(path, work / f"{name}.h5", calibration=CAL, progress=False, **kwargs)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        out[name] = {
            "MB_per_s": summary["MB_per_s"],
            "seconds": summary["seconds"],
            "chunk_rows": summary["chunk_rows"],
            "tracemalloc_peak_MB": peak / 1e6,
            "output_MB": (work / f"{name}.h5").stat().st_size / 1e6,
        }
        (work / f"{name}.h5").unlink()
    return out


def bench_average(work: Path, scan: int) -> dict:
    path = work / "scan.h5"
    t0 = time.perf_counter()
    write_scan(path, scan)
    t_write = time.perf_counter() - t0
    tracemalloc.start()
    summary = average_file(path, work / "cell.h5", cell_shape=(10, 10), progress=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    size = path.stat().st_size
    scale = (256 * 256) / (scan * scan)
    return {
        "scan_shape": [scan, scan],
        "pattern_shape": [N_K, N_K],
        "file_GB": size / 1e9,
        "seconds_write_input": t_write,
        "seconds_total": summary["seconds"],
        "seconds_virtual_image_and_lattice": summary["seconds_virtual_image_and_lattice"],
        "seconds_average_pass": summary["seconds_average"],
        "read_MB_per_s_two_passes": 2 * size / 1e6 / summary["seconds"],
        "tracemalloc_peak_MB": peak / 1e6,
        "lattice_a1_px": summary["lattice_a1_px"],
        "lattice_a2_px": summary["lattice_a2_px"],
        "snr_gain_expected": summary["snr_gain_expected"],
        "snr_gain_split_half": summary["snr_gain_split_half"],
        "seconds_256x256": summary["seconds"] * scale,
        "seconds_256x256_is_extrapolated": scan != 256,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scan", type=int, default=256, help="scan positions per side of the averaging benchmark")
    parser.add_argument("--ingest-mb", type=float, default=128.0, help="size of the ingest source files (MB, uint16)")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "stem.json")
    parser.add_argument("--keep", action="store_true", help="keep the scratch files")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="octastem-bench-", dir=args.workdir))
    try:
        result = {"machine": machine(), "ingest": bench_ingest(work, args.ingest_mb)}
        result["average"] = bench_average(work, args.scan)
        result["max_rss_MB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    write_json(args.out, result)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
