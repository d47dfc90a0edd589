"""Training data for the CNN phase reconstruction: abTEM multislice over many crystal structures.

Each training example is one simulated 4D-STEM scan of a random crystal over its whole periodic
in-plane cell (multislice, frozen phonons), stored with the ground-truth phase of the same frames:

- structures: ASE prototypes (inorganic and hybrid perovskites, rock salt, fluorite, zinc blende,
  wurtzite, spinel, layered MX2 and CdI2 types, fcc/bcc/hcp metals) with random elements from
  per-prototype tables, lattice parameters jittered by +-3 %;
- orientation: a random low-index zone axis ([001], [110], [111] and their hexagonal analogues),
  made orthorhombic with :func:`abtem.atoms.orthogonalize_cell`;
- static distortions (:func:`static_distortion`, half of the scans by default): one species
  displaced alternately along the beam (split columns, as octahedral tilts make) or at random
  (static disorder), 0.05-0.3 A, so the network also sees elongated and two-lobe columns;
- thickness 6-40 A, energy 80/200/300 kV, convergence semi-angle 15-30 mrad, scan step
  0.2-0.45 A, frozen-phonon frames with anisotropic random displacements;
- dose: the patterns are stored noise free; Poisson noise at a random dose (10 e/A^2 to noise
  free) is drawn at training time (:class:`octastem.cnn.TrainingSet`), so every epoch sees new
  noise.

Held out: formamidinium lead bromide is never generated. The hybrid perovskite prototype uses
the methylammonium cation, and :func:`random_structure` refuses any structure that contains Pb,
Br, C, N and H together (:data:`HELD_OUT`), so neither FAPbBr3 nor its closest analogue MAPbBr3
is ever seen in training.

Shards are HDF5 files with one group per scan (``scan_00000``, ...): dataset ``patterns``
(scan_y, scan_x, n_k, n_k) float32 on the canonical detector grid of :mod:`octastem.cnn.input`
(fraction of the beam per bin), dataset ``phase`` (scan_y * f, scan_x * f) float32 (rad, zero
mean, band-limited to the aperture diameter 2 alpha / lambda, f = ``UPSAMPLE``) and the
calibration as attributes.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import h5py
import numpy as np
from ase import Atoms

from octastem.io import InputError, atomic_path, provenance
from octastem.rng import generator

from .input import UPSAMPLE, canonical_patterns, target_phase

PROTOTYPES = (
    "perovskite",
    "hybrid_perovskite",
    "rocksalt",
    "fluorite",
    "zincblende",
    "wurtzite",
    "spinel",
    "layered_mx2",
    "layered_cdi2",
    "fcc",
    "bcc",
    "hcp",
)

#: Element sets never generated: the held-out test material FAPbBr3.
HELD_OUT = ({"Pb", "Br", "C", "N", "H"},)

ENERGIES_EV = (80e3, 200e3, 300e3)

# (elements..., lattice parameter(s) A) per prototype; lattice parameters are jittered by +-3 %
_PEROVSKITE_A = ("Cs", "Rb", "K", "Sr", "Ba", "La")
_PEROVSKITE_B = ("Pb", "Sn", "Ti", "Zr", "Nb", "Ge")
_PEROVSKITE_X = {"O": 3.95, "F": 4.15, "Cl": 5.6, "Br": 5.9, "I": 6.3}
_HYBRID_B = ("Pb", "Sn", "Ge")
_HYBRID_X = {"Cl": 5.7, "Br": 5.95, "I": 6.33}
_ROCKSALT = (("Na", "Cl", 5.64), ("Mg", "O", 4.21), ("Pb", "Te", 6.46), ("K", "Br", 6.6), ("Ag", "Cl", 5.55))
_FLUORITE = (("Ca", "F", 5.46), ("Ce", "O", 5.41), ("U", "O", 5.47), ("Zr", "O", 5.07), ("Sr", "F", 5.8))
_ZINCBLENDE = (("Ga", "As", 5.65), ("Zn", "S", 5.41), ("Cd", "Te", 6.48), ("In", "P", 5.87), ("Si", "Si", 5.43))
_WURTZITE = (("Zn", "O", 3.25, 5.21), ("Ga", "N", 3.19, 5.19), ("Cd", "S", 4.14, 6.71), ("Al", "N", 3.11, 4.98))
_SPINEL = (("Mg", "Al", "O", 8.08), ("Zn", "Fe", "O", 8.44), ("Co", "Al", "O", 8.10))
_MX2 = (("Mo", "S", 3.16, 12.3), ("W", "Se", 3.28, 12.96), ("Nb", "Se", 3.44, 12.55), ("Mo", "Te", 3.52, 13.97))
_CDI2 = (("Pb", "I", 4.56, 6.98), ("Cd", "I", 4.24, 6.84), ("Sn", "S", 3.65, 5.9), ("Ti", "S", 3.41, 5.7))
_FCC = (("Au", 4.08), ("Pt", 3.92), ("Cu", 3.61), ("Al", 4.05), ("Pb", 4.95))
_BCC = (("Fe", 2.87), ("W", 3.16), ("Mo", 3.15), ("Nb", 3.30))
_HCP = (("Ti", 2.95, 4.68), ("Mg", 3.21, 5.21), ("Zn", 2.66, 4.95), ("Co", 2.51, 4.07))

CUBIC_AXES = ((0, 0, 1), (1, 1, 0), (1, 1, 1))
HEXAGONAL_AXES = ((0, 0, 1), (1, 0, 0), (1, 1, 0))

# in-plane cell lengths of a training scan (A): repeated up to at least MIN, refused above MAX
MIN_CELL_A, MAX_CELL_A = 7.0, 17.0
THICKNESS_RANGE_A = (6.0, 40.0)


def methylammonium() -> Atoms:
    """CH3NH3+ centred on the C-N midpoint, C-N along z (C-N 1.47 A, C-H 1.09 A, N-H 1.03 A)."""
    symbols, pos = ["C", "N"], [[0, 0, -0.735], [0, 0, 0.735]]
    for i in range(3):
        phi = 2 * np.pi * i / 3
        symbols.append("H")
        pos.append([1.03 * np.cos(phi), 1.03 * np.sin(phi), -0.735 - 0.36])
        symbols.append("H")
        pos.append([0.97 * np.cos(phi + np.pi / 3), 0.97 * np.sin(phi + np.pi / 3), 0.735 + 0.34])
    return Atoms(symbols, positions=np.array(pos, dtype=float))


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    a, b, c, d = q
    return np.array(
        [
            [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
            [2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b)],
            [2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d],
        ]
    )


def prototype_cell(name: str, rng: np.random.Generator) -> tuple[Atoms, str]:
    """Conventional cell of prototype ``name`` with random elements; returns (atoms, lattice system)."""
    from ase.build import bulk
    from ase.spacegroup import crystal

    jitter = 1.0 + rng.uniform(-0.03, 0.03)

    def pick(table):
        return table[rng.integers(len(table))]

    if name == "perovskite":
        x = pick(tuple(_PEROVSKITE_X))
        a = _PEROVSKITE_X[x] * jitter
        frac = [[0.5, 0.5, 0.5], [0, 0, 0], [0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5]]
        atoms = Atoms([pick(_PEROVSKITE_A), pick(_PEROVSKITE_B), x, x, x], scaled_positions=frac, cell=[a] * 3)
        return atoms, "cubic"
    if name == "hybrid_perovskite":
        x = pick(tuple(_HYBRID_X))
        a = _HYBRID_X[x] * jitter
        atoms = Atoms(
            [pick(_HYBRID_B), x, x, x],
            scaled_positions=[[0, 0, 0], [0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5]],
            cell=[a] * 3,
        )
        mol = methylammonium()
        mol.positions = mol.positions @ _random_rotation(rng).T + a / 2
        return atoms + mol, "cubic"
    if name == "rocksalt":
        m, x, a = pick(_ROCKSALT)
        return bulk(m + x if m != x else m, "rocksalt", a=a * jitter, cubic=True), "cubic"
    if name == "fluorite":
        m, x, a = pick(_FLUORITE)
        return bulk(m + x + "2", "fluorite", a=a * jitter, cubic=True), "cubic"
    if name == "zincblende":
        m, x, a = pick(_ZINCBLENDE)
        if m == x:
            return bulk(m, "diamond", a=a * jitter, cubic=True), "cubic"
        return bulk(m + x, "zincblende", a=a * jitter, cubic=True), "cubic"
    if name == "wurtzite":
        m, x, a, c = pick(_WURTZITE)
        return bulk(m + x, "wurtzite", a=a * jitter, c=c * jitter), "hexagonal"
    if name == "spinel":
        a_el, b_el, o_el, a = pick(_SPINEL)
        atoms = crystal(
            [a_el, b_el, o_el],
            basis=[(0.125, 0.125, 0.125), (0.5, 0.5, 0.5), (0.2625, 0.2625, 0.2625)],
            spacegroup=227,
            setting=2,
            cellpar=[a * jitter] * 3 + [90, 90, 90],
        )
        return atoms, "cubic"
    if name == "layered_mx2":
        m, x, a, c = pick(_MX2)
        atoms = crystal(
            [m, x],
            basis=[(1 / 3, 2 / 3, 0.25), (1 / 3, 2 / 3, 0.621)],
            spacegroup=194,
            cellpar=[a * jitter, a * jitter, c, 90, 90, 120],
        )
        return atoms, "hexagonal"
    if name == "layered_cdi2":
        m, x, a, c = pick(_CDI2)
        atoms = crystal(
            [m, x],
            basis=[(0, 0, 0), (1 / 3, 2 / 3, 0.25)],
            spacegroup=164,
            cellpar=[a * jitter, a * jitter, c, 90, 90, 120],
        )
        return atoms, "hexagonal"
    if name == "fcc":
        m, a = pick(_FCC)
        return bulk(m, "fcc", a=a * jitter, cubic=True), "cubic"
    if name == "bcc":
        m, a = pick(_BCC)
        return bulk(m, "bcc", a=a * jitter, cubic=True), "cubic"
    if name == "hcp":
        m, a, c = pick(_HCP)
        return bulk(m, "hcp", a=a * jitter, c=c * jitter), "hexagonal"
    raise InputError(f"cnn_data: unknown prototype {name!r}; expected one of {list(PROTOTYPES)}")


def orient(atoms: Atoms, axis: tuple[int, int, int]) -> Atoms:
    """``atoms`` with the lattice plane normal (h, k, l) along z, in an orthorhombic periodic cell.

    Raises InputError if no orthorhombic cell of at most 5 repetitions exists or it is larger
    than :data:`MAX_CELL_A` in plane.
    """
    from abtem.atoms import orthogonalize_cell
    from ase.build import surface

    if tuple(axis) == (0, 0, 1) and np.allclose(atoms.cell.angles(), 90.0):
        out = atoms.copy()
    else:
        slab = surface(atoms, tuple(int(i) for i in axis), layers=1, periodic=True)
        try:
            out = orthogonalize_cell(slab, max_repetitions=5)
        except Exception as e:  # abTEM raises plain RuntimeError when no orthogonal cell is found
            raise InputError(f"cnn_data: no orthorhombic cell along {axis}: {e}") from e
    lengths = out.cell.lengths()
    if not np.allclose(out.cell.angles(), 90.0, atol=0.5) or max(lengths[:2]) > MAX_CELL_A:
        raise InputError(f"cnn_data: oriented cell along {axis} is not small and orthorhombic: {lengths}")
    out.pbc = True
    out.wrap()
    return out


def random_structure(rng: np.random.Generator, prototype: str | None = None) -> tuple[Atoms, dict]:
    """A random oriented supercell (>= MIN_CELL_A in plane, 6-40 A thick) and a description dict."""
    for _ in range(50):
        name = prototype or PROTOTYPES[rng.integers(len(PROTOTYPES))]
        cell, system = prototype_cell(name, rng)
        axes = CUBIC_AXES if system == "cubic" else HEXAGONAL_AXES
        axis = axes[rng.integers(len(axes))]
        try:
            oriented = orient(cell, axis)
        except InputError:
            continue
        lengths = oriented.cell.lengths()
        thickness = rng.uniform(*THICKNESS_RANGE_A)
        reps = (
            max(1, math.ceil(MIN_CELL_A / lengths[0])),
            max(1, math.ceil(MIN_CELL_A / lengths[1])),
            max(1, round(thickness / lengths[2])),
        )
        if max(reps[0] * lengths[0], reps[1] * lengths[1]) > MAX_CELL_A:
            continue
        atoms = oriented.repeat(reps)
        symbols = set(atoms.get_chemical_symbols())
        if any(held <= symbols for held in HELD_OUT):
            continue
        info = {
            "prototype": name,
            "formula": cell.get_chemical_formula(),
            "zone_axis": list(axis),
            "cell_A": [float(v) for v in atoms.cell.lengths()],
            "n_atoms": len(atoms),
        }
        return atoms, info
    raise RuntimeError("cnn_data: could not draw a structure in 50 tries")


#: static displacement amplitudes (A) of :func:`static_distortion`
STATIC_AMPLITUDE_A = (0.05, 0.3)
STATIC_MODES = ("split", "random")


def static_distortion(atoms: Atoms, rng: np.random.Generator) -> tuple[Atoms, dict]:
    """Static in-plane displacements of one species (the same in every frozen-phonon frame).

    Crystals in the field are rarely ideal: octahedral tilts move the anions of a perovskite
    off the Pb-X-Pb line, alternately along the beam, and static disorder spreads the atoms of
    a column. Projected, both make elongated or split columns, which frozen-phonon blur alone
    does not produce. A species drawn at random (not hydrogen) is displaced by an amplitude drawn from
    :data:`STATIC_AMPLITUDE_A`, in one of two modes: ``split``, every column gets a random
    in-plane direction and its atoms, in order along the beam, move by +-amplitude alternately
    (a two-lobe column, as tilts make); ``random``, every atom moves by a Gaussian in-plane
    vector of rms ``amplitude`` per axis (static disorder). Returns (distorted copy, description).
    """
    out = atoms.copy()
    symbols = np.array(out.get_chemical_symbols())
    species = sorted(set(symbols) - {"H"}) or ["H"]  # hydrogen barely scatters
    sp = str(species[rng.integers(len(species))])
    amp = float(rng.uniform(*STATIC_AMPLITUDE_A))
    mode = STATIC_MODES[rng.integers(len(STATIC_MODES))]
    idx = np.flatnonzero(symbols == sp)
    pos = out.positions
    if mode == "split":
        # columns: the same in-plane position (to 0.2 A, periodic in the cell)
        lx, ly = out.cell.lengths()[:2]
        key = np.round(np.column_stack([pos[idx, 0] % lx, pos[idx, 1] % ly]) / 0.2).astype(int)
        key[:, 0] %= max(1, round(lx / 0.2))
        key[:, 1] %= max(1, round(ly / 0.2))
        _, column = np.unique(key, axis=0, return_inverse=True)
        column = column.ravel()
        for c in range(column.max() + 1):
            members = idx[column == c]
            members = members[np.argsort(pos[members, 2])]
            phi = rng.uniform(0, 2 * np.pi)
            sign = np.where(np.arange(len(members)) % 2 == 0, 1.0, -1.0)
            pos[members, 0] += amp * sign * np.cos(phi)
            pos[members, 1] += amp * sign * np.sin(phi)
    else:
        pos[idx, :2] += rng.normal(size=(len(idx), 2)) * amp
    out.positions = pos
    out.wrap()
    return out, {"static_species": sp, "static_amplitude_A": amp, "static_mode": mode}


def frozen_phonon_frames(atoms: Atoms, n_frames: int, rng: np.random.Generator) -> list[Atoms]:
    """``n_frames`` copies with Gaussian displacements of random anisotropic rms (0.03-0.12 A per axis)."""
    sigma = rng.uniform(0.03, 0.12, size=3)
    frames = []
    for _ in range(n_frames):
        f = atoms.copy()
        f.positions = f.positions + rng.normal(size=f.positions.shape) * sigma
        f.wrap()
        frames.append(f)
    return frames


def simulate_scan(
    frames: list[Atoms],
    energy_eV: float,
    semiangle_mrad: float,
    scan_step_A: float,
    sampling_A: float | None = None,
    slice_thickness_A: float = 2.0,
    max_angle_mrad: float | None = None,
) -> dict:
    """Eager abTEM multislice 4D-STEM over the whole periodic cell of ``frames`` and its true phase.

    Same conventions as :func:`octastem.stem.simulate_4dstem` (patterns (scan_y, scan_x, k_y, k_x)
    of odd size with the optical axis at n // 2, fraction of the beam per pixel), computed on an
    explicitly built potential (about 10x faster than the lazy graph for small cells). Returns a
    dict with ``data``, ``k_sampling_x_mrad``, ``k_sampling_y_mrad``, ``steps_A`` (x, y),
    ``scan_shape`` (ny, nx), ``phase_fine`` (the frame-averaged projected potential times the
    interaction constant, rad, (y, x) on the simulation grid) and ``cell_A``.
    """
    from octastem.io import import_abtem

    abtem = import_abtem()
    from abtem.core.energy import energy2sigma, energy2wavelength

    from octastem.potential import common_frames, grid_gpts
    from octastem.stem.simulate import _symmetric_crop

    frames, lengths = common_frames(frames)
    wavelength = energy2wavelength(energy_eV)
    if max_angle_mrad is None:
        max_angle_mrad = 2.2 * semiangle_mrad
    if sampling_A is None:
        # anti-aliasing limit (2/3 of Nyquist) just above max_angle
        sampling_A = min(0.1, (2.0 / 3.0) * wavelength / (2.0 * 1.02 * max_angle_mrad * 1e-3))
    gpts = grid_gpts(lengths[:2], sampling_A)
    potential = abtem.Potential(frames, gpts=gpts, slice_thickness=slice_thickness_A, projection="infinite")
    built = potential.build().compute(progress_bar=False)
    slices = np.asarray(built.array)  # (frames, slices, x, y) eV*A
    phase_fine = energy2sigma(energy_eV) * slices.sum(axis=1).mean(axis=0).T
    n_scan = tuple(max(1, round(length / scan_step_A)) for length in lengths[:2])
    steps = (lengths[0] / n_scan[0], lengths[1] / n_scan[1])
    probe = abtem.Probe(energy=energy_eV, semiangle_cutoff=semiangle_mrad)
    probe.grid.match(built)
    scan = abtem.GridScan(start=(0.0, 0.0), end=(lengths[0], lengths[1]), gpts=n_scan, endpoint=False)
    measurement = probe.scan(built, scan=scan, detectors=abtem.PixelatedDetector(max_angle=max_angle_mrad))
    if hasattr(measurement, "compute"):
        measurement = measurement.compute(progress_bar=False)
    array = np.asarray(measurement.array, dtype=np.float64)
    if array.ndim == 5:  # frozen-phonon axis left in place
        array = array.mean(axis=0)
    data = _symmetric_crop(np.transpose(array, (1, 0, 3, 2))).astype(np.float32)
    k_sampling = [float(v) for v in measurement.angular_sampling]
    return {
        "data": data,
        "k_sampling_x_mrad": k_sampling[0],
        "k_sampling_y_mrad": k_sampling[1],
        "steps_A": steps,
        "scan_shape": (n_scan[1], n_scan[0]),
        "phase_fine": phase_fine.astype(np.float64),
        "cell_A": (float(lengths[0]), float(lengths[1])),
        "wavelength_A": float(wavelength),
    }


def random_example(
    rng: np.random.Generator,
    n_frames: int = 2,
    static_rng: np.random.Generator | None = None,
    static_fraction: float = 0.0,
) -> dict:
    """One random training scan: structure, optics, simulation, canonical patterns and target phase.

    With ``static_rng``, a fraction ``static_fraction`` of the structures get a
    :func:`static_distortion` drawn from it (a separate stream, so the structures and optics
    drawn from ``rng`` do not depend on it)."""
    atoms, info = random_structure(rng)
    energy = float(ENERGIES_EV[rng.integers(len(ENERGIES_EV))]) if rng.random() < 0.6 else 300e3
    semiangle = float(rng.uniform(15.0, 30.0))
    step = float(rng.uniform(0.2, 0.45))
    if static_rng is not None and static_rng.random() < static_fraction:
        atoms, static = static_distortion(atoms, static_rng)
        info.update(static)
    frames = frozen_phonon_frames(atoms, n_frames, rng)
    sim = simulate_scan(frames, energy, semiangle, step)
    patterns = canonical_patterns(sim["data"], sim["k_sampling_x_mrad"], sim["k_sampling_y_mrad"], semiangle)
    ny, nx = sim["scan_shape"]
    phase = target_phase(sim["phase_fine"], (ny * UPSAMPLE, nx * UPSAMPLE), sim["cell_A"], energy, semiangle)
    info.update(
        energy_eV=energy,
        semiangle_mrad=semiangle,
        scan_step_x_A=float(sim["steps_A"][0]),
        scan_step_y_A=float(sim["steps_A"][1]),
        thickness_A=float(atoms.cell.lengths()[2]),
        n_frames=n_frames,
    )
    return {"patterns": patterns, "phase": phase, "info": info}


def write_shard(
    path: str | os.PathLike,
    n_scans: int,
    seed: int,
    n_frames: int | None = None,
    progress: bool = False,
    static_fraction: float | None = None,
) -> dict:
    """Generate ``n_scans`` random training scans with ``generator(seed, "cnn_training_set")`` into an HDF5 shard.

    A fraction ``static_fraction`` of them carry a :func:`static_distortion` (drawn from
    ``generator(seed, "cnn_training_set", 1)``; with 0 the shard is that of the frozen-phonon-only
    generator of the same seed). ``n_frames`` and ``static_fraction`` default to the schema's
    ``cnn.frames`` and ``cnn.static_fraction``.

    Returns a summary (number of scans and positions, prototypes drawn, seconds).
    """
    import time

    from tqdm.auto import tqdm

    from octastem.config import schema_defaults

    settings = schema_defaults("cnn")
    n_frames = settings["frames"] if n_frames is None else n_frames
    static_fraction = settings["static_fraction"] if static_fraction is None else static_fraction
    if n_scans < 1:
        raise InputError(f"cnn_data: n_scans must be >= 1, got {n_scans}")
    if not 0.0 <= static_fraction <= 1.0:
        raise InputError(f"cnn_data: static_fraction must be in [0, 1], got {static_fraction}")
    rng = generator(seed, "cnn_training_set")
    static_rng = generator(seed, "cnn_training_set", 1)
    t0 = time.perf_counter()
    counts: dict[str, int] = {}
    n_positions = n_static = 0
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["provenance"] = provenance(
            seed=seed, n_scans=n_scans, n_frames=n_frames, static_fraction=static_fraction
        )
        for i in tqdm(range(n_scans), desc=f"shard {Path(path).name}", unit="scan", disable=not progress):
            ex = random_example(rng, n_frames=n_frames, static_rng=static_rng, static_fraction=static_fraction)
            g = f.create_group(f"scan_{i:05d}")
            g.create_dataset("patterns", data=ex["patterns"], compression="gzip", compression_opts=1)
            g.create_dataset("phase", data=ex["phase"])
            for k, v in ex["info"].items():
                g.attrs[k] = v
            counts[ex["info"]["prototype"]] = counts.get(ex["info"]["prototype"], 0) + 1
            n_static += "static_mode" in ex["info"]
            n_positions += ex["patterns"].shape[0] * ex["patterns"].shape[1]
    return {
        "path": str(path),
        "seed": int(seed),
        "n_scans": int(n_scans),
        "n_positions": int(n_positions),
        "prototypes": counts,
        "n_static_distortion": int(n_static),
        "seconds": time.perf_counter() - t0,
    }
