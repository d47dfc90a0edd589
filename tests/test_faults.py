"""Faults, for real: a job killed with SIGKILL mid-way, Snakemake itself killed, a corrupt input.

One working directory goes through the faults in order (module fixture ``faulted``); each test
then checks one consequence against the uninterrupted reference run (fixture ``reference``):

1. MD: Snakemake and the md job are killed (SIGKILL, whole process group: a node failure) once
   the partial trajectory holds a checkpoint. After ``--unlock`` the re-run resumes from that
   checkpoint, and the finished trajectory is bit-identical to the uninterrupted one.
2. fit: the fit job alone is killed (SIGKILL, as the OOM killer or SLURM would). Snakemake
   reports the failure and removes the job's outputs; the re-run completes.
3. report: Snakemake and a figure job are killed together. Nothing half-written is left (the
   writers are atomic), the output is marked incomplete, and the re-run completes.
"""

import io
import json
import os
import signal
import subprocess
import time

import h5py
import numpy as np
import pandas as pd
import psutil
import pytest

TRAJECTORY = "results/md/pristine/trajectory.h5"
PARTIAL = TRAJECTORY + ".partial"
FIT = ("results/fit/md_pristine_z.csv", "results/fit/md_pristine_z.json")
FIGURE = "results/report/figures/md_pristine_z.png"


