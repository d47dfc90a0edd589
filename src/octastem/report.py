"""Table 1 of the study (median Br ellipticity +- SE of the median) as CSV, Markdown, HTML and a plot.

The columns are exactly those the config lists: 4D-STEM samples, MD systems or both; the notes
describe only what the table rests on (no MD note without MD systems), and warn for every entry
that rests on fewer than :data:`MIN_COLUMNS` Br columns. The comparisons the study makes follow
the table (:func:`comparisons`): each 4D-STEM column against the MD column of the system it was
simulated from, and each system with vacancies against the pristine one, with the combined
standard error and whether the difference exceeds 2 SE; for MD columns, the values of each
projection and the convergence with the analysis window (:mod:`octastem.fit.pooled`).
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from octastem import io
from octastem.io import InputError

log = logging.getLogger("octastem")

#: Fewest Br columns behind a Table 1 entry for a usable median and standard error of the median.
MIN_COLUMNS = 16


def _load_summary(path) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: unreadable fit summary ({e})") from e


def _br(summary: dict, path) -> dict:
    types = summary.get("summary", summary)
    if "Br" not in types:
        raise InputError(f"{path}: fit summary has no 'Br' entry (found {sorted(types)})")
    return types["Br"]


#: What the headline value of a column is (the ``value`` column of table1.csv).
HEADLINES = {
    "corrected": "median minus its noise bias",
    "measured": "median as measured",
}


def _headline(br: dict, source: str, headline: str) -> tuple[float, float, str]:
    """(value, SE, what it is) shown for a column: for 4D-STEM with ``headline`` "corrected" the
    median less its measured noise bias where that was measured, else the median as measured."""
    if headline not in HEADLINES:
        raise InputError(f"fit.headline: expected one of {sorted(HEADLINES)}, got {headline!r}")
    corrected = br.get("corrected_median_ellipticity")
    if source == "4D-STEM" and headline == "corrected" and corrected is not None and np.isfinite(corrected):
        return float(corrected), float(br["corrected_se"]), "corrected"
    return float(br["median_ellipticity"]), float(br["se"]), "measured"


def _value_fields(br: dict, source: str, headline: str) -> dict:
    """The value columns of a Table 1 row from a fit summary's Br entry: the headline median and SE
    (:func:`_headline`), the median as measured, its noise bias, the round-column baseline, the SE
    method and the number of columns."""
    value, se, kind = _headline(br, source, headline)
    return {
        "median_ellipticity": value,
        "se_median": se,
        "value": kind,
        "measured_median_ellipticity": br["median_ellipticity"],
        "measured_se": br["se"],
        "noise_bias": br.get("noise_bias", np.nan),
        "noise_bias_se": br.get("noise_bias_se", np.nan),
        "noise_only_baseline": br.get("baseline_median_ellipticity", np.nan),
        "se_method": br.get("se_method", ""),
        "n_columns": br["n"],
    }


def build_table1(
    columns: list[dict], fit_paths: list, samples: dict, method: str, headline: str = "corrected"
) -> pd.DataFrame:
    """One row per Table 1 column: label, source, dataset, n, the headline median and SE
    (``median_ellipticity``, ``se_median``; what it is in ``value``: :data:`HEADLINES`), the median as
    measured, its noise bias and the round-column (noise only) baseline, se_method, dose, simulated."""
    rows = []
    for col, path in zip(columns, fit_paths):
        br = _br(_load_summary(path), path)
        source = "4D-STEM" if "sample" in col else "MD"
        row = {
            "label": col["label"],
            **_value_fields(br, source, headline),
            "per_axis": "; ".join(
                f"{axis}: {v['median_ellipticity']:.3f} ± {v['se']:.3f} (n = {v['n']})"
                for axis, v in br.get("by_axis", {}).items()
            ),
        }
        if "sample" in col:
            s = samples[col["sample"]]
            row.update(
                source="4D-STEM",
                dataset=col["sample"],
                method=method,
                dose_e_per_A2=s["dose_e_per_A2"],
                simulated="raw" not in s,
                origin=s["raw"]["path"] if "raw" in s else f"simulated from MD system '{s.get('system')}'",
            )
        else:
            row.update(
                source="MD",
                dataset=col["system"],
                method="projected potential",
                dose_e_per_A2=np.nan,
                simulated=True,
                origin=f"MACE NPT MD of system '{col['system']}'",
            )
        row["fit_summary"] = str(path)
        rows.append(row)
    return pd.DataFrame(rows)


#: ``source`` of a Table 1 row: a sample's MD system seen through the sample's own imaging chain.
LIKE_SOURCE = "MD through the chain"


def like_rows(df: pd.DataFrame, like: dict, like_fits: dict, samples: dict, method: str, headline: str) -> pd.DataFrame:
    """Rows of the like-for-like datasets of the Table 1 samples (``like``: sample -> dataset,
    ``like_fits``: dataset -> fit summary), one per dataset, in the order the samples first name
    them; each row's ``like_for`` lists the samples it stands beside."""
    rows = []
    for dataset, path in like_fits.items():
        users = [s for s, d in like.items() if d == dataset and s in set(df["dataset"])]
        if not users:
            continue
        br = _br(_load_summary(path), path)
        first = samples[users[0]]
        system = first["system"]
        measured = "raw" in first
        origin = (
            f"MD system '{system}' simulated with the calibration, scan and dose of '{users[0]}', averaged, "
            f"reconstructed by {method} and fitted like it"
            if measured
            else f"the same simulated specimen of MD system '{system}' without noise, averaged, reconstructed by "
            f"{method} and fitted like the noisy samples"
        )
        rows.append(
            {
                "label": f"MD {system} through the chain" + ("" if measured else " (noise free)"),
                **_value_fields(br, "4D-STEM", headline),
                "per_axis": "",
                "source": LIKE_SOURCE,
                "dataset": dataset,
                "method": method,
                "dose_e_per_A2": float(first["dose_e_per_A2"]) if measured else np.inf,
                "simulated": True,
                "origin": origin,
                "like_for": ",".join(users),
                "fit_summary": str(path),
            }
        )
    return pd.DataFrame(rows)


