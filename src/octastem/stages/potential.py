"""Stage of the ``snapshot_potential`` rule: the averaged projected potential of MD snapshots."""

from __future__ import annotations

import logging

from octastem import io

log = logging.getLogger("octastem")


def snapshot_potential(
    *,
    trajectory,
    output,
    start_fs: float,
    every_fs: float,
    n_cells,
    sampling_A: float,
    slice_thickness_A: float | None,
    axis: str = "z",
    block_fs: float | None = None,
) -> None:
    """Averaged abTEM projected potential along ``axis`` of the snapshots of the analysis window,
    with the means of consecutive time blocks of about ``block_fs`` (None: one block) beside it.

    ``n_cells``: the supercell (nx, ny, nz); the image covers the two cells across ``axis``."""
    from octastem.md import read_frames
    from octastem.potential import AXES, projected_potential

    frames = read_frames(trajectory, start_fs=start_fs, every_fs=every_fs)
    n_blocks = 1 if not block_fs else int(min(len(frames), max(1, round(len(frames) * every_fs / block_fs))))
    log.info(
        "%s: %d snapshots from %.1f fs every %.1f fs, projected along %s in %d time blocks",
        trajectory,
        len(frames),
        start_fs,
        every_fs,
        axis,
        n_blocks,
    )
    image, sampling, cell_xy, blocks = projected_potential(
        frames, sampling_A=sampling_A, slice_thickness_A=slice_thickness_A, axis=axis, n_blocks=n_blocks
    )
    reps = list(n_cells) + [1] * (3 - len(n_cells))
    in_plane = [int(reps[i]) for i in AXES[axis][:2]]
    io.write_image(
        output,
        image,
        sampling,
        kind="projected_potential",
        blocks=blocks,
        n_cells=in_plane,
        cell_A=list(cell_xy),
        n_snapshots=len(frames),
        axis=axis,
        every_fs=float(every_fs),
        provenance=io.provenance(trajectory=str(trajectory), start_fs=start_fs, every_fs=every_fs, axis=axis),
    )
