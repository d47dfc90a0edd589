import numpy as np
import pytest
from ase.geometry import get_distances
from ase.io import read, write

from octastem.io import InputError
from octastem.structure import build_fapbbr3, check_geometry, composition, remove_fabr_pairs


def test_unit_cell_composition_and_sites():
    a = build_fapbbr3((1, 1, 1), a_A=6.0)
    assert composition(a) == {"Pb": 1, "Br": 3, "C": 1, "N": 2, "H": 5}
    assert np.allclose(a.cell.lengths(), 6.0) and a.pbc.all()
    # Pb on the corner, Br on the three edge centres
    assert np.allclose(a.positions[0], 0.0)
    br = a.positions[a.arrays["site"] == "Br"]
    assert np.allclose(sorted(map(tuple, br)), sorted([(0, 0, 3.0), (0, 3.0, 0), (3.0, 0, 0)]))
    # FA+ molecule: C at the cube centre, bonded C-N ~1.31 A, N-H ~1.01 A, planar
    fa = a[a.arrays["site"] == "FA"]
    c = fa.positions[fa.numbers == 6][0]
    assert np.allclose(c, 3.0)
    n = fa.positions[fa.numbers == 7]
    assert np.allclose(np.linalg.norm(n - c, axis=1), 1.31, atol=1e-6)
    centred = fa.positions - fa.positions.mean(0)
    assert np.linalg.svd(centred, compute_uv=False)[-1] < 1e-8  # all 8 atoms in one plane


@pytest.mark.parametrize("n_vac", [0, 1, 11, 64])
def test_vacancies_stoichiometry(n_vac):
    a = remove_fabr_pairs(build_fapbbr3((4, 4, 4)), n_vac, seed=3)
    assert composition(a) == {
        k: v
        for k, v in {"Pb": 64, "Br": 192 - n_vac, "C": 64 - n_vac, "N": 128 - 2 * n_vac, "H": 320 - 5 * n_vac}.items()
        if v > 0
    }
    assert len(a) == 768 - 9 * n_vac
    # charge neutral: FA+ count + 2 Pb2+ = Br-
    assert (64 - n_vac) + 2 * 64 == 192 - n_vac


def test_vacancies_are_seeded_and_random():
    base = build_fapbbr3((4, 4, 4))
    a1 = remove_fabr_pairs(base, 11, seed=1)
    a2 = remove_fabr_pairs(base, 11, seed=1)
    a3 = remove_fabr_pairs(base, 11, seed=2)
    assert np.array_equal(a1.positions, a2.positions)
    assert not np.array_equal(a1.positions, a3.positions)


def test_periodic_images_bond_lengths():
    # Pb-Br nearest neighbours: six at a/2 across the periodic boundary, also in the 1x1x1 cell
    a = build_fapbbr3((1, 1, 1), a_A=6.2)
    pb = a.positions[0:1]
    br = a.positions[a.arrays["site"] == "Br"]
    _, d = get_distances(pb, br, cell=a.cell, pbc=True)
    assert np.allclose(d, 3.1)
    big = build_fapbbr3((3, 3, 3), a_A=6.2)
    check_geometry(big)  # no overlaps across boundaries
    assert np.allclose(big.cell.lengths(), 18.6)


def test_extxyz_roundtrip_keeps_sites(tmp_path):
    a = remove_fabr_pairs(build_fapbbr3((2, 2, 2)), 1, seed=0)
    write(tmp_path / "s.extxyz", a, format="extxyz")
    b = read(tmp_path / "s.extxyz")
    assert np.array_equal(b.arrays["fa_id"], a.arrays["fa_id"])
    assert list(b.arrays["site"]) == list(a.arrays["site"])


def test_bad_input():
    with pytest.raises(InputError, match="n_vacancies"):
        remove_fabr_pairs(build_fapbbr3((1, 1, 1)), 2)
    with pytest.raises(InputError, match="lattice parameter"):
        build_fapbbr3((1, 1, 1), a_A=12.0)
    a = build_fapbbr3((1, 1, 1))
    a.positions[1] = a.positions[0] + 0.1
    with pytest.raises(InputError, match="overlap"):
        check_geometry(a)
