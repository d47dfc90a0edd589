"""Pipeline stages: file in, file out, one function per Snakemake rule.

Each function reads its inputs, calls the science modules and writes its outputs atomically, so
``workflow/scripts/*.py`` only translate the ``snakemake`` object into one call here and every
stage can be run and tested without Snakemake.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from octastem import io
from octastem.io import InputError

log = logging.getLogger("octastem")


def run_context(smk) -> dict:
    """Provenance of a Snakemake job: rule, wildcards, params (seeds), config hash, input checksums."""
    inputs = {}
    for path in smk.input:
        p = Path(path)
        if p.is_file():
            inputs[str(path)] = io.sha256_file(p)
    return {
        "rule": smk.rule,
        "wildcards": dict(smk.wildcards.items()),
        "params": {k: v for k, v in smk.params.items()},
        "config_sha256": io.config_hash(dict(smk.config)),
        "inputs_sha256": inputs,
    }


@contextlib.contextmanager
def logged(path: str | os.PathLike | None, smk=None):
    """Send logging, warnings and stderr (progress bars) of a stage to ``path``.

    With the ``snakemake`` object ``smk``, every provenance record written by the stage also
    carries the job's rule, params, config hash and input checksums (:data:`io.RUN_CONTEXT`).
    """
    if smk is not None:
        io.RUN_CONTEXT.clear()
        io.RUN_CONTEXT.update(run_context(smk))
    if path is None:
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        handler = logging.StreamHandler(fh)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        logging.captureWarnings(True)
        old = sys.stderr
        sys.stderr = fh
        if io.RUN_CONTEXT:
            log.info("provenance: %s", io.provenance())
        try:
            yield
        except Exception:
            log.exception("stage failed")
            raise
        finally:
            sys.stderr = old
            root.removeHandler(handler)


# ----------------------------------------------------------------------------------------------
# structure and MD
# ----------------------------------------------------------------------------------------------


def structure(output, n_vacancies: int, reps, a_A: float = 6.0, seed: int = 0) -> None:
    """Write the cubic FAPbBr3 supercell with ``n_vacancies`` FABr pairs removed (extxyz)."""
    from ase.io import write

    from octastem.structure import build_fapbbr3, check_geometry, composition, remove_fabr_pairs

    atoms = remove_fabr_pairs(build_fapbbr3(tuple(reps), a_A), int(n_vacancies), seed=int(seed))
    check_geometry(atoms, name=str(output))
    atoms.info["provenance"] = io.provenance(n_vacancies=int(n_vacancies), reps=list(reps), a_A=a_A, seed=int(seed))
    log.info("structure %s: %d atoms %s", output, len(atoms), composition(atoms))
    with io.atomic_path(output) as tmp:
        write(tmp, atoms, format="extxyz")


def read_structure(path):
    from ase.io import read

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: structure file not found")
    try:
        return read(path)
    except Exception as e:
        raise InputError(f"{path}: not a readable structure file ({e})") from e


def md(
    structure_path,
    output,
    potential: str = "reference_mace",
    device: str = "auto",
    dtype: str = "float32",
    threads: int = 1,
    model_path=None,
    **settings,
) -> None:
    """MACE NPT MD of the structure; ``potential`` is a registry entry or a model file path."""
    from octastem.md.mlp import check_elements, load_mace_model, mace_calculator
    from octastem.md.run import run_npt
    from octastem.registry import fetch, load_registry
    from octastem.structure import check_geometry

    atoms = read_structure(structure_path)
    check_geometry(atoms, name=str(structure_path))
    if model_path is None:
        model_path = fetch(potential) if potential in load_registry() else Path(potential)
    model = load_mace_model(model_path, device=device, dtype=dtype)
    check_elements(atoms, model, name=str(structure_path))
    calc = mace_calculator(model, device=device, dtype=dtype, threads=threads)
    t0 = time.perf_counter()
    run_npt(atoms, calc, output, **settings)
    wall = time.perf_counter() - t0
    n_steps = settings.get("total_fs", 0) / settings.get("timestep_fs", 1)
    log.info(
        "md %s: %d atoms, %.0f steps in %.1f s (%.1f ms/step)",
        output,
        len(atoms),
        n_steps,
        wall,
        1e3 * wall / max(n_steps, 1),
    )


def md_analysis(trajectory, output, average_structure, start_fs: float, reps, cutoff_A: float = 4.0) -> None:
    """Temperature, energy, lattice, Pb-Br-Pb angles and Br displacements over the analysis window."""
    import h5py
    from ase.io import write

    from octastem.md.analysis import analyse_frames, time_averaged_structure
    from octastem.md.run import read_frames

    frames = read_frames(trajectory, start_fs=start_fs)
    with h5py.File(trajectory, "r") as f:
        t = f["time_fs"][()]
        sel = t >= start_fs - 1e-6
        T = f["temperature_K"][()][sel]
        E = f["energy_eV"][()][sel]
        attrs = {k: io._plain(v) for k, v in f.attrs.items()}
    result = analyse_frames(frames, tuple(reps), cutoff_A=cutoff_A)
    result.update(
        trajectory=str(trajectory),
        n_atoms=len(frames[0]),
        n_frames_analysed=len(frames),
        window_fs=[frames[0].info["time_fs"], frames[-1].info["time_fs"]],
        temperature_K={"mean": float(T.mean()), "std": float(T.std())},
        energy_eV={"mean": float(E.mean()), "std": float(E.std())},
        settings={k: v for k, v in attrs.items() if k != "provenance"},
    )
    log.info(
        "%s: mean Pb-Br-Pb %.2f deg, Br perpendicular RMS %.3f A, T %.1f K",
        trajectory,
        result["pb_br_pb_angle_deg"]["mean"],
        result["br_displacement_A"]["perpendicular_rms"],
        result["temperature_K"]["mean"],
    )
    io.write_json(output, result)
    with io.atomic_path(average_structure) as tmp:
        write(tmp, time_averaged_structure(frames), format="extxyz")


def md_figures(analyses, systems: dict, outputs, series_output) -> None:
    """Per-system analysis plots and the angle-versus-vacancies figure (the study's S11)."""
    import json

    from octastem.md.analysis import plot_analysis, plot_vacancy_series

    results = [json.loads(Path(p).read_text()) for p in analyses]
    for name, res, out in zip(systems, results, outputs, strict=True):
        plot_analysis(res, out, title=f"{name}: {systems[name]} FABr vacancies")
    plot_vacancy_series([systems[n] for n in systems], results, series_output)


# ----------------------------------------------------------------------------------------------
# images and 4D-STEM
# ----------------------------------------------------------------------------------------------


def snapshot_potential(
    trajectory,
    output,
    start_fs: float,
    every_fs: float,
    n_cells,
    sampling_A: float = 0.05,
    slice_thickness_A: float | None = None,
) -> None:
    """Averaged abTEM projected potential of the snapshots of the analysis window."""
    from octastem.md.run import read_frames
    from octastem.potential import projected_potential

    frames = read_frames(trajectory, start_fs=start_fs, every_fs=every_fs)
    log.info("%s: %d snapshots from %.1f fs every %.1f fs", trajectory, len(frames), start_fs, every_fs)
    image, sampling, cell_xy = projected_potential(frames, sampling_A=sampling_A, slice_thickness_A=slice_thickness_A)
    io.write_image(
        output,
        image,
        sampling,
        kind="projected_potential",
        n_cells=list(n_cells),
        cell_A=list(cell_xy),
        n_snapshots=len(frames),
        provenance=io.provenance(trajectory=str(trajectory), start_fs=start_fs, every_fs=every_fs),
    )


def simulate_4dstem(trajectory, output, start_fs: float, frames: int, n_cells, threads: int = 1, **optics) -> None:
    """Noise-free 4D-STEM of ``frames`` snapshots spread evenly over the analysis window."""
    from octastem.md.run import read_frames, spread
    from octastem.stem.simulate import simulate_4dstem as simulate

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
    ``scan_cells`` MD in-plane cells at the centre (:mod:`octastem.nanocrystal`). ``optics`` go
    to :func:`octastem.stem.simulate_4dstem` (``sampling_A=None``: coarsest anti-aliased grid).
    The nanocrystal frames are written to ``structure_output`` (extxyz, one frame each).
    """
    from ase.io import write

    from octastem.md.run import read_frames, spread
    from octastem.stem.nanocrystal import build_nanocrystal
    from octastem.stem.simulate import simulate_4dstem as simulate

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
    log.info(
        "%s: %s patterns of %s pixels (%.2f mrad), potential sampling %.4f A, %.1f s",
        output,
        stem.extra["scan_shape"],
        list(stem.data.shape[2:]),
        stem.k_sampling_mrad,
        stem.extra["sampling_A"],
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


def dose(input_path, output, dose_e_per_A2: float, seed: int, averaged_cells: int = 1, summary=None) -> None:
    """A simulated sample: Poisson counts at its dose, averaged over ``averaged_cells`` equivalent cells.

    The sample stands for a scan over ``averaged_cells`` copies of the periodic MD cell, averaged
    over equivalent positions (template matching with perfect registration). The sum of N
    independent Poisson acquisitions of the same pattern is Poisson with N times the mean, so the
    averaged dataset is drawn directly at ``averaged_cells * dose`` electrons per area; the counts
    are the summed counts, ``dose_e_per_A2`` stays the dose of one acquisition. With
    ``averaged_cells=1`` it is one acquisition at the dose (a nanocrystal scan, averaged later by
    template matching): ``dose * step_x * step_y`` electrons per position.
    """
    from octastem.stem.simulate import add_poisson_noise, electrons_per_position

    stem = io.read_4dstem(input_path)
    if np.isfinite(stem.dose_e_per_A2):
        raise InputError(
            f"{input_path}: expected a noise-free simulation (dose_e_per_A2 = inf), found {stem.dose_e_per_A2}"
        )
    rng = np.random.default_rng(seed)
    steps = (
        float(stem.extra.get("scan_step_x_A", stem.scan_step_A)),
        float(stem.extra.get("scan_step_y_A", stem.scan_step_A)),
    )
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
    from octastem.stem.ingest import ingest as run

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


def average(input_path, output, summary, cell_shape, supercell, weights="nearest", image="adf") -> None:
    """Template-matching average of a scan onto one (super)cell (its extras: supercell, shape, steps).

    ``cell_shape=None``: the positions per (super)cell recorded by a simulated scan.
    """
    from octastem.stem.average import average_file

    result = average_file(
        input_path,
        output,
        cell_shape=None if cell_shape is None else tuple(cell_shape),
        supercell=tuple(supercell),
        weights=weights,
        image=image,
        progress=True,
    )
    io.write_json(summary, result)


def reconstruct(
    input_path, output, method: str, n_cells=None, sampling_A: float | None = None, weights=None, device="auto"
) -> None:
    """Phase image of a 4D-STEM dataset by ``method``, interpolated to ``sampling_A`` when finer than native."""
    from octastem.stem.reconstruct import reconstruct as run

    stem = io.read_4dstem(input_path)
    image, sampling = run(stem, method, sampling_A=sampling_A, weights=weights or None, device=device)
    # the in-plane cell the image spans: simulated scans carry it; averaged cells give it by their
    # (super)cell, output shape and per-axis steps; otherwise the image extent
    extra = stem.extra
    n_cells = extra.get("n_cells", extra.get("supercell", n_cells))
    ny, nx = image.shape
    if "cell_A" in extra:
        cell_xy = [float(extra["cell_A"][0]), float(extra["cell_A"][1])]
    elif {"scan_shape", "scan_step_x_A", "scan_step_y_A"} <= set(extra):
        rows, cols = extra["scan_shape"]
        cell_xy = [cols * float(extra["scan_step_x_A"]), rows * float(extra["scan_step_y_A"])]
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
        provenance=io.provenance(stem=str(input_path), method=method, sampling_A=sampling_A, weights=weights),
    )


# ----------------------------------------------------------------------------------------------
# fit and report
# ----------------------------------------------------------------------------------------------


def fit(
    image_path,
    table,
    summary,
    types=("Br",),
    window_A: float | None = None,
    se_method: str = "asymptotic",
    seed: int = 0,
) -> None:
    """Elliptical Gaussian fit of the columns of an image file -> CSV table + JSON summary."""
    from octastem.fit.core import fit_image_file

    fit_image_file(
        image_path,
        table,
        summary,
        n_cells=None,
        cell_A=None,
        types=tuple(types),
        window_A=window_A,
        se_method=se_method,
        seed=seed,
    )


def figure(image_path, table, output) -> None:
    import pandas as pd

    from octastem.fit.core import plot_model

    image, attrs = io.read_image(image_path)
    df = pd.read_csv(table)
    with io.atomic_path(output) as tmp:
        plot_model(image, attrs["sampling_A"], df, tmp, title=f"{Path(output).stem} ({attrs['kind']})")


def table1(
    fits,
    md_summaries,
    csv,
    md_path,
    html_path,
    columns,
    samples,
    systems,
    md,
    stem,
    structure,
    method,
    provenance_json=None,
    seeds=None,
) -> None:
    from octastem.report import write_table1

    df = write_table1(
        csv,
        md_path,
        html_path,
        columns,
        fits,
        samples,
        method,
        md_summaries,
        md,
        stem,
        structure,
        systems,
        provenance_json=provenance_json,
        seeds=seeds,
    )
    log.info("Table 1:\n%s", df[["label", "median_ellipticity", "se_median", "n_columns"]].to_string())


def table1_plot(csv, output) -> None:
    from octastem.report import plot_table1

    plot_table1(csv, output)


# ----------------------------------------------------------------------------------------------
# CNN
# ----------------------------------------------------------------------------------------------


def cnn_training_set(output, n_scans: int, n_frames: int, seed: int, static_fraction: float = 0.5) -> None:
    from octastem.cnn.data import write_shard

    with io.atomic_path(output) as tmp:
        summary = write_shard(
            tmp, n_scans=n_scans, seed=seed, n_frames=n_frames, progress=True, static_fraction=static_fraction
        )
    log.info("%s: %s", output, summary)


def train_cnn(shards, weights_output, train: dict, device: str = "auto", threads: int | None = None) -> None:
    """Train into the folder of ``weights_output`` (checkpoint there: a re-run resumes)."""
    from octastem.cnn.core import TrainConfig
    from octastem.cnn.core import train as run

    out_dir = Path(weights_output).parent
    summary = run(shards, out_dir, TrainConfig(**train), device=device, progress=True, threads=threads)
    log.info("training: %s", summary)


def evaluate_cnn(weights, metrics, averaged_cells: int, n_seeds: int, seed: int, device: str = "auto") -> None:
    from octastem.cnn.evaluate import evaluate

    result = evaluate(
        Path(metrics).parent, weights=weights, averaged_cells=averaged_cells, n_seeds=n_seeds, seed=seed, device=device
    )
    log.info("evaluation: %s", result)