def cell_text(median: float, se: float) -> str:
    return f"{median:.3f} ± {se:.3f}"


#: A difference is called significant when it exceeds this many combined standard errors.
SIGNIFICANCE_SE = 2.0


#: The comparisons of :func:`comparisons`, in the order they are listed.
COMPARISON_KINDS = {
    "like": "4D-STEM vs its MD system through the same chain (like for like)",
    "paper": "4D-STEM vs the MD projected potential (the study's comparison: different resolutions)",
    "dose": "increased vs low dose (4D-STEM)",
    "vacancies": "vacancies vs pristine (MD)",
}


def comparisons(df: pd.DataFrame, columns: list[dict], samples: dict, systems: dict) -> pd.DataFrame:
    """The differences the study's question needs, from the Table 1 rows ``df`` (the rows of
    ``columns`` first, then the like-for-like rows of :func:`like_rows`):

    - each 4D-STEM column minus its MD system seen through the same chain (like for like), where
      there is one: what the structure, not the chain's resolution, makes of the difference;
    - each 4D-STEM column minus the MD column (raw projected potential) of its system, labelled as
      the study's comparison;
    - between 4D-STEM columns of the same system and kind (both measured or both simulated) at
      different doses, the higher minus the lower dose;
    - each MD system with FABr vacancies minus the pristine system (0 vacancies), when both are columns.

    Columns: comparison, a, b (labels), difference (a - b), se (combined, sqrt(se_a^2 + se_b^2):
    independent data; for a simulated sample and its noise-free twin, which share the MD frames,
    this overstates the SE of the difference), z = difference / se, significant
    (|z| > :data:`SIGNIFICANCE_SE`)."""
    md_row = {col["system"]: i for i, col in enumerate(columns) if "system" in col}
    pristine = [i for name, i in md_row.items() if systems.get(name) == 0]
    like_row = {}
    if "like_for" in df:
        for i, users in df["like_for"].items():
            for u in str(users).split(",") if isinstance(users, str) and users else []:
                like_row[u] = i
    pairs = []
    stem_cols = [(i, col["sample"]) for i, col in enumerate(columns) if "sample" in col]
    for i, sample in stem_cols:
        if sample in like_row:
            pairs.append((i, like_row[sample], COMPARISON_KINDS["like"]))
        system = samples[sample].get("system")
        if system in md_row:
            pairs.append((i, md_row[system], COMPARISON_KINDS["paper"]))
    for (i, a), (j, b) in ((x, y) for x in stem_cols for y in stem_cols):
        sa, sb = samples[a], samples[b]
        same_kind = ("raw" in sa) == ("raw" in sb)  # both measured or both simulated from the same system
        if same_kind and sa.get("system") == sb.get("system") and sa["dose_e_per_A2"] > sb["dose_e_per_A2"]:
            pairs.append((i, j, COMPARISON_KINDS["dose"]))
    for i, col in enumerate(columns):
        if "system" in col and systems.get(col["system"], 0) > 0 and pristine:
            pairs.append((i, pristine[0], COMPARISON_KINDS["vacancies"]))
    rows = []
    for i, j, kind in pairs:
        a, b = df.iloc[i], df.iloc[j]
        diff = float(a["median_ellipticity"] - b["median_ellipticity"])
        se = float(np.hypot(a["se_median"], b["se_median"]))
        z = diff / se if se > 0 else np.nan
        rows.append(
            {
                "comparison": kind,
                "a": a["label"],
                "b": b["label"],
                "difference": diff,
                "se": se,
                "z": z,
                "significant": bool(abs(z) > SIGNIFICANCE_SE) if np.isfinite(z) else False,
            }
        )
    return pd.DataFrame(rows, columns=["comparison", "a", "b", "difference", "se", "z", "significant"])


