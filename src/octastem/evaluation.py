"""Known-truth evaluation suite of the phase reconstructions: does a method preserve column shape?

Every case is a cubic lead-bromide perovskite whose projected Br column shape is set by
construction (split-cubic model): each Br is displaced by ``delta_A`` perpendicular to its
Pb-Br-Pb bond, the sign alternating from cell to cell along the beam (z), so a Br column seen
along [001] is two sub-columns 2 x delta apart (delta = 0: round). Br on the x bonds moves along
y, Br on the y bonds along x, and the Br inside the PbBr columns (z bonds) along x, as in the
held-out structure of :mod:`octastem.cnn.evaluate`. The grid of cases (:func:`cases`) crosses

- ``delta_A``: the split (A);
- ``phonons``: ``static`` (one frame) or ``frozen`` (``frames`` frozen-phonon frames, each atom
  displaced by an isotropic Gaussian of ``rattle_A`` per axis);
- ``cations``: the A site, ``FA`` (the formamidinium molecule of
  :func:`octastem.structure.build_fapbbr3`, a = 6.0 A) or ``Cs`` (cubic CsPbBr3, a = 5.87 A);
- ``thickness_cells``: cells along the beam;
- ``scan_step_A``: the scan step (the two steps of one structure share its frames and truths).

Each case is a periodic cell of ``in_plane_cells`` x ``in_plane_cells`` cells, simulated by
:func:`octastem.stem.simulate_4dstem` (abTEM multislice, frozen phonons averaged) at the optics
given (the pipeline's ``stem`` settings). Nothing here trains: the suite only reconstructs, and
FAPbBr3 stays out of every training set (:data:`octastem.cnn.data.HELD_OUT`); cubic CsPbBr3 is of
the perovskite prototype the CNN is trained on, so its cases are in the CNN's training family.

Truth per case: the median Br ellipticity fitted by :func:`octastem.fit.fit_columns` on

(a) ``truth_potential``: the frame-averaged projected potential (:func:`octastem.potential.projected_potential`,
    abTEM infinite projection) on the simulation grid; the shape of the columns themselves;
(b) ``truth_band_limited``: the same image low-pass filtered to |k| <= 2 alpha / lambda. That is
    the highest spatial frequency any 4D-STEM phase method recovers with a probe of semi-angle
    alpha: the object's frequency q is seen where the bright-field discs scattered to +q and
    -q overlap the undiffracted disc, and two discs of radius alpha / lambda overlap only for
    |q| < 2 alpha / lambda (the limit of ptychography and of iCOM, whose transfer is the aperture
    autocorrelation). It is also the CNN's training target (:func:`octastem.cnn.input.target_phase`).
    Within the limit iCOM further damps the high frequencies (the probe intensity convolves the
    phase); (b) is the shape a perfect method within the limit would give, not iCOM's.

Acquisitions per case (``acquisitions``): noise free, and Poisson noise at a dose (e/A^2) with an
average over ``averaged_cells`` equivalent cells (drawn at ``averaged_cells`` x dose, as the
pipeline's ``dose`` stage does; 1: a single acquisition), ``n_seeds`` noise draws each. Every
method (default: the schema's ``reconstruct.methods``, icom and cnn; any of
:data:`octastem.stem.reconstruct.METHODS`, e.g. the direct-ptychography ``ssb``) reconstructs every acquisition
(:func:`octastem.stem.reconstruct`, on ``UPSAMPLE`` pixels per scan step: iCOM Fourier-interpolated,
the CNN native); the image is band-limited to 2 alpha / lambda (as in :mod:`octastem.cnn.evaluate`)
and fitted. Pearson correlation and SSIM are taken against the band-limited true phase (sigma(E)
times the projected potential) on the same grid.

Outputs (:func:`run_suite`): ``suite.csv`` (one row per method, case and acquisition: mean and
spread over the seeds of the median Br ellipticity, both truths, both biases, Pearson, SSIM),
``suite.json`` (settings, machine, timing per case, per-seed rows), ``suite.md`` (the biases as
Markdown tables, :func:`suite_markdown`) and ``suite.png``
(reconstructed versus true ellipticity per method, one point per case and acquisition, identity
line).
"""

from __future__ import annotations

import itertools
import math
import os
import time
import warnings
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from ase import Atoms

