"""PRISM 4D-STEM of a finite specimen: abTEM's S-matrix with interpolation, the fast path of the nanocrystal scan.

The plain multislice (:mod:`octastem.stem.simulate`) propagates one probe per scan position
through the whole box. PRISM (Ophus 2017; abTEM's :class:`abtem.SMatrix`) propagates once the
plane waves inside the probe aperture on a k-lattice ``interpolation`` (f) times coarser than
the box's, so a probe is a weighted sum of them, periodic with the window ``W = L / f``; each
position's exit wave is that sum cropped to the window around it. The cost is the number of
plane waves, pi (alpha W / lambda)^2 (about 1,000 for a 14 A window at 25 mrad and 300 kV),
instead of the number of positions, plus a cheap sum per position: the advantage grows with the
scan. The approximation is the window: the probe's tails beyond W / 2 are cut (and those of the
neighbouring periodic copies enter), and its aperture edge is sampled on the coarse k-lattice;
the window must hold the probe's spread through the specimen (:func:`interpolation_factors`).

abTEM sets the plane waves, their normalisation, the grids and the probe coefficients; the plane
waves go through abTEM's transmission functions and Fresnel propagators one at a time
(:func:`_plane_wave_basis`), and the reduction is one matrix product per tile of positions
(:func:`_reduce`). With f = 1 the result is the multislice path's to rounding.

The patterns follow the same contract as the multislice path: each windowed exit wave is
zero-padded to the whole box before its Fourier transform, so the pattern has the box's native
angular sampling lambda / L and the same centred, odd-sized pixels within ``max_angle_mrad``;
they are then rebinned (count preserving) onto the detector sampling exactly as there. The
transform of the padded wave is evaluated only at the frequencies kept, as two matrix products
with the window (:func:`_patterns`), and the crop and rebinning are two more. The S-matrix is held
only over the scan region and one window around it, in complex64.
"""
from __future__ import annotations

import numpy as np

from octastem.io import InputError


def interpolation_factors(
    lengths, interpolation=None, margin_A: float | None = None, semiangle_mrad: float = 0.0
) -> tuple[int, int]:
    """PRISM interpolation factors (f_x, f_y) for a box of ``lengths`` (Lx, Ly, thickness Lz) A.

    ``interpolation``: a positive integer for both axes; None: the largest factor per axis whose
    window (length / f) holds the probe's geometric spread through the thickness, 2 Lz alpha
    (``semiangle_mrad`` alpha), plus ``margin_A``; at least 1. InputError for bad values.
    """
    if interpolation is not None:
        if isinstance(interpolation, bool) or not isinstance(interpolation, (int, np.integer)) or interpolation < 1:
            raise InputError(f"stem: prism_interpolation must be a positive integer or null, got {interpolation!r}")
        return int(interpolation), int(interpolation)
    if isinstance(margin_A, bool) or not isinstance(margin_A, (int, float, np.number)) or not 0 < margin_A < np.inf:
        raise InputError(f"stem: prism_margin_A must be a positive number of angstroms, got {margin_A!r}")
    window_A = float(margin_A) + 2.0 * float(lengths[2]) * float(semiangle_mrad) * 1e-3
    fx, fy = (max(1, int(np.floor(float(length) / window_A + 1e-9))) for length in lengths[:2])
    return fx, fy


def _native_shape(abtem, gpts, lengths, energy_eV: float, max_angle_mrad: float) -> tuple[tuple[int, int], list]:
    """Shape (k_x, k_y) and sampling (mrad) of the multislice path's patterns on this grid, before cropping."""
    dummy = abtem.Waves(
        np.zeros(tuple(gpts), np.complex64), extent=tuple(float(v) for v in lengths[:2]), energy=energy_eV
    )
    measurement = abtem.PixelatedDetector(max_angle=max_angle_mrad).detect(dummy)
    return tuple(measurement.array.shape[-2:]), [float(s) for s in measurement.angular_sampling]


def _region(positions_px: np.ndarray, window: int, n: int) -> tuple[int, np.ndarray]:
    """First grid index and indices (periodic, mod ``n``) along one axis of the S-matrix kept: the
    scanned pixels ``positions_px`` and half a ``window`` around them (repeating grid points where
    that is longer than the axis, so every window is one contiguous slice of the kept array)."""
    lo = int(np.floor(positions_px.min())) - window // 2 - 1
    hi = int(np.ceil(positions_px.max())) + window - window // 2 + 1
    return lo, np.arange(lo, hi) % n