def comparison_lines(cmp: pd.DataFrame) -> list[str]:
    """The comparisons in words: difference, combined SE, and whether it is significant at 2 SE."""
    lines = []
    for r in cmp.itertuples():
        verdict = "significant" if r.significant else "not significant"
        lines.append(
            f"{r.a} minus {r.b}: {r.difference:+.3f} ± {r.se:.3f} ({r.z:+.1f} SE, {verdict} at {SIGNIFICANCE_SE:g} SE)"
        )
    return lines


def convergence_lines(df: pd.DataFrame, fit_paths: list) -> list[str]:
    """Markdown table of the pooled median against the analysis window, per MD column."""
    lines = []
    for (_, r), path in zip(df.iterrows(), fit_paths):
        conv = _load_summary(path).get("convergence") if r["source"] == "MD" else None
        if not conv:
            continue
        axes = list(conv[0].get("per_axis_median", {}))
        lines += [
            f"**{r['label']}** (figure `figures/convergence_{r['dataset']}.png`)",
            "",
            "| window (ps) | frames | n | median ± SE | " + " | ".join(axes) + " |",
            "|---|---|---|---|" + "---|" * len(axes),
        ]
        for c in conv:
            per = " | ".join(f"{c['per_axis_median'][a]:.3f}" for a in axes)
            lines.append(
                f"| {c['window_fs'] / 1000:g} | {c['frames']} | {c['n']} | "
                f"{cell_text(c['median_ellipticity'], c['se'])} | {per} |"
            )
        lines.append("")
    return lines


def comparison_table(cmp: pd.DataFrame) -> list[str]:
    """The comparisons as a Markdown table: difference, combined SE, z and the 2-SE verdict."""
    if cmp.empty:
        return []
    lines = [
        "| comparison | a | b | a - b | combined SE | z | exceeds 2 SE |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in cmp.itertuples():
        lines.append(
            f"| {r.comparison} | {r.a} | {r.b} | {r.difference:+.3f} | {r.se:.3f} | {r.z:+.1f} | "
            f"{'yes' if r.significant else 'no'} |"
        )
    return lines + [""]


def table1_markdown(
    df: pd.DataFrame,
    notes: list[str],
    cmp: list[str] = (),
    conv: list[str] = (),
    cmp_table: list[str] = (),
    sens: list[str] = (),
) -> str:
    header = "| | " + " | ".join(df["label"]) + " |"
    sep = "|---|" + "---|" * len(df)
    row = "| Br | " + " | ".join(cell_text(m, s) for m, s in zip(df["median_ellipticity"], df["se_median"])) + " |"
    lines = [
        "# Table 1: ellipticity ratio of the projections of the Br atomic columns",
        "",
        "Median of the ellipticity ratio (major / minor width) with the standard error of the median.",
        "",
        header,
        sep,
        row,
        "",
    ]
    if "n_columns" in df:
        lines += [
            "Br columns behind each value: " + ", ".join(f"{lbl} {n}" for lbl, n in zip(df["label"], df["n_columns"])),
            "",
        ]
    if cmp:
        lines += ["## Comparisons", "", *cmp_table, *[f"- {c}" for c in cmp], ""]
    if any(df["per_axis"].astype(str).str.len() > 0):
        lines += ["## Per projection (MD)", ""]
        lines += [f"- {r['label']}: {r['per_axis']}" for _, r in df.iterrows() if r["per_axis"]]
        lines.append("")
    if conv:
        lines += ["## Convergence with the analysis window (MD)", "", *conv]
    if sens:
        lines += ["## The MD value against the analysis choices", "", *sens]
    lines += ["## Notes", ""]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def table1_html(df: pd.DataFrame, notes: list[str], cmp: list[str] = ()) -> str:
    th = "".join(f"<th>{html.escape(x)}</th>" for x in df["label"])
    td = "".join(f"<td>{cell_text(m, s)}</td>" for m, s in zip(df["median_ellipticity"], df["se_median"]))
    li = "".join(f"<li>{html.escape(n)}</li>" for n in [*cmp, *notes])
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>octastem Table 1</title>"
        "<style>table{border-collapse:collapse}td,th{border:1px solid #999;padding:4px 10px}</style></head><body>"
        "<h1>Table 1: ellipticity ratio of the projected Br columns</h1>"
        f"<table><tr><th></th>{th}</tr><tr><th>Br</th>{td}</tr></table><h2>Notes</h2><ul>{li}</ul></body></html>\n"
    )


