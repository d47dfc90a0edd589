"""Neighbour lists kept across MD steps, and a MACE calculator that uses one.

:class:`VerletList` builds a candidate pair list once with a cutoff widened by a skin and, at
each later call, keeps the pairs of it that lie within the cutoff; it rebuilds the candidates only
when the atoms or the cell moved far enough that a pair outside them could have come within the
cutoff. The pairs it returns are those a full rebuild would find -- every ``(i, j, S)`` with
``|r_j - r_i + S cell| < cutoff``, without an atom's own zero-shift image -- in a fixed order
(sorted by ``i``, ``j``, then ``S``) and selected by a fixed float64 formula, so they depend only
on the current positions and cell, never on when the candidates were built: an MD run resumed
from a checkpoint sees the same edges as the run it continues.

:class:`MACEVerletCalculator` evaluates the model of a :class:`mace.calculators.MACECalculator`
on the edges of a :class:`VerletList`, with the model's input built directly from the atoms
(MACE's own calculator rebuilds the neighbour list and a whole ``AtomicData`` graph every call).
It is the calculator :func:`octastem.md.run_npt` runs the dynamics with.
"""

from __future__ import annotations

import numpy as np
from ase.calculators.calculator import Calculator, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

#: Default skin (A) added to the cutoff for the candidate pairs.
SKIN_A = 1.0


