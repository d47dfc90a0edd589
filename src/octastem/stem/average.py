"""Template-matching average of a crystalline 4D-STEM scan onto one (super)cell.

Assuming perfect crystal periodicity, diffraction patterns recorded at equivalent positions of
the lattice carry the same signal, so averaging them raises the signal-to-noise ratio by about
sqrt(N) for N equivalent positions (Schrenker et al., template matching section of the SI).

1. A virtual image is formed from the data (annular dark field by default, or bright field,
   total intensity, or centre-of-mass magnitude).
2. :func:`find_lattice` finds the lattice of that image: Fourier peaks of the Hann-windowed
   image, each refined to sub-pixel precision by maximising the discrete-time Fourier transform,
   indexed and fitted by least squares to two reciprocal basis vectors. The basis vectors a1, a2
   (scan pixels, (x, y) = (column, row)) form an affine lattice, so scan rotation, unequal scan
   steps and shear (linear scan distortion) are all absorbed. The origin puts the maximum of the
   first Fourier harmonics of the virtual image at a lattice point.
3. :func:`average_to_cell` maps every scan position r to fractional coordinates
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
from typing import NamedTuple

import numpy as np
import scipy.sparse
from scipy import ndimage, optimize

from octastem.io import InputError, Stem4D, open_4dstem, provenance, write_4dstem

IMAGES = ("adf", "bf", "sum", "com")
WEIGHTS = ("nearest", "linear")


class Lattice(NamedTuple):
    """Affine lattice in scan pixels: basis vectors a1, a2 and an origin, each (x, y) = (column, row)."""

    a1: np.ndarray
    a2: np.ndarray
    origin: np.ndarray

    @property
    def basis(self) -> np.ndarray:
        """2x2 matrix with columns a1, a2."""
        return np.column_stack([self.a1, self.a2])

    @property
    def reciprocal(self) -> np.ndarray:
        """2x2 matrix with rows b1, b2 (cycles per scan pixel), b_i . a_j = delta_ij."""
        return np.linalg.inv(self.basis)

    def fractional(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fractional lattice coordinates (u1, u2) of scan positions (x, y) (not wrapped)."""
        b = self.reciprocal
        dx, dy = x - self.origin[0], y - self.origin[1]
        return b[0, 0] * dx + b[0, 1] * dy, b[1, 0] * dx + b[1, 1] * dy


# ----------------------------------------------------------------------------------------------
# Virtual images
# ----------------------------------------------------------------------------------------------