def _plane_wave_basis(abtem, frame_potential, energy_eV, semiangle_mrad, interpolation, scan, num_workers) -> dict:
    """The frame's S-matrix: the plane waves of the aperture on the k-lattice ``interpolation`` times coarser
    than the box's, propagated through ``frame_potential``, downsampled to the anti-aliasing cutoff and kept
    over the scan region plus a window (:func:`_region`).

    abTEM's :class:`abtem.SMatrix` sets the plane waves, their normalisation and the grids; the
    multislice is abTEM's (its band-limited transmission functions and Fresnel propagators, transmission
    then propagation per slice, downsampling as :meth:`abtem.Waves.downsample`) run one plane wave at a
    time, so that each wave stays in the CPU cache through all slices, on ``num_workers`` threads.
    Returns array (plane waves, x, y) complex64, wave_vectors (1/A), sampling (A), window (gpts),
    offset (grid index of array[:, 0, 0]), the downsampled box grid gpts and abTEM's probe of one
    window (``probe``, whose grid sets the aperture's soft edge in :func:`_coefficients`).
    """
    from concurrent.futures import ThreadPoolExecutor

    import scipy.fft
    from abtem.antialias import AntialiasAperture
    from abtem.core.fft import fft_crop
    from abtem.multislice import FresnelPropagator
    from abtem.prism.utils import plane_waves

    s_matrix = abtem.SMatrix(
        potential=frame_potential,
        energy=energy_eV,
        semiangle_cutoff=semiangle_mrad,
        interpolation=interpolation,
        downsample="cutoff",
    )
    gpts, extent = tuple(s_matrix.gpts), tuple(float(v) for v in s_matrix.extent)
    small = tuple(int(v) for v in s_matrix.downsampled_gpts)
    window = tuple(int(v) for v in s_matrix.window_gpts)
    sampling = (extent[0] / small[0], extent[1] / small[1])
    wave_vectors = np.asarray(s_matrix.wave_vectors, dtype=np.float32)
    norm = np.float32(np.prod(s_matrix.interpolation) / np.prod(gpts))

    transmission = AntialiasAperture().bandlimit(frame_potential.transmission_function(energy=energy_eV))
    thickness = [float(dz) for dz in transmission.slice_thickness]
    transmission = np.ascontiguousarray(np.asarray(transmission.array), dtype=np.complex64)
    dummy = abtem.Waves(np.zeros(gpts, np.complex64), extent=extent, energy=energy_eV)
    kernels = {dz: np.asarray(FresnelPropagator._calculate_array(dummy, dz), np.complex64) for dz in set(thickness)}

    nx, ny = scan.n_scan
    xs = (scan.start[0] + np.arange(nx) * scan.steps[0]) / sampling[0]
    ys = (scan.start[1] + np.arange(ny) * scan.steps[1]) / sampling[1]
    (x0, ix), (y0, iy) = (_region(p, w, n) for p, w, n in zip((xs, ys), window, small))
    array = np.empty((len(wave_vectors), len(ix), len(iy)), np.complex64)
    keep = np.ix_(ix, iy)

    def propagate(i: int) -> None:
        wave = plane_waves(wave_vectors[i : i + 1], extent, gpts)[0].astype(np.complex64) * norm
        for k, dz in enumerate(thickness):
            wave *= transmission[k]
            wave = scipy.fft.fft2(wave, overwrite_x=True)
            wave *= kernels[dz]
            if k < len(thickness) - 1:
                wave = scipy.fft.ifft2(wave, overwrite_x=True)
        # the exit wave's spectrum, cropped to the anti-aliasing cutoff (abTEM's downsampling, intensity kept)
        array[i] = scipy.fft.ifft2(fft_crop(wave, small), overwrite_x=True)[keep]

    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        list(pool.map(propagate, range(len(wave_vectors))))
    return {
        "array": array,
        "wave_vectors": wave_vectors.astype(np.float64),
        "sampling": sampling,
        "window": window,
        "offset": (x0, y0),
        "gpts": small,
        "probe": s_matrix.dummy_probes(),
    }