class VerletList:
    """Pairs within ``cutoff`` (A) of periodic atoms, from candidates within ``cutoff + skin``.

    The candidates stay valid while ``(cutoff + skin) * s_min(F) - 2 max_i |u_i| > cutoff``, where
    ``F = cell_0^-1 cell`` is the cell's deformation since the build, ``s_min`` its smallest
    singular value and ``u_i = r_i - r_i,0 F`` the displacement of atom ``i`` beyond the affine
    one: then no pair farther apart than ``cutoff + skin`` at the build is within ``cutoff`` now.
    ``builds`` counts the builds.
    """

    def __init__(self, cutoff: float, skin: float = SKIN_A):
        if not cutoff > 0 or not skin >= 0:
            raise ValueError(f"VerletList: cutoff={cutoff} must be > 0 and skin={skin} >= 0")
        self.cutoff = float(cutoff)
        self.skin = float(skin)
        self.builds = 0
        self._ref = None  # (positions, cell, inverse cell, numbers) at the last build
        self._pairs = None  # candidate (i, j, S)

    def _valid(self, positions: np.ndarray, cell: np.ndarray, numbers: np.ndarray) -> bool:
        if self._ref is None:
            return False
        p0, c0, c0_inv, n0 = self._ref
        if positions.shape != p0.shape or not np.array_equal(numbers, n0):
            return False
        deformation = c0_inv @ cell
        s_min = np.linalg.svd(deformation, compute_uv=False)[-1]
        u_max = np.sqrt((((positions - p0 @ deformation) ** 2).sum(1)).max()) if len(positions) else 0.0
        return (self.cutoff + self.skin) * s_min - 2.0 * u_max > self.cutoff

    def _build(self, positions: np.ndarray, cell: np.ndarray, numbers: np.ndarray) -> None:
        from matscipy.neighbours import neighbour_list

        i, j, shifts = neighbour_list(
            "ijS", positions=positions, cell=cell, pbc=np.ones(3, bool), cutoff=self.cutoff + self.skin
        )
        keep = ~((i == j) & ~shifts.any(axis=1))
        i, j, shifts = i[keep], j[keep], shifts[keep]
        order = np.lexsort((shifts[:, 2], shifts[:, 1], shifts[:, 0], j, i))
        self._pairs = (i[order].astype(np.int64), j[order].astype(np.int64), shifts[order].astype(np.float64))
        self._ref = (positions.copy(), cell.copy(), np.linalg.inv(cell), numbers.copy())
        self.builds += 1

    def pairs(self, positions, cell, numbers) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(i, j, S)`` of the pairs within the cutoff: int64 (E,), int64 (E,), float64 (E, 3)."""
        positions = np.asarray(positions, dtype=np.float64)
        cell = np.asarray(cell, dtype=np.float64)
        numbers = np.asarray(numbers)
        if not self._valid(positions, cell, numbers):
            self._build(positions, cell, numbers)
        i, j, shifts = self._pairs
        d = positions[j] - positions[i] + shifts @ cell
        within = np.einsum("ij,ij->i", d, d) < self.cutoff**2
        return i[within], j[within], shifts[within]


def _eligible(calc) -> bool:
    """Whether ``calc`` is a plain single-model MACE calculator :class:`MACEVerletCalculator` can run."""
    try:
        from mace.calculators import MACECalculator
    except ImportError:
        return False
    if not isinstance(calc, MACECalculator):
        return False
    model = calc.models[0]
    return (
        len(calc.models) == 1
        and calc.model_type == "MACE"
        and not getattr(calc, "use_compile", False)
        and not getattr(calc, "pad_num_atoms", 0)
        and not getattr(calc, "pad_num_edges", 0)
        and not getattr(calc, "compute_atomic_stresses", False)
        and not hasattr(model, "joint_embedding")
        and calc.energy_units_to_eV == 1.0
        and calc.length_units_to_A == 1.0
    )


class MACEVerletCalculator(Calculator):
    """Energy, forces and stress of the model of the MACE calculator ``mace_calc`` on a Verlet list.

    The model gets the same inputs as from ``mace_calc`` (float32 or float64 as its parameters,
    one-hot species, shifts ``S cell``) except the order of the edges, so the results agree with
    ``mace_calc``'s to float round-off. Periodic cells only. ``skin``: see :class:`VerletList`.
    ``torch_threads`` is carried over from ``mace_calc``.
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress"]

    def __init__(self, mace_calc, skin: float = SKIN_A):
        if not _eligible(mace_calc):
            raise ValueError(f"MACEVerletCalculator: {type(mace_calc).__name__} is not a single-model MACE calculator")
        Calculator.__init__(self)
        import torch

        self._torch = torch
        self.mace = mace_calc
        self.model = mace_calc.models[0]
        self.device = mace_calc.device
        self.dtype = next(self.model.parameters()).dtype
        self.torch_threads = getattr(mace_calc, "torch_threads", None)
        self.neighbours = VerletList(float(mace_calc.r_max), skin)
        heads = list(mace_calc.available_heads)
        self._head = heads.index(mace_calc.head) if mace_calc.head in heads else len(heads) - 1
        self._species = None  # (numbers, the inputs that depend on them only)

    def _species_inputs(self, numbers: np.ndarray) -> dict:
        torch = self._torch
        if self._species is None or not np.array_equal(self._species[0], numbers):
            table = {int(z): k for k, z in enumerate(self.mace.z_table.zs)}
            try:
                index = torch.tensor([table[int(z)] for z in numbers], dtype=torch.long)
            except KeyError as e:
                raise ValueError(f"MACEVerletCalculator: element Z={e.args[0]} not covered by the model") from e
            one_hot = torch.nn.functional.one_hot(index, len(table)).to(self.dtype)
            n = len(numbers)
            fixed = dict(
                node_attrs=one_hot,
                batch=torch.zeros(n, dtype=torch.long),
                ptr=torch.tensor([0, n], dtype=torch.long),
                head=torch.tensor([self._head], dtype=torch.long),
            )
            self._species = (numbers.copy(), {k: v.to(self.device) for k, v in fixed.items()})
        return self._species[1]

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        Calculator.calculate(self, atoms, properties, system_changes)
        torch = self._torch
        atoms = self.atoms
        if not atoms.pbc.all():
            raise ValueError("MACEVerletCalculator: periodic cells only")
        positions = atoms.positions
        cell = atoms.cell.array
        i, j, unit_shifts = self.neighbours.pairs(positions, cell, atoms.numbers)
        shifts = unit_shifts @ cell

        def tensor(a, dtype=self.dtype):
            return torch.from_numpy(np.ascontiguousarray(a)).to(device=self.device, dtype=dtype)

        data = dict(self._species_inputs(atoms.numbers))
        data.update(
            positions=tensor(positions),
            cell=tensor(cell),
            edge_index=tensor(np.stack((i, j)), torch.long),
            shifts=tensor(shifts),
            unit_shifts=tensor(unit_shifts),
        )
        out = self.model(data, compute_stress=True, training=False)
        self.results = {
            "energy": out["energy"].detach()[0].item(),
            "forces": out["forces"].detach().cpu().numpy(),
            "stress": full_3x3_to_voigt_6_stress(out["stress"].detach()[0].cpu().numpy()),
            "energies": out["node_energy"].detach().cpu().numpy(),
        }
        self.results["free_energy"] = self.results["energy"]


def verlet_calculator(calc, skin: float = SKIN_A):
    """``calc`` run on a Verlet list (:class:`MACEVerletCalculator`) where it is a plain MACE
    calculator, else ``calc`` itself."""
    return MACEVerletCalculator(calc, skin) if _eligible(calc) else calc
