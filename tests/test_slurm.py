"""The tiny config on a real SLURM cluster through profiles/slurm (snakemake-executor-plugin-slurm).

Opt-in: runs when a SLURM controller answers (``scontrol ping``) or OCTASTEM_SLURM_TESTS=1, in
which case a one-node cluster is started on this machine with tests/slurm/setup.sh (root, Debian)
if none answers. ``make test-slurm`` (tests/slurm/run.sh) does both. Takes about four minutes on
two cores: every job is an sbatch submission that starts Snakemake inside the allocation.

On a cluster whose partitions are not called ``cpu`` and ``gpu``, or that needs an account, set
OCTASTEM_SLURM_CPU_PARTITION, OCTASTEM_SLURM_GPU_PARTITION and OCTASTEM_SLURM_ACCOUNT: they are
written into a second profile layered over profiles/slurm, the way a user adapts it.
"""

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from octastem.cli import snakemake_command

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny.yaml"
PROFILE = REPO / "profiles" / "slurm"
SETUP = REPO / "tests" / "slurm" / "setup.sh"


def controller_up() -> bool:
    if not shutil.which("scontrol") or not shutil.which("sbatch"):
        return False
    try:
        out = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "is UP" in out


@pytest.fixture(scope="module")
def cluster():
    if controller_up():
        return
    if os.environ.get("OCTASTEM_SLURM_TESTS") != "1":
        pytest.skip(
            "no SLURM controller answers `scontrol ping`; start the local test cluster with "
            "`sudo tests/slurm/setup.sh` or run `make test-slurm` (OCTASTEM_SLURM_TESTS=1)"
        )
    if os.geteuid() != 0:
        pytest.fail("OCTASTEM_SLURM_TESTS=1 but no SLURM controller answers; run `sudo tests/slurm/setup.sh` first")
    proc = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True)
    if proc.returncode != 0 or not controller_up():
        pytest.fail(f"tests/slurm/setup.sh could not start a cluster:\n{proc.stdout}\n{proc.stderr}")


def site_profile(workdir: Path) -> tuple[Path | None, str, str]:
    """A profile layered over profiles/slurm with this cluster's account and partition names (if set)."""
    base = yaml.safe_load((PROFILE / "config.yaml").read_text())
    default_cpu = base["default-resources"]["slurm_partition"]
    default_gpu = base["set-resources"]["md"]["slurm_partition"]
    cpu = os.environ.get("OCTASTEM_SLURM_CPU_PARTITION", default_cpu)
    gpu = os.environ.get("OCTASTEM_SLURM_GPU_PARTITION", default_gpu)
    account = os.environ.get("OCTASTEM_SLURM_ACCOUNT")
    if (cpu, gpu, account) == (default_cpu, default_gpu, None):
        return None, cpu, gpu
    site = {"default-resources": dict(base["default-resources"]), "set-resources": base["set-resources"]}
    site["default-resources"]["slurm_partition"] = cpu
    if account is not None:
        site["default-resources"]["slurm_account"] = account
    site["set-resources"]["md"]["slurm_partition"] = gpu
    folder = workdir / "site-profile"
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump(site, sort_keys=False))
    return folder, cpu, gpu


def sbatch_calls(text: str) -> dict[str, list[list[str]]]:
    """rule -> argument lists of its sbatch calls (without the wrapped command), from a --verbose log."""
    calls: dict[str, list[list[str]]] = {}
    for line in text.splitlines():
        if "sbatch call: sbatch " not in line:
            continue
        cmd = line.split("sbatch call: ", 1)[1].split(" --wrap=", 1)[0]
        args = shlex.split(cmd)
        comment = args[args.index("--comment") + 1]
        rule = re.match(r"rule_(.+?)(?:_wildcards_.*)?$", comment).group(1)
        calls.setdefault(rule, []).append(args)
    return calls


def option(args: list[str], name: str) -> str | None:
    """Value of ``name`` in an argument list, given as ``name value`` or ``name=value``."""
    for i, a in enumerate(args):
        if a == name:
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def test_tiny_config_on_slurm(cluster, tmp_path, reference_model_path):
    site, cpu, gpu = site_profile(tmp_path)
    cmd = snakemake_command(
        tmp_path,
        # test-only settings: few jobs at once, one thread per process on a small machine (the
        # requested CPUs stay those of the profile), quick status polling without accounting
        "--jobs", "3",
        "--set-threads", "md=1", "simulate_4dstem=2",
        "--slurm-status-command", "squeue",
        "--slurm-init-seconds-before-status-checks", "2",
        "--verbose",
        configfiles=[TINY],
        profiles=[PROFILE, *([site] if site else [])],
    )  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), timeout=1800)
    log = proc.stdout + proc.stderr
    (tmp_path / "snakemake-slurm.log").write_text(log)
    assert proc.returncode == 0, f"snakemake on SLURM failed:\n{log[-8000:]}"

    table = pd.read_csv(tmp_path / "results/report/table1.csv")
    assert len(table) == 4 and table["median_ellipticity"].between(1.0, 3.0).all()

    calls = sbatch_calls(log)
    assert {"structure", "md", "simulate_4dstem", "fit_md", "table1"} <= set(calls), sorted(calls)
    # the GPU rule: the profile's partition, one GPU, its runtime (4h = 240 min), memory and CPUs
    assert len(calls["md"]) == 2
    for args in calls["md"]:
        assert option(args, "-p") == gpu
        assert option(args, "--gpus") == "1"
        assert option(args, "-t") == "240"
        assert option(args, "--mem") == "16000"
        assert option(args, "--cpus-per-task") == "4"
    # a CPU rule: the default partition, no GPU, the rule's own runtime and memory
    for args in calls["fit_md"]:
        assert option(args, "-p") == cpu
        assert option(args, "--gpus") is None and option(args, "--gres") is None
        assert option(args, "-t") == "30" and option(args, "--mem") == "2000"
    for args in calls["simulate_4dstem"]:
        assert option(args, "-p") == cpu
        assert option(args, "--cpus-per-task") == "16" and option(args, "--mem") == "32000"
        assert option(args, "-t") == "360"

    # what SLURM itself recorded for the md jobs
    ids = re.findall(r"submitted with SLURM jobid (\d+) \(log: \S*/rule_md/", log)
    assert len(ids) == 2, ids
    for jobid in ids:
        show = subprocess.run(["scontrol", "show", "job", jobid], capture_output=True, text=True).stdout
        if not show:  # already purged from the controller (MinJobAge)
            continue
        assert f"Partition={gpu}" in show
        assert "TimeLimit=04:00:00" in show
        assert re.search(r"TresPerJob=\S*gpu:1", show), show
        assert "MinMemoryNode=16000M" in show
        assert "JobState=COMPLETED" in show