def _simulation_text(stem) -> str:
    """How the 4D-STEM was simulated: PRISM for a nanocrystal with ``method: prism``, else multislice."""
    if stem.get("specimen") == "nanocrystal" and stem.get("method") == "prism":
        return "abTEM PRISM (S-matrix, probe window of box / stem.prism_interpolation)"
    return "abTEM multislice"


def _potential_kind(potential: str) -> str:
    if potential == "reference_mace":
        return "MACE, PBE-D3(BJ), the study's own"
    if "student" in Path(potential).name:
        return "CPU student MACE distilled from the study's potential; see resources/student/MODEL_CARD.md"
    return "MACE model file"


def specimen_text(stem: dict, structure: dict) -> str:
    """Plain-language description of the specimen model of the simulated 4D-STEM samples."""
    reps = structure["reps"]
    if stem.get("specimen", "periodic") == "nanocrystal":
        nc = stem["nanocrystal"]
        tiles = (
            "every tile (copy of the MD cell) of every frozen-phonon configuration from another MD frame of the "
            "analysis window"
            if nc.get("tiles", "distinct") == "distinct"
            else "each frozen-phonon configuration one MD frame tiled"
        )
        return (
            f"a finite FAPbBr3 nanocrystal, a cube of edge {nc['edge_A'] / 10:g} nm (whole pseudo-cubic cells), "
            f"{tiles} (whole FA molecules), with {nc['vacuum_A']:g} A of vacuum around it, [001] "
            f"along the beam; the central {nc['scan_cells']:g} x {nc['scan_cells']:g} MD cells scanned, Poisson "
            f"noise at the stated dose per acquisition, then template-matching averaged onto one "
            f"{reps[0]}x{reps[1]} MD cell like measured data."
        )
    return (
        f"the periodic {reps[0]}x{reps[1]}x{reps[2]} MD cell (as thick as the MD cell), Poisson noise at the stated "
        f"dose times {stem['averaged_cells']} cells, standing for a perfect template-matching average over "
        f"{stem['averaged_cells']} equivalent cells."
    )


def few_columns_notes(df: pd.DataFrame, min_columns: int = MIN_COLUMNS) -> list[str]:
    """A warning for every Table 1 entry resting on fewer than ``min_columns`` Br columns."""
    notes = []
    for _, r in df.iterrows():
        if r["n_columns"] < min_columns:
            measured = r["source"] == "4D-STEM" and not r["simulated"]
            more = "a larger average.supercell" if measured else "larger structure.reps"
            notes.append(
                f"WARNING: {r['label']} rests on {r['n_columns']} Br columns, fewer than {min_columns}: its median and "
                f"standard error are rough; {more} gives more columns (README, 'Your own data')."
            )
    return notes