def _k_axes(shape_k: tuple[int, int], k_sampling: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Detector angles (mrad) along k_x and k_y, optical axis at pixel n // 2."""
    nky, nkx = shape_k
    return (np.arange(nkx) - nkx // 2) * k_sampling[0], (np.arange(nky) - nky // 2) * k_sampling[1]


def detector_vectors(
    shape_k: tuple[int, int], k_sampling: tuple[float, float], semiangle_mrad: float, image: str
) -> np.ndarray:
    """Weights (n_channels, k_y * k_x) whose dot products with a pattern give the virtual image channels.

    "adf": one channel, detector pixels beyond 1.2 x the convergence semi-angle; "bf": within it;
    "sum": all pixels; "com": three channels (sum, sum of k_x, sum of k_y) for the centre of mass.
    """
    if image not in IMAGES:
        raise InputError(f"average: field 'image' = {image!r}; expected one of {IMAGES}")
    kx, ky = _k_axes(shape_k, k_sampling)
    k = np.hypot(kx[None, :], ky[:, None])
    if image == "adf":
        mask = k > 1.2 * semiangle_mrad
        if not mask.any():
            raise InputError(
                f"average: no detector pixel lies beyond 1.2 x semiangle_mrad = {1.2 * semiangle_mrad:g} mrad "
                f"(detector edge {k.max():.3g} mrad); use image='com' or 'bf'"
            )
        vec = [mask]
    elif image == "bf":
        vec = [k <= semiangle_mrad]
    elif image == "sum":
        vec = [np.ones_like(k, dtype=bool)]
    else:
        vec = [np.ones_like(k), np.broadcast_to(kx[None, :], k.shape), np.broadcast_to(ky[:, None], k.shape)]
    return np.stack([np.asarray(v, dtype=np.float32).ravel() for v in vec])


def _channels_to_image(channels: np.ndarray, image: str) -> np.ndarray:
    """(n_channels, ny, nx) dot products -> virtual image (ny, nx)."""
    if image != "com":
        return channels[0].astype(np.float64)
    total = np.where(channels[0] > 0, channels[0], 1.0)
    cx, cy = channels[1] / total, channels[2] / total
    return np.hypot(cx - cx.mean(), cy - cy.mean())


def virtual_image(stem: Stem4D, image: str = "adf") -> np.ndarray:
    """Virtual image (scan_y, scan_x) of an in-memory dataset; see :func:`detector_vectors`."""
    data = _validated_data(stem)
    vec = detector_vectors(data.shape[2:], _k_sampling(stem), stem.semiangle_mrad, image)
    flat = data.reshape(data.shape[0] * data.shape[1], -1)
    channels = (vec @ flat.T).reshape(-1, data.shape[0], data.shape[1])
    return _channels_to_image(channels, image)


def _k_sampling(stem: Stem4D) -> tuple[float, float]:
    """Detector sampling (k_x, k_y) in mrad."""
    return float(stem.k_sampling_x_mrad), float(stem.k_sampling_y_mrad)


def _validated_data(stem: Stem4D) -> np.ndarray:
    data = np.asarray(stem.data)
    if data.ndim != 4:
        raise InputError(f"average: field 'data' must be 4D (scan_y, scan_x, k_y, k_x), got shape {data.shape}")
    if not np.all(np.isfinite(data)) or np.any(data < 0):
        raise InputError("average: field 'data' must hold finite, non-negative intensities")
    return data


# ----------------------------------------------------------------------------------------------
# Lattice
# ----------------------------------------------------------------------------------------------


def _dtft(image: np.ndarray, g: np.ndarray) -> complex:
    """Fourier sum of ``image`` at the continuous frequency g = (g_x, g_y) (cycles per pixel)."""
    ny, nx = image.shape
    ex = np.exp(-2j * np.pi * g[0] * np.arange(nx))
    ey = np.exp(-2j * np.pi * g[1] * np.arange(ny))
    return complex(ey @ (image @ ex))


def _refine_peak(image: np.ndarray, g0: np.ndarray, step: np.ndarray) -> tuple[np.ndarray, float]:
    """Sub-pixel Fourier peak: maximise |DTFT| near g0 (window-symmetric, so unbiased for a pure tone)."""

    def cost(g):
        return -abs(_dtft(image, g))

    res = optimize.minimize(
        cost,
        g0,
        method="Nelder-Mead",
        options={
            "initial_simplex": [g0, g0 + [step[0] * 0.3, 0], g0 + [0, step[1] * 0.3]],
            "xatol": 1e-7,
            "fatol": 1e-12,
        },
    )
    return np.asarray(res.x), -float(res.fun)


def find_lattice(
    stem_or_image: Stem4D | np.ndarray,
    image: str = "adf",
    *,
    n_peaks: int = 12,
    threshold: float = 0.05,
) -> Lattice:
    """Lattice (a1, a2, origin) of a periodic scan, in scan pixels (x, y), from its virtual image.

    ``stem_or_image``: a dataset (its ``image`` virtual image is used) or a 2D image (scan_y,
    scan_x). Fourier peaks above ``threshold`` x the strongest one (at most ``n_peaks``, DC
    excluded) are refined to sub-pixel precision; the two shortest non-collinear ones seed the
    reciprocal basis, all peaks indexed on it refine it by least squares. a1 is the basis vector
    closest to the scan +x axis, a2 the other one pointing to +y (rows). The image must hold at
    least about two periods along each axis.
    """
    img = virtual_image(stem_or_image, image) if isinstance(stem_or_image, Stem4D) else np.asarray(stem_or_image, float)
    if img.ndim != 2 or min(img.shape) < 8:
        raise InputError(f"find_lattice: need a 2D image of at least 8x8 scan positions, got shape {img.shape}")
    if not np.all(np.isfinite(img)):
        raise InputError("find_lattice: the virtual image holds NaN or infinite values")
    ny, nx = img.shape
    window = np.hanning(ny + 2)[1:-1, None] * np.hanning(nx + 2)[1:-1][None, :]
    w = (img - img.mean()) * window
    power = np.abs(np.fft.fftshift(np.fft.fft2(w))) ** 2
    cy, cx = ny // 2, nx // 2
    iy, ix = np.mgrid[0:ny, 0:nx]
    # the half plane (one of each +-g pair) outside the window's DC lobe (2.5 bins)
    half = (iy > cy) | ((iy == cy) & (ix > cx))
    dc = ((iy - cy) / 2.5) ** 2 + ((ix - cx) / 2.5) ** 2 <= 1.0
    local_max = ndimage.maximum_filter(power, size=3, mode="wrap") == power
    cand = np.flatnonzero((local_max & half & ~dc).ravel())
    if cand.size == 0 or power.ravel()[cand].max() <= 0:
        raise InputError("find_lattice: the virtual image has no periodic contrast (no Fourier peak)")
    cand = cand[np.argsort(power.ravel()[cand])[::-1]]
    cand = cand[power.ravel()[cand] >= threshold * power.ravel()[cand[0]]][:n_peaks]
    bins = np.array([1.0 / nx, 1.0 / ny])
    peaks, amps = [], []
    for c in cand:
        g0 = np.array([(ix.ravel()[c] - cx) / nx, (iy.ravel()[c] - cy) / ny])
        g, amp = _refine_peak(w, g0, bins)
        peaks.append(g)
        amps.append(amp)
    peaks = np.array(peaks)
    order = np.argsort(np.hypot(peaks[:, 0], peaks[:, 1]))
    b1 = peaks[order[0]]
    b2 = None
    for i in order[1:]:
        g = peaks[i]
        if abs(b1[0] * g[1] - b1[1] * g[0]) > 0.5 * np.hypot(*b1) * np.hypot(*g):
            b2 = g
            break
    if b2 is None:
        raise InputError(
            "find_lattice: found only one lattice direction in the virtual image; the scan must cover at least "
            "two periods along two directions"
        )
    basis = np.array([b1, b2])
    hk = peaks @ np.linalg.inv(basis)  # Miller-like indices of every peak on the seed basis
    idx = np.round(hk)
    good = (np.abs(hk - idx).max(axis=1) < 0.15) & (np.abs(idx).sum(axis=1) > 0)
    if good.sum() >= 2 and np.linalg.matrix_rank(idx[good]) == 2:
        # weight by amplitude: the position error of a peak scales as noise / amplitude
        wts = np.asarray(amps)[good][:, None]
        basis, *_ = np.linalg.lstsq(idx[good] * wts, peaks[good] * wts, rcond=None)
    a = np.linalg.inv(basis)  # columns a1, a2
    a1, a2 = _canonical(a[:, 0], a[:, 1])
    lattice = Lattice(a1, a2, np.zeros(2))
    recip = lattice.reciprocal
    phases = np.array([np.angle(_dtft(w, recip[j])) for j in range(2)])
    frac = np.mod(-phases / (2 * np.pi), 1.0)
    return Lattice(a1, a2, lattice.basis @ frac)


def _canonical(v1: np.ndarray, v2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order and signs of a basis: a1 closest to +x, a2 the other, with a2_y > 0 (rows)."""
    cands = [v1, -v1, v2, -v2]
    angles = [abs(math.atan2(v[1], v[0])) for v in cands]
    i = int(np.argmin(angles))
    a1 = cands[i]
    a2 = v2 if i < 2 else v1
    if a2[1] < 0 or (a2[1] == 0 and a2[0] < 0):
        a2 = -a2
    return np.asarray(a1, float), np.asarray(a2, float)


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
    stem: Stem4D, lattice: Lattice, acc: CellAccumulator, image: str, source: str, input_provenance: str
) -> Stem4D:
    """The averaged cell of ``acc`` as a dataset with its calibration (see module docstring).

    ``stem``: the scan's calibration (its data are not used).
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
    kx, ky = _k_sampling(stem)
    extra = {
        "cell_angle_deg": gamma,
        "lattice_a1_px": lattice.a1,
        "lattice_a2_px": lattice.a2,
        "lattice_origin_px": lattice.origin,
        "lattice_a1_A": a1_A,
        "lattice_a2_A": a2_A,
        "lattice_angle_deg": theta,
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
) -> Stem4D:
    """Average the patterns of ``stem`` over equivalent lattice positions onto one (super)cell.

    ``lattice`` (default: :func:`find_lattice` of the ``image`` virtual image), ``cell_shape``
    (rows along a2, columns along a1) output positions per ``supercell`` = (s1, s2) unit cells,
    ``weights`` "nearest" (each position to one bin) or "linear" (bilinear, sub-pixel). Returns a
    dataset of shape (rows, cols, k_y, k_x) holding mean counts per bin; ``extra`` records the
    lattice, ``n_contributions`` (sum of weights) and ``n_effective`` per bin, the expected SNR
    gain sqrt(mean n_effective) and the split-half noise estimate (see module docstring).
    """
    data = _validated_data(stem)
    if lattice is None:
        lattice = find_lattice(stem, image)
    acc = CellAccumulator(lattice, data.shape[:2], data.shape[2:], cell_shape, supercell, weights)
    rows = max(1, (16 * 2**20) // max(1, data[0].nbytes))
    for r0 in range(0, data.shape[0], rows):
        acc.add(data[r0 : r0 + rows], r0)
    return _cell_dataset(stem, lattice, acc, image, stem.source, stem.provenance)


def average_file(
    input: str | os.PathLike,
    output: str | os.PathLike,
    *,
    cell_shape: tuple[int, int] | None = (16, 16),
    supercell: tuple[int, int] = (1, 1),
    weights: str = "nearest",
    image: str = "adf",
    lattice: Lattice | None = None,
    chunk_positions: int | None = None,
    progress: bool = True,
) -> dict:
    """Streamed :func:`average_to_cell` of an internal 4D-STEM file; writes ``output``, returns a summary.

    Two passes over the file, a few scan rows at a time (``chunk_positions`` positions, default
    about 64 MiB of float32): the virtual image, then the per-bin sums. Memory: two chunks plus
    three float64 arrays of the output cell. ``cell_shape=None`` takes the scan positions per
    (super)cell that a simulated scan records (attribute ``cell_positions``), so every output
    position receives the same number of scan positions.
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
        if lattice is None:
            lattice = _file_lattice(input, stem, rows, image, progress)
        t_lattice = time.perf_counter()
        acc = CellAccumulator(lattice, (ny, nx), (nky, nkx), cell_shape, supercell, weights)
        for r0, chunk in _file_chunks(input, ds, rows, "average", progress):
            acc.add(chunk, r0)
        t_acc = time.perf_counter()
    out = _cell_dataset(stem, lattice, acc, image, str(input), attrs.get("provenance", "{}"))
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


def _file_lattice(input: Path, stem: Stem4D, rows: int, image: str, progress: bool) -> Lattice:
    """:func:`find_lattice` of the virtual image of a file's scan (``stem.data`` an open dataset), read in chunks."""
    ny, nx, nky, nkx = stem.data.shape
    vec = detector_vectors((nky, nkx), _k_sampling(stem), stem.semiangle_mrad, image)
    channels = np.zeros((vec.shape[0], ny, nx))
    for r0, chunk in _file_chunks(input, stem.data, rows, "virtual image", progress):
        flat = chunk.reshape(chunk.shape[0] * nx, -1)
        channels[:, r0 : r0 + chunk.shape[0]] = (vec @ flat.T).reshape(vec.shape[0], chunk.shape[0], nx)
    return find_lattice(_channels_to_image(channels, image))
