"""MD statistics: the Br columns of the three projections pooled, a block bootstrap over time, and
the convergence of the median with the analysis window.

The MD cell is cubic on average, so its averaged projected potential along x, y and z
(:func:`octastem.potential.along_axis`) shows three independent sets of Br columns of the same
network: a 4 x 4 x 4 cell gives 3 x 32 = 96 columns instead of 32. Their ellipticities are pooled
into one median (the per-axis values stay in the summary).

Successive MD snapshots are correlated, so the spread of the columns of one time-averaged image
does not say how much the median would move with another stretch of trajectory. The averaged
image of each axis is stored with the means of consecutive time blocks of its snapshots
(:func:`octastem.potential.projected_potential`'s ``n_blocks``); a block bootstrap draws the
blocks with replacement (the same draw for the three axes, which share the time axis), averages
them into new images, refits their columns and then resamples the pooled columns with
replacement (a two-stage bootstrap: time, then columns). The standard deviation of the medians
of the replicates is the standard error of the pooled median (``se_block_bootstrap``); the
spread from the time draw alone is ``se_time``. The replicates are refitted with the "fast"
engine (batched Levenberg-Marquardt, thousands of columns per second); the median itself comes
from the per-axis fits of the configured engine.

The convergence table refits the images of the last 1, 2, 5, 10, 20, ... blocks (as far as the
window goes, and the whole window) with the configured engine: the median and its asymptotic SE
against the length of trajectory analysed, so a user sees whether the window is long enough.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from octastem.fit.columns import fit_columns
from octastem.fit.stats import median_se
from octastem.fit.summary import summarize
from octastem.io import InputError, atomic_path, provenance, read_image, read_image_blocks, write_json
from octastem.rng import generator

log = logging.getLogger("octastem")

#: Numbers of trailing blocks of the convergence table (those up to the window's, plus the whole window).
CONVERGENCE_BLOCKS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


def _weighted_mean(means: np.ndarray, counts: np.ndarray, idx) -> np.ndarray:
    w = counts[idx].astype(np.float64)
    return np.tensordot(w / w.sum(), means[idx].astype(np.float64), axes=1)


class AxisImages:
    """The time-block images of one projection and the lattice of its fit."""

    def __init__(self, potential_path, fit_summary: dict):
        self.path = Path(potential_path)
        image, attrs = read_image(self.path)
        self.means, self.counts = read_image_blocks(self.path)
        self.shape = image.shape
        self.sampling_A = float(attrs["sampling_A"])
        self.n_cells = fit_summary["n_cells"]
        self.cell_A = fit_summary["cell_A"]
        self.origin_A = tuple(fit_summary["origin_A"])
        self.frame_interval_fs = attrs.get("every_fs")

    @property
    def n_blocks(self) -> int:
        return int(self.counts.size)

    def image(self, idx) -> np.ndarray:
        return _weighted_mean(self.means, self.counts, np.asarray(idx))

    def ellipticities(self, idx, types, method: str, window_A, seed: int) -> np.ndarray:
        """Ellipticities of the successful Br fits of the image averaged over blocks ``idx``."""
        df = fit_columns(
            self.image(idx),
            self.sampling_A,
            self.n_cells,
            self.cell_A,
            types=types,
            window_A=window_A,
            origin_A=self.origin_A,
            method=method,
            seed=seed,
        )
        ok = df[(df["type"] == "Br") & df["success"].astype(bool)]
        return ok["ellipticity"].to_numpy(dtype=float)


def block_bootstrap(
    axes: dict[str, AxisImages], types, replicates: int, seed: int, window_A=None, engine: str = "fast"
) -> dict:
    """Two-stage (time blocks, then columns) bootstrap of the pooled Br median (module docstring).

    Returns the SE, the SE of the time draw alone, the 16/84 % quantiles of the replicate medians,
    the number of blocks and replicates; ``{"error": why}`` when the axes have fewer than 2 blocks
    or different numbers of blocks."""
    counts = {a.n_blocks for a in axes.values()}
    if len(counts) != 1:
        return {"error": f"the projections have different numbers of time blocks {sorted(counts)}"}
    n_blocks = counts.pop()
    if n_blocks < 2:
        return {"error": f"{n_blocks} time block: a block bootstrap needs at least 2 (potential.block_fs)"}
    if replicates < 2:
        return {"error": f"fit.block_replicates = {replicates}: a block bootstrap needs at least 2"}
    rng = generator(seed, "fit_block_bootstrap")
    medians, time_medians = np.empty(replicates), np.empty(replicates)
    from tqdm.auto import tqdm

    for r in tqdm(range(replicates), desc="block bootstrap", unit="replicate", disable=replicates < 20):
        idx = rng.integers(0, n_blocks, size=n_blocks)
        values = np.concatenate([a.ellipticities(idx, types, engine, window_A, seed) for a in axes.values()])
        values = values[np.isfinite(values)]
        if values.size < 2:
            raise InputError(f"block bootstrap replicate {r}: fewer than 2 Br columns fitted")
        time_medians[r] = np.median(values)
        medians[r] = np.median(rng.choice(values, size=values.size, replace=True))
    q16, q84 = np.quantile(medians, [0.16, 0.84])
    return {
        "se": float(np.std(medians, ddof=1)),
        "se_time": float(np.std(time_medians, ddof=1)),
        "quantiles_16_84": [float(q16), float(q84)],
        "median_of_replicates": float(np.median(medians)),
        "n_blocks": int(n_blocks),
        "block_frames": [int(c) for c in next(iter(axes.values())).counts],
        "replicates": int(replicates),
        "engine": engine,
    }


def convergence(axes: dict[str, AxisImages], types, method: str, window_A, seed: int, frame_interval_fs) -> list[dict]:
    """Pooled median (asymptotic SE) of the images of the last k blocks, for k in
    :data:`CONVERGENCE_BLOCKS` up to the number of blocks and the whole window."""
    n_blocks = min(a.n_blocks for a in axes.values())
    ks = sorted({k for k in CONVERGENCE_BLOCKS if k < n_blocks} | {n_blocks})
    rows = []
    for k in ks:
        idx = np.arange(n_blocks - k, n_blocks)
        per_axis = {name: a.ellipticities(idx, types, method, window_A, seed) for name, a in axes.items()}
        values = np.concatenate(list(per_axis.values()))
        values = values[np.isfinite(values)]
        frames = int(next(iter(axes.values())).counts[idx].sum())
        row = {
            "blocks": int(k),
            "frames": frames,
            "window_fs": float(frames * frame_interval_fs) if frame_interval_fs else math.nan,
            "n": int(values.size),
            "per_axis_median": {name: float(np.median(v)) if v.size else math.nan for name, v in per_axis.items()},
        }
        if values.size >= 2:
            row["median_ellipticity"], row["se"] = median_se(values, method="asymptotic")
        else:
            row["median_ellipticity"], row["se"] = (float(values[0]) if values.size else math.nan), math.nan
        rows.append(row)
    return rows


def pool_md_fits(
    tables: dict[str, str],
    summaries: dict[str, str],
    potentials: dict[str, str],
    out_csv,
    out_json,
    *,
    types=("Br",),
    window_A=None,
    se_method: str = "asymptotic",
    replicates: int = 200,
    seed: int = 0,
    frame_interval_fs: float | None = None,
    n_boot: int = 2000,
    method: str = "window",
) -> dict:
    """Pool the per-axis fits of one MD system (``tables``/``summaries``/``potentials``: axis -> file)
    into one table (column ``axis`` added) and one summary: pooled per-type statistics with, for Br,
    the block-bootstrap SE as the Table's SE when it can be computed, the per-axis Br entries,
    the bootstrap record and the convergence table. Written atomically; returns the summary."""
    import json

    if not tables or set(tables) != set(summaries) or set(tables) != set(potentials):
        raise InputError(
            f"pooled MD fit: tables {sorted(tables)}, summaries {sorted(summaries)} and potentials "
            f"{sorted(potentials)} must name the same axes"
        )
    frames, axis_summaries = [], {}
    for axis in tables:
        df = pd.read_csv(tables[axis])
        df.insert(0, "axis", axis)
        frames.append(df)
        try:
            axis_summaries[axis] = json.loads(Path(summaries[axis]).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"{summaries[axis]}: unreadable fit summary ({e})") from e
    pooled = pd.concat(frames, ignore_index=True)
    per_type = summarize(pooled, se_method=se_method, n_boot=n_boot, seed=seed)
    axes = {axis: AxisImages(potentials[axis], axis_summaries[axis]) for axis in tables}
    interval = frame_interval_fs or next(iter(axes.values())).frame_interval_fs
    boot = block_bootstrap(axes, tuple(types), int(replicates), seed, window_A=window_A)
    if "Br" in per_type:
        br = per_type["Br"]
        br["se_block_bootstrap"] = boot.get("se", math.nan)
        br["se_time"] = boot.get("se_time", math.nan)
        if "error" not in boot:
            br["se"], br["se_method"] = boot["se"], "block_bootstrap"
        br["by_axis"] = {
            axis: {k: s["summary"]["Br"].get(k) for k in ("n", "median_ellipticity", "se", "se_method")}
            for axis, s in axis_summaries.items()
            if "Br" in s.get("summary", {})
        }
    conv = convergence(axes, tuple(types), method, window_A, seed, interval) if "Br" in per_type else []
    summary = {
        "source": {axis: str(p) for axis, p in potentials.items()},
        "kind": "projected_potential",
        "axes": list(tables),
        "n_cells": axis_summaries[next(iter(tables))]["n_cells"],
        "summary": per_type,
        "block_bootstrap": boot,
        "convergence": conv,
        "frame_interval_fs": interval,
        "per_axis": {axis: str(p) for axis, p in summaries.items()},
        "provenance": provenance(seed=seed, replicates=int(replicates), se_method=se_method, method=method),
    }
    if "error" in boot:
        log.warning("pooled MD fit: no block bootstrap: %s", boot["error"])
    with atomic_path(out_csv) as tmp:
        pooled.to_csv(tmp, index=False, float_format="%.6g")
    write_json(out_json, summary)
    return summary


def plot_convergence(summaries: dict[str, dict], output) -> None:
    """Pooled median Br ellipticity +- SE against the analysis window, one line per MD system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.0, 3.6))
    for name, s in summaries.items():
        rows = s.get("convergence", [])
        if not rows:
            continue
        t = np.array([r["window_fs"] for r in rows]) / 1000.0
        m = np.array([r["median_ellipticity"] for r in rows])
        e = np.array([r["se"] for r in rows])
        ax.errorbar(t, m, yerr=e, marker="o", capsize=3, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("analysis window (ps, the last ... of the trajectory)")
    ax.set_ylabel("Br ellipticity (pooled median ± SE)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(output) as tmp:
        fig.savefig(tmp, dpi=150, format="png")
    plt.close(fig)
