"""Command line: ``octastem run`` drives the Snakemake workflow; other subcommands run single steps.

Single steps on one file, each the call its pipeline rule makes, with the pipeline's checks
(settings against ``config/schema.yaml``, whose defaults they take), outputs written all or
nothing, and exit status 2 with a message naming the file for a bad input:

- ``inspect FILE``: what a 4D-STEM file holds (:mod:`octastem.inspect`);
- ``reconstruct FILE``: the phase image (:func:`octastem.stages.reconstruct`, after
  :func:`octastem.stages.ingest` and optionally :func:`octastem.stages.average` for a raw file);
- ``fit IMAGE``: the column table, summary and figure (:func:`octastem.fit.fit_image_file`, the
  library call of :func:`octastem.stages.fit`, and :func:`octastem.stages.figure`).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from octastem.config import SCHEMA, schema_defaults
from octastem.io import InputError

REPO = Path(__file__).resolve().parents[2]


def snakemake_command(
    directory: str | os.PathLike,
    *args: str | os.PathLike,
    snakefile: str | os.PathLike | None = None,
    configfiles: Sequence[str | os.PathLike] = (),
    profiles: Sequence[str | os.PathLike] = (),
    cores: str | int = "all",
) -> list[str]:
    """The command line that runs the workflow (this repository's Snakefile unless ``snakefile``) in
    ``directory`` with this interpreter's Snakemake.

    Config files and profiles are passed in order (later ones override earlier keys); ``cores``
    applies only without a profile, which sets its own. ``args`` (targets, ``-n``, further options)
    come last, as given.
    """
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(snakefile or REPO / "Snakefile"),
        "--directory",
        str(directory),
    ]
    for path in configfiles:
        cmd += ["--configfile", str(path)]
    for profile in profiles:
        cmd += ["--profile", str(profile)]
    if not profiles:
        cmd += ["--cores", str(cores)]
    return cmd + [str(a) for a in args]


def _run(args: argparse.Namespace, extra: list[str]) -> int:
    if args.paper and args.workstation:
        print("octastem run: --paper and --workstation are two presets; give one", file=sys.stderr)
        return 2
    configfiles = [REPO / "config" / f"{name}.yaml" for name in ("paper", "workstation") if getattr(args, name)]
    if args.configfile:
        configfiles.append(args.configfile)
    cmd = snakemake_command(
        args.directory,
        *extra,
        configfiles=configfiles,
        profiles=[args.profile] if args.profile else [],
        cores=args.cores,
    )
    print("+", " ".join(cmd), file=sys.stderr)
    rc = subprocess.call(cmd)
    if rc == 0 and args.report and "-n" not in extra and "--dry-run" not in extra:
        rc = subprocess.call(cmd + ["--report", str(Path(args.directory) / "results/report/report.html")])
    return rc


def _fetch(args: argparse.Namespace, extra: list[str]) -> int:
    from octastem.registry import fetch

    print(fetch(args.name, progress=True))
    return 0


def _structure(args: argparse.Namespace, extra: list[str]) -> int:
    from octastem import stages

    stages.structure(output=args.output, n_vacancies=args.vacancies, reps=args.reps, a_A=args.a, seed=args.seed)
    print(args.output)
    return 0


def _table1(args: argparse.Namespace, extra: list[str]) -> int:
    path = Path(args.directory) / "results/report/table1.md"
    if not path.exists():
        raise InputError(f"{path}: not made yet; run 'octastem run' first")
    print(path.read_text())
    return 0


# ----------------------------------------------------------------------------------------------
# Single-step commands: settings checked against the config schema
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _schema() -> dict:
    import yaml

    return yaml.safe_load(SCHEMA.read_text())


def _schema_node(*keys: str) -> dict:
    """The schema of the setting ``keys``; "*" steps into the settings of a named entry (``samples.*``)."""
    node = _schema()
    for key in keys:
        node = node["additionalProperties"] if key == "*" else node["properties"][key]
    return node


def _raw_default(*keys: str):
    """Default of a setting of a measured sample (``samples.<name>.raw``), from the schema."""
    return _schema_node("samples", "*", "raw", *keys).get("default")


def check_settings(where, values: dict, keys: tuple[str, ...], options: dict[str, str]) -> None:
    """Validate ``values`` against the schema of the setting ``keys``, as the pipeline validates its
    config; the :class:`InputError` names ``where`` (the input file), the option (``options``: dotted
    field -> option, the longest matching prefix wins) and the config key."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(_schema_node(*keys))
    errors = sorted(validator.iter_errors(values), key=lambda e: [str(p) for p in e.absolute_path])
    if not errors:
        return
    e = errors[0]
    field = [str(p) for p in e.absolute_path]
    option = "settings"
    for n in range(len(field), 0, -1):
        if ".".join(field[:n]) in options:
            option = " ".join([options[".".join(field[:n])], *field[n:]])
            break
    key = ".".join(["<name>" if k == "*" else k for k in keys] + field)
    raise InputError(f"{where}: {option}: {e.message} (config key {key})")


def _key_value(text: str) -> tuple[str, float]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{key.strip()}: expected a number, got {value!r}") from None


def _sampling(text: str) -> float | None:
    if text.lower() in ("none", "native"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a pixel size in A or 'native', got {text!r}") from None


RAW_OPTIONS = {
    "format": "--format",
    "dataset": "--dataset",
    "counts_per_electron": "--counts-per-electron",
    "calibration": "--calibration",
    "calibration.scan_shape": "--scan-shape",
    "origin": "--origin",
}


def _raw_settings(args: argparse.Namespace) -> dict:
    """The ``samples.<name>.raw`` settings the options give, checked against the schema, with its defaults."""
    node = _schema_node("samples", "*", "raw", "calibration")["properties"]
    calibration = {k: d["default"] for k, d in node.items() if "default" in d}
    calibration.update(dict(args.calibration or []))
    if args.scan_shape:
        calibration["scan_shape"] = list(args.scan_shape)
    raw = {
        "path": str(args.file),
        "format": args.format,
        "counts_per_electron": args.counts_per_electron,
        "calibration": calibration,
        "origin": getattr(args, "origin", _raw_default("origin")),
    }
    if args.dataset is not None:
        raw["dataset"] = args.dataset
    check_settings(args.file, raw, ("samples", "*", "raw"), RAW_OPTIONS)
    return raw


def _add_raw_options(p: argparse.ArgumentParser) -> None:
    """Options of a raw detector file, as in a config's ``samples.<name>.raw``."""
    g = p.add_argument_group("raw detector files (as samples.<name>.raw of a config)")
    fmt, cpe = _raw_default("format"), _raw_default("counts_per_electron")
    formats = _schema_node("samples", "*", "raw", "format")["enum"]
    g.add_argument("--format", choices=formats, default=fmt, help=f"file format (default {fmt}: by extension)")
    g.add_argument("--dataset", help="HDF5 / EMD path of the 4D array (default: the only one)")
    g.add_argument("--scan-shape", type=int, nargs=2, metavar=("NY", "NX"), help="scan of a 3D stack of frames")
    g.add_argument(
        "--calibration",
        type=_key_value,
        action="append",
        metavar="KEY=VALUE",
        help="where the file has none (repeat): energy_eV, semiangle_mrad, scan_step_A, k_sampling_mrad, "
        "scan_rotation_deg (default: measured from the data)",
    )
    g.add_argument(
        "--counts-per-electron", type=float, default=cpe, metavar="C", help=f"counts per electron (default {cpe:g})"
    )
    origin = _raw_default("origin")
    g.add_argument(
        "--origin",
        choices=_schema_node("samples", "*", "raw", "origin")["enum"],
        default=origin,
        help=f"descan fit of the disc centre before the patterns are centred and turned onto the scan axes "
        f"(default {origin}; off: as stored)",
    )


@contextlib.contextmanager
def _naming(source: Path, work: Path | None = None) -> Iterator[None]:
    """Errors name the input file ``source``, never the temporary files made from it in ``work``."""
    try:
        yield
    except InputError as e:
        msg = str(e)
        if work is not None:
            msg = msg.replace(str(work / "ingested.h5"), f"{source} (ingested)").replace(str(work), str(source))
        if str(source) not in msg:
            msg = f"{source}: {msg}"
        if msg == str(e):
            raise
        raise InputError(msg) from e


@contextlib.contextmanager
def _staged(outputs: Sequence[Path]) -> Iterator[list[Path]]:
    """Temporary paths with the outputs' names in a hidden folder next to the first output; all are moved
    into place only when the block succeeds, so a failed (or SIGTERM-ended) command leaves nothing
    behind; folders of earlier commands that were killed outright are removed first."""
    from octastem.io import owner_tag, remove_orphans

    parent = outputs[0].parent
    made = not parent.exists()
    parent.mkdir(parents=True, exist_ok=True)
    for orphan in remove_orphans(parent, ".octastem-"):
        _say(f"removed {orphan}, left by an interrupted command")
    tmp = Path(tempfile.mkdtemp(prefix=f".octastem-{owner_tag()}.", dir=parent))
    try:
        yield [tmp / p.name for p in outputs]
        for p in outputs:
            p.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / p.name, p)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if made:
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise
    shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# inspect
# ----------------------------------------------------------------------------------------------


def _inspect(args: argparse.Namespace, extra: list[str]) -> int:
    from octastem.inspect import inspect_file as run
    from octastem.inspect import output_paths, write_outputs

    raw = _raw_settings(args)
    calibration = {k: v for k, v in raw["calibration"].items() if k != "scan_shape"}
    found = run(
        args.file,
        fmt=raw["format"],
        dataset=raw.get("dataset"),
        scan_shape=raw["calibration"].get("scan_shape"),
        calibration=calibration,
        counts_per_electron=raw["counts_per_electron"],
        progress=not args.quiet,
    )
    print(found.report())
    paths = list(output_paths(args.file, args.out).values())
    with _staged(paths) as tmp, _naming(args.file, tmp[0].parent):
        write_outputs(found, tmp[0].parent)
    for p in paths:
        print(f"  wrote        {p}")
    return 0


def _add_inspect(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="what a 4D-STEM file holds: shape, calibration, what is missing, dose; virtual BF/ADF + mean pattern",
        description="Read a 4D-STEM file (raw detector formats through the ingest readers, or the internal "
        "HDF5 format) and print its shape, dtype, the calibration found in it, the required calibration it "
        "lacks and the dose its counts imply (electrons per position / (step_x * step_y), where a scan step is "
        "known). Writes FILE-stem_bf.png, _adf.png, _mean_pattern.png (one pixel per scan position / detector "
        "pixel), _inspect.png (overview) and _inspect.json (the numbers) into --out.",
    )
    p.add_argument("file", type=Path, help="the 4D-STEM file")
    p.add_argument("--out", type=Path, default=Path("."), help="folder for the PNG and JSON files (default: here)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_raw_options(p)
    p.set_defaults(func=_inspect)


# ----------------------------------------------------------------------------------------------
# reconstruct
# ----------------------------------------------------------------------------------------------


def _say(message: str) -> None:
    print(f"octastem: {message}", file=sys.stderr)


def _is_internal(path: Path) -> bool:
    """Whether ``path`` is an internal 4D-STEM file (``io.open_4dstem`` accepts it)."""
    from octastem import io

    if not path.is_file():
        return False
    try:
        with io.open_4dstem(path):
            return True
    except InputError:
        return False


def _cnn_weights(given: Path | None) -> Path:
    """The weights file: as given, else the schema's ``cnn.weights`` (relative to here, else to this repository)."""
    path = Path(given or schema_defaults("cnn", "weights"))
    if given is None and not path.is_absolute() and not path.exists():
        path = REPO / path
    if not path.is_file():
        raise InputError(f"{path}: CNN weights file not found (--weights)")
    return path


def _n_cells(source: Path, stem_path: Path, given) -> list[int]:
    """Unit cells (nx, ny) the phase image spans: recorded by the dataset (simulated ``n_cells``, averaged
    ``supercell``), else ``--n-cells``; a given value must agree with a recorded one."""
    from octastem import io

    with io.open_4dstem(stem_path) as (_, attrs):
        recorded = attrs.get("n_cells", attrs.get("supercell"))
    if recorded is not None:
        recorded = [int(v) for v in recorded]
        if given is not None and list(given) != recorded:
            raise InputError(f"{source}: --n-cells {list(given)} disagrees with the {recorded} the dataset records")
        return recorded
    if given is None:
        raise InputError(
            f"{source}: the unit cells the scan spans are not recorded (attribute 'n_cells' or 'supercell'); "
            "give --n-cells NX NY, or --average to template-match the scan onto one cell"
        )
    return list(given)


def _average_settings(args: argparse.Namespace) -> dict:
    d = schema_defaults("average")
    settings = {
        "cell_shape": list(args.cell_shape or d["cell_shape"]),
        "supercell": list(args.supercell or d["supercell"]),
        "weights": d["weights"],
        "image": d["image"],
    }
    check_settings(args.file, settings, ("average",), {"cell_shape": "--cell-shape", "supercell": "--supercell"})
    return settings


def _ingest_raw(args: argparse.Namespace, raw: dict, work: Path) -> Path:
    """The raw detector file through the ingest stage (settings ``raw``) into a temporary internal file in ``work``."""
    from octastem import stages

    _say(f"{args.file}: not an internal 4D-STEM file: ingesting it (format {raw['format']}) into a temporary one")
    out = work / "ingested.h5"
    try:
        stages.ingest(
            raw=args.file,
            output=out,
            summary=work / "ingested.json",
            fmt=raw["format"],
            dataset=raw.get("dataset"),
            calibration=raw["calibration"],
            counts_per_electron=raw["counts_per_electron"],
            dose_rtol=_raw_default("dose_rtol"),
            dose_e_per_A2=args.dose,
            origin=raw["origin"],
        )
    except InputError as e:
        if "calibration field" in str(e) and "missing" in str(e):
            raise InputError(f"{e} (here: --calibration KEY=VALUE; `octastem inspect` lists what is missing)") from e
        raise
    return out


def _reconstruct(args: argparse.Namespace, extra: list[str]) -> int:
    from octastem import stages

    source, output = Path(args.file), Path(args.output)
    if not source.exists():
        raise InputError(f"{source}: file not found")
    if output.resolve() == source.resolve():
        raise InputError(f"{source}: -o must differ from the input file")
    check_settings(source, {"sampling_A": args.sampling}, ("reconstruct",), {"sampling_A": "--sampling"})
    check_settings(source, {"device": args.device}, ("cnn",), {"device": "--device"})
    average = _average_settings(args) if args.average else None
    weights = _cnn_weights(args.weights) if args.method == "cnn" else None
    raw = None if _is_internal(source) else _raw_settings(args)
    if raw is not None and args.dose is not None:
        check_settings(source, {"dose_e_per_A2": args.dose}, ("samples", "*"), {"dose_e_per_A2": "--dose"})
    with _staged([output]) as (tmp,), _naming(source, tmp.parent):
        stem_path = source if raw is None else _ingest_raw(args, raw, tmp.parent)
        if average is not None:
            _say(f"{source}: template-matching average onto {average['supercell']} cell(s)")
            averaged = tmp.parent / "averaged.h5"
            stages.average(input_path=stem_path, output=averaged, summary=tmp.parent / "averaged.json", **average)
            stem_path = averaged
        n_cells = _n_cells(source, stem_path, args.n_cells)
        _say(f"{source}: {args.method} phase image")
        stages.reconstruct(
            input_path=stem_path,
            output=tmp,
            method=args.method,
            n_cells=n_cells,
            sampling_A=args.sampling,
            weights=None if weights is None else str(weights),
            device=args.device if args.method == "cnn" else "cpu",
            thickness_A=args.thickness,
            wiener_eps=args.wiener_eps,
        )
    print(output)
    return 0


def _add_reconstruct(sub) -> None:
    r, d, cnn = schema_defaults("reconstruct"), schema_defaults("average"), schema_defaults("cnn")
    p = sub.add_parser(
        "reconstruct",
        help="phase image (icom, icom_wiener, cnn, ssb or wdd) of a 4D-STEM file, in the image format of the pipeline",
        description="The phase image of one 4D-STEM file as the reconstruct rule makes it: HDF5 'image' (y, x; "
        "rad) with sampling_A, kind, n_cells and cell_A. An internal 4D-STEM file (results/stem/*.h5, or one "
        "written by octastem.io.write_4dstem) is reconstructed as it is. A raw detector file is first ingested "
        "into a temporary internal file as the ingest rule does (calibration from the file, else --calibration; "
        "counts checked, and --dose against them) and, with --average, template-matched onto one (super)cell as "
        "the average rule does; without --average the scan is reconstructed as recorded (treated as periodic) "
        "and --n-cells says how many unit cells it spans. Only OUT.h5 is kept.",
    )
    p.add_argument("file", type=Path, help="the 4D-STEM file")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT.h5", help="the phase image file")
    methods = _schema_node("reconstruct", "methods")["items"]["enum"]
    p.add_argument("--method", choices=methods, default=r["table_method"], help=f"default {r['table_method']}")
    p.add_argument("--weights", type=Path, help=f"CNN weights (default {cnn['weights']})")
    p.add_argument(
        "--sampling",
        type=_sampling,
        default=r["sampling_A"],
        metavar="A",
        help=f"pixel (A, default {r['sampling_A']}) or native",
    )
    p.add_argument("--device", default=cnn["device"], help=f"CNN device: auto, cpu, cuda[:N] (default {cnn['device']})")
    p.add_argument("--n-cells", type=int, nargs=2, metavar=("NX", "NY"), help="unit cells the scan spans")
    p.add_argument(
        "--thickness",
        type=float,
        metavar="A",
        help="icom_wiener: specimen thickness along the beam (A; 0: thin; default: the file's thickness_A)",
    )
    p.add_argument(
        "--wiener-eps",
        type=float,
        default=r["wiener_eps"],
        help=f"icom_wiener regularisation (default {r['wiener_eps']})",
    )
    a = p.add_argument_group("template-matching average (as the average rule)")
    a.add_argument("--average", action="store_true", help="average the scan onto one (super)cell first")
    a.add_argument("--cell-shape", type=int, nargs=2, metavar=("ROWS", "COLS"), help=f"default {d['cell_shape']}")
    a.add_argument("--supercell", type=int, nargs=2, metavar=("NX", "NY"), help=f"default {d['supercell']}")
    _add_raw_options(p)
    p.add_argument("--dose", type=float, metavar="E_PER_A2", help="e/A^2 of a raw file, checked on its counts")
    p.set_defaults(func=_reconstruct)


# ----------------------------------------------------------------------------------------------
# fit
# ----------------------------------------------------------------------------------------------


def _fit(args: argparse.Namespace, extra: list[str]) -> int:
    import json

    from octastem import stages
    from octastem.fit import fit_image_file

    image = Path(args.image)
    settings = {"types": list(args.types), "window_A": args.window, "se_method": args.se_method}
    options = {"types": "--types", "window_A": "--window", "se_method": "--se-method"}
    check_settings(image, settings, ("fit",), options)
    prefix = Path(args.output)
    outputs = [prefix.with_name(prefix.name + ext) for ext in (".csv", ".json", ".png")]
    if image.exists() and any(o.resolve() == image.resolve() for o in outputs):
        raise InputError(f"{image}: -o {prefix} would overwrite the input image")
    with _staged(outputs) as (table, summary, figure), _naming(image, table.parent):
        fit_image_file(
            image,
            table,
            summary,
            n_cells=args.n_cells,
            cell_A=args.cell_A,
            types=tuple(args.types),
            window_A=args.window,
            se_method=args.se_method,
            seed=args.seed,
            progress=not args.quiet,
        )
        stages.figure(image_path=image, table=table, output=figure)
        result = json.loads(summary.read_text())
    for typ, e in result["summary"].items():
        print(f"{typ}: median ellipticity {e['median_ellipticity']:.4f} +- {e['se']:.4f} ({e['n']} columns)")
    for path in outputs:
        print(path)
    return 0


def _add_fit(sub) -> None:
    f = schema_defaults("fit")
    p = sub.add_parser(
        "fit",
        help="elliptical Gaussian fit of the atomic columns of an image: table (CSV), summary (JSON), figure (PNG)",
        description="Fit the atomic columns of a phase image or projected potential (HDF5 'image' with sampling_A "
        "and, unless given here, n_cells and cell_A, as `octastem reconstruct` writes it) as the fit rules do, "
        "and draw the fitted ellipses as the figure rule does: PREFIX.csv (one row per column), PREFIX.json "
        "(median ellipticity +- SE per type, beside the round-column baseline) and PREFIX.png.",
    )
    p.add_argument("image", type=Path, help="the image file")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="PREFIX", help="writes PREFIX.csv/.json/.png")
    types = _schema_node("fit", "types")["items"]["enum"]
    p.add_argument("--types", nargs="+", choices=types, default=f["types"], help=f"default {' '.join(f['types'])}")
    p.add_argument(
        "--window", type=float, default=f["window_A"], metavar="A", help="window diameter (A; default 1.2 a)"
    )
    se = _schema_node("fit", "se_method")["enum"]
    p.add_argument("--se-method", choices=se, default=f["se_method"], help=f"default {f['se_method']}")
    p.add_argument("--seed", type=int, default=schema_defaults("seed"), help="seed of the fit's random numbers")
    p.add_argument("--n-cells", type=int, nargs=2, metavar=("NX", "NY"), help="default: the image's n_cells")
    p.add_argument("--cell-A", type=float, nargs=2, metavar=("LX", "LY"), help="default: the image's cell_A")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_fit)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="octastem", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run the workflow (extra arguments after -- go to snakemake)")
    r.add_argument("--paper", action="store_true", help="use the full-paper preset config/paper.yaml")
    r.add_argument(
        "--workstation",
        action="store_true",
        help="use the CPU-workstation preset config/workstation.yaml (the study's protocol in about 2 h on 2 cores)",
    )
    r.add_argument("--configfile", help="an additional config file (overrides keys)")
    r.add_argument("--profile", help="a snakemake profile, e.g. profiles/slurm")
    r.add_argument("--cores", default="all")
    r.add_argument("--directory", default=".", help="working directory for results/ (default: here)")
    r.add_argument("--no-report", dest="report", action="store_false", help="skip the snakemake HTML report")
    r.set_defaults(func=_run)

    f = sub.add_parser("fetch", help="fetch an external-data entry (resources/external.yaml) and print its path")
    f.add_argument("name")
    f.set_defaults(func=_fetch)

    d = schema_defaults("structure")
    s = sub.add_parser("structure", help="write a cubic FAPbBr3 supercell with FABr vacancies (extxyz)")
    s.add_argument("output")
    s.add_argument("--reps", type=int, nargs=3, default=d["reps"], help=f"supercell (default {d['reps']})")
    s.add_argument("--vacancies", type=int, default=0)
    s.add_argument("--a", type=float, default=d["a_A"], help=f"lattice parameter (A, default {d['a_A']})")
    s.add_argument("--seed", type=int, default=d["vacancy_seed"], help="vacancy seed")
    s.set_defaults(func=_structure)

    t = sub.add_parser("table1", help="print results/report/table1.md")
    t.add_argument("--directory", default=".")
    t.set_defaults(func=_table1)

    _add_inspect(sub)
    _add_reconstruct(sub)
    _add_fit(sub)

    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    args = p.parse_args(argv)
    if args.command != "run":  # `run` hands signals to Snakemake
        from octastem.io import exit_on_sigterm

        exit_on_sigterm()
    try:
        return args.func(args, extra)
    except InputError as e:
        print(f"octastem: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
