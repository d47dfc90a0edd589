"""Nanocrystal specimens cut from MD frames: geometry, whole molecules, vacuum, frames, and their 4D-STEM."""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest

from octastem import io, stages
from octastem.io import InputError, read_4dstem
from octastem.stem import (
    antialias_sampling_A,
    build_nanocrystal,
    center_of_mass,
    fa_molecules,
    simulate_4dstem,
    virtual_image,
)
from octastem.structure import build_fapbbr3, composition

A = 6.0
# small, fast optics: 40 mrad detector -> 0.16 A potential sampling, 2 A slices, 0.5 A scan step
OPTICS = {
    "energy_eV": 300e3,
    "semiangle_mrad": 20.0,
    "max_angle_mrad": 40.0,
    "scan_step_A": 0.5,
    "slice_thickness_A": 2.0,
}


def md_frames(reps=(2, 2, 1), n=2, seed=0):
    """Thermal-like frames of one 'trajectory': rattled copies of the ideal supercell, unwrapped like MD
    positions (one molecule of frame 0 straddles the cell boundary, one of frame 1 sits a cell further)."""
    ideal = build_fapbbr3(reps, A)
    rng = np.random.default_rng(seed)
    frames = []
    for k in range(n):
        f = ideal.copy()
        f.positions += rng.normal(0.0, 0.08, f.positions.shape)
        f.info["time_fs"] = 10.0 * k
        frames.append(f)
    mol0 = np.flatnonzero(ideal.arrays["fa_id"] == 0)
    frames[0].positions[mol0[:3]] += frames[0].cell[0]  # split across the boundary
    if n > 1:
        frames[1].positions[mol0] -= frames[1].cell[1]  # whole, one cell away
    for f in frames:
        del f.arrays["fa_id"], f.arrays["site"]  # MD frames carry no molecule identity
    return frames


def write_trajectory(path, frames):
    """The frames as an MD trajectory file (numbers, time_fs from the frames' info, positions, cell)."""
    with h5py.File(path, "w") as f:
        f["numbers"] = frames[0].numbers
        f["time_fs"] = np.array([a.info["time_fs"] for a in frames])
        f["positions"] = np.stack([a.positions for a in frames])
        f["cell"] = np.stack([a.cell[:] for a in frames])
    return path


@pytest.fixture(scope="module")
def crystal():
    return build_nanocrystal(md_frames(), edge_A=24.0, vacuum_A=4.0, scan_cells=1)


def test_cube_has_the_requested_edge(crystal):
    assert crystal.cells == (4, 4, 4) and crystal.reps == (2, 2, 1)
    frame = crystal.frames[0]
    heavy = np.isin(frame.symbols, ["Pb", "Br"])
    extent = np.ptp(frame.positions[heavy], axis=0)
    # faces lie halfway between atomic planes (a/2 apart): outermost planes span edge - a/2
    assert np.all(np.abs(extent + A / 2 - 24.0) < 0.6), extent
    # an edge between whole cells is rounded to the nearest whole cell: within one plane spacing
    other = build_nanocrystal(md_frames(n=1), edge_A=26.0, vacuum_A=4.0, scan_cells=1.0)
    assert other.cells == (4, 4, 4) and abs(other.edge_A[0] - 26.0) <= A / 2


def test_whole_molecules_and_stoichiometry(crystal):
    n_cells = int(np.prod(crystal.cells))
    for frame in crystal.frames:
        expected = {"Pb": n_cells, "Br": 3 * n_cells, "C": n_cells, "N": 2 * n_cells, "H": 5 * n_cells}
        assert composition(frame) == expected
        fa = frame.arrays["fa_id"]
        assert len(np.unique(fa[fa >= 0])) == n_cells
        symbols = np.array(frame.symbols)
        for m in np.unique(fa[fa >= 0]):
            members = fa == m
            assert sorted(symbols[members]) == ["C", "H", "H", "H", "H", "H", "N", "N"]
            c = frame.positions[members & (symbols == "C")][0]
            assert np.linalg.norm(frame.positions[members] - c, axis=1).max() < 2.5  # not broken
        assert np.all((fa >= 0) == (frame.arrays["site"] == "FA"))
        # the molecules found by bonding in the finite crystal are the recorded ones
        found = fa_molecules(frame)
        assert len(np.unique(found[found >= 0])) == n_cells