def notes_for(df: pd.DataFrame, md_summaries: list, md: dict, stem: dict, structure: dict, systems: dict) -> list[str]:
    """Plain-language notes: what is simulated, which potential and settings produced the values,
    and which entries rest on too few columns (:func:`few_columns_notes`)."""
    notes = []
    for _, r in df.iterrows():
        if r["source"] == LIKE_SOURCE:
            notes.append(
                f"{r['label']}: beside {r['like_for'].replace(',', ', ')}: {r['origin']}; {r['n_columns']} Br "
                f"columns fitted, SE: {r['se_method']}. It is what the MD structure gives through the same imaging "
                "chain, so the 4D-STEM column minus it compares like with like; the MD column is the raw projected "
                "potential (no point spread), the study's comparison."
            )
        elif r["source"] == "4D-STEM":
            kind = "SIMULATED dataset (no raw data configured)" if r["simulated"] else "raw dataset"
            notes.append(
                f"{r['label']}: {kind}, {r['origin']}, dose {r['dose_e_per_A2']:g} e/A^2, phase by {r['method']}, "
                f"{r['n_columns']} Br columns fitted, SE: {r['se_method']}. {noise_text(r)}"
            )
        else:
            notes.append(f"{r['label']}: {r['origin']}, {r['n_columns']} Br columns fitted, SE: {r['se_method']}.")
    if any(df["simulated"] & (df["source"] == "4D-STEM")):
        notes.append(
            f"Simulated 4D-STEM: {_simulation_text(stem)} at {stem['energy_eV'] / 1e3:g} kV, convergence semi-angle "
            f"{stem['semiangle_mrad']:g} mrad, scan step {stem['scan_step_A']:g} A, {stem['frames']} frozen-phonon MD "
            f"frames. Specimen: {specimen_text(stem, structure)}"
        )
    if systems:
        reps = structure["reps"]
        notes.append(
            f"MD: potential '{md['potential']}' ({_potential_kind(md['potential'])}), {reps[0]}x{reps[1]}x{reps[2]} "
            f"cubic FAPbBr3 supercell, systems {systems} (FABr vacancies), NPT {md['temperature_K']:g} K / "
            f"{md['pressure_MPa']:g} MPa, {md['timestep_fs']:g} fs step, {md['total_fs']:g} fs total, last "
            f"{md['analysis_fs']:g} fs analysed, snapshot every {md['frame_interval_fs']:g} fs."
        )
    for path in md_summaries:
        s = _load_summary(path)
        lat = s["lattice_A"]
        notes.append(
            f"{Path(path).parent.name}: T = {s['temperature_K']['mean']:.0f} ± {s['temperature_K']['std']:.0f} K, "
            f"a/b/c = {lat['a']['mean']:.3f}/{lat['b']['mean']:.3f}/{lat['c']['mean']:.3f} A, mean Pb-Br-Pb "
            f"{s['pb_br_pb_angle_deg']['mean']:.1f} deg, Br perpendicular RMS displacement "
            f"{s['br_displacement_A']['perpendicular_rms']:.3f} A over {s['n_frames_analysed']} frames."
        )
    return notes + few_columns_notes(df)


def _suite_rows(path) -> pd.DataFrame | None:
    """The known-truth suite's table (``suite.csv`` of :func:`octastem.evaluation.run_suite`), or None."""
    if path is None or not Path(path).is_file():
        return None
    table = pd.read_csv(path)
    need = {
        "method",
        "case",
        "cation",
        "delta_A",
        "thickness_cells",
        "scan_step_A",
        "dose_e_per_A2",
        "averaged_cells",
        "n_seeds",
        "br_ellipticity",
        "br_ellipticity_std",
        "truth_band_limited",
        "bias_band_limited",
    }
    missing = sorted(need - set(table.columns))
    if missing:
        raise InputError(f"{path}: suite table lacks columns {missing}")
    return table


