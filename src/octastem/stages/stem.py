"""Stages of the 4D-STEM rules: simulation (periodic cell, nanocrystal), dose, ingest, average, reconstruct."""

from __future__ import annotations

import json
import logging
import time

import numpy as np

from octastem import io
from octastem.io import InputError

log = logging.getLogger("octastem")


def simulate_4dstem(*, trajectory, output, start_fs: float, frames: int, n_cells, threads: int = 1, **optics) -> None:
    """Noise-free 4D-STEM of ``frames`` snapshots spread evenly over the analysis window."""
    from octastem.md import read_frames, spread
    from octastem.stem import simulate_4dstem as simulate

    chosen = spread(read_frames(trajectory, start_fs=start_fs), frames)
    log.info(
        "%s: simulating %d frozen-phonon frames at t = %s fs",
        trajectory,
        len(chosen),
        [a.info["time_fs"] for a in chosen],
    )
    stem = simulate(
        chosen,
        dose_e_per_A2=None,
        source="simulated",
        num_workers=threads,
        progress=True,
        provenance_extra={"trajectory": str(trajectory), "times_fs": [a.info["time_fs"] for a in chosen]},
        **optics,
    )
    stem.extra["n_cells"] = list(n_cells)
    io.write_4dstem(output, stem)


def simulate_nanocrystal(
    *,
    trajectory,
    output,
    structure_output,
    start_fs: float,
    frames: int,
    edge_A: float,
    vacuum_A: float,
    scan_cells: float,
    threads: int = 1,
    **optics,
) -> None:
    """Noise-free 4D-STEM of a cube nanocrystal cut from ``frames`` MD frames of the analysis window.

    Each frozen-phonon configuration is a nanocrystal cut from a different frame (frames spread
    evenly over the window, as for the periodic cell); the scan covers ``scan_cells`` x
    ``scan_cells`` MD in-plane cells at the centre (:mod:`octastem.stem.nanocrystal`). ``optics`` go
    to :func:`octastem.stem.simulate_4dstem` (``sampling_A=None``: coarsest anti-aliased grid;
    ``method``: "multislice" or "prism" with ``prism_interpolation`` / ``prism_margin_A``).
    The nanocrystal frames are written to ``structure_output`` (extxyz, one frame each).
    """
    from ase.io import write

    from octastem.md import read_frames, spread
    from octastem.stem import build_nanocrystal
    from octastem.stem import simulate_4dstem as simulate

    chosen = spread(read_frames(trajectory, start_fs=start_fs), frames)
    times = [a.info["time_fs"] for a in chosen]
    nc = build_nanocrystal(chosen, edge_A=edge_A, vacuum_A=vacuum_A, scan_cells=scan_cells)
    log.info(
        "%s: nanocrystal of %d x %d x %d cells (edge %s A, %d atoms) in a %s A box, scan over %g x %g MD cells "
        "(%.1f A from the faces), %d frozen-phonon frames at t = %s fs",
        trajectory,
        *nc.cells,
        [round(e, 2) for e in nc.edge_A],
        len(nc.frames[0]),
        [round(b, 2) for b in nc.box_A],
        nc.scan_cells,
        nc.scan_cells,
        nc.margin_A,
        len(chosen),
        times,
    )
    with io.atomic_path(structure_output) as tmp:
        write(tmp, nc.frames, format="extxyz")
    t0 = time.perf_counter()
    stem = simulate(
        nc.frames,
        dose_e_per_A2=None,
        source="simulated",
        num_workers=threads,
        progress=True,
        specimen="finite",
        scan_start_A=nc.scan_start_A,
        scan_period_A=nc.scan_period_A,
        scan_periods=nc.scan_cells,
        provenance_extra={"trajectory": str(trajectory), "times_fs": times, "nanocrystal_edge_A": list(nc.edge_A)},
        **optics,
    )
    settings = json.loads(stem.provenance)
    log.info(
        "%s: %s patterns of %s pixels (%.2f mrad), potential sampling %.4f A, %s%s, %.1f s",
        output,
        stem.scan_shape,
        list(stem.data.shape[2:]),
        stem.k_sampling_mrad,
        stem.extra["sampling_A"],
        settings.get("method", "multislice"),
        f" (interpolation {settings['prism_interpolation']}, window {settings['prism_window_A']} A)"
        if "prism_window_A" in settings
        else "",
        time.perf_counter() - t0,
    )
    stem.extra.update(
        nanocrystal_cells=list(nc.cells),
        nanocrystal_edge_A=list(nc.edge_A),
        nanocrystal_vacuum_A=nc.vacuum_A,
        nanocrystal_margin_A=nc.margin_A,
        md_reps=list(nc.reps),
        times_fs=times,
    )
    io.write_4dstem(output, stem)


