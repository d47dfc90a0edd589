"""Finite FAPbBr3 nanocrystals cut from MD frames: the specimens of the synthetic 4D-STEM experiments.

A nanocrystal is the infinite crystal that an MD frame's periodic cell defines, cut to a
parallelepiped of ``n x n x n`` pseudo-cubic perovskite cells along the cell vectors (a cube for
the nearly cubic cells of FAPbBr3, [001] along the beam = MD z axis), and centred in an
orthorhombic box with ``vacuum_A`` of empty space on every side.

Cut rules (why: a crystal bounded by lattice planes, with whole molecules and whole formula units):

- Pb and Br atoms are kept by their own position, FA+ cations as whole molecules by their centre
  (mean of the 8 atoms, the molecule made whole across the periodic boundary first). Molecules
  are found by C-N, C-H and N-H bonds (minimum image) or taken from a ``fa_id`` array.
- Positions are measured in pseudo-cubic unit cells along each cell vector, ``u = s * reps``
  (``s`` scaled coordinates, ``reps`` the MD supercell). Along each axis the crystal keeps
  ``lo <= u < lo + n`` with ``lo`` a quarter cell below a Pb plane, so every face lies halfway
  between atomic planes and the crystal holds exactly ``n^3`` FAPbBr3 formula units per
  fully occupied MD cell content (one PbBr2- and one FABr-terminated face per axis). The edge
  is ``n`` cells, ``n = round(edge_A / a)``: within half a cell (one atomic plane spacing) of
  the requested edge.
- In the plane the crystal is centred on the scan region: ``scan_cells x scan_cells`` MD
  in-plane cells (a whole number of cells gives every averaged position the same number of
  contributions) starting at a lattice point equivalent to the MD cell origin, so scan
  position (iy, ix) of the nanocrystal sees the same column as position (iy mod n_y, ix mod
  n_x) of the periodic-cell simulation. The region must lie at least ``min_margin_A`` inside
  every face (a probe near the surface sees missing neighbours, and template matching assumes
  equivalent positions carry the same signal).

Several frames (frozen-phonon configurations) are cut with the same lattice sites (the atoms of
every frame are matched to the first one by index, across periodic boundaries), and placed in
one common box with the MD cell origin at the same point, so the scan region is the same for all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from ase import Atoms

from octastem.config import schema_defaults
from octastem.io import InputError
from octastem.potential import check_nearly_orthorhombic

#: Composition of one formamidinium cation CH(NH2)2+.
FA_FORMULA = {"C": 1, "H": 5, "N": 2}

#: Bond cutoffs (A) that group C, N and H atoms into FA molecules (bonds 1.0-1.35 A; the closest
#: intermolecular N-H and H-H contacts in FAPbBr3 are beyond 2 A).
BOND_CUTOFFS_A = {("C", "N"): 1.7, ("C", "H"): 1.4, ("N", "H"): 1.35}


@dataclass
class Nanocrystal:
    """Nanocrystal frames in one orthorhombic box and the scan region over its centre.

    ``frames``: one ase.Atoms per frozen-phonon configuration, arrays ``site`` (Pb, Br, FA) and
    ``fa_id`` (molecule index, -1 otherwise), ``info['time_fs']`` of the MD frame. Lengths in A.
    ``scan_start_A`` (x, y): box position of the MD cell origin where the scan starts;
    ``scan_period_A`` (Lx, Ly): in-plane MD cell lengths (mean over frames), the scan covers
    ``scan_cells`` periods along x and y. ``cells``: pseudo-cubic cells along a, b, c;
    ``lattice_A``: their mean spacings; ``edge_A``: cells * lattice_A; ``margin_A``: smallest
    distance between the scan region and a face of the crystal (in-plane).
    """

    frames: list[Atoms]
    scan_start_A: tuple[float, float]
    scan_period_A: tuple[float, float]
    scan_cells: float
    reps: tuple[int, int, int]
    cells: tuple[int, int, int]
    lattice_A: tuple[float, float, float]
    edge_A: tuple[float, float, float]
    vacuum_A: float
    margin_A: float
    info: dict = field(default_factory=dict)

    @property
    def box_A(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in self.frames[0].cell.lengths())


def fa_molecules(atoms: Atoms, name: str = "frame") -> np.ndarray:
    """FA molecule index of each atom (-1 for Pb, Br), from C-N, C-H and N-H bonds (minimum image).

    Raises InputError if a bonded group of C, N and H atoms is not one whole CH5N2 molecule.
    """
    from ase.neighborlist import neighbor_list
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    symbols = np.array(atoms.get_chemical_symbols())
    ids = np.full(len(atoms), -1, dtype=int)
    organic = np.flatnonzero(np.isin(symbols, list(FA_FORMULA)))
    if organic.size == 0:
        return ids
    sub = atoms[organic]
    sub.pbc = True
    cutoffs = {}
    for (a, b), r in BOND_CUTOFFS_A.items():
        cutoffs[(a, b)] = cutoffs[(b, a)] = r
    i, j = neighbor_list("ij", sub, cutoffs)
    graph = coo_matrix((np.ones(len(i)), (i, j)), shape=(len(sub), len(sub)))
    n, labels = connected_components(graph, directed=False)
    sub_symbols = symbols[organic]
    for k in range(n):
        members = sub_symbols[labels == k]
        found = {s: int((members == s).sum()) for s in FA_FORMULA}
        if found != FA_FORMULA:
            formula = "".join(f"{s}{c}" for s, c in found.items() if c)
            raise InputError(
                f"{name}: bonded organic group {formula} (atoms {organic[labels == k][:8].tolist()}) is not one "
                f"whole FA molecule CH5N2; expected {len(organic) // 8} separate molecules"
            )
    ids[organic] = labels
    return ids


def _check_frames(frames: Atoms | Sequence[Atoms]) -> list[Atoms]:
    frames = [frames] if isinstance(frames, Atoms) else list(frames)
    if not frames:
        raise InputError("nanocrystal: field 'frames' is empty; expected at least one MD frame")
    ref = frames[0]
    for k, f in enumerate(frames):
        if not isinstance(f, Atoms) or len(f) == 0:
            raise InputError(f"nanocrystal: frame {k} is not a non-empty ase.Atoms")
        if len(f) != len(ref) or not np.array_equal(f.numbers, ref.numbers):
            raise InputError(
                f"nanocrystal: frame {k} has other atoms than frame 0 ({len(f)} vs {len(ref)}); "
                "the frames must come from one trajectory"
            )
        check_nearly_orthorhombic(f.cell[:], f"nanocrystal: frame {k} cell")
    return frames


def _whole_units(atoms: Atoms, mol_ids: np.ndarray, unit: np.ndarray, n_units: int, anchor: np.ndarray):
    """Reference point of every unit (atom or whole molecule centre) and every atom's offset from it (A)."""
    from ase.geometry import find_mic

    pos = np.asarray(atoms.positions, dtype=float)
    whole = pos.copy()
    organic = mol_ids >= 0
    if organic.any():
        d = pos[organic] - pos[anchor[organic]]
        d, _ = find_mic(d, atoms.cell, pbc=True)
        whole[organic] = pos[anchor[organic]] + d
    counts = np.bincount(unit, minlength=n_units)
    ref = np.stack([np.bincount(unit, weights=whole[:, c], minlength=n_units) for c in range(3)], axis=1)
    ref /= counts[:, None]
    return ref, whole - ref[unit]


