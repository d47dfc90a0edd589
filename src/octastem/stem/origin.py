"""The bright-field disc of measured 4D-STEM data, its drift over the scan (descan) and the
scan-to-detector rotation and flip, measured from the data; patterns resampled onto the optical
axis and the scan axes.

Measured patterns rarely have the disc at the detector centre: the optical axis sits anywhere on
the detector and moves with the scan (descan), and the detector axes are turned (and possibly
transposed) against the scan axes. The pipeline's detectors, the CNN's canonical input and iCOM
assume the disc centred at pixel (n_k // 2) and the detector axes along the scan axes, so a
measured dataset is put into that frame once, at ingest:

1. :func:`find_disc`: the disc of the mean pattern (largest bright region above half its
   contrast, holes filled): centre and radius from its area, or, for a disc cut by the detector
   edge, from a circle fitted to its edge away from the detector border.
2. :func:`disc_com`: per scan position, the centre of mass of the counts inside the disc (radius
   plus a margin) around a guess of its centre; :func:`fit_origin`: a weighted least-squares
   plane (or quadratic surface, or constant) of those centres over the scan, weights the counts
   in the disc. The fit is the descan: the specimen's own deflection averages out of a surface
   fitted over many lattice periods.
3. :func:`measure_rotation`: the rotation and flip (transpose of the detector axes) that make the
   COM field, relative to the fitted origin, curl-free (a phase object's COM is a gradient field;
   py4DSTEM's DPC and quantem's ``CenterOfMassOriginModel`` use the same criterion, mean |curl|
   over the interior). The curl fixes the angle modulo 180 deg; the half turn is the one whose
   integrated phase correlates positively with the dark-field counts (atomic columns scatter
   out of the disc).
4. :func:`edge_sums` / :func:`disc_edge`: the disc's edge profile (level 1 inside to 0 outside)
   about the fitted centres, as the data show it.
5. :class:`Alignment` maps every output pixel onto the detector (affine: fitted origin, rotation,
   flip) and :meth:`Alignment.resample` resamples patterns onto a window that lies on the detector
   at every scan position, with the disc at its pixel (n // 2) and its axes along the scan axes:
   the disc's modulation and the dark field are interpolated (bilinear) and the edge is put back
   at the output pixels from its profile (values stay >= 0). Bilinear interpolation of the whole
   pattern would widen the edge, a ramp about a pixel wide, by up to a pixel, and the CNN, trained
   on sharp edges, loses up to 0.03 in correlation with the truth from it.

Units: detector pixels (k_y, k_x) unless named otherwise; angles in degrees, counter-clockwise
from the detector axes to the scan axes (``scan_rotation_deg`` of :mod:`octastem.stem.reconstruct`).
quantem's origin model is not used for the steps themselves: it holds the whole dataset in memory,
its COM includes the dark field, its shift wraps a cut disc around, and its plane fit is
unweighted and returns no coefficients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from octastem.io import InputError

#: Fit surfaces of the descan (:func:`fit_origin`) and the terms of each, in scan coordinates.
ORIGIN_FITS = ("plane", "parabola", "constant")
#: Largest relative disagreement of the disc radius found with semiangle / k_sampling.
RADIUS_RTOL = 0.10
#: Difference (deg) between a configured and a measured rotation above which a warning is given.
ROTATION_WARN_DEG = 3.0
#: Largest uncertainty (deg) of a rotation measured to be used.
ROTATION_MAX_UNCERTAINTY_DEG = 1.0
#: Smallest scan (positions per axis) on which the rotation is measured.
ROTATION_MIN_SCAN = 6
#: The curl at the best angle must be below this fraction of its mean over the angles.
ROTATION_MAX_CURL_RATIO = 0.8


@dataclass(frozen=True)
class Disc:
    """A bright-field disc: centre (k_y, k_x) and radius in detector pixels; ``cut``: it reaches the detector edge."""

    centre_px: tuple[float, float]
    radius_px: float
    cut: bool
    contrast: float

    def as_dict(self) -> dict:
        return {
            "centre_px": [float(self.centre_px[0]), float(self.centre_px[1])],
            "radius_px": float(self.radius_px),
            "cut": bool(self.cut),
            "contrast": float(self.contrast),
        }


def _circle_fit(y: np.ndarray, x: np.ndarray) -> tuple[float, float, float]:
    """Algebraic (Kasa) least-squares circle through points (y, x): centre (cy, cx) and radius."""
    a = np.column_stack([x, y, np.ones_like(x)])
    b = -(x * x + y * y)
    (d, e, f), *_ = np.linalg.lstsq(a, b, rcond=None)
    cx, cy = -d / 2, -e / 2
    return float(cy), float(cx), float(math.sqrt(max(cx * cx + cy * cy - f, 0.0)))


def _region_at(s: np.ndarray, level: float):
    """Largest connected region of ``s`` above ``level``, holes filled (or None)."""
    labels, n = ndimage.label(s > level)
    if n == 0:
        return None
    sizes = ndimage.sum(np.ones_like(s), labels, range(1, n + 1))
    return ndimage.binary_fill_holes(labels == int(np.argmax(sizes)) + 1)


def _edge_circle(region: np.ndarray, border: np.ndarray):
    """Circle fitted to the edge pixels of ``region`` away from the detector border: (cy, cx, r,
    RMS residual / r), or None with too few edge pixels."""
    edge = region & ~ndimage.binary_erosion(region) & ~ndimage.binary_dilation(border)
    ey, ex = np.nonzero(edge)
    if len(ey) < 8:
        return None
    cy, cx, r = _circle_fit(ey.astype(float), ex.astype(float))
    if not r > 0:
        return None
    resid = np.hypot(ey - cy, ex - cx) - r
    return cy, cx, r + 0.5, float(np.sqrt(np.mean(resid**2)) / r)  # edge pixels lie half a pixel inside


#: Levels tried for the disc, as fractions from the background to the bright level (:func:`find_disc`).
DISC_LEVELS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def find_disc(pattern: np.ndarray, min_contrast: float = 2.0) -> Disc | None:
    """The bright-field disc of a (mean) diffraction pattern, or None when there is none.

    The pattern is smoothed (1 px) for the search. At each of :data:`DISC_LEVELS` between the
    background (median) and the bright level (99.9th percentile, robust to hot pixels) the largest
    connected region above it (holes filled) is taken, and the level whose region's edge is the
    best circle is kept: a halo of diffuse scattering or a streak joins the region at low levels
    and makes its edge irregular. Uncut, the disc's centre is the region's centroid and its radius
    sqrt(area / pi); touching the detector edge, both come from a circle fitted to its edge pixels
    away from the detector border. None when the pattern holds no counts, the region is under 12
    pixels, its mean is below ``min_contrast`` x the mean outside it, or no level gives a round edge.
    """
    m = np.asarray(pattern, dtype=np.float64)
    if m.ndim != 2 or min(m.shape) < 4 or not np.all(np.isfinite(m)) or not m.max() > 0:
        return None
    s = ndimage.gaussian_filter(m, 1.0, mode="nearest")
    low, high = float(np.median(s)), float(np.percentile(s, 99.9))
    if not high > low:
        return None
    border = np.zeros(m.shape, dtype=bool)
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
    best = None
    for f in DISC_LEVELS:
        region = _region_at(s, low + f * (high - low))
        if region is None or region.sum() < 12:
            continue
        circle = _edge_circle(region, border)
        if circle is None:
            continue
        if best is None or circle[3] < best[1][3]:
            best = (region, circle)
    if best is None or best[1][3] > 0.1:  # edge pixels scatter by more than a tenth of the radius: no disc
        return None
    region, (cy, cx, r, _) = best
    cut = bool((region & border).any())
    if not cut:
        # the fraction of each pixel the disc covers, between the background and the disc's own level,
        # near the chosen region: a sub-pixel area and centroid whatever level chose the region
        core = ndimage.binary_erosion(region, iterations=2)
        plateau = float(np.median(m[core])) if core.any() else float(m[region].max())
        near = ndimage.binary_dilation(region, iterations=2)
        cover = np.where(near, np.clip((m - low) / max(plateau - low, 1e-300), 0.0, 1.0), 0.0)
        cy, cx = ndimage.center_of_mass(cover)
        r = math.sqrt(float(cover.sum()) / math.pi)
    outside = ~ndimage.binary_dilation(region, iterations=2)
    inside_mean = float(m[region].mean())
    outside_mean = float(m[outside].mean()) if outside.any() else 0.0
    contrast = inside_mean / outside_mean if outside_mean > 0 else math.inf
    if not contrast >= min_contrast:
        return None
    return Disc((float(cy), float(cx)), float(r), cut, float(contrast))


def check_radius(name: str, disc: Disc, semiangle_mrad: float, k_sampling_mrad: float, where: dict | None = None):
    """Raise :class:`InputError` when the disc radius differs from semiangle / k_sampling by more than
    :data:`RADIUS_RTOL`, naming both fields, their values and what each would have to be."""
    where = where or {}
    expected = semiangle_mrad / k_sampling_mrad
    rel = disc.radius_px / expected - 1.0
    if abs(rel) <= RADIUS_RTOL:
        return
    raise InputError(
        f"{name}: the bright-field disc found in the mean pattern has a radius of {disc.radius_px:.1f} px, but "
        f"semiangle_mrad = {semiangle_mrad:g} ({where.get('semiangle_mrad', 'config')}) at k_sampling_mrad = "
        f"{k_sampling_mrad:g} mrad/px ({where.get('k_sampling_mrad', 'config')}) gives {expected:.1f} px: they "
        f"disagree by {100 * rel:+.0f} % (expected within {100 * RADIUS_RTOL:.0f} %). Either k_sampling_mrad is "
        f"{semiangle_mrad / disc.radius_px:.4g} or semiangle_mrad is {disc.radius_px * k_sampling_mrad:.4g}"
    )


# ----------------------------------------------------------------------------------------------
# Descan: per-position disc centre and its fitted surface
# ----------------------------------------------------------------------------------------------


def disc_com(chunk: np.ndarray, centres: np.ndarray, radius_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Centre of mass (k_y, k_x) of the counts within ``radius_px`` of ``centres`` (rows, nx, 2) per
    pattern of ``chunk`` (rows, nx, k_y, k_x), and those counts; NaN where a pattern holds none there.

    Patterns sharing a rounded centre are done together (one mask each)."""
    rows, nx, nky, nkx = chunk.shape
    flat = chunk.reshape(rows * nx, nky, nkx)
    c = np.asarray(centres, dtype=float).reshape(rows * nx, 2)
    key = np.round(c).astype(int)
    com = np.full((rows * nx, 2), np.nan)
    weight = np.zeros(rows * nx)
    ky, kx = np.arange(nky, dtype=float), np.arange(nkx, dtype=float)
    for ky0, kx0 in np.unique(key, axis=0):
        sel = np.nonzero((key[:, 0] == ky0) & (key[:, 1] == kx0))[0]
        mask = (ky[:, None] - ky0) ** 2 + (kx[None, :] - kx0) ** 2 <= radius_px**2
        part = flat[sel] * mask
        w = part.sum(axis=(1, 2), dtype=np.float64)
        ok = w > 0
        safe = np.where(ok, w, 1.0)
        com[sel, 0] = np.where(ok, np.einsum("nij,i->n", part, ky, dtype=np.float64) / safe, np.nan)
        com[sel, 1] = np.where(ok, np.einsum("nij,j->n", part, kx, dtype=np.float64) / safe, np.nan)
        weight[sel] = w
    return com.reshape(rows, nx, 2), weight.reshape(rows, nx)


