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
) -> None:
    """Averaged abTEM projected potential of the snapshots of the analysis window."""
    from octastem.md import read_frames
    from octastem.potential import projected_potential

    frames = read_frames(trajectory, start_fs=start_fs, every_fs=every_fs)
    log.info("%s: %d snapshots from %.1f fs every %.1f fs", trajectory, len(frames), start_fs, every_fs)
    image, sampling, cell_xy = projected_potential(frames, sampling_A=sampling_A, slice_thickness_A=slice_thickness_A)
    io.write_image(
        output,
        image,
        sampling,
        kind="projected_potential",
        n_cells=list(n_cells),
        cell_A=list(cell_xy),
        n_snapshots=len(frames),
        provenance=io.provenance(trajectory=str(trajectory), start_fs=start_fs, every_fs=every_fs),
    )