def method_check(
    suite: pd.DataFrame,
    method: str,
    dose: float,
    step_A: float,
    thickness_A: float | None,
    averaged_cells: float | None = None,
) -> pd.DataFrame | None:
    """The suite's cases nearest to a measurement's acquisition, one row per structure (split) there:
    ``method``; the dose nearest ``dose`` (noisy rows first); the averaging nearest ``averaged_cells``
    (equivalent cells behind each averaged position, on a log scale; None: the largest); the scan
    step nearest ``step_A``; the thickness nearest ``thickness_A`` (A; FA cells of 6 A, Cs of
    5.87 A); FA on the A site when present. The measured value plays no part: the bias is stated for
    every structure at that acquisition. Rows carry ``step_mismatch`` (relative) and ``thickness_A``
    of the case, ordered by truth; None when the suite has no row of ``method``."""
    from octastem.evaluation import LATTICE_A

    rows = suite[suite["method"] == method].copy()
    if rows.empty:
        return None
    if (rows["cation"] == "FA").any():
        rows = rows[rows["cation"] == "FA"]
    noisy = rows[rows["dose_e_per_A2"].notna()]
    if not noisy.empty and np.isfinite(dose):
        rows = noisy
        rows = rows[(rows["dose_e_per_A2"] - dose).abs() == (rows["dose_e_per_A2"] - dose).abs().min()]
        if averaged_cells is None or not np.isfinite(averaged_cells) or averaged_cells <= 0:
            rows = rows[rows["averaged_cells"] == rows["averaged_cells"].max()]
        else:
            gap = (np.log(rows["averaged_cells"].astype(float)) - np.log(float(averaged_cells))).abs()
            rows = rows[gap == gap.min()]
    elif not np.isfinite(dose):
        clean = rows[rows["dose_e_per_A2"].isna()]
        rows = clean if not clean.empty else rows
    rows = rows[(rows["scan_step_A"] - step_A).abs() == (rows["scan_step_A"] - step_A).abs().min()]
    rows = rows.assign(thickness_A=[t * LATTICE_A.get(c, 6.0) for t, c in zip(rows["thickness_cells"], rows["cation"])])
    if thickness_A is not None:
        rows = rows[(rows["thickness_A"] - thickness_A).abs() == (rows["thickness_A"] - thickness_A).abs().min()]
    rows = rows.sort_values("truth_band_limited").assign(
        step_mismatch=lambda r: (r["scan_step_A"] - step_A).abs() / step_A
    )
    return rows.reset_index(drop=True)


