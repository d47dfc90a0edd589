"""Simulated 4D-STEM of MD snapshots with abTEM multislice, and Poisson noise at a given dose.

The frames are frozen-phonon configurations: the diffraction intensities are averaged over
them. The probe is scanned over the whole periodic in-plane cell; scan position (iy, ix) is at
(x = ix * step_x, y = iy * step_y), starting at 0, endpoint excluded, with the step adjusted
so an integer number of positions spans the cell. Patterns are stored (scan_y, scan_x, k_y, k_x)
of odd size with the optical axis at the centre pixel (n_ky // 2, n_kx // 2); the diffraction axes are parallel to the
scan axes (scan_rotation_deg = 0).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
from ase import Atoms

from .io import InputError, Stem4D, provenance
from .potential import common_frames, grid_gpts


def _workers(num_workers: int | None) -> int:
    if num_workers:
        return int(num_workers)
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _symmetric_crop(patterns: np.ndarray) -> np.ndarray:
    """Crop (..., k_y, k_x) patterns to an odd size centred on the optical axis at index n // 2.

    abTEM's even-sized patterns hold one more negative than positive frequency; that extra
    row and column would bias the centre of mass towards negative angles.
    """
    index = []
    for n in patterns.shape[-2:]:
        c = n // 2
        half = min(c, n - 1 - c)
        index.append(slice(c - half, c + half + 1))
    return np.ascontiguousarray(patterns[..., index[0], index[1]])


def electrons_per_position(dose_e_per_A2: float, scan_step_A: float | tuple[float, float]) -> float:
    """Expected electrons per probe position: dose (e/A^2) times the area of one scan cell (A^2)."""
    step = np.broadcast_to(np.asarray(scan_step_A, dtype=float), (2,))
    return float(dose_e_per_A2) * float(step[0] * step[1])


def add_poisson_noise(
    patterns: np.ndarray,
    dose_e_per_A2: float,
    scan_step_A: float | tuple[float, float],
    rng: np.random.Generator | int | None = None,
) -> np.ndarray:
    """Poisson-distributed counts (float32) from noise-free ``patterns`` (..., k_y, k_x).

    Each pattern holds the fraction of the incident beam per pixel (summing to ~1); the
    expected number of electrons per probe position is ``dose_e_per_A2 * step_x * step_y``
    (``scan_step_A`` a float or (step_x, step_y) in A).
    """
    patterns = np.asarray(patterns)
    if not np.isfinite(dose_e_per_A2) or dose_e_per_A2 <= 0:
        raise InputError(f"stem: dose_e_per_A2 must be a positive finite number, got {dose_e_per_A2}")
    if np.any(np.asarray(scan_step_A, dtype=float) <= 0):
        raise InputError(f"stem: scan_step_A must be positive, got {scan_step_A}")
    if not np.all(np.isfinite(patterns)) or np.any(patterns < 0):
        raise InputError("stem: noise-free patterns must be finite and non-negative")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    n_e = electrons_per_position(dose_e_per_A2, scan_step_A)
    return rng.poisson(patterns.astype(np.float64) * n_e).astype(np.float32)


def simulate_4dstem(
    frames: Atoms | Sequence[Atoms],
    energy_eV: float = 300e3,
    semiangle_mrad: float = 25.0,
    scan_step_A: float = 0.3,
    max_angle_mrad: float | None = None,
    sampling_A: float = 0.05,
    slice_thickness_A: float = 1.0,
    defocus_A: float = 0.0,
    dose_e_per_A2: float | None = None,
    seed: int = 0,
    source: str = "simulated",
    provenance_extra: dict | None = None,
    parametrization: str = "lobato",
    num_workers: int | None = None,
    progress: bool = False,
) -> Stem4D:
    """Multislice 4D-STEM of ``frames`` (frozen phonons) over the whole periodic in-plane cell.

    Units: energy eV, semi-angle and max angle mrad, steps/sampling/thickness/defocus A (abTEM
    sign convention for defocus: defocus = -C10), dose e/A^2. ``max_angle_mrad``
    (default 2 x semi-angle) crops the patterns; it must lie below the anti-aliasing limit of
    the potential grid (2/3 of lambda / (2 sampling)). Noise-free data (``dose_e_per_A2=None``)
    holds the fraction of the incident beam per pixel, so each pattern sums to the fraction
    reaching the detector (~1), and carries ``dose_e_per_A2 = inf``; with a dose it holds Poisson
    counts (float32) drawn with ``np.random.default_rng(seed)``. ``num_workers`` threads run the
    dask graph (default: all CPUs visible to the process).

    ``Stem4D.extra`` records: cell_A (Lx, Ly, Lz), scan_shape (ny, nx), scan_step_x_A,
    scan_step_y_A, k_sampling_x_mrad, k_sampling_y_mrad, max_angle_mrad, n_frames, sampling_A,
    slice_thickness_A, defocus_A, parametrization, seed, electrons_per_position (0 if noise
    free) and intensity_unit ("fraction_of_beam" or "counts"). The scalar scan_step_A and
    k_sampling_mrad are the means of the x and y values (equal for a square cell).
    """
    from .io import import_abtem

    abtem = import_abtem()
    from abtem.core.energy import energy2wavelength

    for key, value in (
        ("energy_eV", energy_eV),
        ("semiangle_mrad", semiangle_mrad),
        ("scan_step_A", scan_step_A),
        ("sampling_A", sampling_A),
        ("slice_thickness_A", slice_thickness_A),
    ):
        if not (np.isfinite(value) and value > 0):
            raise InputError(f"stem: {key} must be a positive number, got {value}")
    frames, lengths = common_frames(frames)
    gpts = grid_gpts(lengths[:2], sampling_A)
    wavelength_A = energy2wavelength(energy_eV)
    # abTEM's anti-aliasing aperture keeps 2/3 of the Nyquist frequency 1 / (2 sampling)
    sim_sampling = np.asarray(lengths[:2]) / np.asarray(gpts)
    limit_mrad = 1e3 * wavelength_A * (2.0 / 3.0) / (2.0 * sim_sampling.max())
    if max_angle_mrad is None:
        max_angle_mrad = min(2.0 * semiangle_mrad, 0.98 * limit_mrad)
    if not 0 < max_angle_mrad <= limit_mrad:
        raise InputError(
            f"stem: max_angle_mrad={max_angle_mrad} must be positive and at most the anti-aliasing limit "
            f"{limit_mrad:.1f} mrad of sampling_A={sampling_A} (use a finer sampling_A)"
        )
    if semiangle_mrad >= max_angle_mrad:
        raise InputError(f"stem: semiangle_mrad={semiangle_mrad} must be below max_angle_mrad={max_angle_mrad}")

    n_scan = tuple(max(1, round(length / scan_step_A)) for length in lengths[:2])  # (nx, ny)
    steps = (lengths[0] / n_scan[0], lengths[1] / n_scan[1])

    potential = abtem.Potential(
        frames if len(frames) > 1 else frames[0],
        gpts=gpts,
        slice_thickness=slice_thickness_A,
        parametrization=parametrization,
        projection="infinite",
    )
    probe = abtem.Probe(energy=energy_eV, semiangle_cutoff=semiangle_mrad, defocus=defocus_A)
    probe.grid.match(potential)
    scan = abtem.GridScan(start=(0.0, 0.0), end=(lengths[0], lengths[1]), gpts=n_scan, endpoint=False)
    detector = abtem.PixelatedDetector(max_angle=max_angle_mrad)
    measurement = probe.scan(potential, scan=scan, detectors=detector)
    measurement = measurement.compute(scheduler="threads", num_workers=_workers(num_workers), progress_bar=progress)

    array = np.asarray(measurement.array, dtype=np.float64)
    if array.ndim != 4:  # the frozen-phonon axis is averaged by abTEM (ensemble mean)
        raise RuntimeError(f"stem: unexpected abTEM output shape {array.shape}")
    # abTEM (scan_x, scan_y, k_x, k_y) -> (scan_y, scan_x, k_y, k_x); abTEM normalises the probe
    # to unit total intensity, so a pattern sums to the fraction of the beam within max_angle
    patterns = _symmetric_crop(array.transpose(1, 0, 3, 2))
    k_sampling = tuple(float(s) for s in measurement.angular_sampling)  # (kx, ky) in mrad

    settings = {
        "energy_eV": float(energy_eV),
        "semiangle_mrad": float(semiangle_mrad),
        "scan_step_A": float(scan_step_A),
        "max_angle_mrad": float(max_angle_mrad),
        "sampling_A": float(sampling_A),
        "slice_thickness_A": float(slice_thickness_A),
        "defocus_A": float(defocus_A),
        "dose_e_per_A2": None if dose_e_per_A2 is None else float(dose_e_per_A2),
        "seed": int(seed),
        "n_frames": len(frames),
        "parametrization": parametrization,
    }
    settings.update(provenance_extra or {})

    if dose_e_per_A2 is None:
        data = patterns.astype(np.float32)
        dose, n_e, unit = math.inf, 0.0, "fraction_of_beam"
    else:
        data = add_poisson_noise(patterns, dose_e_per_A2, steps, np.random.default_rng(seed))
        dose, n_e, unit = float(dose_e_per_A2), electrons_per_position(dose_e_per_A2, steps), "counts"

    extra = {
        "cell_A": [float(v) for v in lengths],
        "scan_shape": [int(n_scan[1]), int(n_scan[0])],
        "scan_step_x_A": float(steps[0]),
        "scan_step_y_A": float(steps[1]),
        "k_sampling_x_mrad": k_sampling[0],
        "k_sampling_y_mrad": k_sampling[1],
        "max_angle_mrad": float(max_angle_mrad),
        "n_frames": len(frames),
        "sampling_A": float(np.mean(sim_sampling)),
        "slice_thickness_A": float(slice_thickness_A),
        "defocus_A": float(defocus_A),
        "parametrization": parametrization,
        "seed": int(seed),
        "electrons_per_position": float(n_e),
        "intensity_unit": unit,
    }
    return Stem4D(
        data=data,
        energy_eV=float(energy_eV),
        semiangle_mrad=float(semiangle_mrad),
        scan_step_A=float(np.mean(steps)),
        k_sampling_mrad=float(np.mean(k_sampling)),
        dose_e_per_A2=dose,
        scan_rotation_deg=0.0,
        source=source,
        provenance=provenance(**settings),
        extra=extra,
    )
