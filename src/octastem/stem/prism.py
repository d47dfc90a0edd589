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

The patterns follow the same contract as the multislice path: each windowed exit wave is
zero-padded to the whole box before its Fourier transform, so the pattern has the box's native
angular sampling lambda / L and the same centred, odd-sized pixels within ``max_angle_mrad``;
they are then rebinned (count preserving) onto the detector sampling exactly as there. The
S-matrix is held only over the scan region and one window around it, in complex64.
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
    """First grid index and indices (periodic) along one axis of the S-matrix kept: the scanned
    pixels ``positions_px`` and half a ``window`` around them; the whole axis when that covers it."""
    lo = int(np.floor(positions_px.min())) - window // 2 - 1
    hi = int(np.ceil(positions_px.max())) + window - window // 2 + 1
    if hi - lo >= n:
        return 0, np.arange(n)
    return lo, np.arange(lo, hi) % n


def _s_matrix(abtem, frame_potential, energy_eV, semiangle_mrad, interpolation, scan, num_workers):
    """The frame's S-matrix (plane waves propagated, downsampled to the anti-aliasing cutoff), cropped
    to the scan region plus a window, as an :class:`abtem.SMatrixArray` in memory."""
    s_matrix = abtem.SMatrix(
        potential=frame_potential,
        energy=energy_eV,
        semiangle_cutoff=semiangle_mrad,
        interpolation=interpolation,
        downsample="cutoff",
    )
    built = s_matrix.build(lazy=True)
    sampling = built.sampling
    nx, ny = scan.n_scan
    xs = (scan.start[0] + np.arange(nx) * scan.steps[0]) / sampling[0]
    ys = (scan.start[1] + np.arange(ny) * scan.steps[1]) / sampling[1]
    (x0, ix), (y0, iy) = (_region(p, w, n) for p, w, n in zip((xs, ys), built.window_gpts, built.gpts))
    whole = (len(ix) == built.gpts[0], len(iy) == built.gpts[1])
    array = built.array
    array = array[:, ix[0] : ix[0] + len(ix)] if ix[-1] - ix[0] == len(ix) - 1 else array[:, ix]
    array = array[:, :, iy[0] : iy[0] + len(iy)] if iy[-1] - iy[0] == len(iy) - 1 else array[:, :, iy]
    array = np.asarray(array.compute(scheduler="threads", num_workers=num_workers))
    # a cropped axis is no longer periodic; grid index i of the box is index i - offset of the array
    cropped = abtem.SMatrixArray(
        array,
        wave_vectors=np.asarray(built.wave_vectors),
        semiangle_cutoff=semiangle_mrad,
        energy=energy_eV,
        interpolation=interpolation,
        sampling=sampling,
        window_gpts=built.window_gpts,
        window_offset=(x0, y0),
        periodic=whole,
        device="cpu",
    )
    return cropped, tuple(built.gpts)


def _patterns(waves: np.ndarray, full_gpts: tuple[int, int], half: tuple[int, int], num_workers: int) -> np.ndarray:
    """Diffraction patterns (..., k_x, k_y), centred and odd (2 half + 1), of windowed exit waves
    zero-padded to ``full_gpts``; normalised like abTEM's, so a pattern sums to the fraction of the beam."""
    import scipy.fft

    wx, wy = waves.shape[-2:]
    padded = np.zeros(waves.shape[:-2] + tuple(full_gpts), np.complex64)
    padded[..., :wx, :wy] = waves
    spectrum = scipy.fft.fft2(padded, axes=(-2, -1), workers=num_workers)
    intensity = (spectrum.real**2 + spectrum.imag**2) * (wx * wy / (full_gpts[0] * full_gpts[1]))
    intensity = np.fft.fftshift(intensity, axes=(-2, -1))
    out = np.zeros(waves.shape[:-2] + (2 * half[0] + 1, 2 * half[1] + 1))
    src, dst = [], []
    for n, h in zip(full_gpts, half):
        c, k = n // 2, min(h, n // 2, n - 1 - n // 2)
        src.append(slice(c - k, c + k + 1))
        dst.append(slice(h - k, h + k + 1))
    out[..., dst[0], dst[1]] = intensity[..., src[0], src[1]]
    return out


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
        s_matrix, full_gpts = _s_matrix(
            abtem, frame_potential, energy_eV, semiangle_mrad, interpolation, scan, num_workers
        )
        del frame_potential
        tile = _tile(chunk_mb, full_gpts, nx, ny)
        for r0 in range(0, ny, tile[1]):
            r1 = min(ny, r0 + tile[1])
            for c0 in range(0, nx, tile[0]):
                c1 = min(nx, c0 + tile[0])
                grid = abtem.GridScan(
                    start=(scan.start[0] + c0 * scan.steps[0], scan.start[1] + r0 * scan.steps[1]),
                    end=(scan.start[0] + c1 * scan.steps[0], scan.start[1] + r1 * scan.steps[1]),
                    gpts=(c1 - c0, r1 - r0),
                    endpoint=False,
                )
                waves = s_matrix.reduce(
                    scan=grid, ctf=ctf, detectors=abtem.WavesDetector(), max_batch_reduction=(c1 - c0) * (r1 - r0)
                )
                array = np.asarray(waves.array)
                if array.shape[:2] != (c1 - c0, r1 - r0):
                    raise RuntimeError(f"stem: unexpected abTEM PRISM output shape {array.shape}")
                patterns = _patterns(array, full_gpts, half, num_workers)  # (x, y, k_x, k_y)
                total[r0:r1, c0:c1] += np.einsum("oi,xyji,pj->yxop", ry, patterns, rx, optimize=True)
            bar.update(r1 - r0)
    bar.close()
    return total / len(scan.frames), (float(k_out[0]), float(k_out[1]))


def _tile(chunk_mb: float, full_gpts: tuple[int, int], nx: int, ny: int) -> tuple[int, int]:
    """Positions (x, y) reduced at once: a square tile whose padded waves fit ``chunk_mb`` (at most 16 x 16)."""
    per_position = 8.0 * full_gpts[0] * full_gpts[1] * 3  # complex64 padded wave, its transform, the intensity
    side = int(max(1, min(16, np.sqrt(chunk_mb * 2**20 / per_position))))
    return min(side, nx), min(side, ny)
