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
    tiles: str = "distinct",
    threads: int = 1,
    **optics,
) -> None:
    """Noise-free 4D-STEM of ``frames`` cube nanocrystals (frozen-phonon configurations) cut from the
    MD frames of the analysis window.

    ``tiles`` "distinct": every tile (copy of the MD cell) of every configuration comes from another
    frame of the window (:func:`octastem.stem.nanocrystal.tile_frames`), so the scan holds as many
    independent realisations of the thermal motion as tiles times configurations, as a measured
    crystal's unit cells do; "same": each configuration is cut whole from one frame (frames spread
    evenly over the window, as for the periodic cell). The scan covers ``scan_cells`` x
    ``scan_cells`` MD in-plane cells at the centre (:mod:`octastem.stem.nanocrystal`). ``optics`` go
    to :func:`octastem.stem.simulate_4dstem` (``sampling_A=None``: coarsest anti-aliased grid;
    ``method``: "multislice" or "prism" with ``prism_interpolation`` / ``prism_margin_A``).
    The nanocrystal frames are written to ``structure_output`` (extxyz, one frame each).
    """
    from ase.io import write

    from octastem.md import read_frames, spread
    from octastem.stem import build_nanocrystal
    from octastem.stem import simulate_4dstem as simulate

    window = read_frames(trajectory, start_fs=start_fs)
    if tiles == "distinct":
        nc = build_nanocrystal(window, edge_A=edge_A, vacuum_A=vacuum_A, scan_cells=scan_cells, configurations=frames)
        times = sorted({t for row in nc.info["tile_times_fs"] for t in row})
        chosen = nc.frames
    elif tiles == "same":
        chosen = spread(window, frames)
        times = [a.info["time_fs"] for a in chosen]
        nc = build_nanocrystal(chosen, edge_A=edge_A, vacuum_A=vacuum_A, scan_cells=scan_cells)
    else:
        raise InputError(f"stem.nanocrystal.tiles: expected 'distinct' or 'same', got {tiles!r}")
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
        nanocrystal_tiles=tiles,
        n_snapshots=len(times),
    )
    io.write_4dstem(output, stem)


def _measured_chain(path) -> dict:
    """The imaging chain of a measured dataset (internal HDF5), read without loading its patterns:
    optics, per-axis scan steps and detector sampling, scan and detector shape, dose."""
    import h5py

    with h5py.File(path, "r") as f:
        if "data" not in f:
            raise InputError(f"{path}: no 'data' dataset; expected an ingested 4D-STEM file")
        shape = f["data"].shape
        stem = io.Stem4D.from_attrs(np.empty((0, 0, 0, 0), np.float32), dict(f["data"].attrs) | dict(f.attrs))
    if len(shape) != 4:
        raise InputError(f"{path}: 'data' has shape {shape}; expected (scan_y, scan_x, k_y, k_x)")
    if not (np.isfinite(stem.dose_e_per_A2) and stem.dose_e_per_A2 > 0):
        raise InputError(f"{path}: field 'dose_e_per_A2' = {stem.dose_e_per_A2}; a measured dataset needs its dose")
    return {
        "energy_eV": float(stem.energy_eV),
        "semiangle_mrad": float(stem.semiangle_mrad),
        "scan_step_x_A": float(stem.scan_step_x_A),
        "scan_step_y_A": float(stem.scan_step_y_A),
        "k_sampling_x_mrad": float(stem.k_sampling_x_mrad),
        "k_sampling_y_mrad": float(stem.k_sampling_y_mrad),
        "scan_shape": [int(shape[0]), int(shape[1])],
        "detector_shape": [int(shape[2]), int(shape[3])],
        "dose_e_per_A2": float(stem.dose_e_per_A2),
    }