from octastem.io import InputError, machine_info, write_json, write_text
from octastem.rng import generator

#: cubic lattice parameters (A): FAPbBr3 as the project's structure model, cubic CsPbBr3 above 130 C
LATTICE_A = {"FA": 6.0, "Cs": 5.87}
CATIONS = tuple(LATTICE_A)
PHONONS = ("static", "frozen")

#: columns of ``suite.csv``, in order
SUITE_COLUMNS = (
    "method",
    "case",
    "cation",
    "delta_A",
    "phonons",
    "thickness_cells",
    "scan_step_A",
    "acquisition",
    "dose_e_per_A2",
    "averaged_cells",
    "n_seeds",
    "br_ellipticity",
    "br_ellipticity_std",
    "truth_potential",
    "truth_band_limited",
    "bias_potential",
    "bias_band_limited",
    "pearson",
    "pearson_std",
    "ssim",
    "ssim_std",
    "n_failed_fits",
)


@dataclass(frozen=True)
class Case:
    """One structure and scan of the suite: A-site ``cation``, Br split ``delta_A`` (A), ``phonons``
    ("static" or "frozen"), ``thickness_cells`` along the beam and ``scan_step_A`` (A)."""

    cation: str
    delta_A: float
    phonons: str
    thickness_cells: int
    scan_step_A: float

    @property
    def name(self) -> str:
        return f"{self.cation}_d{self.delta_A:.2f}_{self.phonons}_t{self.thickness_cells}_s{self.scan_step_A:.2f}"

    @property
    def structure_key(self) -> int:
        """A stable integer of the structure (everything but the scan step): its frames' random stream."""
        text = f"{self.cation}_{self.delta_A:.4f}_{self.phonons}_{self.thickness_cells}"
        return zlib.crc32(text.encode())


def cases(grid: dict, name: str = "evaluation") -> list[Case]:
    """All cases of ``grid`` (keys ``cations``, ``delta_A``, ``phonons``, ``thickness_cells``,
    ``scan_step_A``: lists crossed with each other), in that nesting order."""
    need = ("cations", "delta_A", "phonons", "thickness_cells", "scan_step_A")
    missing = [k for k in need if not grid.get(k)]
    if missing:
        raise InputError(f"{name}: the grid of cases needs non-empty lists {missing}")
    bad = [c for c in grid["cations"] if c not in CATIONS] + [p for p in grid["phonons"] if p not in PHONONS]
    if bad:
        raise InputError(f"{name}: unknown cations/phonons {bad}; expected cations {CATIONS}, phonons {PHONONS}")
    if min(grid["thickness_cells"]) < 1 or min(grid["scan_step_A"]) <= 0 or min(grid["delta_A"]) < 0:
        raise InputError(f"{name}: thickness_cells >= 1, scan_step_A > 0 and delta_A >= 0 expected, got {grid}")
    out = []
    for c, d, p, t, s in itertools.product(*(grid[k] for k in need)):
        out.append(Case(str(c), float(d), str(p), int(t), float(s)))
    return out


def split_cubic(cation: str, reps: tuple[int, int, int], delta_A: float) -> Atoms:
    """Cubic APbBr3 supercell (``cation`` "FA" or "Cs") with every Br displaced by +-``delta_A``
    perpendicular to its bond, the sign alternating from cell to cell along z.

    Br on the x bonds (1/2, 0, 0) move along y, on the y bonds (0, 1/2, 0) along x, on the z
    bonds (0, 0, 1/2) along x. Per-atom array ``site``: "Pb", "Br", "FA" or "Cs"."""
    from octastem.structure import build_fapbbr3

    if cation not in LATTICE_A:
        raise InputError(f"evaluation: cation must be one of {CATIONS}, got {cation!r}")
    a_A = LATTICE_A[cation]
    if cation == "FA":
        atoms = build_fapbbr3(tuple(reps), a_A)
    else:
        frac = [[0, 0, 0], [0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5], [0.5, 0.5, 0.5]]
        cell = Atoms(["Pb", "Br", "Br", "Br", "Cs"], scaled_positions=frac, cell=[a_A] * 3, pbc=True)
        cell.set_array("site", np.array(["Pb", "Br", "Br", "Br", "Cs"]))
        atoms = cell.repeat(tuple(int(r) for r in reps))
    site = atoms.arrays["site"]
    pos = atoms.positions.copy()
    layer = np.floor(pos[:, 2] / a_A + 0.25).astype(int)
    sign = np.where(layer % 2 == 0, 1.0, -1.0)
    frac = (pos % a_A) / a_A
    br = site == "Br"
    on_x = br & (np.abs(frac[:, 0] - 0.5) < 0.1)
    on_y = br & (np.abs(frac[:, 1] - 0.5) < 0.1)
    on_z = br & ~on_x & ~on_y
    pos[on_x, 1] += delta_A * sign[on_x]
    pos[on_y | on_z, 0] += delta_A * sign[on_y | on_z]
    atoms.positions = pos
    atoms.wrap()
    return atoms