def start(cmd, log):
    """Snakemake (command line ``cmd``, output to ``log``) in its own process group (so the whole
    group can be killed like a node)."""
    with open(log, "w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(proc, condition, what, timeout=300.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if condition():
            return
        if proc.poll() is not None:
            raise AssertionError(f"snakemake ended (rc {proc.returncode}) before {what}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def checkpoint_frames(path) -> int:
    """Frames covered by the checkpoint of a partial trajectory that is being written (0 if none yet)."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            return int(f["checkpoint"].attrs["n_frames"]) if "checkpoint" in f else 0
    except (OSError, KeyError):
        return 0


def job_processes(proc, script):
    """Running processes of the job that executes ``workflow/scripts/<script>``."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for child in children:
        try:
            if any(arg.endswith(script) for arg in child.cmdline()):
                found.append(child)
        except psutil.Error:
            pass
    return found


def png_shape(data: bytes) -> tuple:
    """Shape of a PNG image (raises if it does not decode: a truncated file)."""
    import matplotlib.image

    return matplotlib.image.imread(io.BytesIO(data), format="png").shape


def kill_group(proc):
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def faulted(tmp_path_factory, reference_model_path, snakemake_cmd, run_snakemake):
    work = tmp_path_factory.mktemp("faulted")
    notes = {}

    # 1. MD: kill Snakemake and the job once a checkpoint past frame 0 exists
    proc = start(snakemake_cmd(work, TRAJECTORY), work / "md-killed.log")
    wait_for(proc, lambda: checkpoint_frames(work / PARTIAL) >= 2, "the MD checkpoint at frame 2")
    kill_group(proc)
    notes["md_killed_at"] = checkpoint_frames(work / PARTIAL)
    notes["md_output_after_kill"] = (work / TRAJECTORY).exists()
    notes["locked"] = any((work / ".snakemake/locks").iterdir())
    run_snakemake(work, "--unlock")
    run_snakemake(work, TRAJECTORY)
    notes["md_log"] = (work / "logs/md/pristine.log").read_text()

    # 2. fit: kill the fit job only, Snakemake survives and cleans up
    proc = start(snakemake_cmd(work, FIT[1]), work / "fit-killed.log")
    log = work / "logs/fit/md_pristine_z.log"
    wait_for(proc, lambda: log.exists() and job_processes(proc, "fit.py"), "the fit job")
    for p in job_processes(proc, "fit.py"):
        p.send_signal(signal.SIGKILL)
    notes["fit_rc"] = proc.wait(timeout=300)
    notes["fit_log"] = (work / "fit-killed.log").read_text()
    notes["fit_outputs_after_kill"] = [f for f in FIT if (work / f).exists()]
    run_snakemake(work, FIT[1])

    # 3. report: kill Snakemake together with a figure job
    proc = start(snakemake_cmd(work, FIGURE), work / "figure-killed.log")
    log = work / "logs/report/figure_md_pristine_z.log"
    wait_for(proc, lambda: log.exists() and job_processes(proc, "figure.py"), "the figure job")
    kill_group(proc)
    notes["figure_after_kill"] = (work / FIGURE).read_bytes() if (work / FIGURE).exists() else None
    notes["incomplete_markers"] = [p.name for p in (work / ".snakemake/incomplete").iterdir()]
    run_snakemake(work, "--unlock")
    run_snakemake(work, FIGURE)
    return work, notes


@pytest.mark.slow
def test_md_killed_resumes_to_the_same_frames(faulted, reference):
    work, notes = faulted
    n_total = 4  # tiny config: 3 fs, a frame every 1 fs
    assert 2 <= notes["md_killed_at"] < n_total, notes["md_killed_at"]
    assert not notes["md_output_after_kill"], "no finished trajectory may exist after the kill"
    assert notes["locked"], "a killed Snakemake leaves its lock (removed with --unlock)"
    assert f"resuming at frame {notes['md_killed_at']}" in notes["md_log"]
    assert not (work / PARTIAL).exists()
    with h5py.File(work / TRAJECTORY) as resumed, h5py.File(reference / TRAJECTORY) as uninterrupted:
        assert "checkpoint" not in resumed
        assert list(resumed) == list(uninterrupted)
        for name in resumed:
            assert np.array_equal(resumed[name][()], uninterrupted[name][()]), name
        assert np.array_equal(resumed["time_fs"][()], np.arange(n_total, dtype=float))


@pytest.mark.slow
def test_fit_killed_leaves_no_output_and_reruns(faulted, reference):
    work, notes = faulted
    assert notes["fit_rc"] != 0
    assert "Error in rule fit_md" in notes["fit_log"]
    assert notes["fit_outputs_after_kill"] == [], "outputs of the killed fit must be removed"
    # the re-run wrote complete outputs (bit-for-bit equality is test_determinism's business)
    redone, expected = pd.read_csv(work / FIT[0]), pd.read_csv(reference / FIT[0])
    assert list(redone.columns) == list(expected.columns) and len(redone) == len(expected)
    np.testing.assert_allclose(redone["ellipticity"], expected["ellipticity"], rtol=1e-6)
    assert json.loads((work / FIT[1]).read_text())["summary"]["Br"]["n"] == len(expected)
    assert not list((work / "results/fit").glob(".*.part.*")), "a temporary file of an atomic write survived"


@pytest.mark.slow
def test_figure_killed_with_snakemake_reruns(faulted, reference, run_snakemake, planned_jobs):
    work, notes = faulted
    # Snakemake had no chance to clean up: the output is either absent or complete (atomic rename),
    # and it is marked incomplete so that the next run (rerun-incomplete) makes it again
    if notes["figure_after_kill"] is not None:
        assert png_shape(notes["figure_after_kill"]) == png_shape((reference / FIGURE).read_bytes())
    assert notes["incomplete_markers"], "the interrupted job's output must be marked incomplete"
    assert png_shape((work / FIGURE).read_bytes()) == png_shape((reference / FIGURE).read_bytes())
    assert planned_jobs(run_snakemake(work, "-n", FIGURE)) == {}


@pytest.mark.slow
def test_corrupt_input_fails_clearly_without_outputs(tmp_path, run_snakemake, variant):
    """A truncated raw dataset: the ingest job fails naming the file, and writes nothing."""
    data = np.random.default_rng(0).poisson(5.0, (6, 6, 16, 16)).astype(np.uint16)
    np.save(tmp_path / "scan.npy", data)
    raw = (tmp_path / "scan.npy").read_bytes()
    (tmp_path / "scan.npy").write_bytes(raw[: len(raw) // 2])  # an interrupted copy
    cal = {"energy_eV": 300e3, "semiangle_mrad": 25.0, "scan_step_A": 0.4, "k_sampling_mrad": 2.0}
    cfg = variant(
        tmp_path,
        "corrupt",
        samples={"scan": {"dose_e_per_A2": 48.0, "raw": {"path": "scan.npy", "calibration": cal}}},
        table1=[{"label": "Scan", "sample": "scan"}, {"label": "MD pristine", "system": "pristine"}],
    )
    proc = run_snakemake(tmp_path, "results/stem/raw/scan.h5", check=False, configfile=cfg)
    assert proc.returncode != 0
    log = (tmp_path / "logs/ingest/scan.log").read_text()
    assert "scan.npy: not a readable .npy file, truncated or corrupt" in log
    assert "Error in rule ingest" in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists() or not [p for p in (tmp_path / "results").rglob("*") if p.is_file()]


def test_corrupt_trajectory_is_named(tmp_path):
    from octastem.io import InputError
    from octastem.md import read_frames

    path = tmp_path / "trajectory.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(200))
    with pytest.raises(InputError, match="trajectory.h5: not a readable HDF5 trajectory"):
        read_frames(path)
