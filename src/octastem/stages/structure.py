"""Stage of the ``structure`` rule: the cubic FAPbBr3 supercell with FABr vacancies."""

from __future__ import annotations

import logging
from pathlib import Path

from octastem import io
from octastem.io import InputError

log = logging.getLogger("octastem")


def structure(*, output, n_vacancies: int, reps, a_A: float, seed: int) -> None:
    """Write the cubic FAPbBr3 supercell with ``n_vacancies`` FABr pairs removed (extxyz)."""
    from ase.io import write

    from octastem.structure import build_fapbbr3, check_geometry, composition, remove_fabr_pairs

    atoms = remove_fabr_pairs(build_fapbbr3(tuple(reps), a_A), int(n_vacancies), seed=int(seed))
    check_geometry(atoms, name=str(output))
    atoms.info["provenance"] = io.provenance(n_vacancies=int(n_vacancies), reps=list(reps), a_A=a_A, seed=int(seed))
    log.info("structure %s: %d atoms %s", output, len(atoms), composition(atoms))
    with io.atomic_path(output) as tmp:
        write(tmp, atoms, format="extxyz")


def read_structure(path):
    from ase.io import read

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: structure file not found")
    try:
        return read(path)
    except Exception as e:
        raise InputError(f"{path}: not a readable structure file ({e})") from e
