"""Simulated 4D-STEM of MD snapshots with abTEM multislice, and Poisson noise at a given dose.

The frames are frozen-phonon configurations: the diffraction intensities are averaged over
them. Two specimens:

- ``specimen="periodic"``: the periodic MD cell. The probe is scanned over the whole in-plane
  cell; scan position (iy, ix) is at (x = ix * step_x, y = iy * step_y), starting at 0,
  endpoint excluded, with the step adjusted so an integer number of positions spans the cell.
- ``specimen="finite"``: a finite specimen (a nanocrystal, :mod:`octastem.stem.nanocrystal`) with
  vacuum around it in one orthorhombic box shared by all frames. The scan covers ``scan_periods``
  (nx, ny) periods of ``scan_period_A`` (the MD in-plane cell) from ``scan_start_A``: position
  (iy, ix) is at (x0 + ix * step_x, y0 + iy * step_y) with an integer number of positions per
  period. Along the beam the empty space before the first and after the last atom is dropped,
  so the probe is focused on the entrance surface as for the periodic cell (free propagation
  through vacuum would only defocus it). The potential is built once per frame and the scan
  runs in chunks of rows, each chunk's patterns rebinned (count preserving) onto the detector
  sampling ``detector_sampling_mrad``: a large box gives a fine native angular sampling
  (lambda / box) that no detector has and that would not fit in memory. ``method="prism"``
  replaces the probe-by-probe multislice of a finite specimen by abTEM's PRISM
  (:mod:`octastem.stem.prism`), with the same pattern grid, sampling and calibration.

Patterns are stored (scan_y, scan_x, k_y, k_x) of odd size with the optical axis at the centre
pixel (n_ky // 2, n_kx // 2); the diffraction axes are parallel to the scan axes
(scan_rotation_deg = 0).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from ase import Atoms

from octastem.io import InputError, Stem4D, provenance
from octastem.potential import common_frames, grid_gpts
from octastem.rng import generator


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


def antialias_sampling_A(energy_eV: float, max_angle_mrad: float) -> float:
    """Coarsest potential sampling (A) whose anti-aliasing limit reaches ``max_angle_mrad``.

    abTEM's anti-aliasing aperture keeps 2/3 of the Nyquist frequency 1 / (2 sampling), so the
    largest angle free of aliasing is lambda * (2/3) / (2 sampling); the CPU cost of a finite
    specimen scales with the number of grid points of its whole box, so no finer grid is used.
    """
    from abtem.core.energy import energy2wavelength

    if not (np.isfinite(max_angle_mrad) and max_angle_mrad > 0):
        raise InputError(f"stem: max_angle_mrad must be a positive number, got {max_angle_mrad}")
    return 0.999 * energy2wavelength(energy_eV) * (2.0 / 3.0) / (2.0 * max_angle_mrad * 1e-3)


def _fft_size(n: int) -> int:
    """Smallest n' >= n with no prime factor above 7 (FFTW is slow on large prime factors)."""
    m = max(1, int(n))
    while True:
        k = m
        for p in (2, 3, 5, 7):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