def build_nanocrystal(
    frames: Atoms | Sequence[Atoms],
    edge_A: float,
    vacuum_A: float | None = None,
    scan_cells: float | None = None,
    min_margin_A: float = 3.0,
    fa_id: np.ndarray | None = None,
    configurations: int | None = None,
) -> Nanocrystal:
    """Cut a cube nanocrystal of edge ``edge_A`` (A) from each MD frame; see the module docstring.

    ``configurations``: None cuts one crystal from each frame, every tile (copy of the MD cell) of
    it from that frame. A number builds that many crystals in which every tile comes from another
    frame of ``frames`` (:func:`tile_frames`): each tile a different MD snapshot, as the unit cells
    of a measured crystal are independent realisations of its thermal motion. The tiles are then
    placed on the mean cell of the frames (each frame's positions in its own scaled coordinates),
    so that they join without gaps; ``info['tile_frames']`` records the frame of every tile.

    ``frames``: periodic MD frames of one trajectory (same atoms, nearly orthorhombic cells, [001]
    along z). ``vacuum_A``: empty space between the outermost atoms and the box on every side.
    ``scan_cells``: MD in-plane cells per side of the central scan region. Unset, these two take
    the ``stem.nanocrystal`` defaults of the config schema. ``fa_id``: molecule index per atom
    (-1 for Pb/Br), e.g. from the start structure; default: found by bonding in the first frame.
    Raises InputError naming the field for bad settings.
    """
    defaults = schema_defaults("stem", "nanocrystal")
    vacuum_A = defaults["vacuum_A"] if vacuum_A is None else vacuum_A
    scan_cells = defaults["scan_cells"] if scan_cells is None else scan_cells
    frames = _check_frames(frames)
    scan_cells = _check_settings(edge_A, vacuum_A, scan_cells, min_margin_A)
    ref = frames[0]
    symbols = np.array(ref.get_chemical_symbols())
    reps = _supercell_reps(ref, symbols, edge_A)
    units = _units(ref, symbols, fa_id)
    offsets, scaled, cells = _unwrapped_units(frames, units)
    u0 = scaled[0] * reps
    lo, n_cells, lattice, margin_A, mean_cell = _crystal_range(
        u0, units.unit[symbols == "Pb"], cells, reps, edge_A, scan_cells, min_margin_A
    )
    sel_unit, tiles = _inside(u0, reps, lo, n_cells)
    atom, owner, site, fa_out = _unit_atoms(units, symbols, sel_unit)

    positions = []
    info = {"requested_edge_A": float(edge_A), "min_margin_A": float(min_margin_A)}
    sources = frames
    if configurations is None:
        for off, s, cell in zip(offsets, scaled, cells):
            ref_pos = s @ cell  # unwrapped onto frame 0's lattice sites
            positions.append(ref_pos[sel_unit][owner] + off[atom] + tiles[owner] @ cell)
    else:
        # every tile from its own frame, all on the mean cell (frames differ in strain, not in lattice)
        tile_ids, tile_of = np.unique(tiles, axis=0, return_inverse=True)
        tile_of = np.asarray(tile_of).reshape(-1)[owner]
        assign = tile_frames(len(frames), int(configurations), len(tile_ids))
        per_frame = [(s @ mean_cell)[sel_unit][owner] + off[atom] for off, s in zip(offsets, scaled)]
        shift_tiles = tiles[owner] @ mean_cell
        for row in assign:
            f_atom = row[tile_of]
            p = np.empty((atom.size, 3))
            for f in np.unique(f_atom):
                sel = f_atom == f
                p[sel] = per_frame[f][sel]
            positions.append(p + shift_tiles)
        sources = [frames[int(row[0])] for row in assign]
        info["tile_frames"] = assign.tolist()
        info["tile_times_fs"] = [
            [float(frames[int(f)].info.get("time_fs", float("nan"))) for f in row] for row in assign
        ]
    lo_xyz = np.min([p.min(axis=0) for p in positions], axis=0)
    hi_xyz = np.max([p.max(axis=0) for p in positions], axis=0)
    box = hi_xyz - lo_xyz + 2.0 * vacuum_A
    shift = vacuum_A - lo_xyz
    out = []
    for f, p in zip(sources, positions):
        a = Atoms(numbers=ref.numbers[atom], positions=p + shift, cell=box, pbc=False)
        a.set_array("site", site.astype("<U2"))
        a.set_array("fa_id", fa_out.astype(int))
        a.info["time_fs"] = float(f.info.get("time_fs", float("nan")))
        out.append(a)
    return Nanocrystal(
        frames=out,
        scan_start_A=(float(shift[0]), float(shift[1])),
        scan_period_A=(float(np.linalg.norm(mean_cell[0])), float(np.linalg.norm(mean_cell[1]))),
        scan_cells=scan_cells,
        reps=tuple(int(r) for r in reps),
        cells=tuple(int(n) for n in n_cells),
        lattice_A=tuple(float(v) for v in lattice),
        edge_A=tuple(float(n * a) for n, a in zip(n_cells, lattice)),
        vacuum_A=float(vacuum_A),
        margin_A=float(margin_A.min()),
        info=info,
    )


