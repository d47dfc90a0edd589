"""Stages of the fit rules: ``fit`` (``fit_stem``, ``fit_md``: elliptical Gaussian fits of an image
file) and ``md_statistics`` (the projections of one MD system pooled, block bootstrap, convergence)."""

from __future__ import annotations

import logging
from pathlib import Path

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
    noise_bias_draws: int = 0,
) -> None:
    """Elliptical Gaussian fit of the columns of an image file -> CSV table + JSON summary;
    ``noise_bias_draws`` > 0: with the noise bias of the medians (:func:`octastem.fit.noise_bias`)."""
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
        noise_bias_draws=noise_bias_draws,
    )


def md_statistics(
    *,
    tables,
    summaries,
    potentials,
    axes,
    table,
    summary,
    figure,
    types,
    window_A: float | None,
    se_method: str,
    replicates: int,
    frame_interval_fs: float,
    seed: int,
) -> None:
    """Pool the per-axis fits of one MD system (:func:`octastem.fit.pooled.pool_md_fits`; the
    inputs are lists in the order of ``axes``) -> table, summary and the convergence figure."""
    from octastem.fit.pooled import plot_convergence, pool_md_fits

    axes = list(axes)
    result = pool_md_fits(
        dict(zip(axes, tables, strict=True)),
        dict(zip(axes, summaries, strict=True)),
        dict(zip(axes, potentials, strict=True)),
        table,
        summary,
        types=tuple(types),
        window_A=window_A,
        se_method=se_method,
        replicates=replicates,
        seed=seed,
        frame_interval_fs=frame_interval_fs,
    )
    br = result["summary"].get("Br", {})
    log.info(
        "%s: Br %.4f +- %.4f (%s, n = %s over axes %s); per axis %s",
        summary,
        br.get("median_ellipticity", float("nan")),
        br.get("se", float("nan")),
        br.get("se_method"),
        br.get("n"),
        ",".join(axes),
        {a: round(v["median_ellipticity"], 4) for a, v in br.get("by_axis", {}).items()},
    )
    plot_convergence({Path(summary).stem: result}, figure)