def simulate_like(
    *,
    measured,
    trajectory,
    output,
    structure_output,
    start_fs: float,
    frames: int,
    thickness_A: float | None,
    vacuum_A: float,
    seed: int,
    threads: int = 1,
    **optics,
) -> None:
    """A measured dataset's like-for-like twin: MD frames as a nanocrystal scanned with the dataset's
    own chain (:func:`_measured_chain`: energy, semi-angle, scan step, detector sampling and extent,
    dose) and Poisson noise at its dose, to be averaged, reconstructed and fitted like the dataset.

    The crystal is a cube of edge ``thickness_A`` (reconstruct.thickness_A, the specimen's thickness
    along the beam), enlarged where the scan plus 3 A on each side needs more room (the log says so);
    the scan covers the whole number of MD cells nearest the measured scan's extent (at least one)."""
    import os
    import tempfile
    from pathlib import Path

    from octastem.md import read_frames

    if thickness_A is None:
        raise InputError(
            f"{measured}: reconstruct.thickness_A is null; the like-for-like simulation of a measured sample "
            "needs the specimen thickness (A)"
        )
    chain = _measured_chain(measured)
    window = read_frames(trajectory, start_fs=start_fs)
    cell = np.mean([np.asarray(a.cell.lengths()) for a in window], axis=0)
    extent = np.array(
        [chain["scan_shape"][1] * chain["scan_step_x_A"], chain["scan_shape"][0] * chain["scan_step_y_A"]]
    )
    scan_cells = float(max(1, round(float(np.min(extent / cell[:2])))))
    step = 0.5 * (chain["scan_step_x_A"] + chain["scan_step_y_A"])
    k_sampling = 0.5 * (chain["k_sampling_x_mrad"] + chain["k_sampling_y_mrad"])
    max_angle = k_sampling * (min(chain["detector_shape"]) // 2)
    n_pb = int(np.sum(window[0].numbers == 82))
    a_A = float(np.prod(cell) / max(n_pb, 1)) ** (1.0 / 3.0)  # pseudo-cubic lattice period
    # the scan, 3 A on each side (the nanocrystal's margin) and one period for the faces' rounding
    edge_A = max(float(thickness_A), scan_cells * float(cell[:2].max()) + 2 * 3.0 + a_A)
    if edge_A > float(thickness_A) + 1e-9:
        log.warning(
            "%s: the crystal is %.1f A thick instead of reconstruct.thickness_A = %g A: a cube must hold the %g x %g "
            "MD-cell scan and 3 A on each side",
            output,
            edge_A,
            thickness_A,
            scan_cells,
            scan_cells,
        )
    log.info(
        "%s: twin of %s: %.0f keV, %.1f mrad, step %.3f A, detector %.3f mrad to %.1f mrad, scan %s (%g MD cells), "
        "%.1f e/A^2",
        output,
        measured,
        chain["energy_eV"] / 1e3,
        chain["semiangle_mrad"],
        step,
        k_sampling,
        max_angle,
        chain["scan_shape"],
        scan_cells,
        chain["dose_e_per_A2"],
    )
    fd, clean = tempfile.mkstemp(prefix=f".{Path(output).name}.clean.", suffix=".h5", dir=Path(output).parent)
    os.close(fd)
    try:
        simulate_nanocrystal(
            trajectory=trajectory,
            output=clean,
            structure_output=structure_output,
            start_fs=start_fs,
            frames=frames,
            edge_A=edge_A,
            vacuum_A=vacuum_A,
            scan_cells=scan_cells,
            threads=threads,
            energy_eV=chain["energy_eV"],
            semiangle_mrad=chain["semiangle_mrad"],
            scan_step_A=step,
            max_angle_mrad=max_angle,
            sampling_A=None,
            detector_sampling_mrad=k_sampling,
            **optics,
        )
        dose(input_path=clean, output=output, dose_e_per_A2=chain["dose_e_per_A2"], seed=seed)
    finally:
        Path(clean).unlink(missing_ok=True)


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
    origin="plane",
) -> None:
    """A measured dataset in any supported format -> the internal HDF5 format, with a JSON summary.

    ``origin``: the descan fit of ``samples.<name>.raw.origin`` (default "plane": the disc centred and
    the detector turned onto the scan axes before anything else sees the patterns; "off": as stored)."""
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
        origin=origin,
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
