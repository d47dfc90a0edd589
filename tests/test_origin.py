"""Measured data as they come off a microscope: the bright-field disc off the detector centre and
moving with the scan (descan), the detector turned (and transposed) against the scan, found from
the data at ingest and undone before any detector or reconstruction sees the patterns.

Known truth: a simulated FAPbBr3 cell (multislice, 300 kV, 25 mrad, 0.4 A step) tiled 2 x 2,
whose patterns are put off centre with a linear descan, or turned by 0 / 17 / 90 deg with and
without a transposed detector; each is ingested and reconstructed by icom and cnn, and the
Pearson correlation with the projected potential is compared with that of the centred, unrotated
scan. The CNN is sensitive to the sharpness of the disc's edge (a ramp about a pixel wide): the
test's patterns have it where the simulation puts it, and the ingest must keep it sharp."""

from __future__ import annotations

import math
import zipfile

import numpy as np
import pytest
from scipy import ndimage

from octastem.io import InputError, Stem4D, read_4dstem
from octastem.stem import ingest, reconstruct
from octastem.stem.ingest.align import CalibrationWarning
from octastem.stem.origin import (
    Alignment,
    bins_for_edge,
    check_radius,
    disc_edge,
    edge_sums,
    find_disc,
    fit_origin,
)

ENERGY, ALPHA, STEP = 300e3, 25.0, 0.4
#: detector sampling (mrad / px) of the simulated cell: lambda / 6 A
DK = 3.281248
TILES = 2


