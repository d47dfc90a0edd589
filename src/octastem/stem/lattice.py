"""The lattice of a crystalline 4D-STEM scan: virtual images, the Fourier lattice search, basis
reduction and the check against the structure model's lattice parameter.

1. A virtual image is formed from the data (annular dark field by default, or bright field,
   total intensity, or centre-of-mass magnitude): :func:`virtual_image`.
2. :func:`find_lattice` finds the lattice of that image. Fourier peaks of the Hann-windowed image
   are refined to sub-pixel precision by maximising the discrete-time Fourier transform; those
   above ``threshold`` x the strongest peak and :data:`SIGNIFICANCE` x the mean noise power (the
   median power of the spectrum / ln 2, as for exponentially distributed noise power) count as
   signal. Every pair of signal peaks spans a candidate reciprocal lattice, refined by least
   squares on the peaks it indexes. The lattice chosen is the coarsest one (the smallest real
   cell) that indexes all signal peaks but at most one in ten, so which peaks happen to be the
   strongest does not matter. A larger cell containing it (twice its area, or of the expected
   size) is taken instead when the power at the peaks that it lacks is significant
   (:data:`SUPERLATTICE_ALPHA`): weak first-order peaks of a cell whose strong peaks span a
   centred one. The basis is refined on the peaks it indexes among the signal peaks and the
   ``n_peaks`` strongest. With an expected lattice parameter the choice is made among the
   lattices whose periods agree with it; none agreeing is an :class:`~octastem.io.InputError`
   naming the found and expected periods and the scan step (:func:`check_lattice`).
3. The basis is Lagrange-Gauss reduced (the two shortest independent vectors, |a1 . a2| <=
   |a1|^2 / 2) and put in the conventional setting of the perovskite cell: a1 the vector closest
   to the scan +x axis, a2 completing a basis with the handedness of the image axes (a1 x a2 > 0,
   so a2 points along +y, the rows, for a near-rectangular cell). The basis vectors a1, a2 (scan
   pixels, (x, y) = (column, row)) form an affine lattice, so scan rotation, unequal scan steps
   and shear (linear scan distortion) are all absorbed. The origin puts the maximum of the first
   Fourier harmonics (along b1 and b2) of the virtual image at a lattice point.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import numpy as np
from scipy import ndimage, optimize

from octastem.io import InputError, Stem4D

IMAGES = ("adf", "bf", "sum", "com")

#: Fourier peak power, in units of the mean noise power, above which a peak counts as signal: the
#: noise power of one frequency is exponentially distributed, so noise alone exceeds it with
#: probability exp(-12) = 6e-6 per frequency (a few in 10^3 images of 100 x 100 positions).
SIGNIFICANCE = 12.0
#: Most signal peaks used to choose the lattice (the strongest).
MAX_SIGNAL_PEAKS = 48
#: A peak is indexed by a lattice when its indices lie within this distance of integers.
INDEX_TOLERANCE = 0.15
#: Reciprocal lattices may leave out at most this fraction of the signal peaks (and of their power).
OUTLIER_FRACTION = 0.1
#: False-alarm probability of the test for the weak peaks of a larger cell (see the module docstring).
SUPERLATTICE_ALPHA = 1e-4
#: Half-width (frequency bins) of the window's DC lobe, excluded from the peaks; reciprocal basis
#: vectors must be longer (the scan must hold more than 2.5 periods along each lattice direction).
DC_BINS = 2.5


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

    def vectors_A(self, scan_step_A: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
        """a1, a2 in A (x, y) for scan steps ``scan_step_A`` = (x, y) in A per scan pixel."""
        s = np.asarray(scan_step_A, dtype=float)
        return np.asarray(self.a1) * s, np.asarray(self.a2) * s

    def periods_A(self, scan_step_A: tuple[float, float]) -> tuple[float, float]:
        """|a1|, |a2| in A for scan steps ``scan_step_A`` = (x, y) in A per scan pixel."""
        v1, v2 = self.vectors_A(scan_step_A)
        return float(np.hypot(*v1)), float(np.hypot(*v2))

    def reduced(self) -> Lattice:
        """The same lattice and origin on its Lagrange-Gauss reduced basis in the conventional setting."""
        a1, a2 = conventional_basis(*gauss_reduce(self.a1, self.a2))
        return Lattice(a1, a2, np.asarray(self.origin, dtype=float))


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


def channels_to_image(channels: np.ndarray, image: str) -> np.ndarray:
    """(n_channels, ny, nx) dot products with :func:`detector_vectors` -> virtual image (ny, nx)."""
    if image != "com":
        return channels[0].astype(np.float64)
    total = np.where(channels[0] > 0, channels[0], 1.0)
    cx, cy = channels[1] / total, channels[2] / total
    return np.hypot(cx - cx.mean(), cy - cy.mean())


def virtual_image(stem: Stem4D, image: str = "adf") -> np.ndarray:
    """Virtual image (scan_y, scan_x) of an in-memory dataset; see :func:`detector_vectors`."""
    data = validated_data(stem)
    vec = detector_vectors(data.shape[2:], k_sampling(stem), stem.semiangle_mrad, image)
    flat = data.reshape(data.shape[0] * data.shape[1], -1)
    channels = (vec @ flat.T).reshape(-1, data.shape[0], data.shape[1])
    return channels_to_image(channels, image)


def k_sampling(stem: Stem4D) -> tuple[float, float]:
    """Detector sampling (k_x, k_y) in mrad."""
    return float(stem.k_sampling_x_mrad), float(stem.k_sampling_y_mrad)


def validated_data(stem: Stem4D) -> np.ndarray:
    """The dataset's 4D array, checked to hold finite, non-negative intensities."""
    data = np.asarray(stem.data)
    if data.ndim != 4:
        raise InputError(f"average: field 'data' must be 4D (scan_y, scan_x, k_y, k_x), got shape {data.shape}")
    if not np.all(np.isfinite(data)) or np.any(data < 0):
        raise InputError("average: field 'data' must hold finite, non-negative intensities")
    return data