def averaged_cells_of(path) -> float | None:
    """Equivalent cells behind each position of a reconstructed dataset (internal HDF5): the template
    average's mean contributions (``n_mean``) or a periodic sample's ``averaged_cells``; None if neither."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs)
    except OSError:
        return None
    for key in ("n_mean", "averaged_cells"):
        if key in attrs:
            return float(attrs[key])
    return None


def method_check_notes(
    df: pd.DataFrame, samples: dict, stem: dict, thickness: dict, suite_table, averaging: dict | None = None
) -> list[str]:
    """For each 4D-STEM column: the measured bias of its method on the known-truth suite's cases
    nearest to the data's acquisition (:func:`method_check`: step, dose, averaging, thickness; not the
    measured value), in words; one line when there is no suite table. ``averaging``: sample ->
    equivalent cells behind each averaged position (:func:`averaged_cells_of`)."""
    suite = _suite_rows(suite_table)
    name = "/".join(Path(suite_table).parts[-4:])  # as the repository names it, not this machine's path
    rows = df[df["source"] == "4D-STEM"]
    if rows.empty:
        return []
    if suite is None:
        return [f"Method check: no known-truth suite table at {name} (rule evaluate_suite makes one)."]
    out = []
    for _, r in rows.iterrows():
        s = samples[r["dataset"]]
        step = (
            float(s["raw"]["calibration"].get("scan_step_A", stem["scan_step_A"]))
            if "raw" in s
            else float(stem["scan_step_A"])
        )
        t = thickness.get(r["dataset"]) if thickness else None
        n_avg = (averaging or {}).get(r["dataset"])
        c = method_check(suite, r["method"], float(r["dose_e_per_A2"]), step, t, n_avg)
        if c is None or c.empty:
            out.append(f"Method check, {r['label']}: the suite ({name}) has no rows of method {r['method']}.")
            continue
        first = c.iloc[0]
        acq = (
            "noise free"
            if not np.isfinite(first["dose_e_per_A2"])
            else (
                f"{first['dose_e_per_A2']:g} e/A^2 x {int(first['averaged_cells'])} cells, "
                f"{int(first['n_seeds'])} noise draws"
            )
        )
        cases = "; ".join(
            f"truth {x['truth_band_limited']:.3f}: reads {x['br_ellipticity']:.3f} ± {x['br_ellipticity_std']:.3f}, "
            f"bias {x['bias_band_limited']:+.3f}"
            for _, x in c.iterrows()
        )
        data = f"step {step:g} A, {r['dose_e_per_A2']:g} e/A^2" + (f", {n_avg:.0f} cells averaged" if n_avg else "")
        text = (
            f"Method check, {r['label']} ({data}): on the known-truth suite's cases nearest to this acquisition "
            f"({first['scan_step_A']:g} A, {first['thickness_A']:.0f} A thick, {acq}; {name}) {r['method']} gives "
            f"{cases}."
        )
        if first["step_mismatch"] > 0.05:
            text += (
                f" The data's scan step ({step:g} A) is not in the suite (nearest {first['scan_step_A']:g} A): "
                "the bias at the data's step is not measured."
            )
        out.append(text)
    return out


def noise_text(r) -> str:
    """How noise enters a 4D-STEM column's value: the measured median, its noise bias and what
    noise alone gives for round columns at the same SNR."""
    measured = f"measured {cell_text(r['measured_median_ellipticity'], r['measured_se'])}"
    base = r.get("noise_only_baseline", np.nan)
    alone = f"; noise alone (round columns, same SNR) gives {base:.3f}" if np.isfinite(base) else ""
    if r["value"] == "corrected":
        return (
            f"Shown: {HEADLINES['corrected']} ({measured}, noise bias {r['noise_bias']:+.3f} ± "
            f"{r['noise_bias_se']:.3f} from refits of the fitted structure plus the image's own residual, "
            f"shifted{alone})."
        )
    return f"Shown: {HEADLINES['measured']}, noise bias not removed{alone}."


def sensitivity_lines(path) -> list[str]:
    """The MD value against each analysis choice (``benchmarks/results/md_sensitivity.json`` of
    benchmarks/md_observable.py) as a Markdown table: one column per MD run, pooled median ± SE."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
        runs = doc["runs"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise InputError(
            f"{path}: unreadable MD sensitivity table ({e}); expected benchmarks/md_observable.py output"
        ) from e
    names = list(runs)
    choices = list(next(iter(runs.values())))
    lines = [
        f"From `{'/'.join(path.parts[-3:])}`: the pooled Br ellipticity of the time-averaged potential (x, y, z) "
        "when one analysis choice changes; asymptotic SE over the pooled columns (time correlation not included).",
        "",
        "| analysis choice | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for c in choices:
        cells = [cell_text(runs[n][c]["median"], runs[n][c]["se"]) if c in runs[n] else "" for n in names]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return lines + [""]


def alignment_notes(df: pd.DataFrame, ingest_summaries: dict) -> list[str]:
    """For each measured 4D-STEM column: what ingest measured and removed (bright-field disc centre and
    radius, descan, scan rotation and flip) from its summary JSON (``ingest_summaries``: sample -> path)."""
    out = []
    for _, r in df[df["source"] == "4D-STEM"].iterrows():
        path = (ingest_summaries or {}).get(r["dataset"])
        if path is None:
            continue
        rec = _load_summary(path).get("alignment")
        if not rec:
            out.append(f"{r['label']}: patterns taken as they are (samples.<name>.raw.origin: off).")
            continue
        disc, rot = rec.get("disc", {}), rec.get("rotation", {})
        centre = disc.get("centre_px", [float("nan")] * 2)
        radius_px, radius_mrad = disc.get("radius_px", float("nan")), rec.get("disc_radius_mrad", float("nan"))
        text = (
            f"{r['label']}: at ingest the bright-field disc was found at (k_y, k_x) = "
            f"({centre[0]:.1f}, {centre[1]:.1f}) px, radius {radius_px:.1f} px ({radius_mrad:.1f} mrad), its centre "
            f"fitted over the scan ({rec.get('fit', '?')}) and removed"
        )
        if rot:
            measured = rot.get("measured_deg")
            text += (
                f"; scan rotation {rot.get('applied_deg', float('nan')):.2f} deg applied ({rot.get('source', '?')}"
                + (f", measured {measured:.2f} deg" if measured is not None else "")
                + f"), flip {'yes' if rot.get('flip') else 'no'}"
            )
        out.append(text + ".")
    return out


def provenance_lines(record: dict) -> list[str]:
    """Plain-language provenance of the report: config hash, seeds, versions, input checksums."""
    run = record.get("run", {})
    lines = [
        f"Config sha256: {run.get('config_sha256', 'n/a')}",
        f"Seeds: {json.dumps(record.get('seeds', {}), sort_keys=True)}",
        "Software: python "
        + record.get("python", "?")
        + ", "
        + ", ".join(f"{k} {v}" for k, v in sorted(record.get("versions", {}).items())),
    ]
    for path, sha in sorted(run.get("inputs_sha256", {}).items()):
        lines.append(f"{path}: sha256 {sha[:16]}...")
    return lines


def write_table1(
    csv,
    md_path,
    html_path,
    columns,
    fit_paths,
    samples,
    method,
    md_summaries,
    md,
    stem,
    structure,
    systems,
    provenance_json=None,
    seeds=None,
    comparisons_csv=None,
    headline="corrected",
    suite_table=None,
    thickness=None,
    like=None,
    like_fits=None,
    stems=None,
    sensitivity_table=None,
    ingest_summaries=None,
) -> pd.DataFrame:
    """Table 1 as CSV, Markdown (with comparisons, per-projection values, convergence, notes and
    provenance), HTML; ``provenance_json`` gets the full record, ``comparisons_csv`` the table of
    :func:`comparisons`; ``headline``: the 4D-STEM value shown (:data:`HEADLINES`); ``suite_table``:
    the known-truth suite's ``suite.csv`` whose nearest case states each 4D-STEM column's method bias
    (:func:`method_check_notes`; ``thickness``: specimen thickness per sample, A); ``like`` (sample ->
    like-for-like dataset) and ``like_fits`` (dataset -> fit summary): the rows of :func:`like_rows`;
    ``stems``: sample -> its reconstructed dataset, whose averaging the method check matches;
    ``sensitivity_table``: :func:`sensitivity_lines` of that file follow the convergence tables."""
    df = build_table1(columns, fit_paths, samples, method, headline)
    if like_fits:
        df = pd.concat([df, like_rows(df, like or {}, like_fits, samples, method, headline)], ignore_index=True)
    notes = notes_for(df, md_summaries, md, stem, structure, systems) + alignment_notes(df, ingest_summaries or {})
    if suite_table is not None:
        averaging = {name: averaged_cells_of(path) for name, path in (stems or {}).items()}
        notes += method_check_notes(df, samples, stem, thickness or {}, suite_table, averaging)
    cmp = comparisons(df, columns, samples, systems)
    cmp_text = comparison_lines(cmp)
    conv = convergence_lines(df, fit_paths)
    sens = sensitivity_lines(sensitivity_table) if sensitivity_table is not None else []
    for note in few_columns_notes(df):
        log.warning("%s", note)
    record = json.loads(io.provenance(seeds=seeds or {}))
    record["fits"] = {str(p): _load_summary(p).get("provenance") for p in [*fit_paths, *(like_fits or {}).values()]}
    prov = provenance_lines(record)
    with io.atomic_path(csv) as tmp:
        df.to_csv(tmp, index=False)
    io.write_text(
        md_path,
        table1_markdown(df, notes, cmp_text, conv, comparison_table(cmp), sens)
        + "\n## Provenance\n\n"
        + "".join(f"- {x}\n" for x in prov),
    )
    io.write_text(html_path, table1_html(df, notes + ["Provenance: " + x for x in prov], cmp_text))
    if comparisons_csv is not None:
        with io.atomic_path(comparisons_csv) as tmp:
            cmp.to_csv(tmp, index=False)
    if provenance_json is not None:
        io.write_json(provenance_json, record)
    return df


def plot_table1(csv, output) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = pd.read_csv(csv)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(df), 3.6))
    colours = [{"4D-STEM": "tab:purple", LIKE_SOURCE: "tab:orange"}.get(s, "tab:green") for s in df["source"]]
    x = np.arange(len(df))
    ax.errorbar(x, df["median_ellipticity"], yerr=df["se_median"], fmt="none", ecolor="k", capsize=4)
    ax.scatter(x, df["median_ellipticity"], c=colours, s=60, zorder=3)
    if "value" in df:
        # where the noise bias was removed: the median as measured (open) and noise alone (cross)
        corrected = (df["value"] == "corrected").to_numpy()
        if corrected.any():
            ax.scatter(
                x[corrected] + 0.15,
                df["measured_median_ellipticity"][corrected],
                facecolors="none",
                edgecolors="tab:purple",
                s=40,
                zorder=3,
                label="as measured",
            )
            ax.scatter(
                x[corrected] + 0.15,
                df["noise_only_baseline"][corrected],
                marker="x",
                c="0.4",
                s=30,
                label="noise alone",
            )
            ax.legend(fontsize=7, frameon=False)
    ax.axhline(1.0, color="0.6", ls="--", lw=1)
    ax.set_xticks(x, [lbl.replace(" (", "\n(") for lbl in df["label"]], fontsize=8)
    ax.set_ylabel("Br ellipticity ratio (median ± SE)")
    fig.tight_layout()
    with io.atomic_path(output) as tmp:
        fig.savefig(tmp, dpi=150)
    plt.close(fig)
