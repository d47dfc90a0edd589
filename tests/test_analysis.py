import numpy as np
import pytest

from octastem.io import InputError
from octastem.md import analyse_frames, br_geometry, time_averaged_structure
from octastem.structure import build_fapbbr3


def test_ideal_cell_is_straight():
    g = br_geometry(build_fapbbr3((2, 2, 2)))
    assert len(g.angle_deg) == 24  # every Br bridges two Pb, across periodic boundaries too
    np.testing.assert_allclose(g.angle_deg, 180.0, atol=1e-6)
    np.testing.assert_allclose(g.disp_perpendicular_A, 0.0, atol=1e-9)


@pytest.mark.parametrize("dy, dx", [(0.3, 0.0), (0.2, 0.1), (-0.4, -0.05)])
def test_known_displacement(dy, dx):
    a = build_fapbbr3((2, 2, 2), a_A=6.0)
    k = int(np.flatnonzero(a.numbers == 35)[0])  # Br at (3, 0, 0): its Pb-Pb axis is x
    a.positions[k] += [dx, dy, 0.0]
    g = br_geometry(a)
    m = list(g.br_index).index(k)
    assert g.disp_parallel_A[m] == pytest.approx(dx, abs=1e-9)
    assert g.disp_perpendicular_A[m] == pytest.approx(abs(dy), abs=1e-9)
    # the Pb-Br-Pb angle follows from the geometry of the displaced anion
    d1 = np.hypot(3.0 + dx, dy)
    d2 = np.hypot(3.0 - dx, dy)
    expected = np.degrees(np.arctan2(abs(dy), 3.0 + dx) + np.arctan2(abs(dy), 3.0 - dx))
    assert g.angle_deg[m] == pytest.approx(180.0 - expected, abs=1e-6)
    assert d1 > 0 and d2 > 0


def test_lattice_and_window():
    frames = []
    for k, s in enumerate([1.0, 1.01, 0.99]):
        a = build_fapbbr3((2, 2, 2), a_A=6.0)
        a.set_cell(a.cell * [s, 1.0, 1.0], scale_atoms=True)
        a.info["time_fs"] = 50.0 * k
        frames.append(a)
    r = analyse_frames(frames, (2, 2, 2))
    assert r["lattice_A"]["a"]["mean"] == pytest.approx(6.0)
    assert r["lattice_A"]["b"]["std"] == pytest.approx(0.0, abs=1e-12)
    assert r["n_frames"] == 3 and r["time_fs"] == [0.0, 50.0, 100.0]


def test_time_average_unwraps_boundary_crossing():
    a = build_fapbbr3((1, 1, 1))
    b = a.copy()
    # Pb (at the origin) moves by -0.1 A in x and is wrapped to the far side of the cell
    b.positions[0] = [6.0 - 0.1, 0.0, 0.0]
    avg = time_averaged_structure([a, b])
    assert avg.positions[0][0] == pytest.approx(-0.05, abs=1e-9) or avg.positions[0][0] == pytest.approx(5.95)


def test_not_a_perovskite():
    from ase import Atoms

    with pytest.raises(InputError, match="two Pb neighbours"):
        br_geometry(Atoms("Br2", positions=[[0, 0, 0], [5, 5, 5]], cell=[10, 10, 10], pbc=True))