#: Residual Fourier power, in units of the mean noise power (median power / ln 2), above which a
#: frequency of the scan counts as specimen signal (as :data:`octastem.stem.lattice.SIGNIFICANCE`).
SIGNAL_SIGNIFICANCE = 12.0


def _without_periodic_signal(a: np.ndarray, values: np.ndarray, fitted: np.ndarray, shape, rounds: int = 3):
    """Refit the surface (basis ``a``, (n, terms)) to ``values`` (n, 2) leaving out the scan
    frequencies that hold the specimen's signal; returns the new fit (n, 2).

    A crystal's deflection is periodic with its lattice, so over a scan of few periods it projects
    onto a plane (a third of its amplitude over three periods), and a plane fitted to it takes
    part of the signal as descan. Its power lies at the lattice harmonics, the plane's along the
    frequency axes at all frequencies: the frequencies whose residual power stands out of that of
    their neighbours (:data:`SIGNAL_SIGNIFICANCE` x its median over 5 x 5 frequencies, / ln 2 as
    for exponentially distributed noise power) are left out of a least-squares fit in the Fourier domain
    (Parseval: the same fit as in the scan domain when none is left out), ``rounds`` times."""
    ny, nx = shape
    basis = np.fft.fft2(a.T.reshape(-1, ny, nx)).reshape(a.shape[1], -1).T  # (n_freq, terms)
    spectrum = np.fft.fft2(values.T.reshape(2, ny, nx)).reshape(2, -1).T  # (n_freq, 2)
    out = fitted
    for _ in range(rounds):
        resid = np.fft.fft2((values - out).T.reshape(2, ny, nx)).reshape(2, -1).T
        power = (np.abs(resid) ** 2).sum(axis=1)
        # against the power around each frequency (5 x 5 bins): a lattice harmonic stands out of its
        # neighbours, a misfit of the surface is spread smoothly over the frequency axes
        local = ndimage.median_filter(power.reshape(ny, nx), size=5, mode="wrap").ravel() / math.log(2)
        keep = power <= SIGNAL_SIGNIFICANCE * np.maximum(local, 1e-12 * power.max() + 1e-300)
        keep[0] = True  # the mean: a periodic signal over the scan has none
        if keep.sum() < 2 * a.shape[1]:
            break
        lhs = np.concatenate([basis[keep].real, basis[keep].imag])
        rhs = np.concatenate([spectrum[keep].real, spectrum[keep].imag])
        coef, *_ = np.linalg.lstsq(lhs, rhs, rcond=None)
        out = a @ coef
    return out


