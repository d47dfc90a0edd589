"""Stages of the CNN rules: ``cnn_training_set``, ``train_cnn``, ``evaluate_cnn``, ``evaluate_suite``."""

from __future__ import annotations

import logging
from pathlib import Path

from octastem import io

log = logging.getLogger("octastem")


def cnn_training_set(*, output, n_scans: int, n_frames: int, seed: int, static_fraction: float) -> None:
    from octastem.cnn import write_shard

    with io.atomic_path(output) as tmp:
        summary = write_shard(
            tmp, n_scans=n_scans, seed=seed, n_frames=n_frames, progress=True, static_fraction=static_fraction
        )
    log.info("%s: %s", output, summary)


def train_cnn(*, shards, weights_output, train: dict, device: str, threads: int | None = None) -> None:
    """Train into the folder of ``weights_output`` (checkpoint there: a re-run resumes)."""
    from octastem.cnn import TrainConfig
    from octastem.cnn import train as run

    out_dir = Path(weights_output).parent
    summary = run(shards, out_dir, TrainConfig.from_schema(**train), device=device, progress=True, threads=threads)
    log.info("training: %s", summary)


def evaluate_cnn(*, weights, metrics, averaged_cells: int, n_seeds: int, seed: int, device: str) -> None:
    from octastem.cnn import evaluate

    result = evaluate(
        Path(metrics).parent, weights=weights, averaged_cells=averaged_cells, n_seeds=n_seeds, seed=seed, device=device
    )
    log.info("evaluation: %s", result)


def evaluate_suite(
    *,
    weights,
    table,
    summary,
    plot,
    evaluation: dict,
    markdown=None,
    optics: dict,
    seed: int,
    device: str,
    threads: int | None = None,
) -> None:
    """Known-truth suite of every reconstruction method (:mod:`octastem.evaluation`) over the grid
    of cases ``evaluation``; ``table``, ``summary`` and ``plot`` must share one folder (``suite.csv``,
    ``suite.json``, ``suite.png``)."""
    from octastem.evaluation import run_suite
    from octastem.io import InputError

    out_dir = Path(table).parent
    expected = {"table": "suite.csv", "summary": "suite.json", "plot": "suite.png", "markdown": "suite.md"}
    given = {"table": table, "summary": summary, "plot": plot, "markdown": markdown or out_dir / "suite.md"}
    for key, name in expected.items():
        if Path(given[key]) != out_dir / name:
            raise InputError(f"evaluate_suite: output '{key}' must be {out_dir / name}, got {given[key]}")
    record = run_suite(
        out_dir,
        settings=evaluation,
        optics=optics,
        weights=weights,
        device=device,
        seed=seed,
        threads=threads,
        progress=True,
    )
    log.info("evaluation suite: %d cases in %.0f s", record["n_cases"], record["seconds_total"])