def _coefficients(basis: dict, ctf, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(positions, plane waves) complex64 weights of the probes at (``x``, ``y``) (A): the ``ctf``
    (abTEM's aperture and aberrations at each wave vector, normalised to unit intensity) times the
    phase that shifts each plane wave to the position, as abTEM's PRISM reduction (the aperture's soft
    edge on the window's angular sampling, as there)."""
    ctf = ctf.copy()
    ctf.grid.match(basis["probe"])
    k = basis["wave_vectors"]
    alpha = np.hypot(k[:, 0], k[:, 1]) * ctf.wavelength
    phi = np.arctan2(k[:, 1], k[:, 0])
    weights = np.asarray(ctf._evaluate_from_angular_grid(alpha, phi), dtype=np.complex128)
    weights = weights / np.sqrt((np.abs(weights) ** 2).sum())
    phase = np.exp(-2j * np.pi * (np.outer(x, k[:, 0]) + np.outer(y, k[:, 1])))
    return (phase * weights).astype(np.complex64)


def _reduce(basis: dict, coefficients: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Exit waves (positions, window x, window y) of the probes at (``x``, ``y``) (A): the S-matrix summed
    with ``coefficients`` (:func:`_coefficients`) over the window centred on each position (the nearest
    grid point, as abTEM's reduction), one matrix product over the block that holds them all."""
    window, sampling, offset = basis["window"], basis["sampling"], basis["offset"]
    corners = np.stack(
        [np.rint(v / s - o - w // 2).astype(int) for v, s, o, w in zip((x, y), sampling, offset, window)], axis=1
    )
    lo, hi = corners.min(axis=0), corners.max(axis=0) + np.asarray(window)
    block = basis["array"][:, lo[0] : hi[0], lo[1] : hi[1]]
    waves = (coefficients @ block.reshape(len(block), -1)).reshape(len(x), hi[0] - lo[0], hi[1] - lo[1])
    views = np.lib.stride_tricks.sliding_window_view(waves, window, axis=(1, 2))
    return views[np.arange(len(x)), corners[:, 0] - lo[0], corners[:, 1] - lo[1]]


def _detector_operators(full_gpts, window, half, rx: np.ndarray, ry: np.ndarray) -> dict:
    """Per axis (x, y): the Fourier matrix (frequencies kept, window) complex64 of a window zero-padded to
    ``full_gpts`` (row m: exp(-2 pi i m j / n) for the frequencies |m| <= k the detector uses) and the
    float32 matrix (detector pixels, frequencies kept) of the multislice path's centred, odd crop (2 half + 1)
    and its count-preserving rebinning ``rx`` / ``ry`` in one."""
    out = {"fourier": [], "rebin": []}
    for n, w, h, rebin in zip(full_gpts, window, half, (rx, ry)):
        k = min(h, n // 2, n - 1 - n // 2)
        m = np.arange(-k, k + 1)
        out["fourier"].append(np.exp(-2j * np.pi * np.outer(m, np.arange(w)) / n).astype(np.complex64))
        out["rebin"].append(np.ascontiguousarray(rebin[:, h + m], dtype=np.float32))
    out["scale"] = np.float32(window[0] * window[1] / (full_gpts[0] * full_gpts[1]))
    return out


def _patterns(waves: np.ndarray, operators: dict) -> np.ndarray:
    """Detector patterns (positions, k_y, k_x) float32 of windowed exit waves (positions, x, y): their
    spectra zero-padded to the box grid (the discrete Fourier transform at the frequencies kept, as matrix
    products; the same values as an FFT of the padded wave), normalised like abTEM's (a pattern sums to
    the fraction of the beam), cropped and rebinned by the ``operators`` of :func:`_detector_operators`.
    Each step is one matrix product over all positions (no loop of small products)."""
    (fourier_x, fourier_y), (rebin_x, rebin_y) = operators["fourier"], operators["rebin"]
    n, wx, wy = waves.shape
    kx = fourier_x.shape[0]
    along_x = fourier_x @ np.ascontiguousarray(waves.transpose(1, 0, 2)).reshape(wx, n * wy)  # (k_x, n y)
    spectrum = along_x.reshape(kx * n, wy) @ fourier_y.T  # (k_x n, k_y)
    del along_x
    intensity = spectrum.real**2
    intensity += spectrum.imag**2
    del spectrum
    intensity *= operators["scale"]
    binned_y = (intensity @ rebin_y.T).reshape(kx, n * rebin_y.shape[0])  # (k_x, n detector y)
    binned = (rebin_x @ binned_y).reshape(rebin_x.shape[0], n, rebin_y.shape[0])
    return binned.transpose(1, 2, 0)


def scan_finite_prism(
    abtem,
    scan,
    probe: dict,
    potential: dict,
    angles: dict,
    interpolation: tuple[int, int],
    chunk_mb: float,
    num_workers: int,
    progress: bool,
) -> tuple[np.ndarray, tuple[float, float]]:
    """Frame-averaged (scan_y, scan_x, k_y, k_x) PRISM patterns of a finite specimen and their sampling (k_x, k_y) mrad.

    Same arguments as the multislice path's ``_scan_finite`` (``probe``: energy_eV,
    semiangle_mrad and defocus_A; ``potential``: slice_thickness_A and parametrization;
    ``angles``: wavelength_A, max_angle_mrad and the detector ``sampling``), plus the
    ``interpolation`` factors (f_x, f_y) (the window is the box / f, :func:`interpolation_factors`).
    """
    from tqdm.auto import tqdm

    from octastem.stem.simulate import _output_sampling, _rebin_axis

    energy_eV, semiangle_mrad = probe["energy_eV"], probe["semiangle_mrad"]
    max_angle_mrad = angles["max_angle_mrad"]
    native_shape, dk = _native_shape(abtem, scan.gpts, scan.lengths, energy_eV, max_angle_mrad)
    half = tuple((n - 1) // 2 for n in native_shape)  # the multislice path's symmetric crop
    k_out = _output_sampling(scan, angles)
    rx = _rebin_axis(2 * half[0] + 1, dk[0], k_out[0])
    ry = _rebin_axis(2 * half[1] + 1, dk[1], k_out[1])
    nx, ny = scan.n_scan
    xs = scan.start[0] + np.arange(nx) * scan.steps[0]
    ys = scan.start[1] + np.arange(ny) * scan.steps[1]
    total = np.zeros((ny, nx, ry.shape[0], rx.shape[0]))
    ctf = abtem.CTF(semiangle_cutoff=semiangle_mrad, defocus=probe["defocus_A"], energy=energy_eV)
    bar = tqdm(total=len(scan.frames) * ny, desc="nanocrystal 4D-STEM (PRISM)", unit="row", disable=not progress)
    for frame in scan.frames:
        frame_potential = abtem.Potential(
            frame,
            gpts=scan.gpts,
            slice_thickness=potential["slice_thickness_A"],
            parametrization=potential["parametrization"],
            projection="infinite",
        ).build(lazy=False)
        basis = _plane_wave_basis(abtem, frame_potential, energy_eV, semiangle_mrad, interpolation, scan, num_workers)
        del frame_potential
        full_gpts = basis["gpts"]
        operators = _detector_operators(full_gpts, basis["window"], half, rx, ry)
        tile = _tile(chunk_mb, [len(f) for f in operators["fourier"]], nx, ny)
        for r0 in range(0, ny, tile[1]):
            r1 = min(ny, r0 + tile[1])
            for c0 in range(0, nx, tile[0]):
                c1 = min(nx, c0 + tile[0])
                y, x = (v.ravel() for v in np.meshgrid(ys[r0:r1], xs[c0:c1], indexing="ij"))
                waves = _reduce(basis, _coefficients(basis, ctf, x, y), x, y)
                patterns = _patterns(waves, operators)  # (y x, k_y, k_x)
                total[r0:r1, c0:c1] += patterns.reshape(r1 - r0, c1 - c0, *patterns.shape[1:])
            bar.update(r1 - r0)
    bar.close()
    return total / len(scan.frames), (float(k_out[0]), float(k_out[1]))


def _tile(chunk_mb: float, spectrum_gpts, nx: int, ny: int) -> tuple[int, int]:
    """Positions (x, y) reduced at once: a square tile whose spectra (``spectrum_gpts`` frequencies kept)
    fit ``chunk_mb`` (at most 16 x 16)."""
    per_position = 12.0 * spectrum_gpts[0] * spectrum_gpts[1]  # complex64 spectrum and its float32 intensity
    side = int(max(1, min(16, np.sqrt(chunk_mb * 2**20 / per_position))))
    return min(side, nx), min(side, ny)