def case_frames(case: Case, in_plane_cells: int, frames: int, rattle_A: float, seed: int) -> list[Atoms]:
    """The frames of ``case``: the split-cubic cell, once (static) or ``frames`` times with Gaussian
    thermal displacements of ``rattle_A`` per axis (frozen); drawn from the case's own stream, so
    the scan steps of one structure share them."""
    atoms = split_cubic(case.cation, (in_plane_cells, in_plane_cells, case.thickness_cells), case.delta_A)
    if case.phonons == "static":
        return [atoms]
    rng = generator(seed, "cnn_evaluate", 2, case.structure_key)
    out = []
    for _ in range(int(frames)):
        f = atoms.copy()
        f.positions = f.positions + rng.normal(scale=rattle_A, size=f.positions.shape)
        f.wrap()
        out.append(f)
    return out


def truths(frames: list[Atoms], in_plane_cells: int, optics: dict, fit_method: str) -> dict:
    """Projected potential of ``frames`` on the simulation grid and the two fitted truths.

    Returns ``potential`` (y, x, eV*A), ``sampling_A``, ``cell_A`` (Lx, Ly), ``truth_potential``
    and ``truth_band_limited`` (median Br ellipticities, NaN where the fit fails)."""
    from octastem.cnn.evaluate import br_ellipticity
    from octastem.cnn.input import band_limit
    from octastem.potential import projected_potential

    image, sampling, cell = projected_potential(frames, sampling_A=optics["sampling_A"], progress=False)
    n = (in_plane_cells, in_plane_cells)
    ny, nx = image.shape
    samp_xy = (cell[0] / nx, cell[1] / ny)
    limited = band_limit(image, samp_xy, optics["energy_eV"], optics["semiangle_mrad"])
    return {
        "potential": image,
        "sampling_A": sampling,
        "cell_A": cell,
        "truth_potential": br_ellipticity(image, sampling, n, cell, fit_method),
        "truth_band_limited": br_ellipticity(limited, sampling, n, cell, fit_method),
    }


def scan_grid_ellipticity(
    limited: np.ndarray, cell_A, n_cells: int, step: float, energy_eV: float, semiangle_mrad: float
) -> float:
    """Median Br ellipticity of the band-limited image ``limited`` (y, x; periodic over ``cell_A``
    of ``n_cells`` x ``n_cells`` cells) point-sampled at scan step ``step`` (the nearest grid that
    fits the cell), Fourier-interpolated to ``UPSAMPLE`` pixels per step, band-limited and fitted
    (fast): the best a method with one pixel per scan position can do (benchmarks/sampling.py).
    Equal to the truth while ``step`` <= lambda / (4 alpha); aliased beyond."""
    from scipy.signal import resample

    from octastem.cnn.evaluate import br_ellipticity
    from octastem.cnn.input import UPSAMPLE, band_limit

    lx, ly = cell_A
    ny, nx = limited.shape
    mx, my = int(round(lx / step)), int(round(ly / step))
    # point samples at the scan positions (not a low-pass resampling): the band-limited image is a
    # finite Fourier series, so its Fourier interpolation onto a grid k times the scan's is exact,
    # and every k-th pixel of that grid is a scan position
    k = max(1, int(np.ceil(max(nx / mx, ny / my))))
    dense = resample(resample(limited, my * k, axis=0), mx * k, axis=1)
    coarse = dense[::k, ::k]
    fine = resample(resample(coarse, my * UPSAMPLE, axis=0), mx * UPSAMPLE, axis=1)
    samp = lx / (mx * UPSAMPLE)
    fine = band_limit(fine, (samp, ly / (my * UPSAMPLE)), energy_eV, semiangle_mrad)
    return br_ellipticity(fine, samp, (n_cells, n_cells), cell_A, "fast")


