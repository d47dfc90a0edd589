"""Stages of the report rules: ``table1``, ``table1_plot`` and the per-image fit ``figure``."""

from __future__ import annotations

import logging
from pathlib import Path

from octastem import io

log = logging.getLogger("octastem")


def figure(*, image_path, table, output) -> None:
    import pandas as pd

    from octastem.fit import plot_model

    image, attrs = io.read_image(image_path)
    df = pd.read_csv(table)
    with io.atomic_path(output) as tmp:
        plot_model(image, attrs["sampling_A"], df, tmp, title=f"{Path(output).stem} ({attrs['kind']})")


def table1(*, fits, md_summaries, csv, md_path, html_path, **settings) -> None:
    """Table 1 from the fit summaries (:func:`octastem.report.write_table1`; ``settings``: columns, samples,
    systems, md, stem, structure, method, provenance_json, seeds, headline)."""
    from octastem.report import write_table1

    df = write_table1(csv, md_path, html_path, fit_paths=fits, md_summaries=md_summaries, **settings)
    log.info("Table 1:\n%s", df[["label", "median_ellipticity", "se_median", "n_columns"]].to_string())


def table1_plot(*, csv, output) -> None:
    from octastem.report import plot_table1

    plot_table1(csv, output)
