"""Command line: ``octastem run`` drives the Snakemake workflow; other subcommands expose single stages."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from octastem.config import schema_defaults
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
    configfiles = [REPO / "config" / "paper.yaml"] if args.paper else []
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="octastem", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run the workflow (extra arguments after -- go to snakemake)")
    r.add_argument("--paper", action="store_true", help="use the full-paper preset config/paper.yaml")
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

    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    args = p.parse_args(argv)
    try:
        return args.func(args, extra)
    except InputError as e:
        print(f"octastem: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