def test_vacuum_on_every_side(crystal):
    box = np.array(crystal.box_A)
    for frame in crystal.frames:
        assert np.allclose(frame.cell[:], np.diag(box)) and not frame.pbc.any()
        lo, hi = frame.positions.min(axis=0), frame.positions.max(axis=0)
        assert np.all(lo >= 4.0 - 0.5) and np.all(box - hi >= 4.0 - 0.5)
    every = np.concatenate([f.positions for f in crystal.frames])
    assert np.allclose(every.min(axis=0), 4.0) and np.allclose(box - every.max(axis=0), 4.0)


def test_each_configuration_is_its_own_frame():
    first = md_frames(n=1)[0]
    second = first.copy()
    second.info["time_fs"] = 10.0
    second.positions[np.array(second.symbols) == "Pb"] += [0.2, 0.0, 0.0]
    second.positions[np.array(second.symbols) == "Br"] -= second.cell[2]  # unwrapped a cell away: same sites
    nc = build_nanocrystal([first, second], edge_A=24.0, vacuum_A=4.0, scan_cells=1)
    f0, f1 = nc.frames
    assert [f0.info["time_fs"], f1.info["time_fs"]] == [0.0, 10.0]
    assert np.array_equal(f0.numbers, f1.numbers)  # the same lattice sites in every frame
    symbols = np.array(f0.symbols)
    # each site holds the same atom in both frames, carrying that frame's own positions
    assert np.allclose(f1.positions[symbols == "Pb"] - f0.positions[symbols == "Pb"], [0.2, 0.0, 0.0])
    assert np.allclose(f1.positions[symbols != "Pb"], f0.positions[symbols != "Pb"])


def test_stage_uses_a_different_md_frame_per_configuration(tmp_path, monkeypatch):
    frames = md_frames(n=4)
    traj = write_trajectory(tmp_path / "trajectory.h5", frames)
    seen = {}

    def fake(nc_frames, **kwargs):
        seen["frames"], seen["kwargs"] = nc_frames, kwargs
        extra = {"scan_shape": [2, 2], "sampling_A": 0.16}
        return io.Stem4D(np.zeros((2, 2, 3, 3), np.float32), 300e3, 20.0, 0.5, 1.0, math.inf, extra=extra)

    monkeypatch.setattr("octastem.stem.simulate_4dstem", fake)
    out = tmp_path / "nc.h5"
    stage = dict(
        trajectory=traj,
        output=out,
        structure_output=tmp_path / "nc.extxyz",
        start_fs=10.0,
        frames=2,
        edge_A=24.0,
        vacuum_A=4.0,
        scan_cells=1,
    )
    stages.simulate_nanocrystal(**stage, tiles="same")
    assert [a.info["time_fs"] for a in seen["frames"]] == [10.0, 30.0]
    assert not np.allclose(seen["frames"][0].positions, seen["frames"][1].positions)
    assert seen["kwargs"]["specimen"] == "finite" and seen["kwargs"]["scan_periods"] == 1
    assert read_4dstem(out).extra["times_fs"] == [10.0, 30.0]
    # distinct tiles (the default): every frame of the window is used, each configuration mixes them
    stages.simulate_nanocrystal(**stage)
    extra = read_4dstem(out).extra
    assert extra["times_fs"] == [10.0, 20.0, 30.0] and extra["nanocrystal_tiles"] == "distinct"
    assert extra["n_snapshots"] == 3 and len(seen["frames"]) == 2


