"""Fixtures shared by the test modules: the study's MACE potential, and the Snakemake runs of the
tiny config (tests/configs/tiny.yaml) with the helpers that drive and read them.

The workflow helpers are fixtures that return plain functions (``run_snakemake(workdir, "-n")``),
so that a test names what it uses in its signature and no test module imports another.
"""

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from octastem.cli import snakemake_command

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny.yaml"


def pytest_configure(config):
    # Offline machines: the external data comes from the shared mirror next to the checkout (as
    # `make test` sets it). Set once before any test, so that every test and every Snakemake
    # subprocess sees the same environment whatever the order.
    mirror = REPO.parent / "shared" / "data"
    if not os.environ.get("OCTASTEM_MIRROR") and mirror.exists():
        os.environ["OCTASTEM_MIRROR"] = str(mirror)


@pytest.fixture(scope="session")
def reference_model_path():
    """Path of the study's MACE potential (mirror or download); skips when neither is reachable."""
    from octastem.io import InputError
    from octastem.registry import fetch

    try:
        return fetch("reference_mace")
    except InputError as e:
        pytest.skip(f"reference potential not available: {e}")


@pytest.fixture(scope="session")
def reference_calc(reference_model_path):
    from octastem.md import load_mace_model, mace_calculator

    model = load_mace_model(reference_model_path, device="cpu")
    return model, mace_calculator(model, device="cpu", threads=2)


# --- Snakemake on the tiny config ---


def _snakemake_cmd(workdir, *args, snakefile=None, configfile=TINY):
    return snakemake_command(workdir, *args, snakefile=snakefile, configfiles=[configfile], cores=2)


def _run_snakemake(workdir, *args, check=True, snakefile=None, configfile=TINY):
    proc = subprocess.run(
        _snakemake_cmd(workdir, *args, snakefile=snakefile, configfile=configfile),
        capture_output=True,
        text=True,
        env=os.environ.copy(),
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def _variant(workdir, name, **changes):
    cfg = yaml.safe_load(TINY.read_text())
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    path = Path(workdir) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _planned_jobs(proc) -> dict[str, int]:
    text = proc.stdout + proc.stderr
    jobs = {}
    block = text.split("Job stats:")[-1] if "Job stats:" in text else ""
    for line in block.splitlines():
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if m and m.group(1) != "total":
            jobs[m.group(1)] = int(m.group(2))
    return jobs


@pytest.fixture(scope="session")
def snakemake_cmd():
    """``snakemake_cmd(workdir, *args, snakefile=None, configfile=TINY)``: the command line of a
    Snakemake run of the workflow in ``workdir`` on 2 cores (for a test that starts it itself)."""
    return _snakemake_cmd


@pytest.fixture(scope="session")
def run_snakemake():
    """``run_snakemake(workdir, *args, check=True, snakefile=None, configfile=TINY)``: runs
    Snakemake (see :func:`snakemake_cmd`) and returns the finished process; with ``check`` a
    failure raises AssertionError with the end of its output."""
    return _run_snakemake


@pytest.fixture(scope="session")
def variant():
    """``variant(workdir, name, **changes)``: writes ``<workdir>/<name>.yaml``, a copy of the tiny
    config with top-level sections updated (nested dicts merged), and returns its path."""
    return _variant


@pytest.fixture(scope="session")
def planned_jobs():
    """``planned_jobs(proc)``: rule -> count from the 'Job stats' table of a dry run."""
    return _planned_jobs


@pytest.fixture(scope="session")
def reference(tmp_path_factory, reference_model_path):
    """One uninterrupted run of the tiny config, shared by the tests that compare against it.

    Tests may write config variants there and dry-run against it, but never run jobs in it.
    """
    work = tmp_path_factory.mktemp("reference-tiny")
    _run_snakemake(work)
    return work