def simulate_case(frames, case, optics: dict, threads: int | None):
    """The noise-free periodic 4D-STEM scan of a case's frames with the suite's ``optics``."""
    from octastem.stem import simulate_4dstem

    return simulate_4dstem(
        frames,
        energy_eV=optics["energy_eV"],
        semiangle_mrad=optics["semiangle_mrad"],
        scan_step_A=case.scan_step_A,
        sampling_A=optics["sampling_A"],
        slice_thickness_A=optics["slice_thickness_A"],
        max_angle_mrad=optics["max_angle_mrad"],
        num_workers=threads,
        specimen="periodic",
    )


def acquisition_label(dose: float | None, averaged_cells: int) -> str:
    """ "noise-free", or "<dose>x<cells>" (48x64: 48 e/A^2 averaged over 64 cells; 48x1 a single acquisition)."""
    return "noise-free" if dose is None else f"{dose:g}x{int(averaged_cells)}"


def _acquisitions(stem, acquisitions: list[dict], n_seeds: int, seed: int, key: int):
    """(label, dose, cells, noise seed k, Stem4D) of every acquisition of the noise-free ``stem``."""
    from dataclasses import replace

    from octastem.stem import add_poisson_noise

    steps = (float(stem.scan_step_x_A), float(stem.scan_step_y_A))
    for acq in acquisitions:
        dose, cells = acq.get("dose_e_per_A2"), int(acq.get("averaged_cells", 1))
        label = acquisition_label(dose, cells)
        for k in range(n_seeds if dose is not None else 1):
            if dose is None:
                yield label, None, cells, k, stem
                continue
            rng = generator(seed, "cnn_evaluate", 3, key, k, int(round(1000 * dose)), cells)
            data = add_poisson_noise(stem.data, float(dose) * cells, steps, rng)
            yield label, float(dose), cells, k, replace(stem, data=data, dose_e_per_A2=float(dose))


def run_case(
    case: Case,
    *,
    settings: dict,
    optics: dict,
    methods=None,
    weights=None,
    device: str = "auto",
    seed: int = 0,
    threads: int | None = None,
) -> dict:
    """Simulate, reconstruct and fit one case; returns ``rows`` (one per method, acquisition and
    seed), the two truths and the seconds spent (simulation, truth, reconstruction and fits)."""
    from abtem.core.energy import energy2sigma

    from octastem.cnn.evaluate import br_ellipticity, pearson, ssim
    from octastem.cnn.input import UPSAMPLE, band_limit, target_phase
    from octastem.config import schema_defaults
    from octastem.stem import reconstruct

    methods = tuple(schema_defaults("reconstruct")["methods"] if methods is None else methods)
    cells = int(settings["in_plane_cells"])
    fit_method = settings["fit_method"]
    t0 = time.perf_counter()
    frames = case_frames(case, cells, settings["frames"], settings["rattle_A"], seed)
    truth = truths(frames, cells, optics, fit_method)
    t_truth = time.perf_counter() - t0
    stem = simulate_case(frames, case, optics, threads)
    t_sim = time.perf_counter() - t0 - t_truth
    e, alpha = optics["energy_eV"], optics["semiangle_mrad"]
    ny, nx = stem.data.shape[:2]
    step_x, step_y = float(stem.scan_step_x_A), float(stem.scan_step_y_A)
    out_shape = (ny * UPSAMPLE, nx * UPSAMPLE)
    samp_xy = (step_x / UPSAMPLE, step_y / UPSAMPLE)
    sampling = 0.5 * (samp_xy[0] + samp_xy[1])
    cell_A = truth["cell_A"]
    thickness_A = case.thickness_cells * LATTICE_A[case.cation]  # icom_wiener's transfer: the known thickness
    phase = energy2sigma(e) * np.asarray(truth["potential"], dtype=np.float64)
    truth_phase = target_phase(phase, out_shape, cell_A, e, alpha)
    rows = []
    for label, dose, avg, k, acq in _acquisitions(
        stem, settings["acquisitions"], settings["n_seeds"], seed, case.structure_key
    ):
        for method in methods:
            image, _ = reconstruct(
                acq, method, sampling_A=sampling, weights=weights, device=device, thickness_A=thickness_A
            )
            if image.shape != out_shape:
                raise RuntimeError(f"evaluation: {method} image {image.shape}, expected {out_shape}")
            image = band_limit(image, samp_xy, e, alpha)
            ell = br_ellipticity(image, sampling, (cells, cells), cell_A, fit_method)
            rows.append(
                {
                    "method": method,
                    "case": case.name,
                    "acquisition": label,
                    "dose_e_per_A2": dose,
                    "averaged_cells": avg,
                    "seed": k,
                    "br_ellipticity": ell,
                    "pearson": pearson(truth_phase, image),
                    "ssim": ssim(truth_phase, image),
                }
            )
    t_all = time.perf_counter() - t0
    return {
        "rows": rows,
        "truth_potential": truth["truth_potential"],
        "truth_band_limited": truth["truth_band_limited"],
        "scan_shape": [int(ny), int(nx)],
        "n_atoms": len(frames[0]),
        "n_frames": len(frames),
        "seconds": {
            "truth": t_truth,
            "simulation": t_sim,
            "reconstruction_and_fits": t_all - t_sim - t_truth,
            "total": t_all,
        },
    }


