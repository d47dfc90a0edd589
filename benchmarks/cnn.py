"""Throughput of CNN phase reconstruction vs iCOM on the same data; JSON to benchmarks/results/cnn.json.

Measures, on a synthetic Poisson 4D-STEM scan of ``--scan`` x ``--scan`` positions of
``--n-k`` x ``--n-k`` patterns (the pipeline's 60 mrad detector at 1.64 mrad/pixel is 73 x 73):

- end-to-end patterns per second of :func:`octastem.cnn.predict_phase` on CPU with ``--threads``
  threads (rebinning, kernels, network, overlap-add), from memory and streamed from an HDF5 file;
- the network alone (forward passes on prepared inputs);
- iCOM (:func:`octastem.stem.reconstruct.icom`) on the same data, and the ratio CNN / iCOM;
- the same on the GPU when one is visible (``torch.cuda.is_available()``).

Usage: python benchmarks/cnn.py [--scan 64] [--n-k 73] [--threads 2] [--weights PATH] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from octastem import cnn
from octastem.io import Stem4D, machine_info, write_4dstem, write_json
from octastem.stem import icom


def machine(threads: int) -> dict:
    return machine_info(
        torch_threads=threads,
        torch=torch.__version__,
        gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        note="CPU machine shared with other jobs; times are wall-clock, best of the repeats",
    )


def synthetic_stem(scan: int, n_k: int, seed: int = 0) -> Stem4D:
    """Poisson patterns of a bright-field disc (alpha = 25 mrad at 1.64 mrad/px) at ~4 e/pattern."""
    rng = np.random.default_rng(seed)
    k = np.arange(n_k) - n_k // 2
    disc = ((k[:, None] ** 2 + k[None, :] ** 2) <= (25 / 1.64) ** 2).astype(np.float32)
    disc /= disc.sum()
    data = rng.poisson(disc * 4.3, size=(scan, scan, n_k, n_k)).astype(np.float32)
    return Stem4D(
        data=data, energy_eV=300e3, semiangle_mrad=25.0, scan_step_A=0.3, k_sampling_mrad=1.64, dose_e_per_A2=48.0
    )


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scan", type=int, default=64)
    ap.add_argument("--n-k", type=int, default=73)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--output", default=str(Path(__file__).parent / "results" / "cnn.json"))
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    stem = synthetic_stem(args.scan, args.n_k)
    n = args.scan * args.scan
    result = {
        "machine": machine(args.threads),
        "scan": [args.scan, args.scan],
        "pattern_shape": [args.n_k, args.n_k],
        "n_patterns": n,
    }

    model = cnn.load_model(args.weights, device="cpu")
    cnn.predict_phase(stem, model=model)  # warm-up (first calls allocate, iCOM imports abTEM)
    icom(stem)
    t_cnn = best_time(lambda: cnn.predict_phase(stem, model=model), args.repeats)
    t_icom = best_time(lambda: icom(stem), args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scan.h5"
        write_4dstem(path, stem)
        t_file = best_time(lambda: cnn.predict_phase(path, model=model, chunk_rows=8), args.repeats)
    x = torch.from_numpy(
        np.random.default_rng(1).normal(size=(4096, cnn.KERNEL**2 + 2, cnn.N_K, cnn.N_K)).astype(np.float32)
    )
    with torch.inference_mode():
        t_net = best_time(lambda: model(x), args.repeats)
    result["cpu"] = {
        "cnn_patterns_per_s": n / t_cnn,
        "cnn_streamed_hdf5_patterns_per_s": n / t_file,
        "cnn_network_only_patterns_per_s": len(x) / t_net,
        "icom_patterns_per_s": n / t_icom,
        "cnn_over_icom_throughput": t_icom / t_cnn,
        "seconds": {"cnn": t_cnn, "cnn_hdf5": t_file, "network_4096": t_net, "icom": t_icom},
        "goal_patterns_per_s": 300,
        "goal_met": n / t_cnn >= 300,
    }
    if torch.cuda.is_available():
        gmodel = cnn.load_model(args.weights, device="cuda")
        cnn.predict_phase(stem, model=gmodel, batch_size=65536)
        torch.cuda.synchronize()
        t_gpu = best_time(lambda: cnn.predict_phase(stem, model=gmodel, batch_size=65536), args.repeats)
        xg = x.repeat(16, 1, 1, 1).cuda()
        with torch.inference_mode():
            gmodel(xg)
            torch.cuda.synchronize()

            def net():
                gmodel(xg)
                torch.cuda.synchronize()

            t_gnet = best_time(net, args.repeats)
        result["gpu"] = {
            "device": torch.cuda.get_device_name(0),
            "cnn_patterns_per_s": n / t_gpu,
            "cnn_network_only_patterns_per_s": len(xg) / t_gnet,
            "cnn_over_icom_throughput": t_icom / t_gpu,
            "goal_patterns_per_s": 100_000,
            "goal_met": n / t_gpu >= 100_000,
        }
    else:
        result["gpu"] = None
    write_json(args.output, result)
    print(f"wrote {args.output}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
