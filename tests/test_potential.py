"""Projected potential: symmetry, periodicity, orientation and the common-cell mapping."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms

from octastem.io import InputError
from octastem.potential import common_cell, projected_potential, to_common_cell
from octastem.structure import build_fapbbr3

A = 6.0
SAMPLING = 0.1


def framework(reps=(1, 1, 1), centre="C") -> Atoms:
    """Cubic PbBr3 framework with one spherical atom at the cube centre (exact 4mm in projection)."""
    cell = Atoms(
        ["Pb", "Br", "Br", "Br", centre],
        scaled_positions=[[0, 0, 0], [0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5], [0.5, 0.5, 0.5]],
        cell=[A] * 3,
        pbc=True,
    )
    return cell.repeat(reps)


def periodic_index(n: int) -> np.ndarray:
    """Pixel indices of -x on a periodic grid starting at 0."""
    return (-np.arange(n)) % n


@pytest.fixture(scope="module")
def ideal():
    return projected_potential(framework(), sampling_A=SAMPLING)


def test_grid_spans_cell(ideal):
    image, sampling, cell_xy = ideal
    assert image.dtype == np.float32 and image.shape == (60, 60)
    assert sampling == pytest.approx(SAMPLING)
    assert cell_xy == pytest.approx((A, A))
    assert image.shape[1] * sampling == pytest.approx(cell_xy[0])


def test_4mm_symmetry_about_pb(ideal):
    image = ideal[0].astype(np.float64)
    n = image.shape[0]
    tol = 1e-4 * np.abs(image).max()
    mirror_x = image[:, periodic_index(n)]
    mirror_y = image[periodic_index(n), :]
    mirror_diag = image.T
    # 90 degree rotation about pixel (0, 0) on the periodic grid: R(x, y) = I(y, -x)
    rot90 = image.T[:, periodic_index(n)]
    for other in (mirror_x, mirror_y, mirror_diag, rot90):
        assert np.abs(other - image).max() < tol


def test_fa_cell_keeps_the_two_mirrors():
    # the planar FA+ lies in the xz plane: its projection is mirror symmetric in x and y about
    # the Pb column (not under x <-> y), so the two mirrors must hold exactly
    image = projected_potential(build_fapbbr3((1, 1, 1)), sampling_A=SAMPLING)[0].astype(np.float64)
    n = image.shape[0]
    tol = 1e-4 * np.abs(image).max()
    assert np.abs(image[:, periodic_index(n)] - image).max() < tol
    assert np.abs(image[periodic_index(n), :] - image).max() < tol


def test_pb_column_brightest(ideal):
    image = ideal[0]
    assert np.unravel_index(np.argmax(image), image.shape) == (0, 0)
    br_x = image[0, round(A / 2 / SAMPLING)]
    centre = image[round(A / 2 / SAMPLING), round(A / 2 / SAMPLING)]
    assert image[0, 0] > br_x > centre > image.mean()


def test_periodic_supercell_equals_tiles(ideal):
    image, _, _ = ideal
    double, _sampling, cell_xy = projected_potential(framework((2, 1, 1)), sampling_A=SAMPLING)
    assert cell_xy == pytest.approx((2 * A, A))
    assert double.shape == (60, 120)
    assert np.allclose(double, np.tile(image, (1, 2)), rtol=1e-4, atol=1e-4 * image.max())


def test_orientation_x_is_columns():
    # non-square cell, single atom at (x = a/4, y = 0): the peak must sit in row 0, column a/4/sampling
    atoms = Atoms("Pb", positions=[(A / 4, 0.0, 1.0)], cell=[A, 1.5 * A, 2.0], pbc=True)
    image, sampling, cell_xy = projected_potential(atoms, sampling_A=SAMPLING)
    assert image.shape == (90, 60)
    assert cell_xy == pytest.approx((A, 1.5 * A))
    assert np.unravel_index(np.argmax(image), image.shape) == (0, round(A / 4 / sampling))


def test_slicing_does_not_change_projection():
    atoms = build_fapbbr3((1, 1, 1))
    one = projected_potential(atoms, sampling_A=0.2)[0]
    thin = projected_potential(atoms, sampling_A=0.2, slice_thickness_A=1.0)[0]
    assert np.allclose(one, thin, rtol=1e-4, atol=1e-4 * one.max())


def test_average_over_frames():
    base = framework()
    shifted = base.copy()
    shifted.positions[1] += (0.0, 0.3, 0.0)  # Br off its site, along y
    mean, _, _ = projected_potential([base, shifted], sampling_A=0.2)
    a = projected_potential(base, sampling_A=0.2)[0]
    b = projected_potential(shifted, sampling_A=0.2)[0]
    assert np.allclose(mean, 0.5 * (a + b), rtol=1e-5, atol=1e-5 * a.max())


def test_common_cell_mapping():
    rng = np.random.default_rng(1)
    frames = []
    for _ in range(3):
        f = framework()
        cell = np.diag([A, A, A]) * (1 + 0.01 * rng.normal(size=3)) + 0.01 * rng.normal(size=(3, 3))
        f.set_cell(cell, scale_atoms=True)
        f.positions += (0.0, 0.0, -0.2)  # pushes atoms at z = 0 out of the cell: must be wrapped
        frames.append(f)
    mean = common_cell(frames)
    assert mean.shape == (3, 3)
    assert np.allclose(mean, np.mean([f.cell[:] for f in frames], axis=0))
    out = to_common_cell(frames[0], mean)
    lengths = np.linalg.norm(mean, axis=1)
    assert np.allclose(out.cell[:], np.diag(lengths))
    scaled = out.get_scaled_positions(wrap=False)
    assert np.all((scaled >= 0) & (scaled < 1))
    assert np.allclose(scaled, frames[0].get_scaled_positions(wrap=False) % 1.0)
    assert out is not frames[0] and frames[0].cell[0, 1] != 0.0  # input untouched


def test_sheared_cell_rejected():
    atoms = framework()
    atoms.set_cell([[A, 0, 0], [1.0, A, 0], [0, 0, A]], scale_atoms=True)
    with pytest.raises(InputError, match="orthorhombic"):
        to_common_cell(atoms, atoms.cell[:])
    with pytest.raises(InputError, match="no frames"):
        projected_potential([])


def test_projection_axes_are_cyclic_views():
    # one Pb atom at (1, 2, 3) in a 6 x 7 x 8 cell: along x the image axes are (y, z), along y (z, x)
    atoms = Atoms("Pb", positions=[(1.0, 2.0, 3.0)], cell=[6.0, 7.0, 8.0], pbc=True)
    for axis, (lx, ly), (px, py) in (
        ("x", (7.0, 8.0), (2.0, 3.0)),
        ("y", (8.0, 6.0), (3.0, 1.0)),
        ("z", (6.0, 7.0), (1.0, 2.0)),
    ):
        image, sampling, cell_xy = projected_potential(atoms, sampling_A=0.1, axis=axis)
        assert cell_xy == pytest.approx((lx, ly))
        assert image.shape == (round(ly / 0.1), round(lx / 0.1))
        assert np.unravel_index(np.argmax(image), image.shape) == (round(py / 0.1), round(px / 0.1))
    with pytest.raises(InputError, match="axis"):
        projected_potential(atoms, axis="w")


def test_cubic_cell_gives_the_same_view_along_every_axis():
    # an ideal cubic perovskite cell with a spherical A site: the three projections are identical
    views = [projected_potential(framework(), sampling_A=0.2, axis=a)[0] for a in "xyz"]
    for v in views[:2]:
        assert np.allclose(v, views[2], rtol=1e-5, atol=1e-5 * views[2].max())


def test_time_blocks_average_to_the_image():
    base = framework()
    frames = []
    for k in range(5):
        f = base.copy()
        f.positions[1] += (0.0, 0.1 * k, 0.0)
        frames.append(f)
    image, _, _, (means, counts) = projected_potential(frames, sampling_A=0.2, n_blocks=2)
    assert counts.tolist() == [3, 2]
    assert means.shape == (2, *image.shape)
    assert np.allclose((means * counts[:, None, None]).sum(0) / 5, image, rtol=1e-5, atol=1e-5 * image.max())
    first = projected_potential(frames[:3], sampling_A=0.2)[0]
    assert np.allclose(means[0], first, rtol=1e-5, atol=1e-5 * first.max())
    with pytest.raises(InputError, match="time blocks"):
        projected_potential(frames, sampling_A=0.2, n_blocks=6)