def summarize(case: Case, result: dict) -> list[dict]:
    """Rows of ``suite.csv`` of one case: per method and acquisition, mean and spread (standard
    deviation) over the noise seeds, the truths and the biases of the mean against each."""
    out = []
    keys = []
    for r in result["rows"]:
        if (r["method"], r["acquisition"]) not in keys:
            keys.append((r["method"], r["acquisition"]))
    for method, label in keys:
        sel = [r for r in result["rows"] if r["method"] == method and r["acquisition"] == label]
        entry = {
            "method": method,
            "case": case.name,
            **asdict(case),
            "acquisition": label,
            "dose_e_per_A2": sel[0]["dose_e_per_A2"],
            "averaged_cells": sel[0]["averaged_cells"],
            "n_seeds": len(sel),
        }
        with warnings.catch_warnings():  # all fits failed: NaN, no warning
            warnings.simplefilter("ignore", RuntimeWarning)
            for key in ("br_ellipticity", "pearson", "ssim"):
                vals = np.array([r[key] for r in sel], dtype=float)
                entry[key] = float(np.nanmean(vals))
                entry[key + "_std"] = float(np.nanstd(vals))
            entry["n_failed_fits"] = int(np.isnan([r["br_ellipticity"] for r in sel]).sum())
        for kind in ("potential", "band_limited"):
            entry[f"truth_{kind}"] = result[f"truth_{kind}"]
            entry[f"bias_{kind}"] = entry["br_ellipticity"] - result[f"truth_{kind}"]
        out.append({k: entry[k] for k in SUITE_COLUMNS})
    return out


