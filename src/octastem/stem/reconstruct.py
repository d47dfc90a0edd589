"""Phase images from 4D-STEM: centre of mass (COM), integrated COM (iCOM), iCOM deconvolved by its
transfer function (method ``icom_wiener``, :func:`icom_wiener`), the CNN of
:mod:`octastem.cnn` (method ``cnn``) and direct ptychography by quantem (methods ``ssb``,
single-sideband, and ``wdd``, Wigner distribution deconvolution; :func:`direct_ptychography`).

For a thin phase object the COM of each diffraction pattern is the probe-intensity-weighted
mean of the phase gradient, theta = lambda / (2 pi) * grad(phase); integrating the COM field
gives the phase convolved with the probe intensity (Lazic et al., Ultramicroscopy 2016).

Conventions: ``stem.data`` is (scan_y, scan_x, k_y, k_x); COM components are along the scan
axes x (columns) and y (rows). ``scan_rotation_deg`` is the counter-clockwise angle that turns
the detector axes onto the scan axes: com_scan = R(scan_rotation_deg) @ com_detector. The
scan is treated as periodic (the whole periodic cell is scanned, or a crystal interior).
"""

from __future__ import annotations

import numpy as np

from octastem.io import InputError, Stem4D

METHODS = ("icom", "icom_wiener", "cnn", "ssb", "wdd")

#: the methods that give one pixel per scan position (their band must fit the scan's Nyquist limit)
SCAN_GRID_METHODS = ("icom", "icom_wiener", "ssb", "wdd")

#: regularisation of :func:`icom_wiener` (noise-to-signal power of the Wiener filter)
WIENER_EPS = 1e-3

#: the direct-ptychography methods and their quantem deconvolution kernels
PTYCHOGRAPHY_KERNELS = {"ssb": "ssb", "wdd": "wdd"}


class SamplingWarning(UserWarning):
    """A scan too coarse for the method's band: column shapes will be biased (:func:`check_sampling`)."""


def validate(stem: Stem4D, name: str = "4D-STEM") -> np.ndarray:
    """Check ``stem.data`` is a finite, non-negative 4D array with at least a 2x2 scan; return it."""
    data = np.asarray(stem.data)
    if data.ndim != 4:
        raise InputError(f"{name}: field 'data' must be 4D (scan_y, scan_x, k_y, k_x), got shape {data.shape}")
    if data.shape[0] < 2 or data.shape[1] < 2:
        raise InputError(f"{name}: scan must be at least 2x2 positions, got {data.shape[:2]}")
    if data.shape[2] < 2 or data.shape[3] < 2:
        raise InputError(f"{name}: diffraction patterns must be at least 2x2 pixels, got {data.shape[2:]}")
    if not np.all(np.isfinite(data)):
        raise InputError(f"{name}: field 'data' contains NaN or infinite values")
    if np.any(data < 0):
        raise InputError(f"{name}: field 'data' contains negative intensities (expected counts >= 0)")
    for key in ("energy_eV", "k_sampling_mrad", "scan_step_A"):
        value = float(getattr(stem, key))
        if not (np.isfinite(value) and value > 0):
            raise InputError(f"{name}: attribute '{key}' must be a positive number, got {value}")
    return data


