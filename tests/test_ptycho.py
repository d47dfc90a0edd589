"""Direct ptychography (reconstruct methods ssb and wdd, quantem) on a small noise-free known-truth cell."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from octastem.io import InputError

pytest.importorskip("quantem")

COARSE = {"energy_eV": 300000.0, "semiangle_mrad": 25.0, "max_angle_mrad": 60.0, "sampling_A": 0.1}


@pytest.fixture(scope="module")
def cell():
    """Noise-free 4D-STEM of 2 x 2 x 2 cubic CsPbBr3 cells (round columns), 0.4 A step, and its true phase."""
    from abtem.core.energy import energy2sigma

    from octastem.cnn.input import UPSAMPLE, target_phase
    from octastem.evaluation import Case, case_frames
    from octastem.potential import projected_potential
    from octastem.stem import simulate_4dstem

    frames = case_frames(Case("Cs", 0.0, "static", 2, 0.4), 2, 1, 0.0, 0)
    stem = simulate_4dstem(
        frames,
        energy_eV=COARSE["energy_eV"],
        semiangle_mrad=COARSE["semiangle_mrad"],
        scan_step_A=0.4,
        sampling_A=COARSE["sampling_A"],
        slice_thickness_A=2.0,
        max_angle_mrad=COARSE["max_angle_mrad"],
        num_workers=2,
        specimen="periodic",
    )
    potential, _, cell_A = projected_potential(frames, sampling_A=COARSE["sampling_A"], progress=False)
    ny, nx = stem.data.shape[:2]
    phase = energy2sigma(COARSE["energy_eV"]) * np.asarray(potential, dtype=np.float64)
    truth = target_phase(phase, (ny * UPSAMPLE, nx * UPSAMPLE), cell_A, COARSE["energy_eV"], COARSE["semiangle_mrad"])
    return stem, truth


def _pearson(stem, truth, method):
    from octastem.cnn.evaluate import pearson
    from octastem.cnn.input import UPSAMPLE, band_limit
    from octastem.stem import reconstruct

    sampling = float(stem.scan_step_A) / UPSAMPLE
    image, pixel = reconstruct(stem, method, sampling_A=sampling)
    assert image.dtype == np.float32 and image.shape == truth.shape and pixel == pytest.approx(sampling)
    assert abs(float(image.mean())) < 1e-4
    image = band_limit(image, (pixel, pixel), COARSE["energy_eV"], COARSE["semiangle_mrad"])
    return pearson(truth, image)


@pytest.mark.parametrize(("method", "threshold"), [("ssb", 0.7), ("wdd", 0.75)])
def test_phase_correlates_with_projected_potential(cell, method, threshold):
    stem, truth = cell
    # measured 0.80 (ssb) and 0.87 (wdd; icom 0.88); the detector transposed or turned by 90 degrees
    # gave at most 0.15, turned by 180 degrees the negative
    assert _pearson(stem, truth, method) > threshold


def test_scan_rotation_follows_the_icom_convention(cell):
    """Detector turned by 90 degrees and recorded as scan_rotation_deg = 90: the same image (as for iCOM)."""
    stem, truth = cell
    turned = replace(stem, data=np.rot90(np.asarray(stem.data), k=1, axes=(2, 3)).copy(), scan_rotation_deg=90.0)
    assert _pearson(turned, truth, "icom") > 0.8
    assert _pearson(turned, truth, "ssb") > 0.7
    assert _pearson(replace(turned, scan_rotation_deg=-90.0), truth, "ssb") < 0.0


def test_refuses_bad_input(cell):
    from octastem.stem import reconstruct
    from octastem.stem.reconstruct import direct_ptychography

    stem, _ = cell
    data = np.asarray(stem.data)
    n = data.shape[2] // 2
    cropped = replace(stem, data=data[:, :, n - 4 : n + 5, n - 4 : n + 5].copy())  # 9 pixels: inside the disc
    with pytest.raises(InputError, match="semiangle_mrad"):
        reconstruct(cropped, "ssb")
    bad = data.astype(np.float32).copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(InputError, match="'data'"):
        reconstruct(replace(stem, data=bad), "ssb")
    with pytest.raises(InputError, match="4x4"):
        reconstruct(replace(stem, data=data[:3, :3].copy()), "wdd")
    with pytest.raises(InputError, match="semiangle_mrad"):
        direct_ptychography(replace(stem, semiangle_mrad=0.0))
    with pytest.raises(InputError, match="no counts"):
        direct_ptychography(replace(stem, data=np.zeros_like(data)))
    with pytest.raises(InputError, match="method"):
        direct_ptychography(stem, "obf")
