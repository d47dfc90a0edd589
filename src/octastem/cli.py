"""Command line: ``octastem run`` drives the Snakemake workflow; other subcommands expose single stages."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from octastem.io import InputError

REPO = Path(__file__).resolve().parents[2]


def _run(args: argparse.Namespace, extra: list[str]) -> int:
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(args.directory),
    ]
    if args.paper:
        cmd += ["--configfile", str(REPO / "config" / "paper.yaml")]
    if args.configfile:
        cmd += ["--configfile", str(args.configfile)]
    if args.profile:
        cmd += ["--profile", str(args.profile)]
    else:
        cmd += ["--cores", str(args.cores)]
    cmd += extra
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

    stages.structure(args.output, n_vacancies=args.vacancies, reps=args.reps, a_A=args.a, seed=args.seed)
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

    s = sub.add_parser("structure", help="write a cubic FAPbBr3 supercell with FABr vacancies (extxyz)")
    s.add_argument("output")
    s.add_argument("--reps", type=int, nargs=3, default=[4, 4, 4])
    s.add_argument("--vacancies", type=int, default=0)
    s.add_argument("--a", type=float, default=6.0, help="lattice parameter (A)")
    s.add_argument("--seed", type=int, default=0)
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
