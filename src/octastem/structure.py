"""Cubic FAPbBr3 supercells and FABr-vacancy variants, built with ASE.

The cubic perovskite cell (Pm-3m) has Pb on the corner (0, 0, 0), Br on the edge centres
(1/2, 0, 0), (0, 1/2, 0), (0, 0, 1/2), and the formamidinium cation FA+ = CH(NH2)2+ (8 atoms,
planar) at the cube centre. Per-atom arrays ``site`` (``Pb``, ``Br``, ``FA``) and ``fa_id``
(index of the FA molecule, -1 otherwise) travel with the structure through extxyz, so vacancy
creation and analysis know which atoms form a molecule.
"""

from __future__ import annotations

import numpy as np
from ase import Atoms

from octastem.io import InputError

# FA+ geometry (A, degrees): planar amidinium, C-N 1.31, N-C-N 124, C-H 1.09, N-H 1.01,
# H-N-H 120 (sp2 nitrogen). The molecule lies in the xz plane, C-H along +z.
_CN_A, _NCN_DEG, _CH_A, _NH_A = 1.31, 124.0, 1.09, 1.01


def fa_molecule() -> Atoms:
    """One formamidinium cation CH(NH2)2+ centred on its carbon atom at the origin."""
    half = np.radians(_NCN_DEG / 2)
    symbols, pos = ["C", "H"], [[0.0, 0.0, 0.0], [0.0, 0.0, _CH_A]]
    for sign in (1.0, -1.0):
        n = np.array([sign * _CN_A * np.sin(half), 0.0, -_CN_A * np.cos(half)])
        symbols.append("N")
        pos.append(n)
        to_c = -n / np.linalg.norm(n)
        for rot in (np.radians(120.0), np.radians(-120.0)):
            # rotate the N->C direction in the molecular (xz) plane by +-120 degrees
            c, s = np.cos(rot), np.sin(rot)
            d = np.array([c * to_c[0] + s * to_c[2], 0.0, -s * to_c[0] + c * to_c[2]])
            symbols.append("H")
            pos.append(n + _NH_A * d)
    return Atoms(symbols, positions=np.array(pos))


def unit_cell(a_A: float = 6.0) -> Atoms:
    """The 12-atom cubic FAPbBr3 cell with lattice parameter ``a_A`` (A)."""
    if not 4.0 < a_A < 8.0:
        raise InputError(f"structure: lattice parameter a_A={a_A} A is outside the plausible range (4, 8) A")
    frac = [[0, 0, 0], [0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5]]
    cell = Atoms(["Pb", "Br", "Br", "Br"], scaled_positions=frac, cell=[a_A] * 3, pbc=True)
    fa = fa_molecule()
    fa.translate([a_A / 2] * 3)
    cell += fa
    cell.set_array("site", np.array(["Pb", "Br", "Br", "Br"] + ["FA"] * len(fa)))
    return cell


def build_fapbbr3(reps: tuple[int, int, int] = (1, 1, 1), a_A: float = 6.0) -> Atoms:
    """Cubic FAPbBr3 supercell ``reps`` = (nx, ny, nz) unit cells, periodic, with ``site``/``fa_id``."""
    reps = tuple(int(r) for r in reps)
    if len(reps) != 3 or min(reps) < 1:
        raise InputError(f"structure: reps must be three positive integers, got {reps}")
    cell = unit_cell(a_A)
    n_cell = len(cell)
    atoms = cell.repeat(reps)
    n_fa = 8
    fa_id = np.full(len(atoms), -1, dtype=int)
    for k in range(np.prod(reps)):
        fa_id[k * n_cell + 4 : k * n_cell + 4 + n_fa] = k
    atoms.set_array("fa_id", fa_id)
    return atoms


def remove_fabr_pairs(atoms: Atoms, n_vacancies: int, seed: int = 0) -> Atoms:
    """Remove ``n_vacancies`` FA+ molecules and as many Br- anions, chosen at seeded random sites.

    Both are drawn independently and uniformly (randomly distributed vacancies, as in the
    study), so the structure stays charge neutral.
    """
    if "fa_id" not in atoms.arrays or "site" not in atoms.arrays:
        raise InputError("structure: atoms lack the 'fa_id'/'site' arrays; build them with build_fapbbr3")
    fa_ids = np.unique(atoms.arrays["fa_id"][atoms.arrays["fa_id"] >= 0])
    br_idx = np.flatnonzero(atoms.arrays["site"] == "Br")
    if not 0 <= n_vacancies <= len(fa_ids):
        raise InputError(
            f"structure: n_vacancies={n_vacancies} must be between 0 and the number of FA sites ({len(fa_ids)})"
        )
    rng = np.random.default_rng(seed)
    gone_fa = rng.choice(fa_ids, size=n_vacancies, replace=False)
    gone_br = rng.choice(br_idx, size=n_vacancies, replace=False)
    remove = np.isin(atoms.arrays["fa_id"], gone_fa)
    remove[gone_br] = True
    out = atoms[~remove]
    out.info["n_fabr_vacancies"] = int(n_vacancies)
    out.info["vacancy_seed"] = int(seed)
    return out


def composition(atoms: Atoms) -> dict[str, int]:
    """Element counts of ``atoms``."""
    symbols, counts = np.unique(atoms.get_chemical_symbols(), return_counts=True)
    return {str(s): int(c) for s, c in zip(symbols, counts)}


def check_geometry(atoms: Atoms, min_distance_A: float = 0.7, name: str = "structure") -> None:
    """Raise InputError if two atoms overlap (closer than ``min_distance_A``, minimum image)."""
    from ase.neighborlist import neighbor_list

    i, j, d = neighbor_list("ijd", atoms, min_distance_A)
    if len(d):
        k = int(np.argmin(d))
        raise InputError(
            f"{name}: atoms {i[k]} ({atoms[i[k]].symbol}) and {j[k]} ({atoms[j[k]].symbol}) overlap at "
            f"{d[k]:.3f} A (expected >= {min_distance_A} A)"
        )
