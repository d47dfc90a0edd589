"""Temporary outputs: removed when a stage or command is ended by SIGTERM (a SLURM time limit), and,
when a writer was killed outright (SIGKILL, a lost node), removed before the same output is written
again."""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from octastem import io


def dead_pid() -> int:
    """The id of a process that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_orphaned_part_files_removed_before_the_output_is_written_again(tmp_path):
    host = platform.node()
    out = tmp_path / "scan.h5"
    killed = tmp_path / f".scan.h5.part.{host}-{dead_pid()}.k1x2.h5"
    elsewhere = tmp_path / ".scan.h5.part.other.node.example-12345.a9b8.h5"  # its node is gone with its job
    live = tmp_path / f".scan.h5.part.{host}-{os.getpid()}.zz99.h5"  # a writer of this host that still runs
    other = tmp_path / f".summary.json.part.{host}-{dead_pid()}.q.json"  # another output's: not this writer's
    for p in (killed, elsewhere, live, other):
        p.write_bytes(b"\0" * 1000)
    io.write_text(out, "done")
    assert out.read_text() == "done"
    assert not killed.exists() and not elsewhere.exists()
    assert live.exists() and other.exists()


def _run_until_written(tmp_path: Path, body: str) -> subprocess.Popen:
    """Start a Python process running ``body`` (which writes ``ready`` once its temporary output exists)."""
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(body))
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path)
    for _ in range(300):
        if (tmp_path / "ready").exists():
            return proc
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the job never started writing")


def test_stage_ended_by_sigterm_leaves_no_part_file(tmp_path):
    proc = _run_until_written(
        tmp_path,
        """
        import time
        from pathlib import Path
        from octastem import io, stages

        with stages.logged(None), io.atomic_path("out/scan.h5") as tmp:
            tmp.write_bytes(b"half a dataset")
            Path("ready").touch()
            time.sleep(60)
        """,
    )
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert list((tmp_path / "out").iterdir()) == []


def test_command_ended_by_sigterm_leaves_no_staging_folder(tmp_path):
    (tmp_path / "res").mkdir()
    stale = tmp_path / "res" / f".octastem-{platform.node()}-{dead_pid()}.abc123"  # a command killed with -9
    stale.mkdir()
    (stale / "phase.h5").write_bytes(b"\0" * 1000)
    proc = _run_until_written(
        tmp_path,
        """
        import time
        from pathlib import Path
        from octastem import io
        from octastem.cli import _staged

        io.exit_on_sigterm()
        with _staged([Path("res/phase.h5")]) as (tmp,):
            tmp.write_bytes(b"half an image")
            Path("ready").touch()
            time.sleep(60)
        """,
    )
    assert not stale.exists()  # removed when the next command staged its outputs there
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert list((tmp_path / "res").iterdir()) == []
