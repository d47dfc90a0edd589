"""Stage of the fit rules (``fit_stem``, ``fit_md``): elliptical Gaussian fits of an image file."""

from __future__ import annotations

import logging

log = logging.getLogger("octastem")


def fit(
    *,
    image_path,
    table,
    summary,
    types,
    window_A: float | None,
    se_method: str,
    seed: int,
) -> None:
    """Elliptical Gaussian fit of the columns of an image file -> CSV table + JSON summary."""
    from octastem.fit import fit_image_file

    fit_image_file(
        image_path,
        table,
        summary,
        n_cells=None,
        cell_A=None,
        types=tuple(types),
        window_A=window_A,
        se_method=se_method,
        seed=seed,
    )