def _csv_value(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def write_table(path: str | os.PathLike, rows: list[dict]) -> None:
    """``suite.csv``: :data:`SUITE_COLUMNS`, one row per method, case and acquisition."""
    lines = [",".join(SUITE_COLUMNS)] + [",".join(_csv_value(r[k]) for k in SUITE_COLUMNS) for r in rows]
    write_text(path, "\n".join(lines) + "\n")


def suite_markdown(rows: list[dict]) -> str:
    """``suite.md``: per acquisition, a table of the bias of the median Br ellipticity against the
    band-limited truth (mean over the seeds ± their spread) with one row per method and one column
    per case, the truths in the header, then Pearson and SSIM of each method averaged over the cases."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    labels = list(dict.fromkeys(r["acquisition"] for r in rows))
    names = list(dict.fromkeys(r["case"] for r in rows))
    truth = {r["case"]: r["truth_band_limited"] for r in rows}
    lines = [
        "# Known-truth suite: bias of the median Br ellipticity against the band-limited truth",
        "",
        "Bias = reconstructed minus true (projected potential band-limited to 2 alpha / lambda); mean over the "
        "noise seeds ± their standard deviation. Pearson and SSIM: against the band-limited true phase.",
        "",
    ]
    for label in labels:
        lines += [f"## {label}", ""]
        lines.append("| method | " + " | ".join(f"{n} (truth {truth[n]:.3f})" for n in names) + " | Pearson | SSIM |")
        lines.append("|---|" + "---|" * (len(names) + 2))
        for method in methods:
            cells, pear, ssim_ = [], [], []
            for n in names:
                sel = [r for r in rows if r["method"] == method and r["acquisition"] == label and r["case"] == n]
                if not sel:
                    cells.append("")
                    continue
                r = sel[0]
                spread = f" ± {r['br_ellipticity_std']:.3f}" if r["n_seeds"] > 1 else ""
                cells.append(f"{r['bias_band_limited']:+.3f}{spread}")
                pear.append(r["pearson"])
                ssim_.append(r["ssim"])
            lines.append(
                f"| {method} | " + " | ".join(cells) + f" | {np.nanmean(pear):.3f} | {np.nanmean(ssim_):.3f} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot_suite(path: str | os.PathLike, rows: list[dict]) -> None:
    """Reconstructed versus true median Br ellipticity: one column of panels per method, rows for the
    two truths (projected potential, band-limited); one point per case and acquisition (colour:
    acquisition, marker: cation, bar: spread over the seeds) and the identity line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from octastem.io import atomic_path

    methods = list(dict.fromkeys(r["method"] for r in rows))
    labels = list(dict.fromkeys(r["acquisition"] for r in rows))
    colours = {lab: plt.cm.viridis(i / max(1, len(labels) - 1)) for i, lab in enumerate(labels)}
    markers = {"FA": "o", "Cs": "s"}
    kinds = (("truth_potential", "projected potential"), ("truth_band_limited", "band-limited to 2 alpha / lambda"))
    fig, axes = plt.subplots(len(kinds), len(methods), figsize=(4.2 * len(methods), 4.0 * len(kinds)), squeeze=False)
    values = [r[k] for r in rows for k in ("br_ellipticity", "truth_potential", "truth_band_limited")]
    finite = [v for v in values if np.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (1.0, 2.0)
    pad = 0.05 * max(hi - lo, 0.1)
    for j, method in enumerate(methods):
        for i, (key, title) in enumerate(kinds):
            ax = axes[i][j]
            ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.5", lw=1, ls="--", label="identity")
            for lab in labels:
                for cation, marker in markers.items():
                    sel = [
                        r for r in rows if r["method"] == method and r["acquisition"] == lab and r["cation"] == cation
                    ]
                    if not sel:
                        continue
                    ax.errorbar(
                        [r[key] for r in sel],
                        [r["br_ellipticity"] for r in sel],
                        yerr=[r["br_ellipticity_std"] for r in sel],
                        fmt=marker,
                        ms=5,
                        color=colours[lab],
                        mfc="none" if cation == "Cs" else colours[lab],
                        lw=0.8,
                        label=f"{lab}, {cation}",
                    )
            ax.set_xlim(lo - pad, hi + pad)
            ax.set_ylim(lo - pad, hi + pad)
            ax.set_aspect("equal")
            ax.set_xlabel(f"true Br ellipticity ({title})")
            ax.set_ylabel(f"{method}: fitted Br ellipticity")
            ax.set_title(method)
    axes[0][-1].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def checkpoint_key(settings: dict, optics: dict, methods, weights, seed: int) -> str:
    """sha256 of everything a case's result depends on besides the case itself: the settings
    (without the grid), the optics, the methods, the CNN weights' content and the seed."""
    import hashlib
    import json

    from octastem.io import sha256_file

    grid_keys = ("cations", "delta_A", "phonons", "thickness_cells", "scan_step_A")
    weights_sha = None
    if weights is not None and Path(weights).is_file():
        weights_sha = sha256_file(weights)
    text = json.dumps(
        {
            "settings": {k: v for k, v in settings.items() if k not in grid_keys},
            "optics": optics,
            "methods": list(methods),
            "weights": weights_sha if weights is not None else None,
            "seed": int(seed),
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def load_checkpoint(path: Path, key: str) -> dict | None:
    """The result stored for a case at ``path`` when it was made with ``key``; None otherwise (no
    file, another key, or a file that does not parse: that case is simply run again)."""
    import json

    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("key") != key or "result" not in record:
        return None
    return record["result"]


def run_suite(
    out_dir: str | os.PathLike,
    *,
    settings: dict | None = None,
    optics: dict | None = None,
    methods=None,
    weights=None,
    device: str = "auto",
    seed: int = 0,
    threads: int | None = None,
    progress: bool = False,
) -> dict:
    """Run every case of ``settings`` (default: the schema's ``evaluation``) at ``optics`` (default:
    the schema's ``stem``); writes ``suite.csv``, ``suite.json`` and ``suite.png`` to ``out_dir``.

    ``settings``: the grid (see :func:`cases`), ``in_plane_cells``, ``frames``, ``rattle_A``,
    ``acquisitions`` (list of ``{dose_e_per_A2: float or None, averaged_cells: int}``),
    ``n_seeds``, ``fit_method`` and ``methods``; keys left out take the schema's values. ``methods``
    (overrides ``settings['methods']``; both None: the schema's ``reconstruct.methods``): any of
    :data:`octastem.stem.reconstruct.METHODS`;
    ``weights``/``device``: those of the CNN.
    Every finished case is written to ``out_dir/cases/<case>.json`` (atomically) with a key of
    the settings, optics, methods, weights and seed (:func:`checkpoint_key`); a rerun with the same
    key takes those cases from there, so an interrupted suite resumes where it stopped and a grid
    grown by a case runs only the new one.
    Returns the JSON record (settings, machine, per-case timing and truths, per-seed rows, table).
    """
    import logging

    from octastem.config import schema_defaults
    from octastem.stem import METHODS

    log = logging.getLogger("octastem")
    settings = {**schema_defaults("evaluation"), **(settings or {})}
    optics = {**schema_defaults("stem"), **(optics or {})}
    optics = {
        k: optics[k] for k in ("energy_eV", "semiangle_mrad", "max_angle_mrad", "sampling_A", "slice_thickness_A")
    }
    if methods is None:
        methods = settings.get("methods") or schema_defaults("reconstruct")["methods"]
    methods = list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise InputError(f"evaluation: unknown methods {unknown}; expected some of {list(METHODS)}")
    if not settings["acquisitions"] or int(settings["n_seeds"]) < 1 or int(settings["in_plane_cells"]) < 1:
        raise InputError("evaluation: acquisitions must be non-empty, n_seeds and in_plane_cells at least 1")
    grid = cases(settings)
    machine = machine_info(threads=threads)
    out_dir = Path(out_dir)
    key = checkpoint_key(settings, optics, methods, weights, seed)
    t0 = time.perf_counter()
    table, per_case = [], []
    resumed = 0
    for n, case in enumerate(grid):
        path = out_dir / "cases" / f"{case.name}.json"
        result = load_checkpoint(path, key)
        from_checkpoint = result is not None
        if not from_checkpoint:
            result = run_case(
                case,
                settings=settings,
                optics=optics,
                methods=methods,
                weights=weights,
                device=device,
                seed=seed,
                threads=threads,
            )
            write_json(path, {"key": key, "result": result})
        resumed += from_checkpoint
        table.extend(summarize(case, result))
        per_case.append({"case": case.name, **asdict(case), **{k: v for k, v in result.items() if k != "rows"}})
        per_case[-1]["rows"] = result["rows"]
        if progress:
            log.info(
                "case %d/%d %s: %.1f s%s",
                n + 1,
                len(grid),
                case.name,
                result["seconds"]["total"],
                " (its checkpoint)" if from_checkpoint else "",
            )
    write_table(out_dir / "suite.csv", table)
    write_text(out_dir / "suite.md", suite_markdown(table))
    plot_suite(out_dir / "suite.png", table)
    record = {
        "settings": settings,
        "optics": optics,
        "methods": methods,
        "weights": None if weights is None else str(weights),
        "seed": int(seed),
        "n_cases": len(grid),
        "n_cases_resumed": resumed,
        # the cases' own seconds (simulation, truth, reconstruction and fits), those resumed included
        "seconds_of_cases": float(sum(c["seconds"]["total"] for c in per_case)),
        "machine": {**machine, "load_average_at_end": list(os.getloadavg())},
        "seconds_total": time.perf_counter() - t0,
        "cases": per_case,
        "table": table,
    }
    write_json(out_dir / "suite.json", record)
    return record