def tile_frames(n_frames: int, configurations: int, n_tiles: int) -> np.ndarray:
    """Frame index of every tile of every configuration, (configurations, n_tiles): the
    ``configurations * n_tiles`` slots run through the frames with a stride near ``n_frames`` / golden
    ratio and coprime to it, so that neighbouring tiles and successive configurations take frames far
    apart in time (less correlated), every frame is used as evenly as the counts allow, and tiles of
    one configuration repeat a frame only when there are fewer frames than tiles."""
    if n_frames < 1 or configurations < 1 or n_tiles < 1:
        raise InputError(
            f"nanocrystal: {configurations} configurations of {n_tiles} tiles from {n_frames} frames; each must be >= 1"
        )
    stride = max(1, round(n_frames * 0.6180339887))
    while math.gcd(stride, n_frames) != 1:
        stride += 1
    slots = np.arange(configurations * n_tiles)
    return ((slots * stride) % n_frames).reshape(configurations, n_tiles)


def _check_settings(edge_A, vacuum_A, scan_cells, min_margin_A) -> float:
    """Check the lengths (A) and the scan region; returns ``scan_cells`` as a float."""
    for key, value, positive in (
        ("edge_A", edge_A, True),
        ("vacuum_A", vacuum_A, False),
        ("min_margin_A", min_margin_A, False),
    ):
        number = isinstance(value, (int, float, np.floating, np.integer)) and math.isfinite(value)
        if not number or value < 0 or (positive and value == 0):
            raise InputError(
                f"nanocrystal: field '{key}' = {value!r}; expected a finite number {'>' if positive else '>='} 0 A"
            )
    if not (isinstance(scan_cells, (int, float, np.floating, np.integer)) and 0 < scan_cells < math.inf):
        raise InputError(f"nanocrystal: field 'scan_cells' = {scan_cells!r}; expected a positive number of MD cells")
    return float(scan_cells)