# ----------------------------------------------------------------------------------------------
# Basis reduction
# ----------------------------------------------------------------------------------------------


def gauss_reduce(v1: np.ndarray, v2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lagrange-Gauss reduction: a basis of the same 2D lattice with |v1| <= |v2| <= |v2 +- v1|.

    The result holds the two shortest independent lattice vectors (|v1 . v2| <= |v1|^2 / 2).
    """
    v1, v2 = np.asarray(v1, dtype=float), np.asarray(v2, dtype=float)
    if abs(v1[0] * v2[1] - v1[1] * v2[0]) <= 1e-12 * (v1 @ v1 + v2 @ v2):
        raise InputError(f"lattice: basis vectors {v1.tolist()} and {v2.tolist()} are collinear")
    if v1 @ v1 > v2 @ v2:
        v1, v2 = v2, v1
    for _ in range(64):  # converges in O(log of the basis' skewness) steps
        m = round(float(v1 @ v2) / float(v1 @ v1))
        v2 = v2 - m * v1
        if v2 @ v2 >= v1 @ v1:
            break
        v1, v2 = v2, v1
    return v1, v2


def conventional_basis(v1: np.ndarray, v2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order and signs of a basis: a1 the vector closest to +x, a2 the other with a1 x a2 > 0.

    a1 x a2 > 0 is the handedness of the image axes (x = columns, y = rows): a2 points along +y
    for a near-rectangular cell.
    """
    cands = [v1, -v1, v2, -v2]
    i = int(np.argmin([abs(math.atan2(v[1], v[0])) for v in cands]))
    a1 = np.asarray(cands[i], dtype=float)
    a2 = np.asarray(v2 if i < 2 else v1, dtype=float)
    if a1[0] * a2[1] - a1[1] * a2[0] < 0:
        a2 = -a2
    return a1, a2


def is_reduced(a1: np.ndarray, a2: np.ndarray, rtol: float = 1e-9) -> bool:
    """Whether (a1, a2) is Lagrange-Gauss reduced: |a1| <= |a2| and |a1 . a2| <= |a1|^2 / 2 (either order)."""
    a1, a2 = np.asarray(a1, dtype=float), np.asarray(a2, dtype=float)
    short = min(a1 @ a1, a2 @ a2)
    return abs(float(a1 @ a2)) <= 0.5 * short * (1 + rtol)


# ----------------------------------------------------------------------------------------------
# Lattice search
# ----------------------------------------------------------------------------------------------


def _dtft(image: np.ndarray, g: np.ndarray) -> complex:
    """Fourier sum of ``image`` at the continuous frequency g = (g_x, g_y) (cycles per pixel)."""
    ny, nx = image.shape
    # real arithmetic: a real matrix times a complex vector is some thousand times slower in numpy
    tx, ty = 2 * np.pi * g[0] * np.arange(nx), 2 * np.pi * g[1] * np.arange(ny)
    re_x, im_x = image @ np.cos(tx), image @ np.sin(tx)
    cy, sy = np.cos(ty), np.sin(ty)
    return complex(cy @ re_x - sy @ im_x, -(cy @ im_x + sy @ re_x))


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


class _Peaks(NamedTuple):
    """Signal peaks of a spectrum: frequencies (n, 2) in cycles per pixel, amplitudes (n,), image
    shape, and the mean noise power of one frequency."""

    g: np.ndarray
    amp: np.ndarray
    shape: tuple[int, int]
    noise: float


def _fourier_peaks(w: np.ndarray, n_peaks: int, threshold: float) -> tuple[_Peaks, _Peaks]:
    """Fourier peaks of the windowed image ``w`` above ``threshold`` x the strongest: (signal, all).

    One of each +-g pair (a half plane), outside the window's DC lobe, each refined to sub-pixel
    precision. Signal: those also above SIGNIFICANCE x the mean noise power, at most
    MAX_SIGNAL_PEAKS; all: the signal peaks and the ``n_peaks`` strongest (for the refinement).
    """
    ny, nx = w.shape
    power = np.abs(np.fft.fftshift(np.fft.fft2(w))) ** 2
    cy, cx = ny // 2, nx // 2
    iy, ix = np.mgrid[0:ny, 0:nx]
    half = (iy > cy) | ((iy == cy) & (ix > cx))
    dc = ((iy - cy) / DC_BINS) ** 2 + ((ix - cx) / DC_BINS) ** 2 <= 1.0
    local_max = ndimage.maximum_filter(power, size=3, mode="wrap") == power
    cand = np.flatnonzero((local_max & half & ~dc).ravel())
    p = power.ravel()
    if cand.size == 0 or p[cand].max() <= 0:
        raise InputError("find_lattice: the virtual image has no periodic contrast (no Fourier peak)")
    noise = float(np.median(p[(half & ~dc).ravel()])) / math.log(2.0)
    cand = cand[np.argsort(p[cand])[::-1]]
    cand = cand[p[cand] >= threshold * p[cand[0]]]
    n_signal = min(int((p[cand] >= SIGNIFICANCE * noise).sum()), MAX_SIGNAL_PEAKS)
    if n_signal == 0:
        raise InputError(
            f"find_lattice: no Fourier peak of the virtual image stands out of the noise (strongest "
            f"{p.max() / max(noise, 1e-300):.3g} x the mean noise power; {SIGNIFICANCE:g} x needed)"
        )
    cand = cand[: max(n_signal, n_peaks)]
    bins = np.array([1.0 / nx, 1.0 / ny])
    refined = [_refine_peak(w, np.array([(ix.ravel()[c] - cx) / nx, (iy.ravel()[c] - cy) / ny]), bins) for c in cand]
    every = _Peaks(np.array([g for g, _ in refined]), np.array([a for _, a in refined]), (ny, nx), noise)
    return _Peaks(every.g[:n_signal], every.amp[:n_signal], (ny, nx), noise), every


class _Candidate(NamedTuple):
    """A reciprocal basis (rows b1, b2) refined on the peaks it indexes, and its indexing statistics."""

    basis: np.ndarray
    n_outliers: int
    outlier_power: float
    area: float


def _index(g: np.ndarray, basis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer indices of peaks ``g`` on a reciprocal basis and which peaks lie on it (INDEX_TOLERANCE)."""
    hk = g @ np.linalg.inv(basis)
    idx = np.round(hk)
    ok = (np.abs(hk - idx).max(axis=1) < INDEX_TOLERANCE) & (np.abs(idx).sum(axis=1) > 0)
    return idx, ok


def _refine(peaks: _Peaks, basis: np.ndarray) -> _Candidate | None:
    """Least-squares refinement of a reciprocal basis on the peaks it indexes (re-indexed until stable)."""
    power = peaks.amp**2
    ok = None
    for _ in range(4):
        idx, new = _index(peaks.g, basis)
        if new.sum() < 2 or np.linalg.matrix_rank(idx[new]) < 2:
            return None
        if ok is not None and np.array_equal(new, ok):
            break
        ok = new
        # weight by amplitude: the position error of a peak scales as noise / amplitude
        wts = peaks.amp[ok][:, None]
        basis, *_ = np.linalg.lstsq(idx[ok] * wts, peaks.g[ok] * wts, rcond=None)
    b1, b2 = gauss_reduce(basis[0], basis[1])
    basis = np.array([b1, b2])
    ny, nx = peaks.shape
    if min((b[0] * nx / DC_BINS) ** 2 + (b[1] * ny / DC_BINS) ** 2 for b in basis) <= 1.0:
        return None  # a period longer than the scan resolves
    idx, ok = _index(peaks.g, basis)
    return _Candidate(basis, int((~ok).sum()), float(power[~ok].sum() / power.sum()), abs(float(np.linalg.det(basis))))


def _candidates(peaks: _Peaks) -> list[_Candidate]:
    """Refined reciprocal lattices spanned by pairs of peaks, one per distinct lattice, coarsest first."""
    g, power = peaks.g, peaks.amp**2
    seeds = []
    for i, j in itertools.combinations(range(len(g)), 2):
        det = g[i, 0] * g[j, 1] - g[i, 1] * g[j, 0]
        if abs(det) < 0.1 * np.hypot(*g[i]) * np.hypot(*g[j]):
            continue
        _, ok = _index(g, np.array([g[i], g[j]]))
        if power[ok].sum() >= 0.5 * power.sum():  # a first pass before refinement
            seeds.append(np.array(gauss_reduce(g[i], g[j])))
    found: list[_Candidate] = []
    for seed in seeds:
        cand = _refine(peaks, seed)
        if cand is None or any(_same_lattice(cand.basis, c.basis) for c in found):
            continue
        found.append(cand)
    return sorted(found, key=lambda c: -c.area)


def _same_lattice(b: np.ndarray, c: np.ndarray) -> bool:
    """Whether two reciprocal bases span the same lattice (within the indexing tolerance)."""
    m = b @ np.linalg.inv(c)
    return bool(np.abs(m - np.round(m)).max() < INDEX_TOLERANCE and abs(abs(np.linalg.det(np.round(m))) - 1) < 0.5)


def _choose(cands: list[_Candidate], n_peaks: int) -> _Candidate | None:
    """The coarsest lattice leaving out at most OUTLIER_FRACTION of the peaks and of their power;
    else the one leaving out the fewest peaks (then the coarsest) while indexing 3/4 of the power."""
    allowed = int(OUTLIER_FRACTION * n_peaks)
    good = [c for c in cands if c.n_outliers <= allowed and c.outlier_power <= OUTLIER_FRACTION]
    if good:
        return max(good, key=lambda c: c.area)
    fair = [c for c in cands if c.outlier_power <= 0.25]
    return min(fair, key=lambda c: (c.n_outliers, -c.area)) if fair else None


def find_lattice(
    stem_or_image: Stem4D | np.ndarray,
    image: str = "adf",
    *,
    n_peaks: int = 12,
    threshold: float = 0.05,
    lattice_A: float | None = None,
    scan_step_A: tuple[float, float] | None = None,
    tolerance: float | None = None,
) -> Lattice:
    """Lattice (a1, a2, origin) of a periodic scan, in scan pixels (x, y), from its virtual image.

    ``stem_or_image``: a dataset (its ``image`` virtual image is used) or a 2D image (scan_y,
    scan_x), holding more than 2.5 periods along each direction. The search, reduction and
    setting are those of the module docstring (``n_peaks``, ``threshold``: the peaks of the
    refinement). ``lattice_A``: the structure model's lattice parameter (A); the lattice is then
    chosen among those whose periods |a1|, |a2| (at ``scan_step_A`` = (x, y) A per pixel, a
    dataset's own steps by default) lie within ``tolerance`` of it (relative; default: the
    schema's average.lattice_tolerance), the larger cells tested being those of the expected size
    (index 2 to 4); none agreeing is an InputError (:func:`check_lattice`).
    """
    img = virtual_image(stem_or_image, image) if isinstance(stem_or_image, Stem4D) else np.asarray(stem_or_image, float)
    if img.ndim != 2 or min(img.shape) < 8:
        raise InputError(f"find_lattice: need a 2D image of at least 8x8 scan positions, got shape {img.shape}")
    if not np.all(np.isfinite(img)):
        raise InputError("find_lattice: the virtual image holds NaN or infinite values")
    ny, nx = img.shape
    window = np.hanning(ny + 2)[1:-1, None] * np.hanning(nx + 2)[1:-1][None, :]
    w = (img - img.mean()) * window
    peaks, every = _fourier_peaks(w, n_peaks, threshold)
    cands = _candidates(peaks)
    chosen = _choose(cands, len(peaks.g))
    if chosen is None:
        raise InputError(
            f"find_lattice: no lattice of two directions indexes the {len(peaks.g)} Fourier peaks of the virtual "
            "image; the scan must cover more than 2.5 periods along two directions"
        )
    basis = chosen.basis
    if lattice_A is not None:
        if scan_step_A is None:
            if not isinstance(stem_or_image, Stem4D):
                raise InputError("find_lattice: lattice_A needs scan_step_A (x, y) for an image")
            scan_step_A = (float(stem_or_image.scan_step_x_A), float(stem_or_image.scan_step_y_A))
        tolerance = _tolerance(tolerance)
        agree = [c for c in cands if _deviation(_real(c.basis), scan_step_A, lattice_A) <= tolerance]
        agree = _choose(agree, len(peaks.g))
        if agree is not None:
            basis = agree.basis
        elif _deviation(_real(basis), scan_step_A, lattice_A) > tolerance:
            basis = _superlattice(img, window, peaks, basis, (lattice_A, scan_step_A, tolerance))
    else:
        basis = _superlattice(img, window, peaks, basis, None)
    refined = _refine(every, basis)  # on the signal peaks and the n_peaks strongest
    if refined is not None and _same_lattice(refined.basis, basis):
        basis = refined.basis
    a1, a2 = _real(basis)
    lattice = Lattice(a1, a2, np.zeros(2))
    recip = lattice.reciprocal
    phases = np.array([np.angle(_dtft(w, recip[j])) for j in range(2)])
    lattice = Lattice(a1, a2, lattice.basis @ np.mod(-phases / (2 * np.pi), 1.0))
    if lattice_A is not None:
        check_lattice(lattice, scan_step_A, lattice_A, tolerance, image=image)
    return lattice


def _superlattice(
    img: np.ndarray, window: np.ndarray, peaks: _Peaks, basis: np.ndarray, expected: tuple | None
) -> np.ndarray:
    """Reciprocal basis of a larger cell containing the found one whose own peaks show; else ``basis``.

    Without ``expected``: the three cells of twice the area, repeatedly while one shows. With
    ``expected`` = (lattice_A, scan_step_A, tolerance): the reduced bases of two vectors
    m1 c1 + m2 c2 (|m| <= 2, c: the found real basis) of the expected length spanning a cell 2 to
    4 times the found one. "Shows": the power at the peaks that the found lattice lacks is
    significant (:func:`_missing_peaks_pvalue` below SUPERLATTICE_ALPHA).
    """
    for _ in range(1 if expected else 2):
        best, best_p = basis, SUPERLATTICE_ALPHA
        noise = _periodic_part(img, window, basis)
        for recip in _larger_cells(basis, expected):
            p = _missing_peaks_pvalue(img, noise, peaks, basis, recip)
            if p < best_p:
                best, best_p = recip, p
        if best is basis:
            break
        basis = best
    return basis


def _larger_cells(basis: np.ndarray, expected: tuple | None) -> list[np.ndarray]:
    """Reciprocal bases of the candidate larger cells of :func:`_superlattice`."""
    c = np.linalg.inv(basis)  # columns c1, c2 (px)
    if expected is None:
        cells = [(2 * c[:, 0], c[:, 1]), (c[:, 0], 2 * c[:, 1]), (c[:, 0] + c[:, 1], c[:, 0] - c[:, 1])]
    else:
        lattice_A, steps, tolerance = expected
        vectors = []
        for m in itertools.product(range(-2, 3), repeat=2):
            if m[0] > 0 or (m[0] == 0 and m[1] > 0):  # one of each +-v
                v = c @ np.array(m, dtype=float)
                if abs(float(np.hypot(*(v * np.asarray(steps)))) / lattice_A - 1.0) <= tolerance:
                    vectors.append((m, v))
        cells = [
            (v, u)
            for (m, v), (n, u) in itertools.combinations(vectors, 2)
            if abs(m[0] * n[1] - m[1] * n[0]) in (2, 3, 4)
            and _deviation(gauss_reduce(v, u), steps, lattice_A) <= tolerance
        ]
    return [np.linalg.inv(np.column_stack(gauss_reduce(v, u))) for v, u in cells]


def _points(recip: np.ndarray, g_max: float) -> np.ndarray:
    """Points h b1 + k b2 of a reciprocal basis in one half plane (g_y > 0, or g_y = 0 < g_x) with |g| <= g_max."""
    real = np.linalg.inv(recip)
    h_max = int(np.ceil(g_max * max(np.hypot(*real[:, 0]), np.hypot(*real[:, 1])) * 2)) + 1
    g = np.array(list(itertools.product(range(-h_max, h_max + 1), repeat=2)), dtype=float) @ recip
    half = (g[:, 1] > 1e-12) | ((np.abs(g[:, 1]) <= 1e-12) & (g[:, 0] > 1e-12))
    return g[half & (np.hypot(g[:, 0], g[:, 1]) <= g_max)]


def _periodic_part(img: np.ndarray, window: np.ndarray, found: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The image's part periodic on the found lattice (its window-weighted Fourier components on the
    found reciprocal lattice below the Nyquist frequency), and the noise variance per pixel: the
    squared residual, smoothed the same way (shot noise follows the intensity over the cell)."""
    g = _points(found, 0.75)
    g = g[np.abs(g).max(axis=1) < 0.5]
    norm = float(window.sum())
    ny, nx = img.shape

    def periodic(x: np.ndarray) -> np.ndarray:
        mean = float((x * window).sum()) / norm
        out = np.full(x.shape, mean)
        for gi in g:  # one separable plane wave at a time: memory of one image
            c = _dtft((x - mean) * window, gi) / norm
            out += 2.0 * np.real(
                c * np.outer(np.exp(2j * np.pi * gi[1] * np.arange(ny)), np.exp(2j * np.pi * gi[0] * np.arange(nx)))
            )
        return out

    part = periodic(img)
    residual = img - part
    return part, np.maximum(periodic(residual**2), 0.1 * float(np.mean(residual**2)))


def _missing_peaks_pvalue(img: np.ndarray, noise: tuple, peaks: _Peaks, found: np.ndarray, recip: np.ndarray) -> float:
    """Probability that noise alone gives the power at the peaks of ``recip`` that ``found`` lacks.

    The 12 shortest such peaks g_i within the signal peaks' range, outside the DC lobe; N_i the
    Fourier sums there of the image less its part periodic on ``found`` (no window: the leakage it
    would hold back is gone with that part). For noise of variance s2(r) (``noise`` = (part, s2)
    of :func:`_periodic_part`) the N_i are complex normal with covariance C_ij = sum_r s2(r)
    exp(-2 pi i (g_i - g_j) . r) (correlated where the variance follows the lattice), so S_k, the
    sum of the k first |N_i|^2, has mean tr C and variance |C|_F^2, matched by a Gamma
    distribution; the smallest tail probability over k, times the number of sums tried.
    """
    from scipy import stats

    ny, nx = peaks.shape
    g = _points(recip, 1.05 * float(np.hypot(peaks.g[:, 0], peaks.g[:, 1]).max()))
    on_found = g @ np.linalg.inv(found)
    dc = (g[:, 0] * nx / DC_BINS) ** 2 + (g[:, 1] * ny / DC_BINS) ** 2 <= 1.0
    g = g[(np.abs(on_found - np.round(on_found)).max(axis=1) > 0.25) & ~dc]
    g = g[np.argsort(np.hypot(g[:, 0], g[:, 1]))][:12]
    if len(g) == 0:
        return 1.0
    part, var = noise
    power = np.array([abs(_dtft(img - part, gi)) ** 2 for gi in g])
    cov = np.array([[_dtft(var, gi - gj) for gj in g] for gi in g])
    p = []
    for k in range(1, len(g) + 1):
        mean, spread = float(np.real(np.trace(cov[:k, :k]))), float(np.sum(np.abs(cov[:k, :k]) ** 2))
        p.append(stats.gamma.sf(power[:k].sum(), mean**2 / spread, scale=spread / mean))
    return float(min(1.0, min(p) * len(g)))


def _real(reciprocal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reduced real-space basis (a1, a2) in the conventional setting of a reciprocal basis (rows b1, b2)."""
    a = np.linalg.inv(reciprocal)  # columns a1, a2
    return conventional_basis(*gauss_reduce(a[:, 0], a[:, 1]))


def _tolerance(tolerance: float | None) -> float:
    if tolerance is None:
        from octastem.config import schema_defaults

        tolerance = schema_defaults("average", "lattice_tolerance")
    tolerance = float(tolerance)
    if not 0 < tolerance < 1:
        raise InputError(f"average: field 'lattice_tolerance' = {tolerance}; expected a fraction in (0, 1)")
    return tolerance


def _deviation(vectors_px: tuple[np.ndarray, np.ndarray], scan_step_A, lattice_A: float) -> float:
    """Largest relative difference of the periods |a1|, |a2| (A) from ``lattice_A``."""
    periods = Lattice(*vectors_px, np.zeros(2)).periods_A(scan_step_A)
    return max(abs(p / lattice_A - 1.0) for p in periods)


def check_lattice(
    lattice: Lattice,
    scan_step_A: tuple[float, float],
    lattice_A: float,
    tolerance: float | None = None,
    *,
    image: str | None = None,
    where: str = "average",
) -> dict:
    """Check a lattice's periods against the structure model's lattice parameter; a summary of both.

    ``scan_step_A`` = (x, y) A per scan pixel; ``tolerance``: largest relative difference of |a1|
    or |a2| from ``lattice_A`` (default: the schema's average.lattice_tolerance). Raises an
    InputError naming the found periods (px and A), the expected one and the scan step when they
    disagree, so a wrong lattice stops the analysis instead of giving numbers.
    """
    tolerance = _tolerance(tolerance)
    sx, sy = (float(s) for s in scan_step_A)
    if not (lattice_A > 0 and sx > 0 and sy > 0 and math.isfinite(lattice_A * sx * sy)):
        raise InputError(f"{where}: lattice parameter {lattice_A} A and scan steps {sx}, {sy} A must be positive")
    px = [float(np.hypot(*lattice.a1)), float(np.hypot(*lattice.a2))]
    periods = lattice.periods_A((sx, sy))
    v1, v2 = lattice.vectors_A((sx, sy))
    angle = math.degrees(math.acos(np.clip(float(v1 @ v2) / (periods[0] * periods[1]), -1.0, 1.0)))
    deviation = max(abs(p / lattice_A - 1.0) for p in periods)
    summary = {
        "lattice_periods_px": px,
        "lattice_periods_A": list(periods),
        "lattice_cell_angle_deg": angle,
        "lattice_expected_A": float(lattice_A),
        "lattice_deviation": deviation,
        "lattice_tolerance": tolerance,
    }
    if not deviation <= tolerance:
        source = f"the {image} virtual image" if image else "the given lattice"
        raise InputError(
            f"{where}: the lattice of {source} has periods |a1| = {px[0]:.2f} px = {periods[0]:.3f} A and "
            f"|a2| = {px[1]:.2f} px = {periods[1]:.3f} A (cell angle {angle:.1f} deg) at scan steps "
            f"{sx:.4g} A (x) x {sy:.4g} A (y); the expected lattice parameter (structure.a_A) is {lattice_A:g} A = "
            f"{lattice_A / sx:.2f} px (x) x {lattice_A / sy:.2f} px (y), {deviation:.1%} away, more than "
            f"average.lattice_tolerance = {tolerance:g}. Check structure.a_A, the scan step calibration and "
            "average.image (a virtual image in which the lattice shows)"
        )
    return summary
