"""The fit of an image file: image in, per-column table (CSV), summary (JSON) and figure out.

All outputs are written atomically. The summary holds, per column type, the measured median
ellipticity with its standard errors beside the round-column baseline (the noise bias, see
:func:`octastem.fit.round_baseline`), the lattice found (with the height of each site in the
lattice search: the contrast order of the columns) and the provenance of the run.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from threadpoolctl import threadpool_limits

from octastem.config import schema_defaults
from octastem.fit.columns import fit_columns
from octastem.fit.lattice import SITES
from octastem.fit.model import WINDOW_MAX_PIXELS
from octastem.fit.plot import plot_model
from octastem.fit.summary import summarize
from octastem.fit.synthetic import noise_bias, round_baseline
from octastem.io import InputError, atomic_path, provenance, read_image, write_json
from octastem.rng import STREAMS

log = logging.getLogger("octastem")


def _lattice_of(image_path, attrs, n_cells, cell_A):
    """``n_cells`` and ``cell_A`` as given, else from the image attributes of the same names."""
    if n_cells is None:
        n_cells = attrs.get("n_cells")
    if cell_A is None:
        cell_A = attrs.get("cell_A")
    if n_cells is None or cell_A is None:
        raise InputError(
            f"{image_path}: lattice unknown: pass n_cells and cell_A or store them as attributes "
            f"'n_cells' and 'cell_A' of dataset 'image'"
        )
    return n_cells, cell_A


def _baseline(image_path, image, attrs, df, n_cells, cell_A, **settings):
    """The round-column baseline (:func:`round_baseline`) and, when it cannot be measured, why.

    A secondary estimate: when the round columns cannot be fitted at this noise level the
    measured values stand without it (NaN baseline, reason in the summary)."""
    try:
        return round_baseline(image, attrs["sampling_A"], df, n_cells, cell_A, **settings), None
    except InputError as e:
        log.warning("%s: no round-column baseline: %s", image_path, e)
        return {}, str(e)


def _noise_bias(image_path, image, attrs, df, n_cells, cell_A, **settings):
    """The noise bias of the measured medians (:func:`noise_bias`) and, when it cannot be measured, why."""
    try:
        return noise_bias(image, attrs["sampling_A"], df, n_cells, cell_A, **settings), None
    except InputError as e:
        log.warning("%s: no noise-bias estimate: %s", image_path, e)
        return {}, str(e)


def _site_heights(heights) -> dict | None:
    """Height of each site of the structure model in the lattice search: the contrast order found."""
    if heights is None:
        return None
    return {site: float(h) for (site, *_), h in zip(SITES, heights, strict=True)}


def _summary(image_path, attrs, df, types, per_type, base, baseline_error) -> dict:
    """The JSON summary (less its provenance): image, lattice found, fit settings, per-type results
    and the baseline's noise model (or why there is none; None without a baseline)."""
    return {
        "source": str(image_path),
        "kind": attrs.get("kind"),
        "sampling_A": float(attrs["sampling_A"]),
        "n_cells": list(df.attrs["n_cells"]),
        "cell_A": list(df.attrs["cell_A"]),
        "lattice_A": list(df.attrs["lattice_A"]),
        "origin_A": list(df.attrs["origin_A"]),
        "site_heights": _site_heights(df.attrs.get("site_heights")),
        "window_A": df.attrs["window_A"],
        "noise_sigma": df.attrs["noise_sigma"],
        "types": list(types) if not isinstance(types, str) else [types],
        "fit_seconds": df.attrs["fit_seconds"],
        "method": df.attrs["method"],
        "summary": per_type,
        "baseline": None
        if base is None
        else {"error": baseline_error}
        if baseline_error
        else {k: base[k] for k in ("noise", "noise_sigma", "seed")},
    }


