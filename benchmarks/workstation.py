"""One full run of the workstation preset (config/workstation.yaml); its record to benchmarks/results/workstation/.

Runs Snakemake on the preset in ``--workdir`` (``--cores``, default 2), sampling the load average
every minute, and then collects what the issue of the preset asks to keep: ``table1.csv``,
``table1.md``, ``comparisons.csv``, the fit summaries (per MD axis, pooled, and every 4D-STEM fit),
the Table 1 and convergence figures, and ``run.json``: wall time, exit code, machine, the load
average over the run, the wall time of every job (from Snakemake's log) summed per rule, and per
Table-1 column the value, SE, n and whether SE <= ``--se-target`` (0.03).

``--collect-only`` skips the run and collects from a finished ``--workdir`` (its ``snakemake.log``,
``load_average.log`` and ``run_times.json`` written by an earlier call of this script or by hand:
``{"start": ISO, "end": ISO, "rc": 0, "commit": SHA}``).

Usage: python benchmarks/workstation.py [--workdir /tmp/octastem-workstation] [--cores 2] [--collect-only]
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from octastem.cli import snakemake_command  # noqa: E402
from octastem.io import machine_info, write_json  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "workstation"
CONFIG = REPO / "config" / "workstation.yaml"


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def run(workdir: Path, cores: int) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()

    def sample():
        with open(workdir / "load_average.log", "a") as f:
            while not stop.is_set():
                f.write(f"{_now()} {Path('/proc/loadavg').read_text().strip()}\n")
                f.flush()
                stop.wait(60)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = _now()
    with open(workdir / "snakemake.log", "w") as log:
        rc = subprocess.run(
            snakemake_command(workdir, configfiles=[CONFIG], cores=cores), stdout=log, stderr=subprocess.STDOUT
        ).returncode
    stop.set()
    sampler.join()
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    (workdir / "run_times.json").write_text(json.dumps({"start": start, "end": _now(), "rc": rc, "commit": commit}))


def job_times(log_text: str) -> dict:
    """Wall seconds per rule, summed over its jobs, from the timestamps of Snakemake's log."""
    stamp, started, per_rule = None, {}, defaultdict(float)
    pending = None
    for line in log_text.splitlines():
        m = re.match(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$", line)
        if m:
            stamp = dt.datetime.strptime(m.group(1), "%a %b %d %H:%M:%S %Y")
            continue
        m = re.match(r"^(?:local)?rule (\w+):$", line)
        if m:
            pending = (m.group(1), stamp)
            continue
        m = re.match(r"^\s+jobid: (\d+)$", line)
        if m and pending:
            started[m.group(1)] = pending
            pending = None
            continue
        m = re.match(r"^Finished jobid: (\d+) \(Rule: (\w+)\)$", line)
        if m and m.group(1) in started:
            rule, t0 = started.pop(m.group(1))
            per_rule[rule] += (stamp - t0).total_seconds()
    return dict(sorted(per_rule.items(), key=lambda kv: -kv[1]))


def collect(workdir: Path, se_target: float) -> dict:
    res = workdir / "results"
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "figures").mkdir(exist_ok=True)
    for name in ("table1.csv", "table1.md", "comparisons.csv", "provenance.json"):
        shutil.copy2(res / "report" / name, OUT / name)
    for path in sorted((res / "fit").glob("*.json")):
        shutil.copy2(path, OUT / path.name)
    for pattern in ("table1.png", "convergence_*.png"):
        for path in (res / "report" / "figures").glob(pattern):
            shutil.copy2(path, OUT / "figures" / path.name)
    shutil.copy2(workdir / "load_average.log", OUT / "load_average.log")
    times = json.loads((workdir / "run_times.json").read_text())
    wall = (dt.datetime.fromisoformat(times["end"]) - dt.datetime.fromisoformat(times["start"])).total_seconds()
    samples = [line.split() for line in (workdir / "load_average.log").read_text().splitlines() if line.strip()]
    loads = [float(x[1]) for x in samples]
    with open(res / "report" / "table1.csv") as f:
        rows = list(csv.DictReader(f))
    columns = [
        {
            "label": r["label"],
            "value": float(r["median_ellipticity"]),
            "se": float(r["se_median"]),
            "n_columns": int(r["n_columns"]),
            "se_method": r["se_method"],
            "se_target_met": float(r["se_median"]) <= se_target,
        }
        for r in rows
    ]
    record = {
        "config": str(CONFIG.relative_to(REPO)),
        "commit": times.get("commit"),
        "start": times["start"],
        "end": times["end"],
        "exit_code": times["rc"],
        "wall_s": wall,
        "wall_target_s": 7200,
        "machine": machine_info(note="load average sampled every minute over the run: load_average.log")
        | {"load_average_at_start": [float(v) for v in samples[0][1:4]]},
        "load_average_1min_over_run": {"mean": sum(loads) / len(loads), "max": max(loads), "samples": len(loads)},
        "rule_wall_s": job_times((workdir / "snakemake.log").read_text()),
        "se_target": se_target,
        "table1": columns,
    }
    write_json(OUT / "run.json", record)
    return record


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/octastem-workstation"))
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--se-target", type=float, default=0.03)
    ap.add_argument("--collect-only", action="store_true")
    args = ap.parse_args(argv)
    if not args.collect_only:
        t = time.perf_counter()
        run(args.workdir, args.cores)
        print(f"run: {time.perf_counter() - t:.0f} s", file=sys.stderr)
    record = collect(args.workdir, args.se_target)
    print(json.dumps({k: record[k] for k in ("wall_s", "exit_code", "table1")}, indent=1))
    return 0 if record["exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
