"""Stages of the MD rules: ``md`` (NPT MD), ``md_analysis`` and ``md_figures``."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from octastem import io
from octastem.stages.structure import read_structure

log = logging.getLogger("octastem")


def md(
    *,
    structure_path,
    output,
    potential: str,
    device: str,
    dtype: str,
    trust_model_file: bool,
    threads: int = 1,
    model_path=None,
    **settings,
) -> None:
    """MACE NPT MD of the structure; ``potential`` is a registry entry or a model file path.

    A model file whose sha256 is recorded nowhere (the registry, resources/student/) is unpickled
    only with ``trust_model_file`` (``md.trust_model_file``)."""
    from octastem.md import check_elements, load_mace_model, mace_calculator, run_npt
    from octastem.registry import resolve
    from octastem.structure import check_geometry

    atoms = read_structure(structure_path)
    check_geometry(atoms, name=str(structure_path))
    if model_path is None:
        model_path = resolve(potential)
    model = load_mace_model(model_path, device=device, dtype=dtype, trust=trust_model_file)
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


def md_analysis(*, trajectory, output, average_structure, start_fs: float, reps, cutoff_A: float = 4.0) -> None:
    """Temperature, energy, lattice, Pb-Br-Pb angles and Br displacements over the analysis window."""
    import h5py
    from ase.io import write

    from octastem.md import analyse_frames, read_frames, time_averaged_structure

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


def md_figures(*, analyses, systems: dict, outputs, series_output) -> None:
    """Per-system analysis plots and the angle-versus-vacancies figure (the study's S11)."""
    import json

    from octastem.md import plot_analysis, plot_vacancy_series

    results = [json.loads(Path(p).read_text()) for p in analyses]
    for name, res, out in zip(systems, results, outputs, strict=True):
        plot_analysis(res, out, title=f"{name}: {systems[name]} FABr vacancies")
    plot_vacancy_series([systems[n] for n in systems], results, series_output)