def _design(ny: int, nx: int, fit: str) -> np.ndarray:
    """Basis functions (ny * nx, n_terms) of a fit surface over scan coordinates scaled to [-1, 1]."""
    y, x = np.meshgrid(np.linspace(-1, 1, ny), np.linspace(-1, 1, nx), indexing="ij")
    y, x = y.ravel(), x.ravel()
    terms = {"constant": [np.ones_like(x)], "plane": [np.ones_like(x), x, y]}
    terms["parabola"] = terms["plane"] + [x * x, x * y, y * y]
    return np.column_stack(terms[fit])


def fit_origin(com: np.ndarray, weight: np.ndarray, fit: str = "plane") -> tuple[np.ndarray, dict]:
    """Weighted least-squares surface ``fit`` (:data:`ORIGIN_FITS`) of per-position disc centres
    ``com`` (ny, nx, 2) with weights ``weight`` (ny, nx; counts in the disc, NaN centres left out);
    returns the fitted origin (ny, nx, 2) and a summary (range of the fit over the scan, RMS residual).

    One pass drops positions more than 6 robust standard deviations from the first fit (hot or
    empty frames)."""
    if fit not in ORIGIN_FITS:
        raise InputError(f"origin: field 'fit' = {fit!r}; expected one of {ORIGIN_FITS}")
    ny, nx = weight.shape
    a = _design(ny, nx, fit)
    c = com.reshape(-1, 2)
    w = np.where(np.isfinite(c).all(axis=1), weight.ravel(), 0.0)
    if np.count_nonzero(w) < a.shape[1]:
        raise InputError(
            f"origin: {np.count_nonzero(w)} scan positions hold counts in the disc; too few to fit a {fit}"
        )
    fitted = np.zeros_like(c)
    for _ in range(2):
        sw = np.sqrt(w)[:, None]
        coef, *_ = np.linalg.lstsq(a * sw, np.nan_to_num(c) * sw, rcond=None)
        fitted = a @ coef
        resid = np.hypot(*(np.nan_to_num(c) - fitted).T)
        good = w > 0
        scale = 1.4826 * np.median(resid[good] * np.sqrt(w[good] / np.median(w[good]))) + 1e-12
        w = np.where(resid * np.sqrt(w / np.median(w[good])) <= 6 * scale, w, 0.0)
    good = w > 0
    # every measured position (the clipped ones too: leaving a few out breaks the periodicity the
    # refit relies on), a fitted value where a pattern held nothing
    filled = np.where(np.isfinite(c).all(axis=1)[:, None], np.nan_to_num(c), fitted)
    fitted = _without_periodic_signal(a, filled, fitted, (ny, nx))
    rms = float(np.sqrt(np.average(np.sum((c[good] - fitted[good]) ** 2, axis=1), weights=w[good])))
    fitted = fitted.reshape(ny, nx, 2)
    summary = {
        "fit": fit,
        "mean_px": fitted.reshape(-1, 2).mean(axis=0).tolist(),
        "range_px": (fitted.reshape(-1, 2).max(axis=0) - fitted.reshape(-1, 2).min(axis=0)).tolist(),
        "rms_residual_px": rms,
        "positions_used": int(good.sum()),
    }
    return fitted, summary


