"""The column lattice of cubic FAPbBr3 along [001]: ideal grid, lattice location and initial guesses.

Geometry. ``image`` is a numpy array (y, x); pixel (iy, ix) lies at (x = ix*s, y = iy*s) A with
``s = sampling_A``. ``n_cells = (nx, ny)`` unit cells span the image and ``cell_A = (Lx, Ly)`` is
the in-plane size of that periodic supercell (the whole image), so the lattice constants are
``Lx/nx`` and ``Ly/ny``. The ideal columns per unit cell (fractional coordinates) are PbBr (0, 0),
Br (1/2, 0) (site ``Br_x``: its Pb-Br-Pb bond runs along x), Br (0, 1/2) (site ``Br_y``) and FA
(1/2, 1/2). A rigid lattice offset (``origin_A``: position of the PbBr column of cell (0, 0)) is
found whatever the contrast order of the columns (:func:`locate_lattice`, :func:`refine_origin`):
a template of all four sites with a free height per site, fitted by linear least squares at every
candidate origin, locates the columns as a whole; the types are those of the structure model's
sites with the PbBr column at the cell origin (as in the MD cell and the template-matching
average), checked by its symmetry (Br_x and Br_y equal in height); the brightest peak of each cell,
at whichever site, refines the offset.

Initial guesses of every column (position, height, background, covariance) come from the
brightest pixel near its ideal site and the second moments of its half-maximum region.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import ndimage

from octastem.fit.model import _gather, _stencil
from octastem.io import InputError

#: Column sites of the cubic perovskite along [001]: (site, type, fractional x, fractional y).
SITES = (
    ("PbBr", "PbBr", 0.0, 0.0),
    ("Br_x", "Br", 0.5, 0.0),
    ("Br_y", "Br", 0.0, 0.5),
    ("FA", "FA", 0.5, 0.5),
)
TYPES = ("PbBr", "Br", "FA")

#: Radius (lattice constants) around an expected column where its peak is searched and centred.
PEAK_FRAC = 0.15
#: Radius (lattice constants) of the region whose 10th percentile is a column's local background.
BACKGROUND_FRAC = 0.5
#: Radius (lattice constants) of the region whose half-maximum part gives a column's moments.
MOMENT_FRAC = 0.3
#: Initial widths lie in [GUESS_SIGMA_MIN_PX * s, GUESS_SIGMA_MAX_FRAC * a]; a column without a
#: usable half-maximum region starts round with width GUESS_SIGMA_FRAC * a.
GUESS_SIGMA_MIN_PX = 0.5
GUESS_SIGMA_MAX_FRAC = 0.2
GUESS_SIGMA_FRAC = 0.07
#: Bound of the initial correlation rho.
GUESS_RHO_MAX = 0.8
#: Width (lattice constants, at least one pixel) of the Gaussians of the all-sites template that
#: locates the lattice.
TEMPLATE_SIGMA_FRAC = 0.07
#: The site assignment is refused when the Br_x / Br_y height difference exceeds SYMMETRY_RATIO
#: times the PbBr / A one plus SYMMETRY_SIGMAS standard errors (:func:`_check_assignment`). The
#: ratio leaves room for the Br_x / Br_y asymmetry of real phase images (up to ~10 % of the
#: PbBr height in iCOM images of the simulated nanocrystal at 48 e/A^2, about 10x their standard error).
SYMMETRY_RATIO = 2.0
SYMMETRY_SIGMAS = 3.0


def _pair(value, name: str, cast=float) -> tuple:
    try:
        seq = list(np.asarray(value).ravel())
    except Exception as e:  # pragma: no cover - defensive
        raise InputError(f"{name}: expected two numbers (x, y), got {value!r}") from e
    if len(seq) != 2:
        raise InputError(f"{name}: expected two numbers (x, y), got {value!r}")
    out = tuple(cast(v) for v in seq)
    if cast is int and any(v < 1 for v in out):
        raise InputError(f"{name}: expected two integers >= 1, got {value!r}")
    if cast is float and any(not (v > 0 and math.isfinite(v)) for v in out):
        raise InputError(f"{name}: expected two positive lengths in A, got {value!r}")
    return out


def column_grid(n_cells, cell_A, origin_A=(0.0, 0.0)) -> pd.DataFrame:
    """Ideal column positions of ``n_cells = (nx, ny)`` cubic cells spanning the supercell ``cell_A``.

    Returns a DataFrame with columns type, site, i, j (cell indices), x, y (A, wrapped into the
    supercell [0, Lx) x [0, Ly)); ``origin_A`` is the position of the PbBr column of cell (0, 0).
    """
    nx, ny = _pair(n_cells, "n_cells", int)
    lx, ly = _pair(cell_A, "cell_A")
    ax, ay = lx / nx, ly / ny
    ox, oy = (float(v) for v in origin_A)
    rows = []
    for site, typ, fx, fy in SITES:
        for j in range(ny):
            for i in range(nx):
                rows.append((typ, site, i, j, ((i + fx) * ax + ox) % lx, ((j + fy) * ay + oy) % ly))
    return pd.DataFrame(rows, columns=["type", "site", "i", "j", "x", "y"])


def _check_geometry(image, sampling_A, n_cells, cell_A):
    """Validate image and lattice; return (image float64, s, (nx, ny), (Lx, Ly), (ax, ay))."""
    img = np.asarray(image, dtype=float)
    if img.ndim != 2:
        raise InputError(f"image: expected a 2D array (y, x), got shape {img.shape}")
    n_bad = int((~np.isfinite(img)).sum())
    if n_bad:
        raise InputError(f"image: {n_bad} non-finite (NaN/inf) pixel(s); expected a finite image")
    s = float(sampling_A)
    if not (s > 0 and math.isfinite(s)):
        raise InputError(f"sampling_A: expected a positive pixel size in A, got {sampling_A!r}")
    nx, ny = _pair(n_cells, "n_cells", int)
    lx, ly = _pair(cell_A, "cell_A")
    ext_x, ext_y = img.shape[1] * s, img.shape[0] * s
    tol_x, tol_y = max(1.5 * s, 0.01 * lx), max(1.5 * s, 0.01 * ly)
    if abs(ext_x - lx) > tol_x or abs(ext_y - ly) > tol_y:
        hint = ""
        if abs(ext_x - nx * lx) <= tol_x * nx and abs(ext_y - ny * ly) <= tol_y * ny:
            hint = " (cell_A looks like the unit-cell size; pass the supercell size n_cells * a)"
        raise InputError(
            f"image: extent {ext_x:.3f} x {ext_y:.3f} A ({img.shape[1]} x {img.shape[0]} px at "
            f"{s} A/px) does not match cell_A = ({lx}, {ly}) A; the image must span the periodic "
            f"supercell of n_cells = ({nx}, {ny}) unit cells{hint}"
        )
    ax, ay = lx / nx, ly / ny
    if min(ax, ay) / s < 8:
        raise InputError(
            f"image: too small for the lattice: {min(ax, ay) / s:.1f} px per unit cell "
            f"(n_cells = ({nx}, {ny}) over {img.shape[1]} x {img.shape[0]} px); expected >= 8"
        )
    return img, s, (nx, ny), (lx, ly), (ax, ay)


def _patch(img, s, xc, yc, radius, stride: int = 1):
    """Pixels within ``radius`` A of (xc, yc) with periodic wrap: (X, Y, values) in unwrapped A."""
    ny, nx = img.shape
    ix = np.arange(math.floor((xc - radius) / s), math.ceil((xc + radius) / s) + 1, stride)
    iy = np.arange(math.floor((yc - radius) / s), math.ceil((yc + radius) / s) + 1, stride)
    IX, IY = np.meshgrid(ix, iy)
    X, Y = IX * s, IY * s
    m = (X - xc) ** 2 + (Y - yc) ** 2 <= radius * radius
    return X[m], Y[m], img[IY[m] % ny, IX[m] % nx]


def _smooth(img):
    """3x3 box filter with periodic wrap: the peak search of every column runs on it."""
    return ndimage.uniform_filter(img, size=3, mode="wrap")


# ----------------------------------------------------------------------------------------------
# Locating the lattice in the image
# ----------------------------------------------------------------------------------------------


def _peak_position(img, smooth, s, xp, yp, search_A, centroid_A):
    """Brightest (smoothed) pixel within ``search_A`` of (xp, yp), refined by the centroid of the
    region above half maximum within ``centroid_A`` of it. Returns (x, y, contrast)."""
    X, Y, V = _patch(smooth, s, xp, yp, search_A)
    k = int(np.argmax(V))
    xm, ym = X[k], Y[k]
    bg = float(np.percentile(V, 10))
    X2, Y2, V2 = _patch(img, s, xm, ym, centroid_A)
    half = bg + 0.5 * (V[k] - bg)
    w = np.clip(V2 - half, 0, None)
    if w.sum() <= 0:
        return xm, ym, V[k] - bg
    return float((w * X2).sum() / w.sum()), float((w * Y2).sum() / w.sum()), float(V[k] - bg)


def _noise_sigma(img) -> float:
    """Pixel noise estimate from the MAD of differences of next-but-one pixels (robust to smooth signal)."""
    d = (img[:, 2:] - 2 * img[:, 1:-1] + img[:, :-2]).ravel()
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / math.sqrt(6))


def _site_profile(n_px: int, s: float, n: int, frac: float, sigma: float) -> np.ndarray:
    """Periodic 1D sum of Gaussians of width ``sigma`` (A) at (i + frac) of ``n`` equal periods
    spanning ``n_px`` pixels of ``s`` A: one factor of a site's template (the sites form a
    rectangular lattice, so their templates are separable)."""
    period = n_px * s
    x = np.arange(n_px) * s
    centres = (np.arange(n) + frac) * period / n
    d = (x[:, None] - centres[None, :] + period / 2) % period - period / 2
    return np.exp(-0.5 * (d / sigma) ** 2).sum(axis=1)


def _template_scores(img, s, n_cells, sigma):
    """Linear least squares of the all-sites template at every pixel shift of its origin.

    The template has one Gaussian of width ``sigma`` (A) per column of the structure model
    (:data:`SITES`), a free height per site and a free background. Its fit at an origin shift of
    (p, q) pixels needs only the correlations of the image with the four site templates (by FFT)
    and their Gram matrix, which no shift changes. Returns the explained sum of squares per shift
    (ny, nx), the correlations (5, ny, nx; the last one with the constant background) and the
    inverse Gram matrix (5, 5).
    """
    nyp, nxp = img.shape
    nx, ny = n_cells
    spectrum = np.fft.rfft2(img)
    prof_x = {f: _site_profile(nxp, s, nx, f, sigma) for f in (0.0, 0.5)}
    prof_y = {f: _site_profile(nyp, s, ny, f, sigma) for f in (0.0, 0.5)}
    k_bg = len(SITES)
    corr = np.empty((k_bg + 1, nyp, nxp))
    gram = np.empty((k_bg + 1, k_bg + 1))
    for k, (_, _, fx, fy) in enumerate(SITES):
        template = np.outer(prof_y[fy], prof_x[fx])
        corr[k] = np.fft.irfft2(spectrum * np.conj(np.fft.rfft2(template)), s=img.shape)
        for m, (_, _, gx, gy) in enumerate(SITES):
            gram[k, m] = (prof_y[fy] @ prof_y[gy]) * (prof_x[fx] @ prof_x[gx])
        gram[k, k_bg] = gram[k_bg, k] = prof_y[fy].sum() * prof_x[fx].sum()
    corr[k_bg] = img.sum()
    gram[k_bg, k_bg] = img.size
    gram_inv = np.linalg.inv(gram)
    return np.einsum("kyx,km,myx->yx", corr, gram_inv, corr), corr, gram_inv


def _parabola_vertex(left: float, centre: float, right: float) -> float:
    """Sub-pixel offset (pixels, within +-0.5) of the vertex of the parabola through three samples."""
    curvature = left - 2 * centre + right
    if not curvature < 0:
        return 0.0
    return float(np.clip(0.5 * (left - right) / curvature, -0.5, 0.5))


def _template_origin(img, s, n_cells, origin_A=None):
    """Origin of the structure model's columns from all of them: the shift of the all-sites
    template (:func:`_template_scores`) that fits best, searched within a quarter cell of the image
    origin (the template repeats every half cell, so that window holds each fit once), refined to a
    sub-pixel by a parabola; ``origin_A`` when given. Returns ((ox, oy) A, the fitted height of
    each site of :data:`SITES` at that shift, their covariance (4, 4))."""
    nyp, nxp = img.shape
    nx, ny = n_cells
    ax_px, ay_px = nxp / nx, nyp / ny
    sigma = max(TEMPLATE_SIGMA_FRAC * min(ax_px, ay_px) * s, s)
    score, corr, gram_inv = _template_scores(img, s, (nx, ny), sigma)
    qx = (np.arange(nxp) + nxp // 2) % nxp - nxp // 2
    qy = (np.arange(nyp) + nyp // 2) % nyp - nyp // 2
    if origin_A is None:
        inside = (np.abs(qy)[:, None] <= ay_px / 4) & (np.abs(qx)[None, :] <= ax_px / 4)
        p, q = np.unravel_index(int(np.argmax(np.where(inside, score, -np.inf))), score.shape)
        dx = _parabola_vertex(score[p, (q - 1) % nxp], score[p, q], score[p, (q + 1) % nxp])
        dy = _parabola_vertex(score[(p - 1) % nyp, q], score[p, q], score[(p + 1) % nyp, q])
        origin = (float((qx[q] + dx) * s), float((qy[p] + dy) * s))
    else:
        origin = tuple(float(v) for v in origin_A)
        p, q = round(origin[1] / s) % nyp, round(origin[0] / s) % nxp
    coef = gram_inv @ corr[:, p, q]
    rss = max(float(np.sum(img * img) - score[p, q]), 0.0)
    cov = rss / max(img.size - len(coef), 1) * gram_inv
    return origin, coef[: len(SITES)], cov[: len(SITES), : len(SITES)]


def _cell_peaks(img, s, n_cells, lattice_A, origin_A):
    """The brightest peak of each unit cell, searched over the whole cell (any column type may be
    the brightest), as the offset (dx, dy) A from the ideal position (origin (0, 0)) of the site it
    sits at (the nearest site of the structure model's grid at ``origin_A``), and its contrast."""
    nx, ny = n_cells
    ax, ay = lattice_A
    a = min(ax, ay)
    smooth = _smooth(img)
    offsets, contrasts = [], []
    for j in range(ny):
        for i in range(nx):
            x, y, c = _peak_position(img, smooth, s, i * ax, j * ay, 0.5 * math.hypot(ax, ay), PEAK_FRAC * a)
            fx = 0.5 * (math.floor((x - origin_A[0]) / (0.5 * ax) + 0.5) % 2)
            fy = 0.5 * (math.floor((y - origin_A[1]) / (0.5 * ay) + 0.5) % 2)
            dx = (x - (i + fx) * ax + 0.5 * ax) % ax - 0.5 * ax
            dy = (y - (j + fy) * ay + 0.5 * ay) % ay - 0.5 * ay
            offsets.append((dx, dy))
            contrasts.append(c)
    return np.array(offsets), np.array(contrasts)


def _circular_mean(d, period):
    return float(period / (2 * math.pi) * np.angle(np.mean(np.exp(2j * math.pi * np.asarray(d) / period))))


def _check_assignment(heights, cov, lattice_A) -> None:
    """The structure model's symmetry check of the site assignment: Br_x and Br_y are equivalent
    (the four-fold axis through PbBr and A maps one onto the other), so their heights agree, while
    PbBr and A differ in general. When the pair at (1/2, 0) and (0, 1/2) of the origin differs by
    clearly more than the pair at (0, 0) and (1/2, 1/2) (:data:`SYMMETRY_RATIO`,
    :data:`SYMMETRY_SIGMAS`), the Br columns are the diagonal through the origin: the PbBr column
    sits half a cell away. (Where PbBr and A are as bright as each other, the heights cannot tell
    the two diagonals apart, and the PbBr column is taken to be at the origin.)"""
    h = dict(zip((site for site, *_ in SITES), heights))
    d_br, d_pa = abs(h["Br_x"] - h["Br_y"]), abs(h["PbBr"] - h["FA"])
    e_br, e_pa = np.array([0.0, 1.0, -1.0, 0.0]), np.array([1.0, 0.0, 0.0, -1.0])
    se = math.sqrt(max(float(e_br @ cov @ e_br + e_pa @ cov @ e_pa), 0.0))
    if d_br > SYMMETRY_RATIO * d_pa + SYMMETRY_SIGMAS * se:
        ax, ay = lattice_A
        raise InputError(
            f"lattice: the columns at (1/2, 0) and (0, 1/2) of the origin, equivalent Br sites in the structure "
            f"model, differ in height ({h['Br_x']:.3g} vs {h['Br_y']:.3g}) while those at (0, 0) and (1/2, 1/2) "
            f"agree ({h['PbBr']:.3g}, {h['FA']:.3g}): the PbBr column sits half a cell from the cell origin, more "
            f"than a quarter cell ({ax / 4:.2f}, {ay / 4:.2f}) A from where the MD cell and the template-matching "
            f"average put it; check n_cells/cell_A or the image"
        )


def refine_origin(image, sampling_A, n_cells, cell_A) -> tuple[float, float]:
    """Rigid lattice offset (ox, oy) in A, the position of the PbBr column of cell (0, 0): the
    structure model's columns located as a whole (:func:`_template_origin`), then the mean
    (periodic) displacement of the brightest peak of each cell from the ideal site it sits at."""
    img, s, n, _cell, lattice_A = _check_geometry(image, sampling_A, n_cells, cell_A)
    coarse, _, _ = _template_origin(img, s, n)
    offsets, _ = _cell_peaks(img, s, n, lattice_A, coarse)
    return _circular_mean(offsets[:, 0], lattice_A[0]), _circular_mean(offsets[:, 1], lattice_A[1])


@dataclass(frozen=True)
class Lattice:
    """The lattice found in an image: pixel size, cells, supercell and lattice constants (A), the
    rigid offset ``origin_A`` of the PbBr column of cell (0, 0), the pixel noise estimate and the
    heights of the four sites of :data:`SITES` in the all-sites template fit (the contrast order)."""

    sampling_A: float
    n_cells: tuple[int, int]
    cell_A: tuple[float, float]
    lattice_A: tuple[float, float]
    origin_A: tuple[float, float]
    noise_sigma: float
    site_heights: tuple[float, ...] | None = None

    @property
    def a(self) -> float:
        """The smaller lattice constant (A): the length scale of windows and bounds."""
        return min(self.lattice_A)

    def grid(self) -> pd.DataFrame:
        """Ideal column positions at the found offset (see :func:`column_grid`)."""
        return column_grid(self.n_cells, self.cell_A, self.origin_A)


def locate_lattice(image, sampling_A, n_cells, cell_A, origin_A=None) -> Lattice:
    """Find the lattice of ``n_cells`` over ``cell_A`` in ``image``, whatever the contrast order of
    its columns.

    The origin comes from all the columns of the structure model (:func:`_template_origin`); the
    types follow from the sites of the model with the PbBr column at the cell origin (where the MD
    cell and the template-matching average put it), checked by the model's symmetry
    (:func:`_check_assignment`). The brightest peak of each cell, whichever site it sits at, must
    stand out of the noise and repeat with the lattice; their mean offset from their sites is the
    origin (``origin_A`` when given). Raises :class:`~octastem.io.InputError` when the columns are
    not found, do not repeat with the lattice, or the PbBr column sits more than a quarter cell
    from the cell origin."""
    img, s, (nx, ny), (lx, ly), (ax, ay) = _check_geometry(image, sampling_A, n_cells, cell_A)
    a = min(ax, ay)
    coarse, heights, cov = _template_origin(img, s, (nx, ny), origin_A)
    offsets, contrasts = _cell_peaks(img, s, (nx, ny), (ax, ay), coarse)
    noise = _noise_sigma(img)
    if np.median(contrasts) <= 5 * noise:
        raise InputError(
            f"image: columns not found: the peak contrast {np.median(contrasts):.3g} of the brightest column "
            f"of each cell is not above 5x the pixel noise {noise:.3g}"
        )
    mx, my = _circular_mean(offsets[:, 0], ax), _circular_mean(offsets[:, 1], ay)
    scatter = np.hypot((offsets[:, 0] - mx + ax / 2) % ax - ax / 2, (offsets[:, 1] - my + ay / 2) % ay - ay / 2)
    if np.median(scatter) > 0.125 * a:
        raise InputError(
            f"lattice: the brightest peak of each cell does not repeat with the lattice of "
            f"n_cells = ({nx}, {ny}) over cell_A = ({lx}, {ly}) A (median scatter "
            f"{np.median(scatter):.2f} A about the mean offset); columns not found"
        )
    if origin_A is None:
        _check_assignment(heights, cov, (ax, ay))
    ox, oy = (mx, my) if origin_A is None else (float(v) for v in origin_A)
    if abs(ox) > ax / 4 or abs(oy) > ay / 4:
        raise InputError(
            f"lattice: the PbBr columns sit ({ox:.2f}, {oy:.2f}) A from the cell origin, more than a quarter "
            f"cell ({ax / 4:.2f}, {ay / 4:.2f}) A; check n_cells/cell_A or the image"
        )
    return Lattice(s, (nx, ny), (lx, ly), (ax, ay), (ox, oy), noise, tuple(float(h) for h in heights))


# ----------------------------------------------------------------------------------------------
# Initial guesses
# ----------------------------------------------------------------------------------------------


def _moment_guess(img, smooth, s, xp, yp, a):
    """Position, height, background and covariance (sx, sy, rho) of the column near (xp, yp) from
    the brightest pixel within 0.15 a and the second moments of its half-maximum region."""
    X, Y, V = _patch(smooth, s, xp, yp, max(PEAK_FRAC * a, 1.5 * s))
    k = int(np.argmax(V))
    xm, ym = X[k], Y[k]
    _, _, Vb = _patch(img, s, xm, ym, BACKGROUND_FRAC * a)
    bg = float(np.percentile(Vb, 10))
    h = float(V[k] - bg)
    X2, Y2, V2 = _patch(img, s, xm, ym, MOMENT_FRAC * a)
    inside = V2 > bg + 0.5 * h
    smin, smax = GUESS_SIGMA_MIN_PX * s, GUESS_SIGMA_MAX_FRAC * a
    if h <= 0 or inside.sum() < 3:
        sig = max(GUESS_SIGMA_FRAC * a, smin)
        return {"x": xm, "y": ym, "h": max(h, 0.0), "bg": bg, "sx": sig, "sy": sig, "rho": 0.0}
    Xi, Yi, w = X2[inside], Y2[inside], V2[inside] - (bg + 0.5 * h)
    x0 = float((w * Xi).sum() / w.sum()) if w.sum() > 0 else xm
    y0 = float((w * Yi).sum() / w.sum()) if w.sum() > 0 else ym
    # The 3x3 smoothing lowers the peak; take the height from the raw pixels nearest the centroid.
    near = (X2 - x0) ** 2 + (Y2 - y0) ** 2 <= max(s * s, (0.05 * a) ** 2)
    if near.any():
        h = max(float(V2[near].mean()) - bg, h)
    # Unweighted moments of the half-maximum region: for a Gaussian it is an ellipse whose
    # variance along each axis is sigma^2 ln2 / 2; pixelisation adds s^2/12.
    cxx = np.mean((Xi - Xi.mean()) ** 2) - s * s / 12
    cyy = np.mean((Yi - Yi.mean()) ** 2) - s * s / 12
    cxy = np.mean((Xi - Xi.mean()) * (Yi - Yi.mean()))
    f = 2.0 / math.log(2.0)
    sx = float(np.clip(math.sqrt(max(f * cxx, 0.0)), smin, smax))
    sy = float(np.clip(math.sqrt(max(f * cyy, 0.0)), smin, smax))
    rho = float(np.clip(f * cxy / (sx * sy), -GUESS_RHO_MAX, GUESS_RHO_MAX))
    return {"x": x0, "y": y0, "h": h, "bg": bg, "sx": sx, "sy": sy, "rho": rho}


def _moment_guess_batch(img, smooth, s, x, y, a):
    """Vectorised :func:`_moment_guess` for all columns at once: dict of arrays."""
    shape = img.shape
    n = len(x)
    ax_, ay_ = np.rint(np.asarray(x) / s).astype(int), np.rint(np.asarray(y) / s).astype(int)
    di, dj = _stencil(max(PEAK_FRAC * a, 1.5 * s) / s)
    _, _, L = _gather(shape, s, ax_, ay_, di, dj)
    V = smooth.ravel()[L]
    k = np.argmax(V, axis=1)
    mx, my = ax_ + di[k], ay_ + dj[k]
    vmax = V[np.arange(n), k]
    r_bg = BACKGROUND_FRAC * a / s
    di, dj = _stencil(r_bg, max(1, int(r_bg // 20)))
    _, _, L = _gather(shape, s, mx, my, di, dj)
    bg = np.percentile(img.ravel()[L], 10, axis=1)
    h = vmax - bg
    di, dj = _stencil(MOMENT_FRAC * a / s)
    X2, Y2, L = _gather(shape, s, mx, my, di, dj)
    V2 = img.ravel()[L]
    half = (bg + 0.5 * h)[:, None]
    inside = V2 > half
    cnt = inside.sum(1)
    w = np.where(inside, V2 - half, 0.0)
    ws = w.sum(1)
    safe = np.where(ws > 0, ws, 1.0)
    x0 = np.where(ws > 0, (w * X2).sum(1) / safe, mx * s)
    y0 = np.where(ws > 0, (w * Y2).sum(1) / safe, my * s)
    near = (X2 - x0[:, None]) ** 2 + (Y2 - y0[:, None]) ** 2 <= max(s * s, (0.05 * a) ** 2)
    nn = near.sum(1)
    hnear = np.where(nn > 0, np.where(near, V2, 0.0).sum(1) / np.maximum(nn, 1) - bg, h)
    h = np.maximum(h, hnear)
    c = np.maximum(cnt, 1)
    mxi = np.where(inside, X2, 0.0).sum(1) / c
    myi = np.where(inside, Y2, 0.0).sum(1) / c
    dxi = np.where(inside, X2 - mxi[:, None], 0.0)
    dyi = np.where(inside, Y2 - myi[:, None], 0.0)
    f = 2.0 / math.log(2.0)
    smin, smax = GUESS_SIGMA_MIN_PX * s, GUESS_SIGMA_MAX_FRAC * a
    sx = np.clip(np.sqrt(np.maximum(f * ((dxi * dxi).sum(1) / c - s * s / 12), 0.0)), smin, smax)
    sy = np.clip(np.sqrt(np.maximum(f * ((dyi * dyi).sum(1) / c - s * s / 12), 0.0)), smin, smax)
    rho = np.clip(f * (dxi * dyi).sum(1) / c / (sx * sy), -GUESS_RHO_MAX, GUESS_RHO_MAX)
    poor = (h <= 0) | (cnt < 3)
    sig = max(GUESS_SIGMA_FRAC * a, smin)
    return {
        "x": np.where(poor, mx * s, x0),
        "y": np.where(poor, my * s, y0),
        "h": np.where(poor, np.maximum(h, 0.0), h),
        "bg": bg,
        "sx": np.where(poor, sig, sx),
        "sy": np.where(poor, sig, sy),
        "rho": np.where(poor, 0.0, rho),
    }


def moment_guesses(img, s, grid, a):
    """Initial guesses of all columns of ``grid`` (vectorised :func:`_moment_guess`): dict of arrays."""
    return _moment_guess_batch(img, _smooth(img), s, grid["x"].to_numpy(), grid["y"].to_numpy(), a)