@threadpool_limits.wrap(limits=1, user_api="blas")
def fit_image_file(
    image_path,
    out_csv,
    out_json,
    n_cells=None,
    cell_A=None,
    types=None,
    window_A=None,
    se_method=None,
    n_boot=2000,
    seed=0,
    plot_path=None,
    progress=False,
    max_pixels=WINDOW_MAX_PIXELS,
    neighbours="elliptical",
    method="window",
    baseline=True,
    noise="gaussian",
    noise_bias_draws=0,
) -> dict:
    """Fit the image file ``image_path`` (see :func:`octastem.io.read_image`) and write the per-column
    table ``out_csv`` and the JSON summary ``out_json`` (and the figure ``plot_path`` if given),
    all atomically. ``n_cells``/``cell_A`` default to the image attributes of the same names;
    ``types`` and ``se_method`` to the schema's ``fit`` settings; ``method`` as in
    :func:`fit_columns`.

    With ``baseline`` the noise bias of the ellipticity is measured by :func:`round_baseline`
    (same structure with round columns, same noise level (``noise``), same fit settings, its
    random numbers from the ``fit_baseline`` stream of ``seed``) and written beside the measured
    value of each type as ``baseline_median_ellipticity`` and ``baseline_se`` (its noise model
    under the top-level key ``baseline``).

    With ``noise_bias_draws`` >= 2 the noise bias of each measured median is measured by
    :func:`noise_bias` (that many refits of the fitted structure plus the image's residual, shifted;
    random numbers from the ``fit_noise_bias`` stream of ``seed``) and each type gets
    ``noise_bias``, ``noise_bias_se``, ``corrected_median_ellipticity`` (measured minus bias, at least 1) and
    ``corrected_se`` (measured SE and bias SE in quadrature); 0: not measured (noise-free images).
    Returns the summary dict written to JSON.

    The fits run on one BLAS thread: their matrices are small, and a threaded BLAS sums in an
    order that changes with the machine's load, which moves the results in the 13th digit from
    one run to the next."""
    if types is None:
        types = tuple(schema_defaults("fit", "types"))
    if se_method is None:
        se_method = schema_defaults("fit", "se_method")
    image_path = Path(image_path)
    image, attrs = read_image(image_path)
    n_cells, cell_A = _lattice_of(image_path, attrs, n_cells, cell_A)
    fit_settings = dict(types=types, window_A=window_A, max_pixels=max_pixels, neighbours=neighbours, method=method)
    try:
        df = fit_columns(image, attrs["sampling_A"], n_cells, cell_A, seed=seed, progress=progress, **fit_settings)
    except InputError as e:
        raise InputError(f"{image_path}: {e}") from e
    base, baseline_error = None, None
    if baseline:
        base, baseline_error = _baseline(
            image_path,
            image,
            attrs,
            df,
            n_cells,
            cell_A,
            noise=noise,
            se_method=se_method,
            n_boot=n_boot,
            seed=seed + STREAMS["fit_baseline"],
            **fit_settings,
        )
    per_type = summarize(df, se_method=se_method, n_boot=n_boot, seed=seed)
    bias, bias_error = None, None
    if noise_bias_draws:
        bias, bias_error = _noise_bias(
            image_path,
            image,
            attrs,
            df,
            n_cells,
            cell_A,
            draws=noise_bias_draws,
            seed=seed + STREAMS["fit_noise_bias"],
            **fit_settings,
        )
        for typ, entry in per_type.items():
            b = bias.get(typ, {})
            entry["noise_bias"] = b.get("bias", math.nan)
            entry["noise_bias_se"] = b.get("bias_se", math.nan)
            entry["noise_bias_draws"] = b.get("n_draws", 0)
            # a ratio is >= 1 by construction: a correction past round is held at round
            entry["corrected_median_ellipticity"] = max(1.0, entry["median_ellipticity"] - entry["noise_bias"])
            entry["corrected_se"] = math.hypot(entry["se"], entry["noise_bias_se"])
    if base is not None:
        for typ, entry in per_type.items():
            b = base.get(typ, {})
            entry["baseline_median_ellipticity"] = b.get("median_ellipticity", math.nan)
            entry["baseline_se"] = b.get("se", math.nan)
    summary = _summary(image_path, attrs, df, types, per_type, base, baseline_error)
    if noise_bias_draws:
        keys = ("draws", "iterations", "noise_sigma", "seed")
        summary["noise_bias"] = {"error": bias_error} if bias_error else {k: bias[k] for k in keys}
    summary["provenance"] = provenance(
        seed=seed,
        se_method=se_method,
        max_pixels=max_pixels,
        neighbours=neighbours,
        method=method,
        baseline=bool(baseline),
        noise=noise,
        noise_bias_draws=int(noise_bias_draws),
    )
    with atomic_path(out_csv) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")
    write_json(out_json, summary)
    if plot_path is not None:
        plot_model(image, attrs["sampling_A"], df, plot_path)
    return summary