# ----------------------------------------------------------------------------------------------
# Rotation and flip from the curl of the COM field
# ----------------------------------------------------------------------------------------------


def rotate_com(com_x: np.ndarray, com_y: np.ndarray, angle_deg: float, flip: bool) -> tuple[np.ndarray, np.ndarray]:
    """Detector COM components -> scan frame: transpose the detector axes when ``flip``, then turn by
    ``angle_deg`` counter-clockwise (com_scan = R(angle) F com_detector)."""
    if flip:
        com_x, com_y = com_y, com_x
    t = math.radians(angle_deg)
    c, s = math.cos(t), math.sin(t)
    return c * com_x - s * com_y, s * com_x + c * com_y


def _signal_bins(power: np.ndarray) -> np.ndarray:
    """Frequencies (mask, ``numpy.fft`` order) whose power stands out of the power around them
    (:data:`SIGNAL_SIGNIFICANCE` x its median over 5 x 5 frequencies / ln 2), the mean left out."""
    local = ndimage.median_filter(power, size=5, mode="wrap") / math.log(2)
    mask = power > SIGNAL_SIGNIFICANCE * np.maximum(local, 1e-12 * power.max() + 1e-300)
    mask[0, 0] = False
    return mask


def curl_terms(com_x, com_y, flip: bool, step_x: float = 1.0, step_y: float = 1.0) -> tuple[float, float, float, int]:
    """(C, D, X, n): the summed squared curl C and divergence D, each divided by |k|, of the detector COM
    field (transposed when ``flip``) over its significant frequencies, and their cross term X, so
    that the squared curl of the field turned by theta is C cos^2 + D sin^2 + 2 X sin cos (curl_theta =
    cos curl + sin div, frequency by frequency); n: the frequencies used."""
    gx, gy = (com_y, com_x) if flip else (com_x, com_y)
    fx, fy = np.fft.fft2(gx), np.fft.fft2(gy)
    ny, nx = gx.shape
    kx = np.fft.fftfreq(nx, d=step_x)[None, :]
    ky = np.fft.fftfreq(ny, d=step_y)[:, None]
    mask = _signal_bins(np.abs(fx) ** 2 + np.abs(fy) ** 2)
    k = np.hypot(kx, ky)
    k[0, 0] = 1.0
    # per unit |k|: the parts of the field across and along each frequency, so every frequency counts
    # with its share of the field's power (the curl itself weights the noisier high ones by k^2)
    curl = ((kx * fy - ky * fx) / k)[mask]
    div = ((kx * fx + ky * fy) / k)[mask]
    return (
        float(np.sum(np.abs(curl) ** 2)),
        float(np.sum(np.abs(div) ** 2)),
        float(np.sum(np.real(curl * np.conj(div)))),
        int(mask.sum()),
    )