def _supercell_reps(ref: Atoms, symbols: np.ndarray, edge_A: float) -> np.ndarray:
    """Pseudo-cubic cells along each cell vector of frame 0: the supercell holds one Pb per cell."""
    n_pb = int((symbols == "Pb").sum())
    if n_pb == 0:
        raise InputError("nanocrystal: frame 0 has no Pb atom; expected a FAPbBr3 supercell")
    cell0 = np.asarray(ref.cell[:], dtype=float)
    a_pc = (abs(np.linalg.det(cell0)) / n_pb) ** (1.0 / 3.0)
    lengths0 = np.linalg.norm(cell0, axis=1)
    reps = np.maximum(1, np.round(lengths0 / a_pc)).astype(int)
    if int(np.prod(reps)) != n_pb:
        raise InputError(
            f"nanocrystal: frame 0 cell {np.round(lengths0, 2).tolist()} A with {n_pb} Pb atoms is not a "
            f"supercell of pseudo-cubic perovskite cells (reps {reps.tolist()} would hold {int(np.prod(reps))})"
        )
    if edge_A < lengths0.max() - 1e-6:
        raise InputError(
            f"nanocrystal: field 'edge_A' = {edge_A:g} A is smaller than one MD cell ({lengths0.max():.2f} A); "
            "the nanocrystal must hold at least one whole periodic cell"
        )
    return reps


@dataclass
class _Units:
    """The units a crystal is cut in: ``unit`` index per atom (Pb and Br atoms alone, FA molecules
    whole), the FA molecule index per atom (``mol_ids``, -1 otherwise), the atom each atom is made
    whole around (``anchor``: the C atom of its molecule, else itself) and which units are molecules."""

    mol_ids: np.ndarray
    unit: np.ndarray
    n_units: int
    anchor: np.ndarray
    is_molecule: np.ndarray


def _units(ref: Atoms, symbols: np.ndarray, fa_id: np.ndarray | None) -> _Units:
    """Every Pb/Br atom and every FA molecule (anchored on its C atom to make it whole) of frame 0."""
    if fa_id is None:
        mol_ids = fa_molecules(ref, name="nanocrystal: frame 0")
    else:
        mol_ids = np.asarray(fa_id, dtype=int)
        if mol_ids.shape != (len(ref),):
            raise InputError(f"nanocrystal: field 'fa_id' has shape {mol_ids.shape}; expected ({len(ref)},)")
        for m in np.unique(mol_ids[mol_ids >= 0]):
            members = symbols[mol_ids == m]
            if {s: int((members == s).sum()) for s in FA_FORMULA} != FA_FORMULA:
                raise InputError(f"nanocrystal: field 'fa_id': molecule {m} is not CH5N2")
    inorganic = np.flatnonzero(mol_ids < 0)
    unit = np.empty(len(ref), dtype=int)
    unit[inorganic] = np.arange(inorganic.size)
    _, mol_unit = np.unique(mol_ids[mol_ids >= 0], return_inverse=True)
    unit[mol_ids >= 0] = inorganic.size + mol_unit
    n_units = int(unit.max()) + 1
    anchor = np.arange(len(ref))
    for m in np.unique(mol_ids[mol_ids >= 0]):
        members = np.flatnonzero(mol_ids == m)
        anchor[members] = members[symbols[members] == "C"][0]
    is_molecule = np.zeros(n_units, dtype=bool)
    is_molecule[unit[mol_ids >= 0]] = True
    return _Units(mol_ids, unit, n_units, anchor, is_molecule)