def pearson(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def disc_pattern(shape, centre, radius, level=10.0, background=0.1):
    """A uniform disc (anti-aliased by 8 x 8 supersampling) on a faint background."""
    ny, nx = shape
    sub = 8
    y = (np.arange(ny * sub) + 0.5) / sub - 0.5
    x = (np.arange(nx * sub) + 0.5) / sub - 0.5
    inside = (y[:, None] - centre[0]) ** 2 + (x[None, :] - centre[1]) ** 2 <= radius**2
    return background + level * inside.reshape(ny, sub, nx, sub).mean(axis=(1, 3))


def test_disc_found_off_centre_and_cut():
    disc = find_disc(disc_pattern((64, 80), (20.3, 55.6), 12.4))
    assert not disc.cut
    assert disc.centre_px == pytest.approx((20.3, 55.6), abs=0.1) and disc.radius_px == pytest.approx(12.4, abs=0.1)
    cut = find_disc(disc_pattern((64, 80), (30.2, 8.7), 12.4))  # 3.7 px of it beyond column 0
    assert (
        cut.cut
        and cut.centre_px == pytest.approx((30.2, 8.7), abs=0.5)
        and cut.radius_px == pytest.approx(12.4, abs=0.5)
    )
    # a halo of diffuse scattering joined to the disc at low levels does not move it
    yy, xx = np.indices((64, 80))
    halo = 4.0 * np.exp(-np.hypot(yy - 20, xx - 40) / 15.0) * (xx < 45)
    with_halo = find_disc(disc_pattern((64, 80), (32.0, 40.0), 10.0) + halo)
    assert with_halo.centre_px == pytest.approx((32.0, 40.0), abs=0.5) and with_halo.radius_px == pytest.approx(
        10.0, abs=0.5
    )


def test_no_disc_in_empty_or_flat_patterns():
    rng = np.random.default_rng(0)
    assert find_disc(np.zeros((40, 40))) is None  # where the mean count is 0 there is no disc
    assert find_disc(rng.poisson(0.05, (40, 40)).astype(float)) is None
    assert find_disc(np.ones((40, 40))) is None


def test_disc_radius_checked_against_semiangle_and_k_sampling():
    disc = find_disc(disc_pattern((64, 64), (32, 32), 20.0))
    check_radius("x.npy", disc, 20.0, 1.0)  # 20 px expected: fine
    with pytest.raises(
        InputError,
        match=r"x.npy: .*radius of 20.0 px, but semiangle_mrad = 20 \(config\) at "
        r"k_sampling_mrad = 0.5 .* gives 40.0 px: they disagree by -50 % .* k_sampling_mrad is (1|0.99\d*) or "
        r"semiangle_mrad is (10|9.99\d*)$",
    ):
        check_radius("x.npy", disc, 20.0, 0.5)


def test_descan_fit_leaves_a_periodic_signal_alone():
    """A plane fitted to the disc centres of a crystal takes part of its lattice-periodic deflection as
    descan when the scan spans few periods; the fit leaves the signal's frequencies out."""
    ny, nx = 30, 30
    y, x = np.indices((ny, nx))
    signal = 0.3 * np.sin(2 * np.pi * x / 10) * np.cos(2 * np.pi * y / 15)
    descan = np.stack([10 + 0.05 * x - 0.02 * y, 40 - 0.03 * x + 0.04 * y], axis=-1)
    com = descan + np.stack([signal, -signal], axis=-1)
    fitted, summary = fit_origin(com, np.ones((ny, nx)), "plane")
    np.testing.assert_allclose(fitted, descan, atol=1e-6)
    assert summary["range_px"] == pytest.approx([0.05 * 29 + 0.02 * 29, 0.03 * 29 + 0.04 * 29], abs=1e-6)


def test_resampling_keeps_the_disc_edge_sharp():
    """Patterns whose disc (an aperture edge a pixel wide on a smooth modulation and dark field) sits
    at fractional centres come out centred as if recorded there; whole-pixel shifts are exact."""
    n, radius = 48, 9.3

    def pattern(shape, cy, cx):
        ky, kx = np.indices(shape).astype(float)
        level = aperture_level(np.hypot(ky - cy, kx - cx), radius)
        q = 1.0 + 0.2 * np.sin(0.4 * (ky - cy) + 0.3 * (kx - cx))
        return level * q + (1 - level) * 0.01 * np.exp(-np.hypot(ky - cy, kx - cx) / 10)

    iy, ix = np.indices((4, 4)).astype(float)
    whole, fractional = np.stack([22 + iy, 24 - ix], -1), np.stack([22.37 + 0.29 * iy, 24.6 - 0.41 * ix], -1)
    for origin, exact in ((whole, True), (fractional, False)):
        chunk = np.stack([[pattern((n, n), *origin[a, b]) for b in range(4)] for a in range(4)]).astype(np.float32)
        bins = bins_for_edge(radius, (1.0, 1.0))
        edge = disc_edge(*edge_sums(chunk, origin, (1.0, 1.0), bins), bins, radius, 1.0)
        plan = Alignment.fit_window(origin, 0.0, False, (1.0, 1.0), (n, n), edge)
        m = plan.shape[0]
        truth = pattern((m, m), m // 2, m // 2)
        err = np.abs(plan.resample(chunk, 0) - truth).max()
        if exact:
            assert err < 1e-5
        else:
            bilinear = Alignment.fit_window(origin, 0.0, False, (1.0, 1.0), (n, n)).resample(chunk, 0)
            assert err < 0.06 and np.abs(bilinear - truth).max() > 4 * err  # of a disc level of 1


# ---------------------------------------------------------------------------------------------- known truth


@pytest.fixture(scope="module")
def truth():
    """The centred scan (tiled 2 x 2), its detector sampling, the projected-potential truth and the
    icom / cnn correlations of the centred, unrotated scan."""
    from octastem.cnn.input import target_phase
    from octastem.potential import projected_potential
    from octastem.stem import simulate_4dstem
    from octastem.structure import build_fapbbr3

    atoms = build_fapbbr3((1, 1, 1))
    sim = simulate_4dstem(
        atoms,
        energy_eV=ENERGY,
        scan_step_A=STEP,
        sampling_A=0.05,
        slice_thickness_A=1.0,
        semiangle_mrad=ALPHA,
        max_angle_mrad=60.0,
        num_workers=2,
    )
    data = np.tile(sim.data, (TILES, TILES, 1, 1))
    pot, _, _ = projected_potential(atoms, sampling_A=0.05)
    pot = np.tile(pot, (TILES, TILES))
    cell = 6.0 * TILES

    def scores(stem):
        out = {}
        for method in ("icom", "cnn"):
            image, _ = reconstruct(stem, method, device="cpu")
            out[method] = pearson(image, target_phase(pot, image.shape, (cell, cell), ENERGY, ALPHA))
        return out

    dk = float(sim.k_sampling_mrad)
    assert dk == pytest.approx(DK, rel=1e-5)
    centred = scores(Stem4D(data, ENERGY, ALPHA, STEP, dk, float("inf")))
    return {"data": data, "dk": dk, "scores": scores, "centred": centred}


def aperture_level(r_px, radius_px):
    """The simulation's disc edge (abTEM's soft aperture) in intensity at r_px from its centre:
    amplitude clip(radius - r + 1/2, 0, 1), squared."""
    return np.clip(radius_px - r_px + 0.5, 0.0, 1.0) ** 2


def detector_patterns(data, size, offset=(0.0, 0.0), descan=((0.0, 0.0), (0.0, 0.0)), angle_deg=0.0, flip=False):
    """The centred patterns as a detector of ``size`` px records them: disc centre at
    size // 2 + offset + descan @ (iy, ix) (px per scan position), detector axes turned by -angle
    (com_scan = R(angle) F com_detector; F transposes them when ``flip``).

    A detector pixel sees the disc's edge where the simulation puts it, the aperture of radius
    alpha / dk at the disc centre (:func:`aperture_level`, evaluated at the pixel); only the
    smooth parts are interpolated (bilinear) from the centred pattern: the disc's modulation Q and
    the dark field F of P = D Q + (1 - D) F (F extended into the disc from its nearest dark pixel)."""
    ny, nx, nk, _ = data.shape
    c0 = nk // 2
    radius = ALPHA / DK
    level_c = aperture_level(np.hypot(*(np.indices((nk, nk)) - c0)), radius)
    nearest = ndimage.distance_transform_edt(level_c > 0, return_distances=False, return_indices=True)
    yy, xx = np.indices((size, size)).astype(float)
    t = math.radians(angle_deg)
    c, s = math.cos(t), math.sin(t)
    out = np.zeros((ny, nx, size, size), np.float32)
    for iy in range(ny):
        for ix in range(nx):
            oy = size // 2 + offset[0] + descan[0][0] * iy + descan[0][1] * ix
            ox = size // 2 + offset[1] + descan[1][0] * iy + descan[1][1] * ix
            dx, dy = xx - ox, yy - oy
            if flip:
                dx, dy = dy, dx
            qx, qy = c * dx - s * dy, s * dx + c * dy  # detector offset -> scan frame
            p = data[iy, ix].astype(np.float64)
            f = p[tuple(nearest)]

            def interp(v, qy=qy, qx=qx):
                return ndimage.map_coordinates(v, [c0 + qy, c0 + qx], order=1, mode="constant")

            den = interp(level_c)
            q = np.divide(interp(p - (1 - level_c) * f), den, out=np.zeros_like(den), where=den > 0)
            level = aperture_level(np.hypot(qx, qy), radius)
            out[iy, ix] = level * q + (1 - level) * interp(f)
    return out


def ingested(tmp_path, patterns, dk, **calibration):
    src = tmp_path / "raw.npy"
    np.save(src, patterns)
    cal = {"energy_eV": ENERGY, "semiangle_mrad": ALPHA, "scan_step_A": STEP, "k_sampling_mrad": dk, **calibration}
    summary = ingest(src, tmp_path / "out.h5", calibration=cal, origin="plane", progress=False)
    return read_4dstem(tmp_path / "out.h5"), summary["alignment"]


def test_off_centre_disc_with_linear_descan(tmp_path, truth):
    """Disc 30 % of the detector off centre along y (20 % along x), moving up to 2.4 px over the scan."""
    size = 100
    offset, descan = (-0.3 * size, 0.2 * size), ((0.05, 0.02), (-0.03, 0.06))
    stem, record = ingested(tmp_path, detector_patterns(truth["data"], size, offset, descan), truth["dk"])
    ny = truth["data"].shape[0]
    assert record["disc"]["centre_px"] == pytest.approx(
        [size // 2 + offset[0] + 0.07 * (ny - 1) / 2, size // 2 + offset[1] + 0.03 * (ny - 1) / 2], abs=0.3
    )
    assert record["descan"]["range_px"] == pytest.approx([0.07 * (ny - 1), 0.09 * (ny - 1)], abs=0.05)
    assert stem.scan_rotation_deg == 0.0 and stem.extra["scan_flip"] == 0 or not stem.extra["scan_flip"]
    scores = truth["scores"](stem)
    # the resampled patterns hold the disc's edge as sharp as the detector did (bilinear: +40 %)
    dk = truth["dk"]
    bins = bins_for_edge(ALPHA / dk, (dk, dk))
    centre = np.full((*stem.data.shape[:2], 2), float(stem.data.shape[-1] // 2))
    edge = disc_edge(*edge_sums(stem.data, centre, (dk, dk), bins), bins, ALPHA / dk, dk)
    assert edge.as_dict()["width_90_10_mrad"] == pytest.approx(record["disc_edge"]["width_90_10_mrad"], rel=0.1)
    assert scores["icom"] == pytest.approx(truth["centred"]["icom"], abs=0.01)
    assert scores["cnn"] == pytest.approx(truth["centred"]["cnn"], abs=0.01)


@pytest.mark.parametrize("angle_deg", [0.0, 17.0, 90.0])
@pytest.mark.parametrize("flip", [False, True])
def test_rotation_and_flip_measured_from_the_curl(tmp_path, truth, angle_deg, flip):
    patterns = detector_patterns(truth["data"], 64, (2.0, -3.0), angle_deg=angle_deg, flip=flip)
    stem, record = ingested(tmp_path, patterns, truth["dk"])
    rotation = record["rotation"]
    assert rotation["source"] == "measured" and rotation["flip"] == flip
    assert rotation["measured_deg"] == pytest.approx(angle_deg, abs=0.1)
    assert stem.scan_rotation_deg == 0.0 and stem.extra["scan_rotation_measured_deg"] == pytest.approx(
        angle_deg, abs=0.1
    )
    scores = truth["scores"](stem)
    assert scores["icom"] == pytest.approx(truth["centred"]["icom"], abs=0.01)
    assert scores["cnn"] == pytest.approx(truth["centred"]["cnn"], abs=0.01)


def test_configured_rotation_checked_against_the_data(tmp_path, truth):
    patterns = detector_patterns(truth["data"], 64, angle_deg=17.0)
    with pytest.warns(
        CalibrationWarning,
        match=r"'scan_rotation_deg' = 0 deg \(config\) but the curl of the COM "
        r"field says 17.0 deg \(17.0 deg apart\)",
    ):
        stem, record = ingested(tmp_path, patterns, truth["dk"], scan_rotation_deg=0.0)
    assert record["rotation"]["applied_deg"] == 0.0 and record["rotation"]["measured_deg"] == pytest.approx(17, abs=0.1)


def test_refusals_name_the_file_and_leave_nothing(tmp_path, truth):
    src = tmp_path / "raw.npy"
    cal = {"energy_eV": ENERGY, "semiangle_mrad": ALPHA, "scan_step_A": STEP, "k_sampling_mrad": truth["dk"]}
    out = tmp_path / "results"
    out.mkdir()
    cases = [
        (detector_patterns(truth["data"], 64, (0.0, -27.0)), cal, r"cut by the detector edge: it reaches .* column 0"),
        (detector_patterns(truth["data"], 64), {**cal, "k_sampling_mrad": 2 * truth["dk"]}, r"disagree by \+9\d %"),
        (np.ones((8, 8, 32, 32), np.float32), cal, "no bright-field disc found"),
        (detector_patterns(truth["data"][:4, :5], 64), cal, "too small to measure the rotation"),
    ]
    for patterns, calibration, match in cases:
        np.save(src, patterns)
        with pytest.raises(InputError, match=match) as info:
            ingest(src, out / "out.h5", calibration=calibration, origin="plane", progress=False)
        assert str(src) in str(info.value)
        assert list(out.iterdir()) == []


def test_real_merlin_disc_found_at_its_true_centre(tmp_path):
    """The Merlin 4 x 2 acquisition (rosettasciio's test data): its disc is saturated (6 bit) and
    touches the detector's column 0, with a halo of diffuse scattering beside it. The truth is read
    off the raw mean pattern: the pixels saturated in every frame (the disc's interior, a pixel
    inside its edge), along the column and the row through the centre found; the 128-row ROI
    acquisition of the same disc must agree."""
    pytest.importorskip("rsciio")
    from octastem.registry import fetch
    from octastem.stem import open_source

    try:
        archive = fetch("rsciio_merlin_4x2")
    except InputError as e:
        pytest.skip(f"real detector file not obtainable: {e}")
    with zipfile.ZipFile(archive) as z:
        z.extractall(tmp_path)
    found = {}
    for name in ("001_4x2_6bit.mib", "002_4x2_6bit_roi128.mib"):
        with open_source(tmp_path / name) as src:
            frames = src.read(0, src.shape[0]).astype(float)
        mean = frames.mean(axis=(0, 1))
        disc = find_disc(mean)
        cy, cx = disc.centre_px
        saturated = mean >= frames.max() - 0.5
        column = np.nonzero(saturated[:, round(cx)])[0]
        row = np.nonzero(saturated[round(cy), :])[0]
        assert cy == pytest.approx(0.5 * (column.min() + column.max()), abs=1.0)
        assert disc.radius_px == pytest.approx(0.5 * (column.max() - column.min() + 1), abs=2.5)
        assert cx + disc.radius_px == pytest.approx(row.max() + 0.5, abs=1.5)
        assert disc.cut
        for iy in range(2):  # every frame shows the same disc
            for ix in range(4):
                assert find_disc(frames[iy, ix]).centre_px == pytest.approx((cy, cx), abs=2.0)
        found[name] = disc
    full, roi = found.values()
    assert full.centre_px[1] == pytest.approx(roi.centre_px[1], abs=1.0)
    assert full.radius_px == pytest.approx(roi.radius_px, abs=1.0)
    out = tmp_path / "results"
    out.mkdir()
    cal = {"energy_eV": 300e3, "semiangle_mrad": 24.6, "scan_step_A": 0.5, "k_sampling_mrad": 1.0}
    with pytest.raises(InputError, match=r"001_4x2_6bit.mib: the bright-field disc .* is cut by the detector edge"):
        ingest(tmp_path / "001_4x2_6bit.mib", out / "out.h5", calibration=cal, origin="plane", progress=False)
    assert list(out.iterdir()) == []