def measure_rotation(
    com_x: np.ndarray,
    com_y: np.ndarray,
    dark_field: np.ndarray,
    step_x: float = 1.0,
    step_y: float = 1.0,
) -> dict:
    """Rotation (deg, in [-180, 180)) and flip of a COM field relative to its origin (scan_y, scan_x,
    detector components along k_x and k_y, any unit) that make it curl-free.

    The squared curl of the turned field, summed over the frequencies that hold the specimen's
    signal (those standing out of the noise, :func:`curl_terms`), is a + b cos 2 theta + c sin 2
    theta: its minimum is found in closed form, with and without the flip, and the flip with the
    smaller minimum (relative to the mean a) is taken. The curl fixes the angle modulo 180 deg;
    the half turn is chosen so that the integrated phase correlates positively with
    ``dark_field`` (counts outside the disc per position). Returns angle_deg, flip, the curl at the
    optimum relative to its mean over the angles (``curl_ratio``; 1 means no preferred angle), that
    of the other flip, the frequencies used, the standard error of the angle (from the angles of
    the scan's halves, left | right and top | bottom) and the dark-field correlation."""
    from .reconstruct import integrate_gradient

    ny, nx = com_x.shape
    if min(ny, nx) < ROTATION_MIN_SCAN:
        raise InputError(
            f"a scan of {ny} x {nx} positions is too small to measure the rotation from the curl of the COM "
            f"field (at least {ROTATION_MIN_SCAN} x {ROTATION_MIN_SCAN})"
        )
    best = {flip: _least_curl(com_x, com_y, flip, step_x, step_y) for flip in (False, True)}
    flip = best[True][1] < best[False][1]
    angle, ratio, n = best[flip]
    # the angle's standard error from two splits of the scan into halves (left | right, top | bottom):
    # the difference of two halves' angles has 4 x the variance of the whole scan's
    diffs = []
    for axis in (1, 0):
        n_half = com_x.shape[axis] // 2
        parts = [
            _least_curl(np.take(com_x, idx, axis), np.take(com_y, idx, axis), flip, step_x, step_y)[0]
            for idx in (np.arange(n_half), np.arange(n_half, com_x.shape[axis]))
        ]
        diffs.append(0.5 * angle_difference_deg(2 * parts[0], 2 * parts[1]))
    uncertainty = 0.5 * math.sqrt(np.mean(np.square(diffs)))
    gx, gy = rotate_com(com_x, com_y, angle, flip)
    phase = integrate_gradient(gx, gy, step_x, step_y)
    df = np.asarray(dark_field, dtype=float)
    corr = float(np.corrcoef(phase.ravel(), df.ravel())[0, 1]) if phase.std() > 0 and df.std() > 0 else 0.0
    if corr < 0:
        angle += 180.0
    angle = (angle + 180.0) % 360.0 - 180.0
    return {
        "angle_deg": angle,
        "flip": bool(flip),
        "curl_ratio": ratio,
        "curl_other_flip_ratio": best[not flip][1],
        "frequencies": n,
        "uncertainty_deg": uncertainty,
        "dark_field_correlation": abs(corr),
    }


