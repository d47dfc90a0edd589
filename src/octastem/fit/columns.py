"""``fit_columns``: locate the lattice, run one fitting engine, finish the per-column table.

The engines (:data:`ENGINES`, name -> function) share one signature,
``engine(img, lattice, grid, types, *, window_A, max_pixels, elliptical_neighbours, seed,
progress)`` (each takes the keywords it uses), and return the rows of the columns of ``types`` and
the radius of their fit windows. The finish step wraps the positions into the supercell, adds the
angle to the Pb-Br-Pb bond, orders the table and checks the success rate.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from octastem.config import schema_defaults
from octastem.fit.fast import fit_fast_lattice
from octastem.fit.joint import fit_joint_lattice
from octastem.fit.lattice import TYPES, Lattice, _check_geometry, locate_lattice
from octastem.fit.model import WINDOW_MAX_PIXELS
from octastem.fit.rows import RESULT_COLUMNS
from octastem.fit.window import fit_windows
from octastem.io import InputError

#: Fitting engines of :func:`fit_columns` (its ``method``).
ENGINES = {
    "window": fit_windows,
    "joint": fit_joint_lattice,
    "fast": fit_fast_lattice,
}

#: Direction of the Pb-Br-Pb bond through each Br site (degrees from +x).
_BOND_ANGLE_DEG = {"Br_x": 0.0, "Br_y": 90.0}


def _types(types) -> tuple[str, ...]:
    """Column types to fit as a tuple (None: the schema default ``fit.types``)."""
    if types is None:
        types = schema_defaults("fit", "types")
    types = (types,) if isinstance(types, str) else tuple(types)
    bad = [t for t in types if t not in TYPES]
    if bad or not types:
        raise InputError(f"types: expected a non-empty subset of {TYPES}, got {types!r}")
    return types


def fit_columns(
    image,
    sampling_A,
    n_cells,
    cell_A,
    types=None,
    window_A=None,
    seed=0,
    progress=False,
    origin_A=None,
    max_pixels=WINDOW_MAX_PIXELS,
    neighbours="elliptical",
    method="window",
) -> pd.DataFrame:
    """Fit elliptical Gaussians to the columns of the given ``types`` (any of "PbBr", "Br", "FA").

    ``image`` (y, x) with ``sampling_A`` A/px spans the supercell ``cell_A = (Lx, Ly)`` A made of
    ``n_cells = (nx, ny)`` cubic cells. ``types``: default the schema's ``fit.types``.
    ``window_A``: diameter of the circular fit window around each column (default 1.2 lattice
    constants, so the four nearest neighbours are fitted with it). ``origin_A``: rigid lattice
    offset; refined from the data when None. ``max_pixels``: the window is subsampled on a regular
    stride when it would hold more pixels (None: never). ``seed`` seeds the perturbed restarts of
    fits that fail to converge. ``neighbours``: "elliptical" (default) or "round" Gaussians for
    the free neighbouring columns.

    ``method`` (the engine, :data:`ENGINES`):

    ``"window"`` (default)
        one lmfit fit per column in its window, neighbours inside the window free (reference path);
    ``"joint"``
        one lmfit fit of all columns of the image and a constant background at once (small images:
        the cost grows with the square of the number of columns);
    ``"fast"``
        all columns (every type) fitted by batched Levenberg-Marquardt on small windows
        (diameter ``window_A``, default 0.6 lattice constants; at most 1500 pixels each), in
        StatSTEM-style sweeps over the four sites with all other columns subtracted, alternating
        with a global linear re-solve of heights and background; ``neighbours`` and ``seed`` do
        not apply. Thousands of columns per second.

    Returns one row per fitted column (see ``RESULT_COLUMNS``; lengths in A, angles in degrees,
    the major-axis angle from +x in (-90, 90]); ``df.attrs`` holds origin_A, lattice, the height of
    each site in the lattice search (``site_heights``, :data:`~octastem.fit.lattice.SITES` order)
    and timing.
    Raises :class:`~octastem.io.InputError` for a non-finite image, an image that does not span
    the lattice, a PbBr column more than a quarter cell from the cell origin, or columns that are
    not found. The columns may come in any contrast order (see :func:`~octastem.fit.locate_lattice`).
    """
    t0 = time.perf_counter()
    img, s, *_ = _check_geometry(image, sampling_A, n_cells, cell_A)
    types = _types(types)
    if neighbours not in ("elliptical", "round"):
        raise InputError(f"neighbours: expected 'elliptical' or 'round', got {neighbours!r}")

    lattice = locate_lattice(img, s, n_cells, cell_A, origin_A)
    grid = lattice.grid()
    if method not in ENGINES:
        raise InputError(f"method: expected 'window', 'joint' or 'fast', got {method!r}")
    rows, radius = ENGINES[method](
        img,
        lattice,
        grid,
        types,
        window_A=window_A,
        max_pixels=max_pixels,
        elliptical_neighbours=neighbours == "elliptical",
        seed=seed,
        progress=progress,
    )
    return _finish(rows, types, lattice, radius, method, t0)


def _finish(df, types, lattice: Lattice, radius, method, t0) -> pd.DataFrame:
    """Wrap positions, add the angle to the Pb-Br-Pb bond, order the columns, check the success
    rate and record the lattice, window and timing in ``df.attrs``."""
    fit_seconds = time.perf_counter() - t0
    lx, ly = lattice.cell_A
    for col in RESULT_COLUMNS:
        if col not in df:
            df[col] = pd.Series(dtype=float)
    df["x"] = df["x"] % lx
    df["y"] = df["y"] % ly
    bond = df["site"].map(_BOND_ANGLE_DEG).astype(float)
    d = np.abs((df["angle_deg"] - bond + 90.0) % 180.0 - 90.0)
    df["angle_to_bond_deg"] = d
    df = df[RESULT_COLUMNS].copy()
    df["success"] = df["success"].astype(bool)

    n_ok = int(df["success"].sum())
    if n_ok < max(1, 0.5 * len(df)):
        flags = df["flag"].value_counts().to_dict()
        raise InputError(
            f"image: columns not found: only {n_ok} of {len(df)} {'/'.join(types)} column fits "
            f"succeeded (flags {flags}); check the lattice (n_cells, cell_A) and the image contrast"
        )
    df.attrs.update(
        origin_A=lattice.origin_A,
        lattice_A=lattice.lattice_A,
        n_cells=lattice.n_cells,
        cell_A=lattice.cell_A,
        sampling_A=lattice.sampling_A,
        window_A=2 * radius,
        noise_sigma=lattice.noise_sigma,
        site_heights=lattice.site_heights,
        method=method,
        fit_seconds=fit_seconds,
    )
    return df
