"""Centre of mass and integrated COM: exact recovery of a known phase, physics check, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from abtem.core.energy import energy2wavelength

from octastem.io import InputError, Stem4D
from octastem.potential import projected_potential
from octastem.stem import (
    SamplingWarning,
    center_of_mass,
    check_sampling,
    icom,
    icom_transfer,
    icom_wiener,
    integrate_gradient,
    nyquist_step_A,
    reconstruct,
    simulate_4dstem,
    square_grid,
    square_pixels,
)
from octastem.structure import build_fapbbr3

ENERGY = 300e3
K_MRAD = 0.5  # detector pixel (mrad) of the synthetic patterns


def known_phase(ny=24, nx=30, step=0.25):
    """A periodic phase (rad) on a (ny, nx) grid and its exact gradient (rad/A)."""
    x = np.arange(nx) * step
    y = np.arange(ny) * step
    lx, ly = nx * step, ny * step
    X, Y = np.meshgrid(x, y)
    ax, ay = 2 * np.pi / lx, 2 * np.pi / ly
    phase = 0.8 * np.cos(ax * X) * np.sin(2 * ay * Y) + 0.3 * np.sin(3 * ax * X + ay * Y)
    gx = -0.8 * ax * np.sin(ax * X) * np.sin(2 * ay * Y) + 0.3 * 3 * ax * np.cos(3 * ax * X + ay * Y)
    gy = 1.6 * ay * np.cos(ax * X) * np.cos(2 * ay * Y) + 0.3 * ay * np.cos(3 * ax * X + ay * Y)
    return phase, gx, gy, step


def spot_patterns(theta_x_mrad, theta_y_mrad, n_k=41, sigma_px=2.5):
    """Gaussian spots (scan_y, scan_x, k_y, k_x) whose centre of mass is (theta_x, theta_y) mrad."""
    k = (np.arange(n_k) - n_k // 2) * K_MRAD
    gx = np.exp(-((k[None, None, :] - theta_x_mrad[..., None]) ** 2) / (2 * (sigma_px * K_MRAD) ** 2))
    gy = np.exp(-((k[None, None, :] - theta_y_mrad[..., None]) ** 2) / (2 * (sigma_px * K_MRAD) ** 2))
    return (gy[..., :, None] * gx[..., None, :]).astype(np.float32)


def make_stem(data, step, rotation_deg=0.0):
    return Stem4D(
        data=data,
        energy_eV=ENERGY,
        semiangle_mrad=25.0,
        scan_step_A=step,
        k_sampling_mrad=K_MRAD,
        dose_e_per_A2=float("inf"),
        scan_rotation_deg=rotation_deg,
    )


def pearson(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


@pytest.mark.parametrize("rotation_deg", [0.0, 30.0])
def test_icom_recovers_known_phase(rotation_deg):
    phase, gx, gy, step = known_phase()
    scale = energy2wavelength(ENERGY) / (2 * np.pi) * 1e3  # rad/A of phase gradient -> mrad
    tx, ty = scale * gx, scale * gy
    # the detector is rotated: it records R(-rotation) theta, and scan_rotation_deg undoes it
    r = np.radians(rotation_deg)
    dx, dy = np.cos(r) * tx + np.sin(r) * ty, -np.sin(r) * tx + np.cos(r) * ty
    stem = make_stem(spot_patterns(dx, dy), step, rotation_deg)

    com_x, com_y = center_of_mass(stem)
    assert np.allclose(com_x, tx - tx.mean(), atol=1e-3 * np.abs(tx).max())
    assert np.allclose(com_y, ty - ty.mean(), atol=1e-3 * np.abs(ty).max())

    image, sampling = icom(stem)
    assert image.dtype == np.float32 and image.shape == phase.shape and sampling == step
    assert abs(image.mean()) < 1e-5
    # the discrete Fourier integration of sampled analytic gradients is exact up to aliasing
    # of the highest harmonic: a few per cent of the amplitude at most
    assert pearson(image, phase) > 0.995
    assert np.abs(image - (phase - phase.mean())).max() < 0.05 * np.abs(phase).max()


def periodic_wave(x, y, lx, ly):
    """A band-limited function periodic on lx x ly (harmonics up to 3)."""
    return (
        np.cos(2 * np.pi * 2 * x / lx)
        + 0.5 * np.sin(2 * np.pi * (3 * y / ly + 0.1))
        + 0.7 * np.cos(2 * np.pi * (x / lx - 2 * y / ly))
    )


def test_square_pixels_keeps_the_geometry_of_unequal_scan_steps():
    # 40 x 40 pixels of 0.30 A x 0.306 A: a 12.00 A x 12.24 A cell, as an averaged cell of a
    # slightly orthorhombic lattice
    nx = ny = 40
    px, py = 0.30, 0.306
    lx, ly = nx * px, ny * py
    X, Y = np.meshgrid(np.arange(nx) * px, np.arange(ny) * py)
    image, s = square_pixels(periodic_wave(X, Y, lx, ly), px, py, sampling_A=0.1)
    m_y, m_x = image.shape
    # square pixels no coarser than asked, a whole number of them along both sides of the cell
    assert s <= 0.1 and m_x * s == pytest.approx(lx, rel=1e-12) and m_y * s == pytest.approx(ly, rel=1e-3)
    # the resampled image is the same function on the new grid (Fourier interpolation is exact)
    Xs, Ys = np.meshgrid(np.arange(m_x) * lx / m_x, np.arange(m_y) * ly / m_y)
    np.testing.assert_allclose(image, periodic_wave(Xs, Ys, lx, ly), atol=1e-5)
    # the old behaviour, one mean pixel size for both axes, would misplace the far edge by 1 %
    assert abs(ny * 0.5 * (px + py) - ly) > 0.1 and abs(m_y * s - ly) < 0.02
    # equal steps and no finer sampling asked: unchanged
    same, s_same = square_pixels(image, s, s)
    assert s_same == s and np.array_equal(same, image)
    assert square_grid(12.0, 12.0, 0.1) == (120, 120)


def test_icom_image_spans_the_scanned_cell_with_unequal_steps():
    phase, gx, gy, _ = known_phase(ny=24, nx=30, step=0.25)
    scale = energy2wavelength(ENERGY) / (2 * np.pi) * 1e3
    # the same phase, scanned with 0.25 A along x and 0.27 A along y: the gradient along y is
    # smaller by 0.25 / 0.27 in rad/A
    sy = 0.27
    stem = make_stem(spot_patterns(scale * gx, scale * gy * 0.25 / sy), 0.26)
    stem.scan_step_x_A, stem.scan_step_y_A = 0.25, sy
    image, s = reconstruct(stem, "icom", sampling_A=0.1)
    assert s <= 0.1
    assert image.shape[1] * s == pytest.approx(30 * 0.25, rel=1e-9)
    assert image.shape[0] * s == pytest.approx(24 * sy, rel=2e-3)
    # read at the scan positions (nearest pixel), it is the phase
    rows = np.round(np.arange(24) * image.shape[0] / 24).astype(int)
    cols = np.round(np.arange(30) * image.shape[1] / 30).astype(int)
    assert pearson(image[np.ix_(rows, cols)], phase) > 0.99


def test_integrate_gradient_is_exact_for_spectral_gradients():
    rng = np.random.default_rng(0)
    ny, nx, sx, sy = 16, 20, 0.3, 0.4
    phase = rng.normal(size=(ny, nx))
    phase_hat = np.fft.fft2(phase)
    phase_hat[ny // 2, :] = 0  # no Nyquist row/column: their derivative is not defined
    phase_hat[:, nx // 2] = 0
    phase = np.real(np.fft.ifft2(phase_hat))
    kx = np.fft.fftfreq(nx, sx)[None, :]
    ky = np.fft.fftfreq(ny, sy)[:, None]
    gx = np.real(np.fft.ifft2(2j * np.pi * kx * phase_hat))
    gy = np.real(np.fft.ifft2(2j * np.pi * ky * phase_hat))
    assert np.allclose(integrate_gradient(gx, gy, sx, sy), phase - phase.mean(), atol=1e-10)


def test_icom_of_thin_cell_follows_projected_potential():
    # For a thin phase object the COM is the probe-intensity-weighted mean phase gradient, so
    # iCOM = sigma * V_projected convolved with the probe intensity |P|^2 (Lazic et al. 2016).
    # The reference is therefore the projected potential convolved with the simulated probe
    # intensity (aperture-limited Airy disc), sampled at the scan positions. The 6 A cell is
    # thin enough for the phase-object picture, and the detector reaches 4x the semi-angle
    # so little scattered intensity is lost.
    atoms = build_fapbbr3((1, 1, 1))
    step, sampling, semiangle = 0.3, 0.05, 25.0
    stem = simulate_4dstem(
        atoms,
        energy_eV=ENERGY,
        scan_step_A=step,
        sampling_A=sampling,
        slice_thickness_A=1.0,
        semiangle_mrad=semiangle,
        max_angle_mrad=100.0,
        num_workers=2,
    )
    image, image_sampling = icom(stem)
    assert image.shape == (20, 20) and image_sampling == pytest.approx(step)

    potential, pot_sampling, _cell_xy = projected_potential(atoms, sampling_A=sampling)
    ny, nx = potential.shape
    wavelength = energy2wavelength(ENERGY)
    k = np.hypot(np.fft.fftfreq(nx, pot_sampling)[None, :], np.fft.fftfreq(ny, pot_sampling)[:, None])
    probe = np.fft.ifft2((k * wavelength <= semiangle * 1e-3).astype(float))
    intensity = np.abs(probe) ** 2
    intensity /= intensity.sum()
    blurred = np.real(np.fft.ifft2(np.fft.fft2(potential) * np.fft.fft2(intensity)))
    every = round(step / pot_sampling)
    reference = blurred[::every, ::every]
    assert reference.shape == image.shape
    r = pearson(image, reference)
    assert r > 0.95, r
    # the raw (unblurred) potential still correlates, less well
    assert pearson(image, potential[::every, ::every]) > 0.6
    # and the brightest pixel is the Pb-Br column at the origin
    assert np.unravel_index(np.argmax(image), image.shape) == (0, 0)


def test_empty_patterns_count_as_undeflected():
    data = spot_patterns(np.zeros((4, 4)), np.zeros((4, 4)))
    data[1, 2] = 0.0
    com_x, com_y = center_of_mass(make_stem(data, 0.3))
    assert np.all(np.isfinite(com_x)) and com_x[1, 2] == 0.0 and com_y[1, 2] == 0.0


def test_bad_input():
    good = spot_patterns(np.zeros((3, 3)), np.zeros((3, 3)))
    with pytest.raises(InputError, match="2x2"):
        icom(make_stem(good[:1], 0.3))
    with pytest.raises(InputError, match="4D"):
        icom(make_stem(good[0], 0.3))
    bad = good.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        icom(make_stem(bad, 0.3))
    bad = good.copy()
    bad[0, 0, 0, 0] = -1.0
    with pytest.raises(InputError, match="negative"):
        center_of_mass(make_stem(bad, 0.3))
    with pytest.raises(InputError, match="unknown method"):
        reconstruct(make_stem(good, 0.3), method="ptycho")
    image, sampling = reconstruct(make_stem(good, 0.3), method="icom")
    assert image.shape == (3, 3) and sampling == 0.3


def test_icom_transfer_is_the_spectrum_of_the_probe_intensity():
    # iCOM convolves the phase with the probe intensity |P|^2; the analytic transfer (overlap of
    # two aperture discs) must equal the Fourier transform of the numerically formed probe intensity
    n, sampling, semiangle = 256, 0.05, 25.0
    wavelength = energy2wavelength(ENERGY)
    k = np.hypot(np.fft.fftfreq(n, sampling)[None, :], np.fft.fftfreq(n, sampling)[:, None])
    probe = np.fft.ifft2((k * wavelength <= semiangle * 1e-3).astype(float))
    spectrum = np.real(np.fft.fft2(np.abs(probe) ** 2))
    spectrum /= spectrum[0, 0]
    transfer = icom_transfer((n, n), sampling, sampling, ENERGY, semiangle)
    assert transfer[0, 0] == pytest.approx(1.0)
    np.testing.assert_allclose(transfer, spectrum, atol=0.03)
    # zero from 2 alpha / lambda on, monotonic before
    cutoff = 2 * semiangle * 1e-3 / wavelength
    assert np.all(transfer[k >= cutoff] == 0.0)
    row = transfer[0, : n // 2]
    assert np.all(np.diff(row) <= 1e-12)


def test_icom_wiener_undoes_the_probe_blur_that_icom_leaves():
    # a single spatial frequency q = 1 / A (near alpha / lambda, where iCOM keeps about half the
    # amplitude): COM data of the phase blurred by the transfer, as a thin object gives them
    step, ny, nx, q = 0.2, 20, 25, 1.0
    x = np.arange(nx) * step
    phase = 0.05 * np.cos(2 * np.pi * q * x)[None, :].repeat(ny, axis=0)
    t_q = float(icom_transfer((1, nx), step, step, ENERGY, 25.0)[0, 5])  # fftfreq index 5 = 1 / A
    assert np.fft.fftfreq(nx, step)[5] == pytest.approx(q) and 0.45 < t_q < 0.55
    grad_x = -0.05 * 2 * np.pi * q * np.sin(2 * np.pi * q * x)[None, :].repeat(ny, axis=0) * t_q
    theta_x = grad_x * energy2wavelength(ENERGY) / (2 * np.pi) * 1e3  # mrad
    stem = make_stem(spot_patterns(theta_x, np.zeros_like(theta_x)), step)
    plain, _ = icom(stem)
    sharp, sampling = icom_wiener(stem, thickness_A=0.0, eps=1e-2)
    assert sharp.shape == plain.shape == phase.shape and sampling == pytest.approx(step)
    amplitude = lambda img: float(np.abs(np.fft.rfft(img.mean(axis=0)))[5] / (nx / 2))  # noqa: E731
    assert amplitude(plain) == pytest.approx(0.05 * t_q, rel=0.02)
    assert amplitude(sharp) == pytest.approx(0.05 * t_q**2 / (t_q**2 + 1e-2), rel=0.02)
    assert pearson(sharp, phase) > 0.999
    with pytest.raises(InputError, match="eps"):
        icom_wiener(stem, thickness_A=0.0, eps=0.0)
    with pytest.raises(InputError, match="thickness_A"):  # no thickness given or recorded
        icom_wiener(stem)
    recorded = make_stem(stem.data, step)
    recorded.extra["thickness_A"] = 0.0
    np.testing.assert_allclose(icom_wiener(recorded, eps=1e-2)[0], sharp)


def test_thick_specimen_transfer_spreads_with_depth():
    # the probe spreads by ~lambda z alpha along the specimen: the depth-averaged transfer keeps
    # the thin one's limits (1 at q = 0, 0 beyond 2 alpha / lambda) and damps the band in between
    thin = icom_transfer((1, 64), 0.1, 0.1, ENERGY, 25.0)[0]
    nearly = icom_transfer((1, 64), 0.1, 0.1, ENERGY, 25.0, thickness_A=0.5)[0]
    thick = icom_transfer((1, 64), 0.1, 0.1, ENERGY, 25.0, thickness_A=24.0)[0]
    q = np.fft.fftfreq(64, 0.1)
    band = (q > 0.3) & (q < 2.0)
    assert thick[0] == pytest.approx(1.0) and np.all(thick[np.abs(q) > 2.6] == 0.0)
    np.testing.assert_allclose(nearly, thin, atol=0.02)
    assert np.all(thick[band] < thin[band]) and np.max(thin[band] - thick[band]) > 0.08
    with pytest.raises(InputError, match="thickness_A"):
        icom_transfer((4, 4), 0.1, 0.1, ENERGY, 25.0, thickness_A=-1.0)


def test_scan_steps_coarser_than_the_band_warn():
    assert nyquist_step_A(300e3, 25.0) == pytest.approx(0.197, abs=0.001)
    data = spot_patterns(np.zeros((4, 4)), np.zeros((4, 4)))
    assert check_sampling(make_stem(data, 0.2), "icom") is None
    assert "0.4 A is coarser" in check_sampling(make_stem(data, 0.4), "icom_wiener")
    assert check_sampling(make_stem(data, 0.4), "cnn") is None  # not a scan-grid method
    with pytest.warns(SamplingWarning, match="aliased"):
        reconstruct(make_stem(data, 0.4), "icom")
