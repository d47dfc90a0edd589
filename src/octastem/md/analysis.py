"""Structure analysis of MD frames: Pb-Br-Pb angles, Br displacements, lattice parameters.

For every Br anion, its Pb neighbours within ``cutoff_A`` (4.0 A, minimum image) define the
Pb-Br-Pb bond angle and the Pb-Pb axis. The Br displacement from the Pb-Pb midpoint is split into
the component along that axis (parallel) and the rest (perpendicular): the perpendicular part is
the "split cubic" / octahedral-tilt signature that elongates projected Br columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ase import Atoms
from ase.neighborlist import neighbor_list

from octastem.io import InputError


@dataclass
class BrGeometry:
    """Per-Br geometry of one frame (only Br with exactly two Pb neighbours)."""

    angle_deg: np.ndarray
    disp_parallel_A: np.ndarray
    disp_perpendicular_A: np.ndarray
    br_index: np.ndarray
    axis: np.ndarray  # unit Pb-Pb axis per Br, (n, 3)


def br_geometry(atoms: Atoms, cutoff_A: float = 4.0) -> BrGeometry:
    """Pb-Br-Pb angle and Br displacement components of every two-fold coordinated Br."""
    i, j, D = neighbor_list("ijD", atoms, cutoff_A)
    z = atoms.numbers
    sel = (z[i] == 35) & (z[j] == 82)
    i, D = i[sel], D[sel]
    order = np.argsort(i, kind="stable")
    i, D = i[order], D[order]
    br, start, count = np.unique(i, return_index=True, return_counts=True)
    two = count == 2
    if not two.any():
        raise InputError("analysis: no Br with two Pb neighbours within the cutoff; is this a perovskite frame?")
    s = start[two]
    d1, d2 = D[s], D[s + 1]  # Br -> Pb vectors
    cosang = np.einsum("ij,ij->i", d1, d2) / (np.linalg.norm(d1, axis=1) * np.linalg.norm(d2, axis=1))
    angle = np.degrees(np.arccos(np.clip(cosang, -1.0, 1.0)))
    u = -(d1 + d2) / 2.0  # Br position relative to the Pb-Pb midpoint
    axis = (d2 - d1) / np.linalg.norm(d2 - d1, axis=1)[:, None]
    par = np.einsum("ij,ij->i", u, axis)
    perp = np.linalg.norm(u - par[:, None] * axis, axis=1)
    return BrGeometry(angle, par, perp, br[two], axis)


def analyse_frames(
    frames: list[Atoms], reps: tuple[int, int, int], cutoff_A: float = 4.0, bins_deg: np.ndarray | None = None
) -> dict:
    """Angle distribution, displacement statistics and lattice parameters over ``frames``."""
    if not frames:
        raise InputError("analysis: no frames to analyse")
    bins = np.arange(120.0, 180.5, 1.0) if bins_deg is None else bins_deg
    angles, par, perp, perp_vec_comp = [], [], [], []
    for a in frames:
        g = br_geometry(a, cutoff_A)
        angles.append(g.angle_deg)
        par.append(g.disp_parallel_A)
        perp.append(g.disp_perpendicular_A)
        perp_vec_comp.append(len(g.angle_deg))
    angles = np.concatenate(angles)
    par = np.concatenate(par)
    perp = np.concatenate(perp)
    cells = np.array([a.cell.lengths() for a in frames]) / np.asarray(reps, float)
    hist, edges = np.histogram(angles, bins=bins, density=True)
    return {
        "n_frames": len(frames),
        "n_br_per_frame": int(np.median(perp_vec_comp)),
        "pb_br_pb_angle_deg": {
            "mean": float(angles.mean()),
            "median": float(np.median(angles)),
            "std": float(angles.std()),
            "p5": float(np.percentile(angles, 5)),
            "histogram": {"edges": edges.tolist(), "density": hist.tolist()},
        },
        "br_displacement_A": {
            "parallel_rms": float(np.sqrt(np.mean(par**2))),
            "parallel_mean": float(par.mean()),
            "perpendicular_rms": float(np.sqrt(np.mean(perp**2))),
            "perpendicular_mean": float(perp.mean()),
        },
        "lattice_A": {
            k: {"mean": float(cells[:, n].mean()), "std": float(cells[:, n].std()), "series": cells[:, n].tolist()}
            for n, k in enumerate("abc")
        },
        "time_fs": [float(a.info.get("time_fs", np.nan)) for a in frames],
    }


def time_averaged_structure(frames: list[Atoms]) -> Atoms:
    """Mean structure over ``frames``: positions unwrapped frame to frame (minimum image), mean cell."""
    ref = frames[0]
    scaled = ref.get_scaled_positions(wrap=False)
    total = scaled.copy()
    prev = scaled
    for a in frames[1:]:
        s = a.get_scaled_positions(wrap=False)
        s = s - np.round(s - prev)  # follow each atom across the periodic boundary
        total += s
        prev = s
    mean_cell = np.mean([a.cell.array for a in frames], axis=0)
    out = Atoms(numbers=ref.numbers, cell=mean_cell, pbc=True)
    out.set_scaled_positions(total / len(frames))
    out.info["n_frames_averaged"] = len(frames)
    return out


def plot_analysis(result: dict, path, title: str = "") -> None:
    """Angle distribution and lattice parameters over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from octastem.io import atomic_path

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    h = result["pb_br_pb_angle_deg"]["histogram"]
    e = np.asarray(h["edges"])
    ax1.stairs(h["density"], e, fill=True, alpha=0.6)
    ax1.axvline(result["pb_br_pb_angle_deg"]["mean"], color="k", ls="--", lw=1)
    ax1.set_xlabel("Pb-Br-Pb angle (deg)")
    ax1.set_ylabel("density")
    t = np.asarray(result["time_fs"]) / 1000.0
    for k in "abc":
        ax2.plot(t, result["lattice_A"][k]["series"], label=k)
    ax2.set_xlabel("time (ps)")
    ax2.set_ylabel("pseudo-cubic lattice parameter (A)")
    ax2.legend(frameon=False)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=130)
    plt.close(fig)


def plot_vacancy_series(n_vacancies: list[int], results: list[dict], path) -> None:
    """Mean Pb-Br-Pb angle (and Br perpendicular RMS displacement) versus the number of FABr vacancies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from octastem.io import atomic_path

    order = np.argsort(n_vacancies)
    n = np.asarray(n_vacancies)[order]
    mean = np.array([results[i]["pb_br_pb_angle_deg"]["mean"] for i in order])
    std = np.array([results[i]["pb_br_pb_angle_deg"]["std"] for i in order])
    perp = np.array([results[i]["br_displacement_A"]["perpendicular_rms"] for i in order])
    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    ax.errorbar(n, mean, yerr=std, fmt="o-", capsize=3, color="tab:purple")
    ax.set_xlabel("number of FABr vacancies")
    ax.set_ylabel("mean Pb-Br-Pb angle (deg)")
    ax2 = ax.twinx()
    ax2.plot(n, perp, "s--", color="tab:green")
    ax2.set_ylabel("Br perpendicular RMS displacement (A)", color="tab:green")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=130)
    plt.close(fig)