def _unwrapped_units(frames: list[Atoms], units: _Units) -> tuple[list, list, list]:
    """Scaled unit positions of every frame, unwrapped onto frame 0 (atoms keep their lattice site).

    Returns, per frame, each atom's offset from its unit's reference point (A), the scaled unit
    positions and the cell matrix.
    """
    offsets, scaled, cells = [], [], []
    for f in frames:
        r, off = _whole_units(f, units.mol_ids, units.unit, units.n_units, units.anchor)
        cell = np.asarray(f.cell[:], dtype=float)
        s = np.linalg.solve(cell.T, r.T).T
        if not scaled:
            s = s - np.floor(s)
        else:
            s = s - np.round(s - scaled[0])
        offsets.append(off)
        scaled.append(s)
        cells.append(cell)
    return offsets, scaled, cells


def _crystal_range(u0, pb_units, cells, reps, edge_A, scan_cells, min_margin_A):
    """Crystal range in unit cells: faces a quarter cell from the Pb planes, centred on the scan region.

    ``u0``: frame 0's unit positions in pseudo-cubic cells. Returns the lower face ``lo`` and the
    cells ``n_cells`` per axis, the mean cell spacings (A), the in-plane margins (A) between the scan
    region and the faces, and the mean cell matrix over frames.
    """
    phase = np.angle(np.exp(2j * np.pi * u0[pb_units]).mean(axis=0)) / (2 * np.pi)  # Pb planes at phase + k
    mean_cell = np.mean(cells, axis=0)
    lattice = np.linalg.norm(mean_cell, axis=1) / reps
    n_cells = np.maximum(1, np.round(edge_A / lattice)).astype(int)
    span = np.array([scan_cells * reps[0], scan_cells * reps[1], 0], dtype=float)  # scan region [0, span)
    lo = phase - 0.25 + np.round(span / 2 - n_cells / 2 - (phase - 0.25))
    margin_cells = np.minimum(0.0 - lo, lo + n_cells - span)[:2]
    margin_A = margin_cells * lattice[:2]
    for axis, name in enumerate("xy"):
        if margin_A[axis] < min_margin_A - 1e-9:
            raise InputError(
                f"nanocrystal: field 'edge_A' = {edge_A:g} A: a crystal of {n_cells[axis]} cells "
                f"({n_cells[axis] * lattice[axis]:.1f} A) leaves {margin_A[axis]:.1f} A along {name} between the scan "
                f"region ({scan_cells:g} MD cells = {span[axis] * lattice[axis]:.1f} A, field 'scan_cells') and its "
                f"face; need >= {min_margin_A:g} A: enlarge edge_A or reduce scan_cells"
            )
    return lo, n_cells, lattice, margin_A, mean_cell


def _inside(u0: np.ndarray, reps: np.ndarray, lo: np.ndarray, n_cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (unit, MD-cell translation m) whose unit-cell position lies inside [lo, lo + n): units and m."""
    ranges = [
        np.arange(math.floor((lo[i] - reps[i]) / reps[i]), math.ceil((lo[i] + n_cells[i]) / reps[i]) + 1)
        for i in range(3)
    ]
    m_grid = np.stack(np.meshgrid(*ranges, indexing="ij"), axis=-1).reshape(-1, 3)
    u_all = u0[None, :, :] + (m_grid * reps)[:, None, :]
    inside = np.all((u_all >= lo) & (u_all < lo + n_cells), axis=2)
    sel_m, sel_unit = np.nonzero(inside)
    return sel_unit, m_grid[sel_m]


def _unit_atoms(units: _Units, symbols: np.ndarray, sel_unit: np.ndarray):
    """Atoms of the selected units (the members of a unit are contiguous after a stable sort).

    Returns the frame-0 atom index of every output atom, the selected unit it belongs to (index
    into ``sel_unit``), its site label (Pb, Br, FA) and its FA molecule index (-1 otherwise).
    """
    order = np.argsort(units.unit, kind="stable")
    counts = np.bincount(units.unit, minlength=units.n_units)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    per = counts[sel_unit]
    owner = np.repeat(np.arange(sel_unit.size), per)
    within = np.arange(per.sum()) - np.repeat(np.cumsum(per) - per, per)
    atom = order[starts[sel_unit][owner] + within]
    is_molecule = units.is_molecule[sel_unit][owner]
    site = np.where(is_molecule, "FA", symbols[atom])
    mol_index = np.cumsum(units.is_molecule[sel_unit]) - 1
    fa_out = np.where(is_molecule, mol_index[owner], -1)
    return atom, owner, site, fa_out