def test_bad_inputs_name_the_field():
    frames = md_frames(n=1)
    with pytest.raises(InputError, match="edge_A.*smaller than one MD cell"):
        build_nanocrystal(frames, edge_A=10.0)
    with pytest.raises(InputError, match="edge_A"):
        build_nanocrystal(frames, edge_A=-5.0)
    with pytest.raises(InputError, match="vacuum_A"):
        build_nanocrystal(frames, edge_A=24.0, vacuum_A=-1.0)
    with pytest.raises(InputError, match="scan_cells"):
        build_nanocrystal(frames, edge_A=24.0, scan_cells=2)  # a 24 A scan inside a 24 A crystal
    with pytest.raises(InputError, match="scan_cells"):
        build_nanocrystal(frames, edge_A=24.0, scan_cells=0)
    broken = frames[0].copy()
    del broken[int(np.flatnonzero(np.array(broken.symbols) == "H")[0])]
    with pytest.raises(InputError, match="CH5N2"):
        build_nanocrystal(broken, edge_A=24.0)
    with pytest.raises(InputError, match="other atoms"):
        build_nanocrystal([frames[0], broken], edge_A=24.0)
    nc = build_nanocrystal(frames, edge_A=24.0, vacuum_A=4.0, scan_cells=1.0)
    with pytest.raises(InputError, match="scan_start_A"):
        simulate_4dstem(nc.frames, specimen="finite", sampling_A=0.05, **OPTICS)
    with pytest.raises(InputError, match="outside the box"):
        simulate_4dstem(
            nc.frames,
            specimen="finite",
            scan_start_A=(20.0, 20.0),
            scan_period_A=(12.0, 12.0),
            sampling_A=0.05,
            **OPTICS,
        )


# ---------------------------------------------------------------------------------------------
# 4D-STEM of the nanocrystal against the periodic cell of the same frame
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair():
    """One frame 12 x 12 x 24 A: its periodic simulation, and a 24 A cube cut from it (equal thickness)."""
    frame = md_frames(reps=(2, 2, 4), n=1, seed=3)
    sampling = antialias_sampling_A(300e3, OPTICS["max_angle_mrad"])
    periodic = simulate_4dstem(frame, sampling_A=sampling, num_workers=2, **OPTICS)
    nc = build_nanocrystal(frame, edge_A=24.0, vacuum_A=3.0, scan_cells=1)
    finite = simulate_4dstem(
        nc.frames,
        specimen="finite",
        scan_start_A=nc.scan_start_A,
        scan_period_A=nc.scan_period_A,
        scan_periods=nc.scan_cells,
        sampling_A=None,
        num_workers=2,
        **OPTICS,
    )
    return periodic, finite, nc