def dose(*, input_path, output, dose_e_per_A2: float, seed: int, averaged_cells: int = 1, summary=None) -> None:
    """A simulated sample: Poisson counts at its dose, averaged over ``averaged_cells`` equivalent cells.

    The sample stands for a scan over ``averaged_cells`` copies of the periodic MD cell, averaged
    over equivalent positions (template matching with perfect registration). The sum of N
    independent Poisson acquisitions of the same pattern is Poisson with N times the mean, so the
    averaged dataset is drawn directly at ``averaged_cells * dose`` electrons per area; the counts
    are the summed counts, ``dose_e_per_A2`` stays the dose of one acquisition. With
    ``averaged_cells=1`` it is one acquisition at the dose (a nanocrystal scan, averaged later by
    template matching): ``dose * step_x * step_y`` electrons per position.
    """
    from octastem.rng import generator
    from octastem.stem import add_poisson_noise, electrons_per_position

    stem = io.read_4dstem(input_path)
    if np.isfinite(stem.dose_e_per_A2):
        raise InputError(
            f"{input_path}: expected a noise-free simulation (dose_e_per_A2 = inf), found {stem.dose_e_per_A2}"
        )
    rng = generator(seed, "stem_noise")
    steps = (float(stem.scan_step_x_A), float(stem.scan_step_y_A))
    stem.data = add_poisson_noise(stem.data, dose_e_per_A2 * averaged_cells, steps, rng)
    stem.dose_e_per_A2 = float(dose_e_per_A2)
    stem.extra["averaged_cells"] = int(averaged_cells)
    stem.extra["electrons_per_position"] = electrons_per_position(dose_e_per_A2 * averaged_cells, steps)
    stem.extra["intensity_unit"] = "counts"
    stem.source = "simulated"
    stem.provenance = io.provenance(
        clean=str(input_path), dose_e_per_A2=dose_e_per_A2, averaged_cells=averaged_cells, noise_seed=seed
    )
    counts = float(stem.data.sum(axis=(2, 3)).mean())
    log.info(
        "%s: %.1f e/A^2 per acquisition x %d averaged cells -> %.1f counts per position",
        output,
        dose_e_per_A2,
        averaged_cells,
        counts,
    )
    io.write_4dstem(output, stem)
    if summary is not None:
        io.write_json(
            summary,
            {
                "input": str(input_path),
                "output": str(output),
                "dose_e_per_A2": float(dose_e_per_A2),
                "averaged_cells": int(averaged_cells),
                "electrons_per_position": stem.extra["electrons_per_position"],
                "mean_counts_per_position": counts,
                "noise_seed": int(seed),
            },
        )


def ingest(
    *,
    raw,
    output,
    summary,
    fmt="auto",
    dataset=None,
    calibration=None,
    counts_per_electron=1.0,
    dose_rtol=0.2,
    dose_e_per_A2=None,
) -> None:
    """A measured dataset in any supported format -> the internal HDF5 format, with a JSON summary."""
    from octastem.stem import ingest as run

    calibration = dict(calibration or {})
    result = run(
        raw,
        output,
        fmt=fmt,
        dataset=dataset,
        calibration=calibration,
        dose_e_per_A2=dose_e_per_A2,
        counts_per_electron=counts_per_electron,
        dose_rtol=dose_rtol,
        progress=True,
    )
    io.write_json(summary, result)


def average(
    *,
    input_path,
    output,
    summary,
    cell_shape,
    supercell,
    weights="nearest",
    image="adf",
    lattice_A: float | None = None,
    lattice_tolerance: float | None = None,
) -> None:
    """Template-matching average of a scan onto one (super)cell (its extras: supercell, shape, steps).

    ``cell_shape=None``: the positions per (super)cell recorded by a simulated scan. ``lattice_A``
    (the config's structure.a_A) and ``lattice_tolerance``: the found lattice must agree with the
    structure model, else an InputError names both and nothing is written.
    """
    from octastem.stem import average_file

    result = average_file(
        input_path,
        output,
        cell_shape=None if cell_shape is None else tuple(cell_shape),
        supercell=tuple(supercell),
        weights=weights,
        image=image,
        lattice_A=lattice_A,
        lattice_tolerance=lattice_tolerance,
        progress=True,
    )
    if lattice_A is not None:
        log.info(
            "%s: lattice periods %.3f A and %.3f A, %.1f %% at most from structure.a_A = %g A; cell angle %.1f deg",
            input_path,
            *result["lattice_periods_A"],
            100 * result["lattice_deviation"],
            lattice_A,
            result["lattice_cell_angle_deg"],
        )
    io.write_json(summary, result)


def reconstruct(
    *,
    input_path,
    output,
    method: str,
    n_cells=None,
    sampling_A: float | None = None,
    weights=None,
    device="auto",
    thickness_A: float | None = None,
    wiener_eps: float | None = None,
) -> None:
    """Phase image of a 4D-STEM dataset by ``method``, interpolated to ``sampling_A`` when finer than
    native; ``thickness_A`` / ``wiener_eps``: those of ``icom_wiener`` (None: the file's
    ``thickness_A`` attribute / the default)."""
    from octastem.stem import reconstruct as run
    from octastem.stem.reconstruct import WIENER_EPS

    stem = io.read_4dstem(input_path)
    image, sampling = run(
        stem,
        method,
        sampling_A=sampling_A,
        weights=weights or None,
        device=device,
        thickness_A=thickness_A,
        wiener_eps=WIENER_EPS if wiener_eps is None else wiener_eps,
    )
    # the in-plane cell the image spans: simulated scans carry it; averaged cells give it by their
    # (super)cell, output shape and per-axis steps; otherwise the image extent
    extra = stem.extra
    n_cells = extra.get("n_cells", extra.get("supercell", n_cells))
    ny, nx = image.shape
    if stem.cell_A is not None:
        cell_xy = [float(stem.cell_A[0]), float(stem.cell_A[1])]
    elif stem.scan_shape is not None:
        rows, cols = stem.scan_shape
        cell_xy = [cols * float(stem.scan_step_x_A), rows * float(stem.scan_step_y_A)]
    else:
        cell_xy = [nx * sampling, ny * sampling]
    io.write_image(
        output,
        image,
        sampling,
        kind=f"phase_{method}",
        n_cells=list(n_cells),
        cell_A=cell_xy,
        dose_e_per_A2=stem.dose_e_per_A2,
        source=stem.source,
        provenance=io.provenance(
            stem=str(input_path),
            method=method,
            sampling_A=sampling_A,
            weights=weights,
            **({"thickness_A": thickness_A, "wiener_eps": wiener_eps} if method == "icom_wiener" else {}),
        ),
    )
