"""The CNN's canonical input and its training target.

Network input (per scan position): ``KERNEL**2 + 2`` channels of ``N_K`` x ``N_K`` bins:

- the 9 neighbouring patterns (rows iy-1..iy+1, columns ix-1..ix+1, periodic), rebinned onto a
  canonical detector grid spanning +-2 alpha (alpha the convergence semi-angle) with
  count-preserving area weights, divided by the mean total of the canonical patterns over the
  scan and scaled so the bright-field disc is ~1 (dose-independent input);
- the probe: the vacuum pattern (uniform aperture disc) on the same grid, same normalisation;
- the dimensionless sampling ``alpha * step / lambda`` (scan step in units of the probe's
  resolution) as a constant channel; it fixes the relation between deflection and phase.

Target: the phase of the object, sigma(E) times the frame-averaged projected potential (rad),
band-limited to the aperture diameter 2 alpha / lambda (the information limit of 4D-STEM) and
with zero mean over the scan (the absolute phase offset is not measured, as for iCOM), on the
output grid of ``UPSAMPLE`` pixels per scan step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from octastem.io import InputError
from octastem.units import electron_wavelength_A

UPSAMPLE = 4  #: output pixels per scan step
N_K = 20  #: canonical detector bins per axis, spanning +-2 alpha
KERNEL = 3  #: scan positions per axis in the input kernel
PATCH = KERNEL * UPSAMPLE + 1  #: output patch (pixels per axis), centred on the scan position
EXTENT_ALPHA = 2.0  #: half-width of the canonical detector grid in units of alpha
N_CHANNELS = KERNEL * KERNEL + 2  #: input channels: the kernel's patterns, the probe, the sampling

#: multiplies (pattern / mean total) so the bright-field disc is ~1 per bin
INPUT_SCALE = math.pi * N_K**2 / (4 * EXTENT_ALPHA**2)


def _rebin_matrix(n_in: int, dk_mrad: float, semiangle_mrad: float, n_out: int = N_K) -> np.ndarray:
    """(n_out, n_in) area-overlap weights from detector pixels (axis at n_in // 2) to canonical bins.

    Entry (o, j) is the fraction of input pixel j inside output bin o, so counts are preserved.
    """
    half = EXTENT_ALPHA * semiangle_mrad
    edges_out = np.linspace(-half, half, n_out + 1)
    centres = (np.arange(n_in) - n_in // 2) * dk_mrad
    lo_in, hi_in = centres - dk_mrad / 2, centres + dk_mrad / 2
    lo = np.maximum(edges_out[:-1, None], lo_in[None, :])
    hi = np.minimum(edges_out[1:, None], hi_in[None, :])
    return np.clip(hi - lo, 0.0, None) / dk_mrad


def check_patterns(
    shape: Sequence[int], k_sampling_x_mrad: float, k_sampling_y_mrad: float, semiangle_mrad: float, name: str = "cnn"
) -> None:
    """Raise InputError unless (..., k_y, k_x) patterns cover +-2 alpha and the calibration is valid.

    The detector must reach ``EXTENT_ALPHA * alpha`` along both axes (within half a pixel) and
    hold at least ``N_K // 2`` pixels per axis.
    """
    for key, value in (
        ("k_sampling_x_mrad", k_sampling_x_mrad),
        ("k_sampling_y_mrad", k_sampling_y_mrad),
        ("semiangle_mrad", semiangle_mrad),
    ):
        if not (np.isfinite(value) and value > 0):
            raise InputError(f"{name}: calibration '{key}' must be a positive number, got {value}")
    n_ky, n_kx = shape[-2:]
    if min(n_ky, n_kx) < N_K // 2:
        raise InputError(
            f"{name}: diffraction patterns of {n_ky}x{n_kx} pixels are too small (need >= {N_K // 2} per axis)"
        )
    need = EXTENT_ALPHA * semiangle_mrad
    for n, dk, axis in ((n_kx, k_sampling_x_mrad, "k_x"), (n_ky, k_sampling_y_mrad, "k_y")):
        reach = min(n // 2, n - 1 - n // 2) * dk + dk / 2
        if reach < 0.97 * need:
            raise InputError(
                f"{name}: diffraction patterns of size {n_ky}x{n_kx} reach only {reach:.1f} mrad along {axis} "
                f"(k-sampling {dk} mrad); the CNN needs +-{need:.1f} mrad (2 x the {semiangle_mrad} mrad semi-angle)"
            )


def check_scan(
    shape: Sequence[int], k_sampling_x_mrad: float, k_sampling_y_mrad: float, semiangle_mrad: float, name: str = "cnn"
) -> None:
    """Raise InputError unless a (scan_y, scan_x, k_y, k_x) scan holds the ``KERNEL`` x ``KERNEL``
    kernel and its patterns pass :func:`check_patterns`."""
    ny, nx = shape[:2]
    if ny < KERNEL or nx < KERNEL:
        raise InputError(f"{name}: scan of {ny}x{nx} positions is smaller than the {KERNEL}x{KERNEL} kernel of the CNN")
    check_patterns(shape, k_sampling_x_mrad, k_sampling_y_mrad, semiangle_mrad, name=name)


def canonical_patterns(
    data: np.ndarray, k_sampling_x_mrad: float, k_sampling_y_mrad: float, semiangle_mrad: float
) -> np.ndarray:
    """Rebin (..., k_y, k_x) patterns onto the canonical (..., N_K, N_K) grid over +-2 alpha (float32).

    Count-preserving (area weights): a pattern's counts inside the grid are kept.
    """
    data = np.asarray(data)
    check_patterns(data.shape, k_sampling_x_mrad, k_sampling_y_mrad, semiangle_mrad)
    ry = _rebin_matrix(data.shape[-2], k_sampling_y_mrad, semiangle_mrad).astype(np.float32)
    rx = _rebin_matrix(data.shape[-1], k_sampling_x_mrad, semiangle_mrad).astype(np.float32)
    return np.einsum("oi,...ij,pj->...op", ry, data.astype(np.float32, copy=False), rx, optimize=True)


def probe_pattern(n_k: int = N_K, oversample: int = 8) -> np.ndarray:
    """Vacuum diffraction pattern (aperture disc of radius alpha) on the canonical grid, summing to 1."""
    n = n_k * oversample
    k = (np.arange(n) + 0.5) / n * 2 * EXTENT_ALPHA - EXTENT_ALPHA  # units of alpha
    disc = (k[None, :] ** 2 + k[:, None] ** 2 <= 1.0).astype(np.float64)
    binned = disc.reshape(n_k, oversample, n_k, oversample).sum(axis=(1, 3))
    return (binned / binned.sum()).astype(np.float32)


def sampling_parameter(energy_eV: float, semiangle_mrad: float, step_A: float) -> float:
    """alpha * step / lambda: the scan step in units of the probe's resolution lambda / alpha."""
    return float(semiangle_mrad * 1e-3 * step_A / electron_wavelength_A(energy_eV))


def kernel_inputs(canon_rows: np.ndarray, norm: float, s_param: float) -> np.ndarray:
    """Network inputs for the centre rows of ``canon_rows`` (rows+2, scan_x, N_K, N_K).

    ``canon_rows`` holds one extra row above and below (periodic neighbours); columns wrap
    around. Returns (rows * scan_x, N_CHANNELS, N_K, N_K) float32.
    """
    rows = canon_rows.shape[0] - 2
    nx = canon_rows.shape[1]
    x = canon_rows * (INPUT_SCALE / norm)
    out = np.empty((rows, nx, N_CHANNELS, N_K, N_K), dtype=np.float32)
    c = 0
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            out[:, :, c] = np.roll(x[1 + dy : 1 + dy + rows], -dx, axis=1)
            c += 1
    out[:, :, c] = probe_pattern() * INPUT_SCALE
    out[:, :, c + 1] = s_param
    return out.reshape(rows * nx, N_CHANNELS, N_K, N_K)


def target_phase(
    phase_fine: np.ndarray,
    out_shape: tuple[int, int],
    cell_A: tuple[float, float],
    energy_eV: float,
    semiangle_mrad: float,
) -> np.ndarray:
    """Band-limited phase on the output grid: ``phase_fine`` (y, x) (rad, periodic over ``cell_A``)
    low-pass filtered to |k| <= 2 alpha / lambda, zero mean, Fourier-resampled to ``out_shape``.

    This is the reference every reconstruction is scored against; iCOM images are compared after
    the same band limit (:func:`band_limit`).
    """
    phase_fine = np.asarray(phase_fine, dtype=np.float64)
    ny, nx = phase_fine.shape
    my, mx = out_shape
    k_max = 2.0 * semiangle_mrad * 1e-3 / electron_wavelength_A(energy_eV)
    spec = np.fft.fft2(phase_fine)
    fy = np.fft.fftfreq(ny, d=cell_A[1] / ny)
    fx = np.fft.fftfreq(nx, d=cell_A[0] / nx)
    spec *= (fy[:, None] ** 2 + fx[None, :] ** 2) <= k_max**2
    spec[0, 0] = 0.0
    iy = np.fft.fftfreq(ny, d=1.0 / ny).astype(int)
    ix = np.fft.fftfreq(nx, d=1.0 / nx).astype(int)
    keep_y = np.abs(iy) < (my + 1) // 2
    keep_x = np.abs(ix) < (mx + 1) // 2
    out = np.zeros((my, mx), dtype=complex)
    out[np.ix_(iy[keep_y] % my, ix[keep_x] % mx)] = spec[np.ix_(keep_y, keep_x)]
    return (np.real(np.fft.ifft2(out)) * (my * mx) / (ny * nx)).astype(np.float32)


def band_limit(
    image: np.ndarray, sampling_xy_A: tuple[float, float], energy_eV: float, semiangle_mrad: float
) -> np.ndarray:
    """Periodic image (y, x) low-pass filtered to |k| <= 2 alpha / lambda, zero mean."""
    ny, nx = image.shape
    cell = (nx * sampling_xy_A[0], ny * sampling_xy_A[1])
    return target_phase(image, (ny, nx), cell, energy_eV, semiangle_mrad)