def corr(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def test_interior_scan_matches_the_periodic_cell(pair):
    periodic, finite, nc = pair
    assert nc.edge_A[2] == pytest.approx(periodic.cell_A[2], rel=0.01)  # same thickness
    assert finite.data.shape[:2] == periodic.data.shape[:2] == (24, 24)
    assert finite.extra["cell_positions"] == [24, 24] and finite.extra["specimen"] == "finite"
    assert finite.extra["sampling_A"] <= antialias_sampling_A(300e3, 40.0)
    sums = finite.data.sum(axis=(2, 3))
    assert np.all(sums <= 1.0 + 1e-3) and sums.mean() > 0.9  # fraction of the beam, as for the periodic cell
    for image in ("bf", "adf"):
        assert corr(virtual_image(finite, image), virtual_image(periodic, image)) > 0.9, image
    cf, cp = center_of_mass(finite, origin="axis"), center_of_mass(periodic, origin="axis")
    assert corr(cf[0], cp[0]) > 0.9 and corr(cf[1], cp[1]) > 0.9


def test_detector_rebinning_preserves_counts(pair):
    from octastem.stem.simulate import _rebin_axis

    _, finite, _ = pair
    n_ky, n_kx = finite.data.shape[2:]
    dky, dkx = finite.k_sampling_y_mrad, finite.k_sampling_x_mrad
    ry, rx = _rebin_axis(n_ky, dky, 3.0 * dky), _rebin_axis(n_kx, dkx, 3.0 * dkx)
    assert rx.shape[0] % 2 == 1 and rx.shape[0] <= n_kx // 3 + 1  # odd, centred on the optical axis
    assert np.allclose(rx.sum(axis=1), 3.0) and np.allclose(ry.sum(axis=1), 3.0)  # output pixels fully covered
    pattern = finite.data[3, 5].astype(np.float64)
    rebinned = np.einsum("oi,ij,pj->op", ry, pattern, rx)
    # counts kept, but for the outermost rim of the input beyond the last whole output pixel
    assert pattern.sum() * 0.97 < rebinned.sum() <= pattern.sum() * (1 + 1e-9)
    cy, cx = ry.shape[0] // 2, rx.shape[0] // 2
    centre = pattern[n_ky // 2 - 1 : n_ky // 2 + 2, n_kx // 2 - 1 : n_kx // 2 + 2]
    assert rebinned[cy, cx] == pytest.approx(centre.sum())


def test_poisson_dose_per_acquisition(pair, tmp_path):
    _, finite, _ = pair
    clean = tmp_path / "clean.h5"
    io.write_4dstem(clean, finite)
    fraction = finite.data.sum(axis=(2, 3))
    n_pos = fraction.size
    step2 = finite.scan_step_x_A * finite.scan_step_y_A
    means = {}
    for dose in (48.0, 144.0):
        out = tmp_path / f"d{dose:g}.h5"
        stages.dose(input_path=clean, output=out, dose_e_per_A2=dose, seed=5, averaged_cells=1)
        noisy = read_4dstem(out)
        counts = noisy.data.sum(axis=(2, 3))
        assert noisy.dose_e_per_A2 == dose and noisy.extra["electrons_per_position"] == pytest.approx(dose * step2)
        expected = dose * step2 * fraction.mean()
        means[dose] = counts.mean()
        assert abs(means[dose] - expected) < 4 * math.sqrt(expected / n_pos)
        assert json.loads(noisy.provenance)["averaged_cells"] == 1
    assert means[144.0] / means[48.0] == pytest.approx(3.0, rel=0.05)


def test_tile_frames_spread_every_frame_over_the_tiles():
    from octastem.stem.nanocrystal import tile_frames

    assign = tile_frames(21, 2, 12)
    assert assign.shape == (2, 12)
    for row in assign:  # no frame twice in one configuration while there are more frames than tiles
        assert len(set(row.tolist())) == 12
    counts = np.bincount(assign.ravel(), minlength=21)
    assert counts.max() - counts.min() <= 1  # every frame used as evenly as 24 slots over 21 frames allow
    assert np.all(np.abs(np.diff(assign[0])) > 1)  # neighbouring tiles far apart in time
    assert tile_frames(1, 3, 4).max() == 0
    with pytest.raises(InputError, match="configurations"):
        tile_frames(0, 1, 1)


def test_distinct_tiles_each_hold_their_own_frame():
    """Frame k is frame 0 moved by k * 0.01 A along z: in a configuration of distinct tiles every
    atom is moved by the step of the frame its tile was assigned, the tiles carry different frames,
    and the crystal is otherwise the one frame 0 gives (same atoms, same order)."""
    step = 0.01
    base = md_frames(n=1)[0]
    frames = []
    for k in range(5):
        f = base.copy()
        f.positions[:, 2] += k * step
        f.info["time_fs"] = 10.0 * k
        frames.append(f)
    mixed = build_nanocrystal(frames, edge_A=24.0, vacuum_A=4.0, scan_cells=1, configurations=2)
    plain = build_nanocrystal(frames[:1], edge_A=24.0, vacuum_A=4.0, scan_cells=1).frames[0]
    assign = np.asarray(mixed.info["tile_frames"])
    assert len(mixed.frames) == 2 and assign.shape[0] == 2 and assign.shape[1] >= 4
    for c, config in enumerate(mixed.frames):
        assert np.array_equal(config.numbers, plain.numbers)
        d = config.positions - plain.positions
        assert np.ptp(d[:, :2], axis=0).max() < 1e-9  # in the plane only the vacuum shift
        k = (d[:, 2] - d[:, 2].min()) / step
        k_int = np.round(k)
        assert np.abs(k - k_int).max() < 1e-6
        # the frames found in the crystal are the ones assigned to its tiles (up to the common shift)
        found = sorted(set(k_int.astype(int).tolist()))
        used = sorted(set(assign[c].tolist()))
        assert len(found) == len(used) >= 3
        assert np.array_equal(np.diff(found), np.diff(used))


def test_simulated_twin_of_a_measured_dataset_takes_its_chain(tmp_path, monkeypatch):
    """simulate_like hands the measured file's own calibration to the simulation (energy, semi-angle,
    scan step, detector sampling and extent), scans the whole MD cells nearest the measured extent, draws
    Poisson noise at the measured dose, and leaves no temporary file behind."""
    frames = md_frames(n=3)
    traj = write_trajectory(tmp_path / "trajectory.h5", frames)
    measured = tmp_path / "measured.h5"
    counts = np.ones((30, 31, 40, 44), np.float32)
    write = io.Stem4D(counts, 200e3, 21.0, 0.41, 1.1, 48.0, source="measured", scan_step_x_A=0.41, scan_step_y_A=0.39)
    io.write_4dstem(measured, write)
    seen = {}

    def fake(nc_frames, **kwargs):
        seen["frames"], seen["kwargs"] = nc_frames, kwargs
        data = np.full((6, 6, 9, 9), 1.0 / 81, np.float32)
        extra = {"scan_shape": [6, 6], "sampling_A": 0.1}
        return io.Stem4D(
            data, kwargs["energy_eV"], kwargs["semiangle_mrad"], kwargs["scan_step_A"], 1.1, math.inf, extra=extra
        )

    monkeypatch.setattr("octastem.stem.simulate_4dstem", fake)
    out = tmp_path / "twin.h5"
    stages.simulate_like(
        measured=measured,
        trajectory=traj,
        output=out,
        structure_output=tmp_path / "twin.extxyz",
        start_fs=0.0,
        frames=2,
        thickness_A=24.0,
        vacuum_A=3.0,
        seed=5,
        tiles="distinct",
        slice_thickness_A=2.0,
    )
    kw = seen["kwargs"]
    assert kw["energy_eV"] == 200e3 and kw["semiangle_mrad"] == 21.0
    assert kw["scan_step_A"] == pytest.approx(0.40) and kw["detector_sampling_mrad"] == pytest.approx(1.1)
    assert kw["max_angle_mrad"] == pytest.approx(1.1 * 20)  # half the smaller detector side
    assert kw["scan_periods"] == 1.0  # 12.7 A x 11.7 A measured: one 12 A MD cell
    twin = read_4dstem(out)
    assert twin.dose_e_per_A2 == 48.0 and twin.extra["intensity_unit"] == "counts"
    assert np.allclose(twin.data.sum(axis=(2, 3)).mean(), 48.0 * 0.40 * 0.40, rtol=0.2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    with pytest.raises(InputError, match="reconstruct.thickness_A"):
        stages.simulate_like(
            measured=measured,
            trajectory=traj,
            output=out,
            structure_output=tmp_path / "twin.extxyz",
            start_fs=0.0,
            frames=2,
            thickness_A=None,
            vacuum_A=3.0,
            seed=5,
        )
