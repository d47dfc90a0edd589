import subprocess
import sys

from ase.io import read

from octastem.cli import main
from octastem.structure import composition


def test_structure_command(tmp_path):
    out = tmp_path / "s.extxyz"
    assert main(["structure", str(out), "--reps", "2", "2", "2", "--vacancies", "1", "--seed", "3"]) == 0
    assert composition(read(out)) == {"Pb": 8, "Br": 23, "C": 7, "N": 14, "H": 35}


def test_run_dry_run_of_paper_preset(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "octastem.cli", "run", "--paper", "--directory", str(tmp_path), "--", "-n"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert "FABr_vac11" in text and "md" in text


def test_missing_table_is_a_clear_error(tmp_path, capsys):
    assert main(["table1", "--directory", str(tmp_path)]) == 2
    assert "octastem run" in capsys.readouterr().err