def _least_curl(com_x, com_y, flip: bool, step_x: float, step_y: float) -> tuple[float, float, int]:
    """The angle (deg, modulo 180) of least curl, the curl there relative to its mean over the angles,
    and the frequencies used (:func:`curl_terms`)."""
    c, d, x, n = curl_terms(com_x, com_y, flip, step_x, step_y)
    a, b = 0.5 * (c + d), 0.5 * (c - d)
    theta = 0.5 * math.degrees(math.atan2(-x, -b))
    return theta, (a - math.hypot(b, x)) / a if a > 0 else 1.0, n


def angle_difference_deg(a: float, b: float) -> float:
    """|a - b| on the circle (deg, 0..180)."""
    return abs((a - b + 180.0) % 360.0 - 180.0)


# ----------------------------------------------------------------------------------------------
# Resampling onto the optical axis and the scan axes
# ----------------------------------------------------------------------------------------------


#: Bin width of the disc's edge profile (:func:`edge_sums`), in detector pixels.
EDGE_BIN_PX = 0.05
#: Reach of the edge profile beyond the disc radius (detector pixels): inside, it is the disc's
#: plateau (1), beyond, the dark field (0).
EDGE_REACH_PX = 3.0
#: Edge level at or below which a detector pixel counts as dark field.
DARK_LEVEL = 1e-3


