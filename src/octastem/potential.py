"""Projected electrostatic potential of MD snapshots along a cell axis, with abTEM.

The "snapshot potential" of the study: the projected potential of one MD snapshot every 50 fs,
averaged over the snapshots. Frames of an NPT run have slightly fluctuating, nearly orthorhombic
cells; every frame is mapped onto one common orthorhombic cell (same scaled positions) so all
images share one grid.

The MD cell is cubic on average, so the projections along x, y and z ([100], [010], [001]) are
three views of the same network; ``axis`` picks one by a cyclic permutation of the coordinates
(beam along x: image axes (y, z); along y: (z, x); along z: (x, y)), which keeps the frame
right-handed and maps the perovskite's columns onto the same sites of the structure model.
The frames can be averaged in consecutive time blocks as well (:func:`projected_potential`'s
``n_blocks``): the block images are what a block bootstrap over time resamples.

Image convention (whole project): images are numpy arrays (y, x); pixel (iy, ix) is the
real-space position (x = ix * sampling, y = iy * sampling) in the periodic cell, starting at 0,
endpoint excluded, and the image spans exactly the in-plane cell (Lx, Ly). abTEM arrays are
(x, y) and are transposed here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from ase import Atoms

from octastem.io import InputError

#: Largest tolerated off-diagonal cell element, as a fraction of the cell length: beyond this
#: a frame is not "nearly orthorhombic" and mapping it onto an orthorhombic cell would shear it.
MAX_SHEAR_FRACTION = 0.05


def _as_frames(frames: Atoms | Sequence[Atoms], name: str = "frames") -> list[Atoms]:
    if isinstance(frames, Atoms):
        frames = [frames]
    frames = list(frames)
    if not frames:
        raise InputError(f"{name}: no frames given (expected at least one ase.Atoms)")
    for i, f in enumerate(frames):
        if not isinstance(f, Atoms):
            raise InputError(f"{name}: frame {i} is a {type(f).__name__}, expected ase.Atoms")
        if len(f) == 0:
            raise InputError(f"{name}: frame {i} has no atoms")
        lengths = f.cell.lengths()
        if np.any(lengths <= 0):
            raise InputError(f"{name}: frame {i} has a degenerate cell {f.cell.tolist()} (need three cell vectors)")
    return frames


def common_cell(frames: Atoms | Sequence[Atoms]) -> np.ndarray:
    """Mean (3, 3) cell (A) of ``frames``."""
    frames = _as_frames(frames)
    return np.mean([np.asarray(f.cell[:], dtype=float) for f in frames], axis=0)


def check_nearly_orthorhombic(cell, what: str) -> np.ndarray:
    """Raise InputError (naming ``what``) for a degenerate (3, 3) cell or one with off-diagonal
    elements above :data:`MAX_SHEAR_FRACTION` of its lengths; return the cell vector lengths."""
    cell = np.asarray(cell, dtype=float)
    lengths = np.linalg.norm(cell, axis=1)
    if np.any(lengths <= 0) or abs(np.linalg.det(cell)) < 1e-6:
        raise InputError(f"{what} {cell.tolist()} is degenerate")
    off = np.abs(cell - np.diag(np.diag(cell)))
    if np.any(off.max(axis=1) > MAX_SHEAR_FRACTION * lengths):
        raise InputError(
            f"{what} {np.round(cell, 3).tolist()} is not nearly orthorhombic (off-diagonal elements above "
            f"{MAX_SHEAR_FRACTION:.0%} of the lengths); orient [001] along z first"
        )
    return lengths


def to_common_cell(atoms: Atoms, cell: np.ndarray) -> Atoms:
    """Copy of ``atoms`` with the same (wrapped) scaled positions in the orthorhombic cell diag(|cell_i|).

    ``cell`` is a (3, 3) cell (typically :func:`common_cell`) or three lengths (A). Raises
    InputError if ``atoms`` is far from orthorhombic (off-diagonal above 5 % of the lengths).
    """
    cell = np.asarray(cell, dtype=float)
    lengths = np.linalg.norm(cell, axis=1) if cell.shape == (3, 3) else cell.reshape(3)
    check_nearly_orthorhombic(atoms.cell[:], "structure: cell")
    scaled = atoms.get_scaled_positions(wrap=False) % 1.0
    out = atoms.copy()
    out.calc = None
    out.set_cell(np.diag(lengths), scale_atoms=False)
    out.set_scaled_positions(scaled)
    out.pbc = True
    return out


def grid_gpts(cell_xy_A: Sequence[float], sampling_A: float) -> tuple[int, int]:
    """Grid points (nx, ny) with spacing at most ``sampling_A`` that span the cell exactly."""
    if not sampling_A > 0:
        raise InputError(f"potential: sampling_A must be positive, got {sampling_A}")
    # the small tolerance keeps 6.0 / 0.05 at 120 points despite rounding in the division
    return tuple(max(1, math.ceil(length / sampling_A - 1e-6)) for length in cell_xy_A)


def common_frames(frames: Atoms | Sequence[Atoms], name: str = "frames") -> tuple[list[Atoms], np.ndarray]:
    """All frames mapped onto their common orthorhombic cell; returns (frames, cell lengths (3,) A)."""
    frames = _as_frames(frames, name)
    cell = common_cell(frames)
    lengths = np.linalg.norm(cell, axis=1)
    return [to_common_cell(f, cell) for f in frames], lengths


#: Beam axes and the cyclic permutation of (x, y, z) that puts each along z.
AXES = {"x": (1, 2, 0), "y": (2, 0, 1), "z": (0, 1, 2)}


def along_axis(atoms: Atoms, axis: str) -> Atoms:
    """Copy of orthorhombic ``atoms`` with the beam ``axis`` ("x", "y" or "z") turned onto z by a
    cyclic permutation of the coordinates and cell lengths (right-handed; "z" returns a copy)."""
    if axis not in AXES:
        raise InputError(f"potential: axis must be one of {sorted(AXES)}, got {axis!r}")
    order = list(AXES[axis])
    out = atoms.copy()
    out.calc = None
    lengths = np.linalg.norm(np.asarray(atoms.cell[:], dtype=float), axis=1)
    out.set_cell(np.diag(lengths[order]), scale_atoms=False)
    out.set_positions(atoms.get_positions()[:, order])
    out.pbc = True
    return out


def block_slices(n_frames: int, n_blocks: int) -> list[slice]:
    """``n_blocks`` consecutive, nearly equal blocks of ``n_frames`` frames (the first ones one
    longer when it does not divide); InputError unless 1 <= n_blocks <= n_frames."""
    if not 1 <= int(n_blocks) <= int(n_frames):
        raise InputError(f"potential: {n_blocks} time blocks asked for {n_frames} frames (need 1 to {n_frames})")
    edges = np.cumsum([0] + [len(b) for b in np.array_split(np.arange(n_frames), int(n_blocks))])
    return [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def projected_potential(
    frames: Atoms | Sequence[Atoms],
    sampling_A: float = 0.05,
    slice_thickness_A: float | None = None,
    parametrization: str = "lobato",
    progress: bool | None = None,
    axis: str = "z",
    n_blocks: int | None = None,
):
    """Frame-averaged projected potential along ``axis`` (eV*A, abTEM units) of ``frames``.

    Returns ``(image, sampling_A_actual, (Lx, Ly))``: ``image`` float32 (y, x) spanning the
    common in-plane cell exactly (for ``axis`` "x" the image axes are (y, z), for "y" (z, x), see
    :func:`along_axis`); ``sampling_A_actual`` (A/pixel) is the mean of the two in-plane
    spacings (equal for a square cell; each at most ``sampling_A``). With ``n_blocks`` a fourth
    item follows: the (n_blocks, ny, nx) float32 means of consecutive time blocks of the frames
    (:func:`block_slices`) and their frame counts, ``(blocks, counts)``; the image is their
    count-weighted mean.

    ``slice_thickness_A=None`` puts the whole cell into one slice: with abTEM's infinite
    projection integrals the projection is the sum of the atoms' projected potentials whatever
    the slicing, so one slice gives the same image as thin slices, about 30x faster.
    ``progress`` shows a tqdm bar over frames (default: when there are more than 10 frames).
    """
    from octastem.io import import_abtem

    abtem = import_abtem()
    from tqdm.auto import tqdm

    frames, lengths = common_frames(frames)
    frames = [along_axis(f, axis) for f in frames]
    lengths = lengths[list(AXES[axis])]
    gpts = grid_gpts(lengths[:2], sampling_A)
    thickness = float(lengths[2]) if slice_thickness_A is None else float(slice_thickness_A)
    if not thickness > 0:
        raise InputError(f"potential: slice_thickness_A must be positive, got {slice_thickness_A}")
    if progress is None:
        progress = len(frames) > 10

    blocks = block_slices(len(frames), 1 if n_blocks is None else n_blocks)
    sums = np.zeros((len(blocks), *gpts), dtype=np.float64)
    bar = tqdm(total=len(frames), desc=f"projected potential along {axis}", unit="frame", disable=not progress)
    for b, block in enumerate(blocks):
        for atoms in frames[block]:
            pot = abtem.Potential(
                atoms,
                gpts=gpts,
                slice_thickness=thickness,
                parametrization=parametrization,
                projection="infinite",
            )
            image = pot.project().compute(scheduler="synchronous", progress_bar=False)
            sums[b] += np.asarray(image.array, dtype=np.float64)
            bar.update(1)
    bar.close()
    counts = np.array([blk.stop - blk.start for blk in blocks])
    mean = (sums.sum(axis=0) / len(frames)).T  # abTEM (x, y) -> (y, x)
    sampling = 0.5 * (lengths[0] / gpts[0] + lengths[1] / gpts[1])
    out = (mean.astype(np.float32), float(sampling), (float(lengths[0]), float(lengths[1])))
    if n_blocks is None:
        return out
    block_means = (sums / counts[:, None, None]).transpose(0, 2, 1).astype(np.float32)
    return (*out, (block_means, counts))
