"""The Verlet neighbour list and the MACE calculator on it that run_npt uses."""

from pathlib import Path

import numpy as np
import pytest
from matscipy.neighbours import neighbour_list

from octastem.md import load_mace_model, mace_calculator
from octastem.md.neighbours import MACEVerletCalculator, VerletList, verlet_calculator
from octastem.structure import build_fapbbr3

STUDENT = Path(__file__).resolve().parents[1] / "resources" / "student" / "fapbbr3_student.model"


def _full_rebuild(positions, cell, cutoff):
    """Pairs within ``cutoff`` from a fresh neighbour search, as a set of (i, j, S)."""
    i, j, s = neighbour_list("ijS", positions=positions, cell=cell, pbc=np.ones(3, bool), cutoff=cutoff)
    return {(a, b, *map(int, c)) for a, b, c in zip(i, j, s) if a != b or c.any()}


def _as_set(pairs):
    i, j, s = pairs
    return {(a, b, *map(int, c)) for a, b, c in zip(i, j, s)}


def test_verlet_list_matches_full_rebuild_while_atoms_and_cell_move():
    atoms = build_fapbbr3((2, 2, 2))
    rng = np.random.default_rng(0)
    nl = VerletList(cutoff=5.0, skin=1.0)
    positions, cell = atoms.positions.copy(), atoms.cell.array.copy()
    for step in range(12):
        # random walk of the atoms and a strain of the cell carrying them along
        strain = np.eye(3) + 0.004 * rng.normal(size=(3, 3))
        positions = positions @ strain + rng.normal(scale=0.06, size=positions.shape)
        cell = cell @ strain
        got = nl.pairs(positions, cell, atoms.numbers)
        assert _as_set(got) == _full_rebuild(positions, cell, 5.0), step
        assert len(_as_set(got)) == len(got[0])  # no duplicates
        # the edges do not depend on when the candidates were built: same arrays as a fresh list
        fresh = VerletList(cutoff=5.0, skin=1.0).pairs(positions, cell, atoms.numbers)
        for a, b in zip(got, fresh):
            assert np.array_equal(a, b)
    assert 1 < nl.builds < 12  # reused between rebuilds, and rebuilt when moved far enough


def test_verlet_list_rebuilds_once_an_atom_moved_half_the_skin():
    atoms = build_fapbbr3((2, 2, 2))
    nl = VerletList(cutoff=5.0, skin=1.0)
    nl.pairs(atoms.positions, atoms.cell.array, atoms.numbers)
    moved = atoms.positions.copy()
    moved[0] += [0.49, 0, 0]
    nl.pairs(moved, atoms.cell.array, atoms.numbers)
    assert nl.builds == 1
    moved[0] += [0.02, 0, 0]
    nl.pairs(moved, atoms.cell.array, atoms.numbers)
    assert nl.builds == 2
    # an atom wrapped into the cell by a lattice vector is a large move too
    moved[1] += atoms.cell.array[0]
    got = nl.pairs(moved, atoms.cell.array, atoms.numbers)
    assert nl.builds == 3 and _as_set(got) == _full_rebuild(moved, atoms.cell.array, 5.0)


@pytest.fixture(scope="module")
def student_calc():
    return mace_calculator(load_mace_model(STUDENT, device="cpu"), device="cpu", threads=2)


def test_verlet_calculator_gives_the_plain_mace_results(student_calc):
    fast = verlet_calculator(student_calc)
    assert isinstance(fast, MACEVerletCalculator) and fast.torch_threads == 2
    atoms = build_fapbbr3((2, 2, 2))
    rng = np.random.default_rng(1)
    for _ in range(3):
        atoms.set_cell(atoms.cell.array @ (np.eye(3) + 0.01 * rng.normal(size=(3, 3))), scale_atoms=True)
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        ref = {k: student_calc.get_property(k, atoms) for k in ("energy", "forces", "stress")}
        got = {k: fast.get_property(k, atoms) for k in ("energy", "forces", "stress")}
        scale = np.abs(ref["forces"]).max()
        assert scale > 0.1
        np.testing.assert_allclose(got["forces"], ref["forces"], rtol=0, atol=2e-6 * scale)
        np.testing.assert_allclose(got["energy"], ref["energy"], rtol=1e-6)
        np.testing.assert_allclose(got["stress"], ref["stress"], rtol=0, atol=2e-6 * np.abs(ref["stress"]).max())
    assert fast.neighbours.builds <= 3


def test_other_calculators_are_left_alone():
    from ase.calculators.emt import EMT

    calc = EMT()
    assert verlet_calculator(calc) is calc