def edge_sums(
    chunk: np.ndarray, origin: np.ndarray, k_sampling: tuple[float, float], bins_mrad: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Counts of ``chunk`` (rows, nx, k_y, k_x) summed in rings of radius ``bins_mrad`` (edges, mrad)
    about each pattern's fitted disc centre ``origin`` (rows, nx, 2; k_y, k_x px), and the pixels per
    ring; ``k_sampling`` (k_x, k_y) mrad per pixel. Summed over chunks they give the mean radial
    profile of the disc in its own frame, free of the descan's smear."""
    rows, nx, nky, nkx = chunk.shape
    ky = np.arange(nky, dtype=float)[:, None]
    kx = np.arange(nkx, dtype=float)[None, :]
    n = len(bins_mrad) - 1
    sums, counts = np.zeros(n), np.zeros(n)
    for a in range(rows):
        for b in range(nx):
            oy, ox = origin[a, b]
            r = np.hypot((ky - oy) * k_sampling[1], (kx - ox) * k_sampling[0])
            idx = np.digitize(r, bins_mrad).ravel() - 1
            ok = (idx >= 0) & (idx < n)
            sums += np.bincount(idx[ok], weights=chunk[a, b].ravel()[ok].astype(np.float64), minlength=n)
            counts += np.bincount(idx[ok], minlength=n)
    return sums, counts


@dataclass(frozen=True)
class DiscEdge:
    """The bright-field disc's edge: its level (1 on the plateau inside, 0 in the dark field) at
    ``radius_mrad`` from the disc centre, as the data show it (aperture edge, detector blur)."""

    radius_mrad: np.ndarray
    level: np.ndarray

    def __call__(self, r_mrad: np.ndarray) -> np.ndarray:
        return np.interp(r_mrad, self.radius_mrad, self.level, left=1.0, right=0.0)

    def as_dict(self) -> dict:
        def at(v):  # the radius where the level falls through v
            return float(np.interp(-v, -self.level, self.radius_mrad))

        return {"radius_half_mrad": at(0.5), "width_90_10_mrad": at(0.1) - at(0.9)}


def bins_for_edge(radius_px: float, k_sampling: tuple[float, float]) -> np.ndarray:
    """Ring edges (mrad) for :func:`edge_sums` around a disc of ``radius_px`` detector pixels."""
    dk = math.sqrt(k_sampling[0] * k_sampling[1])
    lo = max(0.0, radius_px - 2 * EDGE_REACH_PX)
    return np.arange(lo, radius_px + 2 * EDGE_REACH_PX + EDGE_BIN_PX, EDGE_BIN_PX) * dk


def disc_edge(sums: np.ndarray, counts: np.ndarray, bins_mrad: np.ndarray, radius_px: float, dk: float) -> DiscEdge:
    """The edge profile from ring sums (:func:`edge_sums`) of a disc of ``radius_px`` pixels of ``dk``
    mrad: the mean counts per ring (empty rings interpolated) scaled from the dark-field level
    (median over ``radius + 1.5 .. radius + EDGE_REACH_PX`` px) to the plateau (median over
    ``radius - EDGE_REACH_PX .. radius - 1.5`` px), clipped to [0, 1], 1 inside and 0 outside the
    reach, and non-increasing outwards (a specimen's modulation of the mean disc is no edge)."""
    centres = 0.5 * (bins_mrad[1:] + bins_mrad[:-1])
    held = counts > 0
    mean = np.interp(centres, centres[held], sums[held] / counts[held])
    r_px = centres / dk
    plateau = float(np.median(mean[(r_px >= radius_px - EDGE_REACH_PX) & (r_px <= radius_px - 1.5)]))
    dark = float(np.median(mean[(r_px >= radius_px + 1.5) & (r_px <= radius_px + EDGE_REACH_PX)]))
    if not plateau > dark:
        raise InputError(f"origin: the disc's plateau ({plateau:.3g}) is not above the dark field ({dark:.3g})")
    level = np.clip((mean - dark) / (plateau - dark), 0.0, 1.0)
    level[r_px < radius_px - EDGE_REACH_PX] = 1.0
    level[r_px > radius_px + EDGE_REACH_PX] = 0.0
    return DiscEdge(centres, np.minimum.accumulate(level))


@dataclass
class Alignment:
    """Output pattern pixel (j, i) -> detector pixel, per scan position: fitted origin ``origin``
    (ny, nx, 2; k_y, k_x) + F R(-angle) applied to ((i - m_x // 2) dk, (j - m_y // 2) dk), in detector
    pixels of ``k_sampling`` (k_x, k_y mrad); output pixels of ``dk`` mrad on ``shape`` (m_y, m_x).
    ``edge``: the disc's edge, with which :meth:`resample` keeps it sharp (None: plain bilinear)."""

    origin: np.ndarray
    angle_deg: float
    flip: bool
    k_sampling: tuple[float, float]
    dk: float
    shape: tuple[int, int]
    edge: DiscEdge | None = None
    offsets: np.ndarray = field(init=False, repr=False)  # (2, m_y, m_x) detector pixel offsets (k_y, k_x)

    def __post_init__(self):
        self.offsets = self._offsets(self.shape)

    def _offsets(self, shape) -> np.ndarray:
        my, mx = shape
        j, i = np.meshgrid(np.arange(my) - my // 2, np.arange(mx) - mx // 2, indexing="ij")
        u, v = i * self.dk, j * self.dk  # scan frame (x, y), mrad
        t = math.radians(self.angle_deg)
        c, s = math.cos(t), math.sin(t)
        dx, dy = c * u + s * v, -s * u + c * v  # R(-angle)
        if self.flip:
            dx, dy = dy, dx
        return np.stack([dy / self.k_sampling[1], dx / self.k_sampling[0]])

    @classmethod
    def fit_window(cls, origin, angle_deg, flip, k_sampling, detector_shape, edge=None) -> Alignment:
        """The largest output window (disc at its pixel n // 2) whose every pixel lies on the detector
        (between the outermost pixel centres) at every scan position; square for equal k-sampling."""
        dk = min(k_sampling)
        o = np.asarray(origin, dtype=float).reshape(-1, 2)
        lo = o.min(axis=0)
        hi = np.array(detector_shape, dtype=float) - 1 - o.max(axis=0)
        if np.any(lo < 0) or np.any(hi < 0):
            raise InputError("origin: the fitted disc centre leaves the detector within the scan")
        best = None
        m = 2
        while True:
            probe = cls(origin, angle_deg, flip, k_sampling, dk, (m, m), edge)
            off = probe.offsets.reshape(2, -1)
            if np.any(off.min(axis=1) < -lo - 1e-9) or np.any(off.max(axis=1) > hi + 1e-9):
                break
            best = probe
            m += 1
        if best is None:
            raise InputError("origin: no output window fits on the detector around the disc")
        return best

    def reach_px(self) -> float:
        """Half-width of the output window in output pixels (from the centre pixel to the nearer edge)."""
        my, mx = self.shape
        return float(min(my // 2, my - 1 - my // 2, mx // 2, mx - 1 - mx // 2))

    def resample(self, chunk: np.ndarray, r0: int) -> np.ndarray:
        """Scan rows r0.. of ``chunk`` (rows, nx, k_y, k_x) resampled onto the output window, float32.

        Without an ``edge``, bilinear. With one, each pattern P is split as D Q + (1 - D) F about its
        fitted centre, D the disc's edge level there: the dark field F (P where D <= DARK_LEVEL,
        extended inwards from the nearest such pixel) and the disc's modulation Q are interpolated
        (bilinear; Q as sum(w (P - (1 - D) F)) / sum(w D) over the bilinear weights w, so pixels on
        the edge count by how much of the disc they hold) and put together with the edge level at
        the output pixel. The disc's edge, a ramp about a pixel wide that bilinear interpolation
        widens by up to a pixel, so stays as sharp as the data show it, and a shift by whole pixels
        returns the pattern unchanged. Values stay >= 0."""
        rows, nx = chunk.shape[:2]
        out = np.empty((rows, nx, *self.shape), dtype=np.float32)
        nky, nkx = chunk.shape[2:]
        if self.edge is not None:
            ky = np.arange(nky, dtype=float)[:, None]
            kx = np.arange(nkx, dtype=float)[None, :]
            my, mx = self.shape
            j, i = np.meshgrid(np.arange(my) - my // 2, np.arange(mx) - mx // 2, indexing="ij")
            level_out = self.edge(np.hypot(i, j) * self.dk)
        for a in range(rows):
            for b in range(nx):
                oy, ox = self.origin[r0 + a, b]
                coords = self.offsets + np.array([oy, ox])[:, None, None]
                p = chunk[a, b]
                if self.edge is None:
                    out[a, b] = ndimage.map_coordinates(p, coords, order=1, mode="nearest", prefilter=False)
                    continue
                p = p.astype(np.float64)
                level = self.edge(np.hypot((ky - oy) * self.k_sampling[1], (kx - ox) * self.k_sampling[0]))
                dark = level <= DARK_LEVEL
                nearest = ndimage.distance_transform_edt(~dark, return_distances=False, return_indices=True)
                f = p[tuple(nearest)]
                bright = level >= 0.5
                fill = float(np.mean(p[bright] / level[bright])) if bright.any() else 0.0

                def interp(v, coords=coords):
                    return ndimage.map_coordinates(v, coords, order=1, mode="nearest", prefilter=False)

                # a little of the disc's mean level where no pixel of the stencil holds the disc
                # (there the edge level at the output pixel is ~0 too)
                tiny = 1e-9
                q = (interp(p - (1.0 - level) * f) + tiny * fill) / (interp(level) + tiny)
                out[a, b] = np.maximum(level_out * q + (1.0 - level_out) * interp(f), 0.0)
        return out