def _rebin_axis(n_in: int, dk_in: float, dk_out: float) -> np.ndarray:
    """Count-preserving (area weight) rebinning matrix (n_out, n_in) between centred, odd-sized axes.

    Input pixel j lies at (j - n_in // 2) * dk_in, output pixel o at (o - n_out // 2) * dk_out; the
    output reaches no further than the input, so every output pixel is fully covered.
    """
    reach = (n_in // 2) * dk_in + dk_in / 2
    half = int(np.floor((reach - dk_out / 2) / dk_out + 1e-9))
    centres_out = np.arange(-half, half + 1) * dk_out
    centres_in = (np.arange(n_in) - n_in // 2) * dk_in
    lo = np.maximum(centres_out[:, None] - dk_out / 2, centres_in[None, :] - dk_in / 2)
    hi = np.minimum(centres_out[:, None] + dk_out / 2, centres_in[None, :] + dk_in / 2)
    return np.clip(hi - lo, 0.0, None) / dk_in


def _finite_frames(frames: Atoms | Sequence[Atoms]) -> tuple[list[Atoms], np.ndarray]:
    """Frames of a finite specimen in their common orthorhombic box, trimmed along the beam.

    Returns (frames, box lengths (3,) A): every frame shifted along z so that the first atom of
    all frames lies at z = 0, the box ending half an angstrom after the last atom.
    """
    if isinstance(frames, Atoms):
        frames = [frames]
    frames = list(frames)
    if not frames or any(not isinstance(f, Atoms) or len(f) == 0 for f in frames):
        raise InputError("stem: a finite specimen needs at least one non-empty ase.Atoms frame")
    cell = np.asarray(frames[0].cell[:], dtype=float)
    lengths = np.diag(cell).copy()
    for k, f in enumerate(frames):
        c = np.asarray(f.cell[:], dtype=float)
        if not np.allclose(c, np.diag(lengths), atol=1e-6) or np.any(lengths <= 0):
            raise InputError(
                f"stem: finite specimen frame {k} has cell {np.round(c, 3).tolist()}; all frames must share one "
                f"orthorhombic box (frame 0: {np.round(lengths, 3).tolist()})"
            )
        xy = f.positions[:, :2]
        if np.any(xy < 0) or np.any(xy >= lengths[:2]):
            raise InputError(f"stem: finite specimen frame {k} has atoms outside its box in x or y")
    z_lo = min(float(f.positions[:, 2].min()) for f in frames)
    z_hi = max(float(f.positions[:, 2].max()) for f in frames)
    lengths[2] = z_hi - z_lo + 0.5
    out = []
    for f in frames:
        a = f.copy()
        a.calc = None
        a.positions[:, 2] -= z_lo
        a.set_cell(lengths, scale_atoms=False)
        a.pbc = True  # abTEM's FFTs are periodic anyway; the vacuum keeps the specimen apart
        out.append(a)
    return out, lengths


@dataclass
class _Scan:
    """Frames of a specimen and its scan: ``lengths`` (Lx, Ly, Lz) A of the cell or box, the
    potential grid ``gpts``, and along (x, y) the scan start and period (A), the periods scanned,
    the positions per period and in all, and the step (A)."""

    frames: list[Atoms]
    lengths: np.ndarray
    gpts: tuple[int, int]
    start: tuple[float, float]
    period: tuple[float, float]
    periods: tuple[float, float]
    per_period: tuple[int, int] = (1, 1)
    n_scan: tuple[int, int] = (1, 1)
    steps: tuple[float, float] = (0.0, 0.0)


#: Order of the first attributes of a simulated dataset's file (an HDF5 file's bytes depend on the
#: order); the other ``extra`` entries follow in the order they are made.
_ATTR_ORDER = (
    "specimen",
    "cell_A",
    "scan_shape",
    "scan_step_x_A",
    "scan_step_y_A",
    "scan_start_x_A",
    "scan_start_y_A",
    "scan_periods",
    "cell_positions",
    "k_sampling_x_mrad",
    "k_sampling_y_mrad",
)


def simulate_4dstem(
    frames: Atoms | Sequence[Atoms],
    *,
    energy_eV: float,
    semiangle_mrad: float,
    scan_step_A: float,
    sampling_A: float | None,
    slice_thickness_A: float,
    max_angle_mrad: float | None = None,
    defocus_A: float = 0.0,
    dose_e_per_A2: float | None = None,
    seed: int = 0,
    source: str = "simulated",
    provenance_extra: dict | None = None,
    parametrization: str = "lobato",
    num_workers: int | None = None,
    progress: bool = False,
    specimen: str = "periodic",
    scan_start_A: Sequence[float] | None = None,
    scan_period_A: Sequence[float] | None = None,
    scan_periods: Sequence[float] | float = 1.0,
    detector_sampling_mrad: float | None = None,
    chunk_mb: float = 128.0,
    method: str | None = None,
    prism_interpolation: int | None = None,
    prism_margin_A: float | None = None,
) -> Stem4D:
    """Multislice 4D-STEM of ``frames`` (frozen phonons) of a periodic cell or a finite specimen.

    Units: energy eV, semi-angle and max angle mrad, steps/sampling/thickness/defocus A (abTEM
    sign convention for defocus: defocus = -C10), dose e/A^2. The optics (energy to slice
    thickness) have no defaults here: the pipeline's are the ``stem`` settings of the config
    schema. ``max_angle_mrad`` (None: 2 x semi-angle) crops the patterns; it must lie below the
    anti-aliasing limit of the potential grid (2/3 of lambda / (2 sampling)); ``sampling_A=None``
    takes the coarsest sampling that reaches it (:func:`antialias_sampling_A`). Noise-free data
    (``dose_e_per_A2=None``) holds the fraction of the incident beam per pixel, so each pattern
    sums to the fraction reaching the detector (~1), and carries ``dose_e_per_A2 = inf``; with a
    dose it holds Poisson counts (float32) drawn with ``generator(seed, "stem_noise")``.
    ``num_workers`` threads run the dask graph (default: all CPUs visible to the process).

    ``specimen``: "periodic" (the whole in-plane cell of the frames, mapped onto their common
    orthorhombic cell, is scanned) or "finite" (frames in one orthorhombic box with vacuum; the
    scan covers ``scan_periods`` (nx, ny) periods of ``scan_period_A`` (x, y) from
    ``scan_start_A`` (x, y), all three required). ``detector_sampling_mrad`` (finite specimens
    only) rebins the patterns onto this angular sampling (count preserving) when it is coarser
    than the native lambda / box; ``chunk_mb`` bounds the native patterns held at once.

    ``method`` (finite specimens): "multislice" (one probe per position, the reference) or
    "prism" (:mod:`octastem.stem.prism`: abTEM's S-matrix with interpolation factor
    ``prism_interpolation`` f, the probe cropped to a window of box / f; None: the largest f
    whose window holds the probe's spread through the specimen, 2 x thickness x semi-angle, plus
    ``prism_margin_A``; the same patterns within the window's accuracy at a cost set by the
    number of plane waves instead of positions). Unset, these take the ``stem`` defaults of the
    config schema. A periodic cell is always simulated by multislice.

    The dataset carries ``cell_A`` (Lx, Ly, Lz of the simulated cell or box), ``scan_shape``
    (ny, nx), the steps ``scan_step_x_A`` / ``scan_step_y_A`` and the detector sampling
    ``k_sampling_x_mrad`` / ``k_sampling_y_mrad``; the scalar scan_step_A and k_sampling_mrad are
    the means of the x and y values (equal for a square cell). ``extra`` records: specimen,
    scan_start_x_A, scan_start_y_A, scan_periods (ny, nx), cell_positions (positions per period,
    (ny, nx)), max_angle_mrad, n_frames, sampling_A, slice_thickness_A, defocus_A,
    parametrization, seed, electrons_per_position (0 if noise free) and intensity_unit
    ("fraction_of_beam" or "counts").
    """
    from octastem.io import import_abtem

    abtem = import_abtem()
    from abtem.core.energy import energy2wavelength

    if specimen not in ("periodic", "finite"):
        raise InputError(f"stem: specimen must be 'periodic' or 'finite', got {specimen!r}")
    method, prism = _method(method, {"interpolation": prism_interpolation, "margin_A": prism_margin_A}, specimen)
    if sampling_A is None:
        sampling_A = antialias_sampling_A(energy_eV, 2.0 * semiangle_mrad if max_angle_mrad is None else max_angle_mrad)
    _check_optics(energy_eV, semiangle_mrad, scan_step_A, sampling_A, slice_thickness_A)
    if specimen == "periodic":
        scan = _periodic_scan(frames, sampling_A, scan_start_A, scan_period_A, detector_sampling_mrad)
    else:
        scan = _finite_scan(frames, sampling_A, scan_start_A, scan_period_A, scan_periods)
    wavelength_A = energy2wavelength(energy_eV)
    max_angle_mrad, sim_sampling = _max_angle(scan, wavelength_A, semiangle_mrad, max_angle_mrad, sampling_A)
    _scan_grid(scan, scan_step_A)

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
        "n_frames": len(scan.frames),
        "parametrization": parametrization,
        "specimen": specimen,
    }
    if specimen == "finite":
        settings["detector_sampling_mrad"] = detector_sampling_mrad
    angles = {"wavelength_A": wavelength_A, "max_angle_mrad": max_angle_mrad, "sampling": detector_sampling_mrad}
    workers = _workers(num_workers)
    if method == "prism":
        patterns, k_sampling = _scan_prism(abtem, scan, settings, prism, angles, chunk_mb, workers, progress)
    else:
        probe = abtem.Probe(energy=energy_eV, semiangle_cutoff=semiangle_mrad, defocus=defocus_A)
        detector = abtem.PixelatedDetector(max_angle=max_angle_mrad)
        potential = {"slice_thickness_A": slice_thickness_A, "parametrization": parametrization}
        if specimen == "periodic":
            patterns, k_sampling = _scan_periodic(abtem, scan, probe, detector, potential, workers, progress)
        else:
            patterns, k_sampling = _scan_finite(
                abtem, scan, probe, detector, potential, angles, chunk_mb, workers, progress
            )
    return _dataset(scan, patterns, k_sampling, settings, float(np.mean(sim_sampling)), source, provenance_extra)


def _scan_prism(
    abtem, scan: _Scan, settings: dict, prism: dict, angles: dict, chunk_mb: float, num_workers: int, progress: bool
) -> tuple[np.ndarray, tuple[float, float]]:
    """PRISM patterns of a finite specimen (:mod:`octastem.stem.prism`); records its settings in ``settings``.

    ``prism``: interpolation (None or an integer) and margin_A. Only this path records ``method``,
    so the provenance of the default multislice path stays as it was.
    """
    from octastem.stem.prism import interpolation_factors, scan_finite_prism

    factors = interpolation_factors(scan.lengths, semiangle_mrad=settings["semiangle_mrad"], **prism)
    settings.update(method="prism", prism_interpolation=list(factors))
    settings["prism_window_A"] = [float(length / f) for length, f in zip(scan.lengths[:2], factors)]
    optics = {key: settings[key] for key in ("energy_eV", "semiangle_mrad", "defocus_A")}
    potential = {key: settings[key] for key in ("slice_thickness_A", "parametrization")}
    return scan_finite_prism(abtem, scan, optics, potential, angles, factors, chunk_mb, num_workers, progress)


def _dataset(
    scan: _Scan,
    patterns: np.ndarray,
    k_sampling: tuple[float, float],
    settings: dict,
    grid_sampling_A: float,
    source: str,
    provenance_extra: dict | None,
) -> Stem4D:
    """The simulated dataset: noise-free fractions of the beam, or Poisson counts at ``settings`` dose and seed.

    ``settings``: the simulation settings (see :func:`simulate_4dstem`), recorded with
    ``provenance_extra`` in the provenance; ``grid_sampling_A``: mean sampling of the potential grid.
    """
    steps = scan.steps
    dose_e_per_A2 = settings["dose_e_per_A2"]
    if dose_e_per_A2 is None:
        data = patterns.astype(np.float32)
        dose, n_e, unit = math.inf, 0.0, "fraction_of_beam"
    else:
        data = add_poisson_noise(patterns, dose_e_per_A2, steps, generator(settings["seed"], "stem_noise"))
        dose, n_e, unit = dose_e_per_A2, electrons_per_position(dose_e_per_A2, steps), "counts"
    extra = {
        "specimen": settings["specimen"],
        "scan_start_x_A": float(scan.start[0]),
        "scan_start_y_A": float(scan.start[1]),
        "scan_periods": [float(scan.periods[1]), float(scan.periods[0])],
        "cell_positions": [int(scan.per_period[1]), int(scan.per_period[0])],
        "max_angle_mrad": settings["max_angle_mrad"],
        "n_frames": len(scan.frames),
        "sampling_A": grid_sampling_A,
        "slice_thickness_A": settings["slice_thickness_A"],
        "defocus_A": settings["defocus_A"],
        "parametrization": settings["parametrization"],
        "seed": settings["seed"],
        "electrons_per_position": float(n_e),
        "intensity_unit": unit,
    }
    return Stem4D(
        data=data,
        energy_eV=settings["energy_eV"],
        semiangle_mrad=settings["semiangle_mrad"],
        scan_step_A=float(np.mean(steps)),
        k_sampling_mrad=float(np.mean(k_sampling)),
        dose_e_per_A2=dose,
        scan_rotation_deg=0.0,
        source=source,
        provenance=provenance(**{**settings, **(provenance_extra or {})}),
        extra=extra,
        scan_step_x_A=float(steps[0]),
        scan_step_y_A=float(steps[1]),
        k_sampling_x_mrad=k_sampling[0],
        k_sampling_y_mrad=k_sampling[1],
        scan_shape=[int(scan.n_scan[1]), int(scan.n_scan[0])],
        cell_A=[float(v) for v in scan.lengths],
        attr_order=_ATTR_ORDER,
    )


# ----------------------------------------------------------------------------------------------
# Settings and scan geometry
# ----------------------------------------------------------------------------------------------


def _check_optics(
    energy_eV: float, semiangle_mrad: float, scan_step_A: float, sampling_A: float, slice_thickness_A: float
) -> None:
    for key, value in (
        ("energy_eV", energy_eV),
        ("semiangle_mrad", semiangle_mrad),
        ("scan_step_A", scan_step_A),
        ("sampling_A", sampling_A),
        ("slice_thickness_A", slice_thickness_A),
    ):
        if not (np.isfinite(value) and value > 0):
            raise InputError(f"stem: {key} must be a positive number, got {value}")


def _method(method: str | None, prism: dict, specimen: str) -> tuple[str, dict]:
    """The scan method and the PRISM settings (interpolation, margin_A), schema defaults where unset."""
    from octastem.config import schema_defaults

    defaults = schema_defaults("stem")
    method = defaults["method"] if method is None else method
    prism = {key: defaults[f"prism_{key}"] if value is None else value for key, value in prism.items()}
    if method not in ("multislice", "prism"):
        raise InputError(f"stem: method must be 'multislice' or 'prism', got {method!r}")
    if method == "prism" and specimen != "finite":
        raise InputError("stem: method 'prism' applies to a finite specimen; a periodic cell uses 'multislice'")
    return method, prism


def _periodic_scan(frames, sampling_A: float, scan_start_A, scan_period_A, detector_sampling_mrad) -> _Scan:
    """The whole in-plane periodic cell, scanned from its origin."""
    if scan_start_A is not None or scan_period_A is not None or detector_sampling_mrad is not None:
        raise InputError("stem: scan_start_A, scan_period_A and detector_sampling_mrad apply to finite specimens")
    frames, lengths = common_frames(frames)
    gpts = grid_gpts(lengths[:2], sampling_A)
    return _Scan(frames, lengths, gpts, (0.0, 0.0), (float(lengths[0]), float(lengths[1])), (1, 1))


def _finite_scan(frames, sampling_A: float, scan_start_A, scan_period_A, scan_periods) -> _Scan:
    """A finite specimen in its box, scanned over ``scan_periods`` periods from ``scan_start_A``."""
    if scan_start_A is None or scan_period_A is None:
        raise InputError("stem: a finite specimen needs scan_start_A and scan_period_A (the scan region)")
    frames, lengths = _finite_frames(frames)
    gpts = tuple(_fft_size(n) for n in grid_gpts(lengths[:2], sampling_A))
    start = tuple(float(v) for v in scan_start_A)
    period = tuple(float(v) for v in scan_period_A)
    periods = tuple(float(v) for v in np.broadcast_to(np.asarray(scan_periods, dtype=float), (2,)))
    if len(start) != 2 or len(period) != 2 or min(period) <= 0 or not 0 < min(periods) < math.inf:
        raise InputError(
            f"stem: scan region start {start}, period {period} A, periods {periods}: expected two positions, "
            "two positive lengths and two positive numbers"
        )
    end = [s + n * p for s, n, p in zip(start, periods, period)]  # within half a step of the last position
    if min(start) < 0 or end[0] > lengths[0] or end[1] > lengths[1]:
        raise InputError(f"stem: scan region {start} .. {end} A lies outside the box {lengths[:2].tolist()} A")
    return _Scan(frames, lengths, gpts, start, period, periods)


def _max_angle(
    scan: _Scan, wavelength_A: float, semiangle_mrad: float, max_angle_mrad: float | None, sampling_A: float
) -> tuple[float, np.ndarray]:
    """The detector's outer angle (mrad), checked against the grid's anti-aliasing limit, and the grid sampling (A)."""
    # abTEM's anti-aliasing aperture keeps 2/3 of the Nyquist frequency 1 / (2 sampling)
    sim_sampling = np.asarray(scan.lengths[:2]) / np.asarray(scan.gpts)
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
    return max_angle_mrad, sim_sampling


def _scan_grid(scan: _Scan, scan_step_A: float) -> None:
    """Positions per period (an integer number spans each period), steps and positions in all, (x, y)."""
    scan.per_period = tuple(max(1, round(p / scan_step_A)) for p in scan.period)
    scan.steps = (scan.period[0] / scan.per_period[0], scan.period[1] / scan.per_period[1])
    scan.n_scan = tuple(max(1, round(n * p)) for n, p in zip(scan.per_period, scan.periods))


# ----------------------------------------------------------------------------------------------
# Multislice scans
# ----------------------------------------------------------------------------------------------


def _scan_periodic(
    abtem, scan: _Scan, probe, detector, potential: dict, num_workers: int, progress: bool
) -> tuple[np.ndarray, tuple[float, float]]:
    """Frame-averaged (scan_y, scan_x, k_y, k_x) patterns over the whole periodic cell, and (k_x, k_y) mrad.

    ``potential``: slice_thickness_A and parametrization of the potential.
    """
    frames, lengths = scan.frames, scan.lengths
    cell_potential = abtem.Potential(
        frames if len(frames) > 1 else frames[0],
        gpts=scan.gpts,
        slice_thickness=potential["slice_thickness_A"],
        parametrization=potential["parametrization"],
        projection="infinite",
    )
    probe.grid.match(cell_potential)
    grid = abtem.GridScan(start=(0.0, 0.0), end=(lengths[0], lengths[1]), gpts=scan.n_scan, endpoint=False)
    measurement = probe.scan(cell_potential, scan=grid, detectors=detector)
    measurement = measurement.compute(scheduler="threads", num_workers=num_workers, progress_bar=progress)
    array = np.asarray(measurement.array, dtype=np.float64)
    if array.ndim != 4:  # the frozen-phonon axis is averaged by abTEM (ensemble mean)
        raise RuntimeError(f"stem: unexpected abTEM output shape {array.shape}")
    # abTEM (scan_x, scan_y, k_x, k_y) -> (scan_y, scan_x, k_y, k_x); abTEM normalises the probe
    # to unit total intensity, so a pattern sums to the fraction of the beam within max_angle
    patterns = _symmetric_crop(array.transpose(1, 0, 3, 2))
    return patterns, tuple(float(s) for s in measurement.angular_sampling)  # (kx, ky) in mrad


def _output_sampling(scan: _Scan, angles: dict) -> tuple[float, float]:
    """Detector sampling (k_x, k_y) mrad of a finite specimen's patterns: ``angles["sampling"]``, or the
    native lambda / box where that is finer (``angles``: wavelength_A and the detector ``sampling`` or None)."""
    native = [1e3 * angles["wavelength_A"] / float(scan.lengths[i]) for i in range(2)]
    detector_sampling_mrad = angles["sampling"]
    if detector_sampling_mrad is None:
        return native[0], native[1]
    if not (np.isfinite(detector_sampling_mrad) and detector_sampling_mrad > 0):
        raise InputError(f"stem: detector_sampling_mrad must be a positive number, got {detector_sampling_mrad}")
    return max(float(detector_sampling_mrad), native[0]), max(float(detector_sampling_mrad), native[1])


def _scan_finite(
    abtem, scan: _Scan, probe, detector, potential: dict, angles: dict, chunk_mb: float, num_workers: int, progress
) -> tuple[np.ndarray, tuple[float, float]]:
    """Frame-averaged (scan_y, scan_x, k_y, k_x) patterns of a finite specimen, scanned in row chunks.

    ``potential``: slice_thickness_A and parametrization of the potential; ``angles``:
    wavelength_A, max_angle_mrad and the detector ``sampling`` (mrad or None). Returns the
    patterns rebinned onto the detector sampling and that sampling (k_x, k_y) in mrad.
    """
    from tqdm.auto import tqdm

    frames, start, steps = scan.frames, scan.start, scan.steps
    max_angle_mrad = angles["max_angle_mrad"]
    native = [1e3 * angles["wavelength_A"] / float(scan.lengths[i]) for i in range(2)]  # (kx, ky) mrad per pixel
    k_out = _output_sampling(scan, angles)
    nx, ny = scan.n_scan
    n_k_native = [2 * int(max_angle_mrad / dk) + 2 for dk in native]
    rows = max(1, int(chunk_mb * 2**20 // (4 * nx * n_k_native[0] * n_k_native[1])))
    chunks = [(r0, min(ny, r0 + rows)) for r0 in range(0, ny, rows)]
    total = None
    k_sampling = None
    rebin = None
    bar = tqdm(total=len(frames) * len(chunks), desc="nanocrystal 4D-STEM", unit="chunk", disable=not progress)
    for frame in frames:
        frame_potential = abtem.Potential(
            frame,
            gpts=scan.gpts,
            slice_thickness=potential["slice_thickness_A"],
            parametrization=potential["parametrization"],
            projection="infinite",
        ).build(lazy=False)
        probe.grid.match(frame_potential)
        for r0, r1 in chunks:
            grid = abtem.GridScan(
                start=(start[0], start[1] + r0 * steps[1]),
                end=(start[0] + nx * steps[0], start[1] + r1 * steps[1]),
                gpts=(nx, r1 - r0),
                endpoint=False,
            )
            measurement = probe.scan(frame_potential, scan=grid, detectors=detector)
            measurement = measurement.compute(scheduler="threads", num_workers=num_workers, progress_bar=False)
            array = np.asarray(measurement.array, dtype=np.float64)
            if array.ndim != 4 or array.shape[:2] != (nx, r1 - r0):
                raise RuntimeError(f"stem: unexpected abTEM output shape {array.shape}")
            chunk = _symmetric_crop(array.transpose(1, 0, 3, 2))  # (rows, nx, k_y, k_x), centred, odd
            if rebin is None:
                dk = [float(s) for s in measurement.angular_sampling]  # (kx, ky)
                ry = _rebin_axis(chunk.shape[2], dk[1], k_out[1])
                rx = _rebin_axis(chunk.shape[3], dk[0], k_out[0])
                rebin = (ry, rx)
                k_sampling = (float(k_out[0]), float(k_out[1]))
                total = np.zeros((ny, nx, ry.shape[0], rx.shape[0]))
            total[r0:r1] += np.einsum("oi,...ij,pj->...op", rebin[0], chunk, rebin[1], optimize=True)
            bar.update(1)
    bar.close()
    return total / len(frames), k_sampling