def center_of_mass(stem: Stem4D, origin: str = "mean") -> tuple[np.ndarray, np.ndarray]:
    """COM deflection (mrad) per scan position: ``(com_x, com_y)``, each (scan_y, scan_x) float64.

    ``origin="mean"`` measures it from the mean COM over the scan (for a periodic scan the mean
    phase gradient is zero, so this also removes a descan or detector offset);
    ``origin="axis"`` from the pixel (n_ky // 2, n_kx // 2), the optical axis of simulated data.
    Empty patterns (no counts, possible at very low dose) get the origin (zero deflection).
    The detector sampling is ``stem.k_sampling_x_mrad`` / ``k_sampling_y_mrad`` per axis.
    """
    if origin not in ("mean", "axis"):
        raise InputError(f"center_of_mass: origin must be 'mean' or 'axis', got {origin!r}")
    data = validate(stem).astype(np.float64, copy=False)
    n_ky, n_kx = data.shape[2:]
    dkx, dky = float(stem.k_sampling_x_mrad), float(stem.k_sampling_y_mrad)
    kx = (np.arange(n_kx) - n_kx // 2) * dkx
    ky = (np.arange(n_ky) - n_ky // 2) * dky
    total = data.sum(axis=(2, 3))
    empty = total <= 0
    safe = np.where(empty, 1.0, total)
    cx = np.einsum("abij,j->ab", data, kx) / safe
    cy = np.einsum("abij,i->ab", data, ky) / safe
    if origin == "mean":
        if np.all(empty):
            raise InputError("center_of_mass: all diffraction patterns are empty (zero counts)")
        cx = cx - cx[~empty].mean()
        cy = cy - cy[~empty].mean()
    cx[empty] = 0.0
    cy[empty] = 0.0
    rot = np.radians(float(stem.scan_rotation_deg))
    c, s = np.cos(rot), np.sin(rot)
    return c * cx - s * cy, s * cx + c * cy


def integrate_gradient(grad_x: np.ndarray, grad_y: np.ndarray, step_x: float, step_y: float) -> np.ndarray:
    """Periodic Fourier integration of a gradient field (y, x) sampled at (step_x, step_y); zero mean.

    Least-squares solution phi of grad(phi) = (grad_x, grad_y):
    F[phi] = (kx F[gx] + ky F[gy]) / (2 pi i |k|^2), with F[phi](0) = 0.
    """
    ny, nx = grad_x.shape
    kx = np.fft.fftfreq(nx, d=step_x)[None, :]
    ky = np.fft.fftfreq(ny, d=step_y)[:, None]
    k2 = kx**2 + ky**2
    k2[0, 0] = 1.0
    phi_hat = (kx * np.fft.fft2(grad_x) + ky * np.fft.fft2(grad_y)) / (2j * np.pi * k2)
    phi_hat[0, 0] = 0.0
    return np.real(np.fft.ifft2(phi_hat))


def icom(stem: Stem4D, origin: str = "mean") -> tuple[np.ndarray, float]:
    """Integrated COM phase image (rad), float32 (scan_y, scan_x) with zero mean, and its sampling (A).

    The COM deflection theta (rad) is the phase gradient times lambda / (2 pi), so
    grad(phase) = 2 pi / lambda * theta; the gradient field is integrated on the periodic scan
    grid. Pixel (iy, ix) is scan position (x = ix * step_x, y = iy * step_y). The returned
    sampling is the mean of step_x and step_y (``stem.scan_step_x_A`` / ``scan_step_y_A``).
    """
    from abtem.core.energy import energy2wavelength

    com_x, com_y = center_of_mass(stem, origin=origin)
    step_x, step_y = float(stem.scan_step_x_A), float(stem.scan_step_y_A)
    wavelength_A = energy2wavelength(float(stem.energy_eV))
    scale = 2.0 * np.pi / wavelength_A * 1e-3  # mrad -> rad/A of phase gradient
    phase = integrate_gradient(scale * com_x, scale * com_y, step_x, step_y)
    phase -= phase.mean()
    return phase.astype(np.float32), float(0.5 * (step_x + step_y))


def icom_transfer(
    shape: tuple[int, int],
    step_x: float,
    step_y: float,
    energy_eV: float,
    semiangle_mrad: float,
    thickness_A: float = 0.0,
    n_depths: int = 16,
) -> np.ndarray:
    """iCOM's transfer function on the periodic scan grid ``shape`` (y, x), ``numpy.fft`` order.

    A thin phase object: the iCOM image is the phase convolved with the probe intensity (for any
    phase strength, Ehrenfest), whose Fourier transform is the autocorrelation of the aperture,
    the normalised overlap area of two discs of radius alpha / lambda at a distance |q| (1 at
    q = 0, 0 from |q| = 2 alpha / lambda on); that is ``thickness_A`` = 0. A specimen of
    ``thickness_A``: each slice at depth z is seen through the probe as it has propagated to z
    (focused on the entrance surface, Fresnel-spread by z), so the transfer is the mean over
    ``n_depths`` depths of the spectrum of the defocused probe's intensity (first order in the
    scattering; channelling beyond it is not modelled). The spread sqrt(lambda z) is 0.7 A at
    24 A and 300 kV, the size of a split Br column: ignoring it rounds split columns."""
    from abtem.core.energy import energy2wavelength

    ny, nx = shape
    wavelength = energy2wavelength(float(energy_eV))
    radius = float(semiangle_mrad) * 1e-3 / wavelength
    q = np.hypot(np.fft.fftfreq(ny, d=step_y)[:, None], np.fft.fftfreq(nx, d=step_x)[None, :])
    thickness_A = float(thickness_A)
    if not (np.isfinite(thickness_A) and thickness_A >= 0):
        raise InputError(f"icom_transfer: thickness_A must be a number >= 0, got {thickness_A}")
    if thickness_A == 0:
        x = np.clip(q / (2.0 * radius), 0.0, 1.0)
        return (2.0 / np.pi) * (np.arccos(x) - x * np.sqrt(1.0 - x * x))
    # radial profile from a probe grid whose k range holds the band (sampling 1 / (8 R)) and whose
    # extent holds the probe spread to the exit surface (lambda t R) and resolves the aperture (32 / R)
    spread = wavelength * thickness_A * radius + 2.0 / radius
    extent = max(32.0 / radius, 4.0 * spread)
    n = int(2 ** np.ceil(np.log2(max(256.0, 8.0 * radius * extent))))
    sampling = 1.0 / (8.0 * radius)
    k = np.fft.fftfreq(n, d=sampling)
    k2 = k[None, :] ** 2 + k[:, None] ** 2
    aperture = (k2 <= radius**2).astype(np.complex128)
    mean = np.zeros(n)
    for z in (np.arange(int(n_depths)) + 0.5) / int(n_depths) * thickness_A:
        probe = np.fft.ifft2(aperture * np.exp(-1j * np.pi * wavelength * z * k2))
        spectrum = np.real(np.fft.fft2(np.abs(probe) ** 2))
        mean += spectrum[0] / spectrum[0, 0]
    mean /= int(n_depths)
    half = n // 2
    out = np.interp(q, k[:half], mean[:half], right=0.0)
    out[q >= 2.0 * radius] = 0.0  # no transfer beyond the disc overlap (the profile's round-off there)
    return out


def icom_wiener(
    stem: Stem4D, thickness_A: float | None = None, eps: float = WIENER_EPS, origin: str = "mean"
) -> tuple[np.ndarray, float]:
    """iCOM phase image deconvolved by its transfer function (:func:`icom_transfer` for a specimen of
    ``thickness_A``) with a Wiener filter T / (T^2 + ``eps``); float32 (scan_y, scan_x), zero mean,
    and its sampling (A).

    iCOM damps every spatial frequency q by the overlap of two aperture discs (T falls from 1 to
    about 0.4 at alpha / lambda and to 0 at 2 alpha / lambda), and in a thick specimen further by
    the probe's spread with depth; this rounds split columns and broadens round ones. The filter
    restores the band where T^2 >> ``eps`` and leaves the frequencies beyond 2 alpha / lambda (no
    information, only noise) at zero. ``thickness_A``: the specimen thickness along the beam
    (A; 0: a thin object); None takes ``stem.extra['thickness_A']`` and fails with
    :class:`InputError` when the file has none. Same grid, sign and units as :func:`icom`; the
    probe is taken as focused on the entrance surface.
    """
    eps = float(eps)
    if not (np.isfinite(eps) and eps > 0):
        raise InputError(f"icom_wiener: eps must be a positive number, got {eps}")
    if thickness_A is None:
        thickness_A = stem.extra.get("thickness_A")
    if thickness_A is None:
        raise InputError(
            "icom_wiener: the specimen thickness is unknown: give reconstruct.thickness_A (A; 0 for a thin "
            "specimen) or record an attribute 'thickness_A' in the 4D-STEM file"
        )
    image, step = icom(stem, origin=origin)
    step_x, step_y = float(stem.scan_step_x_A), float(stem.scan_step_y_A)
    t = icom_transfer(image.shape, step_x, step_y, stem.energy_eV, stem.semiangle_mrad, float(thickness_A))
    out = np.real(np.fft.ifft2(np.fft.fft2(image.astype(np.float64)) * t / (t * t + eps)))
    out -= out.mean()
    return out.astype(np.float32), step


def nyquist_step_A(energy_eV: float, semiangle_mrad: float) -> float:
    """The coarsest scan step (A) whose Nyquist frequency holds the 4D-STEM transfer band
    |q| <= 2 alpha / lambda: lambda / (4 alpha) (0.197 A at 300 kV and 25 mrad)."""
    from abtem.core.energy import energy2wavelength

    return float(energy2wavelength(float(energy_eV)) / (4.0 * float(semiangle_mrad) * 1e-3))


def check_sampling(stem: Stem4D, method: str) -> str | None:
    """A warning text when ``method`` gives one pixel per scan position (:data:`SCAN_GRID_METHODS`)
    and the scan step is coarser than :func:`nyquist_step_A`; None otherwise. The transfer band
    then folds onto itself: column shapes come out wrong by an amount that depends on the
    structure (benchmarks/results/sampling.json)."""
    if method not in SCAN_GRID_METHODS:
        return None
    limit = nyquist_step_A(stem.energy_eV, stem.semiangle_mrad)
    step = max(float(stem.scan_step_x_A), float(stem.scan_step_y_A))
    if step <= limit * 1.02:
        return None
    return (
        f"{method}: the scan step {step:.3g} A is coarser than lambda / (4 alpha) = {limit:.3g} A "
        f"({float(stem.energy_eV) / 1e3:g} kV, {float(stem.semiangle_mrad):g} mrad): the image is aliased and "
        "column shapes (ellipticities) are biased; scan at most that step to measure them"
    )


def direct_ptychography(stem: Stem4D, method: str = "ssb") -> tuple[np.ndarray, float]:
    """Direct-ptychography phase image (rad), float32 (scan_y, scan_x) with zero mean, and its sampling (A).

    quantem's ``DirectPtychography`` (imported here, so the rest of the package does not need
    quantem) on the scan grid, as iCOM: ``ssb`` (single sideband, a weak-phase-object kernel) or
    ``wdd`` (Wigner distribution deconvolution, no weak-object approximation; ridge 1e-3). The
    diffraction origin is fitted and removed by quantem; the probe is the aperture of
    ``semiangle_mrad`` with C10 = -``extra['defocus_A']`` (abTEM's sign; 0 if not recorded).
    Pixel (iy, ix) is scan position (x = ix * step_x, y = iy * step_y), as for :func:`icom`; the
    data are handed over in their own axis order (rows, columns), in which quantem's detector
    rotation is -``scan_rotation_deg``. Neither kernel is calibrated in radians (the transfer is
    below 1 and frequency dependent), so the image is a phase up to a positive scale; column
    positions and shapes, which the fit uses, are what it is for. Not upsampled past the scan
    grid: quantem's ``upsampling_factor`` was measured to turn round Br columns elliptical
    (benchmarks/ptychography.py), so the resampling to ``reconstruct.sampling_A`` is the same
    Fourier interpolation as iCOM's.
    """
    if method not in PTYCHOGRAPHY_KERNELS:
        raise InputError(f"direct_ptychography: method must be one of {list(PTYCHOGRAPHY_KERNELS)}, got {method!r}")
    data = validate(stem)
    name = f"{method} reconstruction"
    if data.shape[0] < 4 or data.shape[1] < 4:
        raise InputError(f"{name}: field 'data' needs a scan of at least 4x4 positions, got {data.shape[:2]}")
    alpha = float(stem.semiangle_mrad)
    if not (np.isfinite(alpha) and alpha > 0):
        raise InputError(f"{name}: attribute 'semiangle_mrad' must be a positive number, got {alpha}")
    dkx, dky = float(stem.k_sampling_x_mrad), float(stem.k_sampling_y_mrad)
    reach = min((data.shape[3] // 2) * dkx, (data.shape[2] // 2) * dky)
    if reach <= alpha:
        raise InputError(
            f"{name}: the detector (field 'data', {data.shape[2]}x{data.shape[3]} pixels of "
            f"{dky:g} x {dkx:g} mrad, 'k_sampling_mrad') reaches {reach:.3g} mrad from its centre, not beyond the "
            f"bright-field disc of 'semiangle_mrad' = {alpha:g} mrad"
        )
    totals = data.sum(axis=(2, 3))
    if not np.any(totals > 0):
        raise InputError(f"{name}: field 'data' has no counts (all diffraction patterns empty)")
    defocus = float(stem.extra.get("defocus_A", 0.0) or 0.0)
    try:
        from quantem.core.datastructures import Dataset4dstem
        from quantem.diffractive_imaging import DirectPtychography
    except ImportError as err:  # pragma: no cover - the environment of envs/ installs it
        raise ImportError(
            f"reconstruct: method {method!r} needs the package quantem (installed by `make env`: "
            "pip install --no-deps quantem==0.1.10)"
        ) from err
    step_x, step_y = float(stem.scan_step_x_A), float(stem.scan_step_y_A)
    dataset = Dataset4dstem.from_array(
        np.ascontiguousarray(data, dtype=np.float32),
        sampling=(step_y, step_x, dky, dkx),
        units=("A", "A", "mrad", "mrad"),
    )
    ptycho = DirectPtychography.from_dataset4d(
        dataset,
        energy=float(stem.energy_eV),
        semiangle_cutoff=alpha,
        rotation_angle=-float(stem.scan_rotation_deg),
        aberration_coefs={"C10": -defocus} if defocus else {},
        device="cpu",
        verbose=False,
    )
    ptycho.reconstruct(deconvolution_kernel=PTYCHOGRAPHY_KERNELS[method], verbose=False)
    phase = np.asarray(ptycho.obj, dtype=np.float64)
    if phase.shape != data.shape[:2] or not np.all(np.isfinite(phase)):
        raise RuntimeError(
            f"{name}: quantem returned an image of shape {phase.shape} (finite: "
            f"{bool(np.all(np.isfinite(phase)))}), expected {data.shape[:2]}"
        )
    phase -= phase.mean()
    return phase.astype(np.float32), float(0.5 * (step_x + step_y))


def fourier_upsample(image: np.ndarray, factor: int) -> np.ndarray:
    """Band-limited (periodic, Fourier) interpolation of ``image`` onto a ``factor`` times finer grid.

    Exact for the periodic, band-limited images iCOM produces: it adds pixels, not information,
    so that column fits see several pixels per column width.
    """
    from scipy.signal import resample

    factor = int(factor)
    if factor <= 1:
        return image
    ny, nx = image.shape
    out = resample(resample(np.asarray(image, dtype=np.float64), ny * factor, axis=0), nx * factor, axis=1)
    return out.astype(np.float32)


def square_grid(extent_x: float, extent_y: float, sampling_A: float, max_relative: float = 1e-3) -> tuple[int, int]:
    """Pixel counts (m_x, m_y) of a square-pixel grid over extent_x x extent_y A with pixels no coarser
    than ``sampling_A``: the first m_x (from extent_x / sampling_A up) whose pixel extent_x / m_x
    also divides extent_y to within ``max_relative``, else the best one in a 20 % range."""
    start = int(np.ceil(extent_x / sampling_A - 1e-9))
    best = None
    for m_x in range(start, max(start + 1, int(np.ceil(1.2 * start)) + 1)):
        s = extent_x / m_x
        m_y = max(1, int(round(extent_y / s)))
        err = abs(extent_y / s - m_y) / m_y
        if best is None or err < best[0]:
            best = (err, m_x, m_y)
        if err <= max_relative:
            break
    return best[1], best[2]


def square_pixels(
    image: np.ndarray, pixel_x_A: float, pixel_y_A: float, sampling_A: float | None = None
) -> tuple[np.ndarray, float]:
    """Periodic (Fourier) resampling of ``image`` (y, x), pixels ``pixel_x_A`` x ``pixel_y_A``, onto
    square pixels over the same extent; returns (image float32, pixel size A).

    The pixel is at most ``sampling_A`` and at most the finer input pixel (no information is
    dropped), chosen so that both axes hold a whole number of pixels (:func:`square_grid`): the
    image keeps spanning the scanned cell, so column positions and shapes keep their geometry when
    the scan steps differ along x and y (a periodic cell with unequal sides, an averaged cell of a
    measured lattice). Exact for the periodic, band-limited images iCOM and the CNN produce.
    """
    from scipy.signal import resample

    ny, nx = image.shape
    px, py = float(pixel_x_A), float(pixel_y_A)
    target = min(px, py) if sampling_A is None else min(float(sampling_A), px, py)
    if px == py and (sampling_A is None or sampling_A >= px):
        return np.asarray(image, dtype=np.float32), px
    m_x, m_y = square_grid(nx * px, ny * py, target)
    out = np.asarray(image, dtype=np.float64)
    if m_y != ny:
        out = resample(out, m_y, axis=0)
    if m_x != nx:
        out = resample(out, m_x, axis=1)
    return out.astype(np.float32), nx * px / m_x


def reconstruct(
    stem: Stem4D,
    method: str = "icom",
    sampling_A: float | None = None,
    weights: str | None = None,
    device: str = "auto",
    thickness_A: float | None = None,
    wiener_eps: float = WIENER_EPS,
) -> tuple[np.ndarray, float]:
    """Phase image (y, x) on square pixels and its pixel size (A) by ``method`` (one of :data:`METHODS`).

    ``icom``, ``icom_wiener``, ``ssb`` and ``wdd`` (:func:`direct_ptychography`, needs quantem) give
    one pixel per scan step (a :class:`SamplingWarning` when the step is coarser than
    :func:`nyquist_step_A`); ``cnn`` (weights from ``weights``, default ``resources/cnn/weights.pt``, on
    ``device``) gives 4 pixels per scan step. The image is
    Fourier-resampled (:func:`square_pixels`) onto square pixels spanning the scanned extent,
    of ``sampling_A`` when that is finer than native, and also when the scan steps along x and y
    differ (``stem.scan_step_x_A`` / ``scan_step_y_A``). ``thickness_A`` and ``wiener_eps``: those
    of :func:`icom_wiener` (the other methods ignore them).
    """
    note = check_sampling(stem, method)
    if note is not None:
        import warnings

        warnings.warn(note, SamplingWarning, stacklevel=2)
    if method == "icom":
        image, step = icom(stem)
    elif method == "icom_wiener":
        image, step = icom_wiener(stem, thickness_A=thickness_A, eps=wiener_eps)
    elif method == "cnn":
        from octastem.cnn import predict_phase

        image, step = predict_phase(stem, weights=weights, device=device)
    elif method in PTYCHOGRAPHY_KERNELS:
        image, step = direct_ptychography(stem, method)
    else:
        raise InputError(f"reconstruct: unknown method {method!r}; expected one of {list(METHODS)}")
    step_x, step_y = float(stem.scan_step_x_A), float(stem.scan_step_y_A)
    scan_y, scan_x = stem.data.shape[:2]
    pixel_x = step_x * scan_x / image.shape[1]
    pixel_y = step_y * scan_y / image.shape[0]
    if sampling_A is not None and not sampling_A < step:
        sampling_A = None
    return square_pixels(image, pixel_x, pixel_y, sampling_A)
