"""Template-matching average of a crystalline 4D-STEM scan onto one (super)cell.

Assuming perfect crystal periodicity, diffraction patterns recorded at equivalent positions of
the lattice carry the same signal, so averaging them raises the signal-to-noise ratio by about
sqrt(N) for N equivalent positions (Schrenker et al., template matching section of the SI).

1. :func:`octastem.stem.lattice.find_lattice` finds the lattice of a virtual image of the scan
   (Fourier peaks indexed by the coarsest lattice spanned by two of them, Lagrange-Gauss reduced
   basis, a1 along the scan +x axis); with the structure model's lattice parameter it is chosen
   among the lattices that agree with it, and a disagreement is an InputError
   (:func:`octastem.stem.lattice.check_lattice`).
2. :func:`average_to_cell` maps every scan position r to fractional coordinates
   u = B (r - origin) / supercell (B: reciprocal basis), bins u modulo 1 onto a grid of
   ``cell_shape`` = (n_rows, n_cols) output positions (nearest bin, or bilinear weights) and
   averages the patterns per bin.

Output grid: output position (p, q) lies at origin + (q / n_cols) s1 a1 + (p / n_rows) s2 a2, so
rows follow a2 and columns a1; the output ``scan_rotation_deg`` is the input one minus the angle
of a1 to the scan x axis (the output scan axes are the lattice directions), the output steps are
|s1 a1| / n_cols and |s2 a2| / n_rows (A), and the angle between a1 and a2 is recorded.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import scipy.sparse

from octastem.io import InputError, Stem4D, open_4dstem, provenance, write_4dstem

from .lattice import (
    Lattice,
    channels_to_image,
    check_lattice,
    detector_vectors,
    find_lattice,
    k_sampling,
    validated_data,
)

WEIGHTS = ("nearest", "linear")


# ----------------------------------------------------------------------------------------------
# Averaging
# ----------------------------------------------------------------------------------------------


class CellAccumulator:
    """Running per-bin sums of patterns (and of squares, and of one checkerboard half of the cells)."""

    def __init__(self, lattice: Lattice, scan_shape, pattern_shape, cell_shape, supercell=(1, 1), weights="nearest"):
        if weights not in WEIGHTS:
            raise InputError(f"average: field 'weights' = {weights!r}; expected one of {WEIGHTS}")
        cell_shape = tuple(int(n) for n in cell_shape)
        supercell = tuple(int(n) for n in supercell)
        if len(cell_shape) != 2 or min(cell_shape) < 1:
            raise InputError(
                f"average: field 'cell_shape' must be two positive integers (rows, cols), got {cell_shape}"
            )
        if len(supercell) != 2 or min(supercell) < 1:
            raise InputError(
                f"average: field 'supercell' must be two positive integers (along a1, a2), got {supercell}"
            )
        det = float(np.cross(lattice.a1, lattice.a2))
        if not math.isfinite(det) or abs(det) < 1e-9:
            raise InputError(f"average: lattice vectors a1={lattice.a1}, a2={lattice.a2} are collinear or invalid")
        self.lattice, self.scan_shape, self.cell_shape = lattice, tuple(scan_shape), cell_shape
        self.supercell, self.weights = supercell, weights
        self.n_bins = cell_shape[0] * cell_shape[1]
        n_k = int(np.prod(pattern_shape))
        self.pattern_shape = tuple(pattern_shape)
        self.sum = np.zeros((self.n_bins, n_k))
        self.sum_sq = np.zeros((self.n_bins, n_k))
        self.sum_half = np.zeros((self.n_bins, n_k))
        self.w = np.zeros(self.n_bins)
        self.w2 = np.zeros(self.n_bins)
        self.w_half = np.zeros(self.n_bins)

    def _matrix(self, r0: int, r1: int) -> tuple[scipy.sparse.csr_matrix, np.ndarray]:
        """Sparse (bins x positions) weights for scan rows r0..r1, and the checkerboard parity of each entry."""
        nx = self.scan_shape[1]
        y, x = np.mgrid[r0:r1, 0:nx]
        u1, u2 = self.lattice.fractional(x.ravel().astype(float), y.ravel().astype(float))
        u1, u2 = u1 / self.supercell[0], u2 / self.supercell[1]
        nr, nc = self.cell_shape
        t1, t2 = u1 * nc, u2 * nr  # continuous output column / row
        pos = np.arange(u1.size)
        if self.weights == "nearest":
            q, p = np.round(t1), np.round(t2)
            rows = [(np.mod(p, nr) * nc + np.mod(q, nc)).astype(np.int64)]
            vals = [np.ones_like(t1)]
            cells = [np.floor((q + 0.5) / nc) + np.floor((p + 0.5) / nr)]
        else:
            q0, p0 = np.floor(t1), np.floor(t2)
            f1, f2 = t1 - q0, t2 - p0
            rows, vals, cells = [], [], []
            for dq, dp, wv in (
                (0, 0, (1 - f1) * (1 - f2)),
                (1, 0, f1 * (1 - f2)),
                (0, 1, (1 - f1) * f2),
                (1, 1, f1 * f2),
            ):
                q, p = q0 + dq, p0 + dp
                rows.append((np.mod(p, nr) * nc + np.mod(q, nc)).astype(np.int64))
                vals.append(wv)
                cells.append(np.floor((q + 0.5) / nc) + np.floor((p + 0.5) / nr))
        rows = np.concatenate(rows)
        vals = np.concatenate(vals)
        parity = np.mod(np.concatenate(cells), 2).astype(bool)
        cols = np.tile(pos, len(vals) // pos.size)
        m = scipy.sparse.csr_matrix((vals.astype(np.float32), (rows, cols)), shape=(self.n_bins, pos.size))
        h = scipy.sparse.csr_matrix(
            (np.where(parity, vals, 0).astype(np.float32), (rows, cols)), shape=(self.n_bins, pos.size)
        )
        return m, h

    def add(self, chunk: np.ndarray, r0: int) -> None:
        """Accumulate scan rows ``r0 .. r0 + len(chunk)`` (rows, scan_x, k_y, k_x)."""
        r1 = r0 + chunk.shape[0]
        flat = np.ascontiguousarray(chunk, dtype=np.float32).reshape(chunk.shape[0] * chunk.shape[1], -1)
        m, h = self._matrix(r0, r1)
        self.sum += m @ flat
        self.sum_half += h @ flat
        self.sum_sq += m @ (flat * flat)
        self.w += np.asarray(m.sum(axis=1)).ravel()
        self.w2 += np.asarray(m.multiply(m).sum(axis=1)).ravel()
        self.w_half += np.asarray(h.sum(axis=1)).ravel()

    def result(self) -> tuple[np.ndarray, dict]:
        """Averaged patterns (rows, cols, k_y, k_x) float32 and statistics per bin."""
        nr, nc = self.cell_shape
        empty = self.w <= 0
        if empty.any():
            raise InputError(
                f"average: {int(empty.sum())} of {self.n_bins} output positions received no scan position; "
                f"use a smaller cell_shape than {self.cell_shape} or weights='linear'"
            )
        mean = self.sum / self.w[:, None]
        n_eff = self.w**2 / self.w2
        # single-pattern noise (weighted scatter around the bin mean) and the split-half noise of the mean
        var1 = (
            np.maximum(self.sum_sq / self.w[:, None] - mean**2, 0.0) * (n_eff / np.maximum(n_eff - 1, 1e-12))[:, None]
        )
        other = self.w - self.w_half
        both = (self.w_half > 0) & (other > 0)
        stats = {
            "n_contributions": self.w.reshape(nr, nc),
            "n_effective": n_eff.reshape(nr, nc),
            "noise_single": float(np.sqrt(var1.sum(axis=1).mean())),
        }
        if both.any():
            half_a = self.sum_half[both] / self.w_half[both, None]
            half_b = (self.sum[both] - self.sum_half[both]) / other[both, None]
            # var(A - B) = var1 (1/w_a + 1/w_b) for unit weights; scale to the full-bin noise var1 / n
            scale = (1.0 / self.w[both]) / (1.0 / self.w_half[both] + 1.0 / other[both])
            stats["noise_average_split_half"] = float(np.sqrt((((half_a - half_b) ** 2).sum(axis=1) * scale).mean()))
        return mean.reshape(nr, nc, *self.pattern_shape).astype(np.float32), stats


def _cell_dataset(
    stem: Stem4D,
    lattice: Lattice,
    acc: CellAccumulator,
    image: str,
    source: str,
    input_provenance: str,
    check: dict | None = None,
) -> Stem4D:
    """The averaged cell of ``acc`` as a dataset with its calibration (see module docstring).

    ``stem``: the scan's calibration (its data are not used); ``check``: the lattice check's summary.
    """
    mean, stats = acc.result()
    sx, sy = float(stem.scan_step_x_A), float(stem.scan_step_y_A)
    s1, s2 = acc.supercell
    nr, nc = acc.cell_shape
    a1_A = np.array([lattice.a1[0] * sx, lattice.a1[1] * sy])
    a2_A = np.array([lattice.a2[0] * sx, lattice.a2[1] * sy])
    step_x = s1 * float(np.hypot(*a1_A)) / nc
    step_y = s2 * float(np.hypot(*a2_A)) / nr
    theta = math.degrees(math.atan2(a1_A[1], a1_A[0]))
    gamma = math.degrees(math.acos(float(a1_A @ a2_A) / (np.hypot(*a1_A) * np.hypot(*a2_A))))
    area_out = step_x * step_y * math.sin(math.radians(gamma))
    dose_in = float(stem.dose_e_per_A2)
    dose_out = dose_in * sx * sy / area_out if math.isfinite(dose_in) else dose_in
    n_eff = stats["n_effective"]
    kx, ky = k_sampling(stem)
    extra = {
        "cell_angle_deg": gamma,
        "lattice_a1_px": lattice.a1,
        "lattice_a2_px": lattice.a2,
        "lattice_origin_px": lattice.origin,
        "lattice_a1_A": a1_A,
        "lattice_a2_A": a2_A,
        "lattice_angle_deg": theta,
        **(check or {}),
        "supercell": [s1, s2],
        "weights": acc.weights,
        "virtual_image": image,
        "n_contributions": stats["n_contributions"],
        "n_effective": n_eff,
        "n_mean": float(n_eff.mean()),
        "snr_gain_expected": float(np.sqrt(n_eff.mean())),
        "noise_single": stats["noise_single"],
        "effective_dose_e_per_A2": dose_out * float(n_eff.mean()),
        "input_dose_e_per_A2": dose_in,
        "intensity_unit": "mean counts",
    }
    if "noise_average_split_half" in stats:
        extra["noise_average_split_half"] = stats["noise_average_split_half"]
        extra["snr_gain_split_half"] = stats["noise_single"] / max(stats["noise_average_split_half"], 1e-300)
    return Stem4D(
        data=mean,
        energy_eV=float(stem.energy_eV),
        semiangle_mrad=float(stem.semiangle_mrad),
        scan_step_A=0.5 * (step_x + step_y),
        k_sampling_mrad=float(stem.k_sampling_mrad),
        dose_e_per_A2=dose_out,
        scan_rotation_deg=float(stem.scan_rotation_deg) - theta,
        extra=extra,
        scan_step_x_A=step_x,
        scan_step_y_A=step_y,
        k_sampling_x_mrad=kx,
        k_sampling_y_mrad=ky,
        scan_shape=[nr, nc],
        attr_order=("scan_step_x_A", "scan_step_y_A", "k_sampling_x_mrad", "k_sampling_y_mrad", "scan_shape"),
        source=source,
        provenance=provenance(
            stage="average",
            input_provenance=input_provenance,
            cell_shape=list(acc.cell_shape),
            supercell=list(acc.supercell),
            weights=acc.weights,
            image=image,
        ),
    )


def average_to_cell(
    stem: Stem4D,
    lattice: Lattice | None = None,
    cell_shape: tuple[int, int] = (16, 16),
    supercell: tuple[int, int] = (1, 1),
    *,
    weights: str = "nearest",
    image: str = "adf",
    lattice_A: float | None = None,
    lattice_tolerance: float | None = None,
) -> Stem4D:
    """Average the patterns of ``stem`` over equivalent lattice positions onto one (super)cell.

    ``lattice`` (default: :func:`find_lattice` of the ``image`` virtual image), ``cell_shape``
    (rows along a2, columns along a1) output positions per ``supercell`` = (s1, s2) unit cells,
    ``weights`` "nearest" (each position to one bin) or "linear" (bilinear, sub-pixel). With the
    structure model's lattice parameter ``lattice_A`` (A), the lattice must agree with it within
    ``lattice_tolerance`` (:func:`check_lattice`; an InputError otherwise). Returns a dataset of
    shape (rows, cols, k_y, k_x) holding mean counts per bin; ``extra`` records the lattice (and
    its check), ``n_contributions`` (sum of weights) and ``n_effective`` per bin, the expected SNR
    gain sqrt(mean n_effective) and the split-half noise estimate (see module docstring).
    """
    data = validated_data(stem)
    steps = (float(stem.scan_step_x_A), float(stem.scan_step_y_A))
    if lattice is None:
        lattice = find_lattice(stem, image, lattice_A=lattice_A, tolerance=lattice_tolerance)
    check = None if lattice_A is None else check_lattice(lattice, steps, lattice_A, lattice_tolerance)
    acc = CellAccumulator(lattice, data.shape[:2], data.shape[2:], cell_shape, supercell, weights)
    rows = max(1, (16 * 2**20) // max(1, data[0].nbytes))
    for r0 in range(0, data.shape[0], rows):
        acc.add(data[r0 : r0 + rows], r0)
    return _cell_dataset(stem, lattice, acc, image, stem.source, stem.provenance, check)


def average_file(
    input: str | os.PathLike,
    output: str | os.PathLike,
    *,
    cell_shape: tuple[int, int] | None = (16, 16),
    supercell: tuple[int, int] = (1, 1),
    weights: str = "nearest",
    image: str = "adf",
    lattice: Lattice | None = None,
    lattice_A: float | None = None,
    lattice_tolerance: float | None = None,
    chunk_positions: int | None = None,
    progress: bool = True,
) -> dict:
    """Streamed :func:`average_to_cell` of an internal 4D-STEM file; writes ``output``, returns a summary.

    Two passes over the file, a few scan rows at a time (``chunk_positions`` positions, default
    about 64 MiB of float32): the virtual image, then the per-bin sums. Memory: two chunks plus
    three float64 arrays of the output cell. ``cell_shape=None`` takes the scan positions per
    (super)cell that a simulated scan records (attribute ``cell_positions``), so every output
    position receives the same number of scan positions. ``lattice_A``, ``lattice_tolerance``: the
    check of the lattice against the structure model (:func:`average_to_cell`), an InputError
    naming the file when they disagree.
    """
    input = Path(input)
    t0 = time.perf_counter()
    with open_4dstem(input) as (ds, attrs):
        stem = Stem4D.from_attrs(ds, attrs)
        if cell_shape is None:
            if "cell_positions" not in stem.extra:
                raise InputError(
                    f"{input}: field 'cell_shape' is null but the dataset records no 'cell_positions' (scan positions "
                    "per cell of a simulated scan); give average.cell_shape"
                )
            cell_shape = tuple(int(n) for n in stem.extra["cell_positions"])
        ny, nx, nky, nkx = ds.shape
        per_row = nx * nky * nkx * 4
        rows = max(1, (chunk_positions // nx if chunk_positions else (64 * 2**20) // per_row))
        rows = min(rows, ny)
        t_read = time.perf_counter()
        steps = (float(stem.scan_step_x_A), float(stem.scan_step_y_A))
        try:
            if lattice is None:
                lattice = _file_lattice(input, stem, rows, image, progress, lattice_A, lattice_tolerance)
            check = None if lattice_A is None else check_lattice(lattice, steps, lattice_A, lattice_tolerance)
        except InputError as e:
            raise InputError(f"{input}: {e}") from None
        t_lattice = time.perf_counter()
        acc = CellAccumulator(lattice, (ny, nx), (nky, nkx), cell_shape, supercell, weights)
        for r0, chunk in _file_chunks(input, ds, rows, "average", progress):
            acc.add(chunk, r0)
        t_acc = time.perf_counter()
    out = _cell_dataset(stem, lattice, acc, image, str(input), attrs.get("provenance", "{}"), check)
    write_4dstem(output, out)
    return {
        "input": str(input),
        "output": str(output),
        "scan_shape": [ny, nx],
        "pattern_shape": [nky, nkx],
        "cell_shape": list(acc.cell_shape),
        "supercell": list(acc.supercell),
        "lattice_a1_px": lattice.a1.tolist(),
        "lattice_a2_px": lattice.a2.tolist(),
        "lattice_origin_px": lattice.origin.tolist(),
        **(check or {}),
        "n_mean": out.extra["n_mean"],
        "n_min": float(out.extra["n_effective"].min()),
        "snr_gain_expected": out.extra["snr_gain_expected"],
        "snr_gain_split_half": out.extra.get("snr_gain_split_half"),
        "seconds_virtual_image_and_lattice": t_lattice - t_read,
        "seconds_average": t_acc - t_lattice,
        "seconds": time.perf_counter() - t0,
    }


def _file_chunks(input: Path, ds, rows: int, desc: str, progress: bool):
    """(first row, rows) chunks of the file's scan, each checked to hold finite counts >= 0."""
    from tqdm.auto import tqdm

    for r0 in tqdm(range(0, ds.shape[0], rows), desc=desc, disable=not progress, unit="chunk"):
        chunk = ds[r0 : r0 + rows]
        if not np.isfinite(chunk.sum(dtype=np.float64)) or chunk.min() < 0:
            raise InputError(f"{input}: field 'data' rows {r0}..{r0 + len(chunk) - 1}: expected finite counts >= 0")
        yield r0, chunk


def _file_lattice(
    input: Path, stem: Stem4D, rows: int, image: str, progress: bool, lattice_A: float | None, tolerance: float | None
) -> Lattice:
    """:func:`find_lattice` of the virtual image of a file's scan (``stem.data`` an open dataset), read in chunks."""
    ny, nx, nky, nkx = stem.data.shape
    vec = detector_vectors((nky, nkx), k_sampling(stem), stem.semiangle_mrad, image)
    channels = np.zeros((vec.shape[0], ny, nx))
    for r0, chunk in _file_chunks(input, stem.data, rows, "virtual image", progress):
        flat = chunk.reshape(chunk.shape[0] * nx, -1)
        channels[:, r0 : r0 + chunk.shape[0]] = (vec @ flat.T).reshape(vec.shape[0], chunk.shape[0], nx)
    steps = (float(stem.scan_step_x_A), float(stem.scan_step_y_A))
    return find_lattice(
        channels_to_image(channels, image), image, lattice_A=lattice_A, scan_step_A=steps, tolerance=tolerance
    )
