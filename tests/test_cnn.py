"""CNN phase reconstruction: canonical input, overlap-add, streamed inference, training, bad input."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from octastem import cnn
from octastem.io import InputError, Stem4D, write_4dstem
from octastem.units import electron_wavelength_A

K_MRAD = 1.0
SEMIANGLE = 14.0  # canonical grid +-28 mrad: needs patterns of at least 2 * 28 + 1 pixels at 1 mrad


def make_stem(ny=6, nx=5, n_k=61, seed=0, **kw) -> Stem4D:
    rng = np.random.default_rng(seed)
    attrs = dict(energy_eV=300e3, semiangle_mrad=SEMIANGLE, scan_step_A=0.3, k_sampling_mrad=K_MRAD, dose_e_per_A2=48.0)
    attrs.update(kw)
    return Stem4D(data=rng.poisson(0.5, size=(ny, nx, n_k, n_k)).astype(np.float32), **attrs)


def small_model(seed=0):
    torch.manual_seed(seed)
    return cnn.build_model(cnn.ModelConfig(width=8, hidden=32)).eval()


def test_overlap_add_of_exact_patches_reproduces_image():
    rng = np.random.default_rng(1)
    image = rng.normal(size=(5 * cnn.UPSAMPLE, 7 * cnn.UPSAMPLE))
    patches = cnn.extract_patches(image, (5, 7))
    assert patches.shape == (5, 7, cnn.PATCH, cnn.PATCH)
    # the centre pixel of the patch of position (iy, ix) is image pixel (iy * f, ix * f)
    assert patches[2, 3, cnn.PATCH // 2, cnn.PATCH // 2] == image[2 * cnn.UPSAMPLE, 3 * cnn.UPSAMPLE]
    total, weight = cnn.overlap_add(patches, image.shape)
    np.testing.assert_allclose(total / weight, image, atol=1e-12)
    # row-chunked accumulation gives the same sums
    t2, w2 = cnn.overlap_add(patches[:2], image.shape, row0=0)
    t2, w2 = cnn.overlap_add(patches[2:], image.shape, row0=2, image=t2, weight=w2)
    np.testing.assert_allclose(t2, total)
    # a wrong patch field is not reproduced
    assert np.abs(cnn.overlap_add(patches[:, ::-1], image.shape)[0] / weight - image).max() > 0.1


def test_canonical_patterns_preserve_counts_and_centre():
    n = 61
    data = np.zeros((1, 1, n, n), np.float32)
    data[0, 0, n // 2, n // 2] = 10.0  # on the optical axis
    data[0, 0, n // 2, n // 2 + 20] = 5.0  # 20 mrad along +k_x
    out = cnn.canonical_patterns(data, K_MRAD, K_MRAD, SEMIANGLE)
    assert out.shape == (1, 1, cnn.N_K, cnn.N_K)
    assert out.sum() == pytest.approx(15.0, rel=1e-6)
    c = cnn.N_K // 2
    # the axis sits on the corner of the four central bins: mass split equally
    np.testing.assert_allclose(out[0, 0, c - 1 : c + 1, c - 1 : c + 1], 2.5, rtol=1e-6)
    # pixel [19.5, 20.5] mrad along x; bins 2.8 mrad wide from -28: 0.1 mrad of it in bin c + 6
    assert out[0, 0, c - 1 : c + 1, c + 7].sum() == pytest.approx(4.5, rel=1e-5)
    assert out[0, 0, c - 1 : c + 1, c + 6].sum() == pytest.approx(0.5, rel=1e-4)
    probe = cnn.probe_pattern()
    assert probe.sum() == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_allclose(probe, probe[::-1, ::-1], atol=1e-7)


def test_target_phase_band_limit_and_resampling():
    energy, alpha = 300e3, 20.0
    k_max = 2 * alpha * 1e-3 / electron_wavelength_A(energy)  # ~2.03 / A
    cell = (8.0, 6.0)
    ny, nx = 120, 160
    x = np.arange(nx) * cell[0] / nx
    y = np.arange(ny) * cell[1] / ny
    X, Y = np.meshgrid(x, y)
    low = 0.7 * np.cos(2 * np.pi * 4 / cell[0] * X)  # 0.5 / A: kept
    high = 0.3 * np.cos(2 * np.pi * 24 / cell[0] * X)  # 3 / A > k_max: removed
    out = cnn.target_phase(low + high + 5.0, (48, 64), cell, energy, alpha)
    assert 3.0 > k_max > 0.5
    xo = np.arange(64) * cell[0] / 64
    expected = 0.7 * np.cos(2 * np.pi * 4 / cell[0] * xo)[None, :] * np.ones((48, 1))
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_predict_shapes_sampling_and_streaming(tmp_path):
    stem = make_stem()
    model = small_model()
    image, sampling = cnn.predict_phase(stem, model=model)
    assert image.shape == (6 * cnn.UPSAMPLE, 5 * cnn.UPSAMPLE)
    assert image.dtype == np.float32
    assert sampling == pytest.approx(0.3 / cnn.UPSAMPLE)
    assert abs(float(image.mean())) < 1e-6 and image.std() > 0
    # small chunks and batches, and the file read row by row, give the same image
    streamed, _ = cnn.predict_phase(stem, model=model, chunk_rows=1, batch_size=7)
    np.testing.assert_allclose(streamed, image, atol=1e-5)
    path = tmp_path / "scan.h5"
    write_4dstem(path, stem)
    from_file, _ = cnn.predict_phase(path, model=model, chunk_rows=2, batch_size=5)
    np.testing.assert_allclose(from_file, image, atol=1e-5)
    # the input is dose-normalised: ten times the counts give the same image
    stem10 = make_stem()
    stem10.data = stem10.data * 10
    np.testing.assert_allclose(cnn.predict_phase(stem10, model=model)[0], image, atol=1e-4)


def test_device_path_matches_numpy_reference():
    stem = make_stem(ny=5, nx=4, seed=2)
    model = small_model(1)
    image, _ = cnn.predict_phase(stem, model=model, chunk_rows=2)
    canon = cnn.canonical_patterns(stem.data, K_MRAD, K_MRAD, SEMIANGLE)
    norm = float(canon.sum(axis=(2, 3)).mean())
    s_param = cnn.sampling_parameter(stem.energy_eV, SEMIANGLE, stem.scan_step_A)
    rows = canon[[4, 0, 1, 2, 3, 4, 0]]  # periodic padding of one row on each side
    with torch.no_grad():
        patches = model(torch.from_numpy(cnn.kernel_inputs(rows, norm, s_param))).numpy()
    total, weight = cnn.overlap_add(patches.reshape(5, 4, cnn.PATCH, cnn.PATCH), image.shape)
    expected = total / weight
    np.testing.assert_allclose(image, expected - expected.mean(), atol=1e-5)


def test_kernel_inputs_hold_periodic_neighbours():
    canon = np.arange(5 * 4, dtype=np.float32).reshape(5, 4, 1, 1) * np.ones((1, 1, cnn.N_K, cnn.N_K), np.float32)
    x = cnn.kernel_inputs(canon, norm=cnn.INPUT_SCALE, s_param=0.5)  # rows 1..3 are the centre rows
    assert x.shape == (3 * 4, cnn.KERNEL**2 + 2, cnn.N_K, cnn.N_K)
    # centre row 0 (canon row 1), column 0: neighbours (dy, dx) in row-major order, columns wrap
    got = x[0, :9, 0, 0].reshape(3, 3)
    expected = np.array([[canon[r, c % 4, 0, 0] for c in (-1, 0, 1)] for r in (0, 1, 2)])
    np.testing.assert_array_equal(got, expected)
    assert np.all(x[:, 10] == 0.5)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"n_k": 41}, "reach only"),  # +-20 mrad detector < +-28 mrad needed
        ({"ny": 2}, "smaller than the 3x3 kernel"),
        ({"nx": 2}, "smaller than the 3x3 kernel"),
        ({"semiangle_mrad": float("nan")}, "semiangle_mrad"),
        ({"k_sampling_mrad": 0.0}, "k_sampling"),
        ({"scan_step_A": -1.0}, "scan_step"),
    ],
)
def test_bad_input_raises_clear_error(change, message):
    shape = {k: change.pop(k) for k in ("ny", "nx", "n_k") if k in change}
    stem = make_stem(**shape, **change)
    with pytest.raises(InputError, match=message):
        cnn.predict_phase(stem, model=small_model())


def test_missing_calibration_in_file_and_bad_weights(tmp_path):
    path = tmp_path / "nocal.h5"
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("data", data=np.ones((4, 4, 61, 61), np.float32))
        for k, v in {"energy_eV": 300e3, "scan_step_A": 0.3, "k_sampling_mrad": 1.0}.items():
            ds.attrs[k] = v
    with pytest.raises(InputError, match="semiangle_mrad"):
        cnn.predict_phase(path, model=small_model())
    with pytest.raises(InputError, match="not found"):
        cnn.load_model(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    torch.save({"weights": 1}, bad)
    with pytest.raises(InputError, match="'model'"):
        cnn.load_model(bad)
    # a saved model loads back with the same outputs
    model = small_model()
    cnn.save_weights(tmp_path / "w.pt", model)
    again = cnn.load_model(tmp_path / "w.pt", device="cpu")
    x = torch.randn(3, cnn.KERNEL**2 + 2, cnn.N_K, cnn.N_K)
    torch.testing.assert_close(again(x), model(x))


def synthetic_shard(path, n_scans=3, ny=8, nx=8, seed=0):
    """Scans whose patterns are spots displaced by the local phase gradient: a learnable mapping."""
    rng = np.random.default_rng(seed)
    f = cnn.UPSAMPLE
    k = np.arange(cnn.N_K) - cnn.N_K / 2 + 0.5
    with h5py.File(path, "w") as h:
        for i in range(n_scans):
            H, W = ny * f, nx * f
            yy, xx = np.meshgrid(np.arange(H) / H, np.arange(W) / W, indexing="ij")
            kx, ky = rng.integers(1, 3, size=2)
            phase = np.cos(2 * np.pi * (kx * xx + rng.random())) * np.sin(2 * np.pi * (ky * yy + rng.random()))
            phase = (phase - phase.mean()).astype(np.float32)
            gy, gx = np.gradient(phase)
            cy, cx = gy[::f, ::f] * 20, gx[::f, ::f] * 20
            spots = np.exp(
                -(
                    (k[None, None, :, None] - cy[..., None, None]) ** 2
                    + (k[None, None, None, :] - cx[..., None, None]) ** 2
                )
                / 8.0
            )
            spots /= spots.sum(axis=(2, 3), keepdims=True)
            g = h.create_group(f"scan_{i:05d}")
            g.create_dataset("patterns", data=spots.astype(np.float32))
            g.create_dataset("phase", data=phase)
            for key, v in {
                "energy_eV": 300e3,
                "semiangle_mrad": 25.0,
                "scan_step_x_A": 0.3,
                "scan_step_y_A": 0.3,
            }.items():
                g.attrs[key] = v
    return path


def tiny_train_config(**changes) -> cnn.TrainConfig:
    """A small network and a short run on the synthetic shards."""
    settings = dict(seed=3, batch_size=32, lr=3e-3, val_fraction=0.34, val_batches=2, width=8, hidden=32)
    return cnn.TrainConfig.from_schema(**{**settings, **changes})


def test_training_decreases_loss_and_resumes_identically(tmp_path):
    shard = synthetic_shard(tmp_path / "shard.h5")
    config = tiny_train_config(epochs=4, steps_per_epoch=12)
    full = cnn.train([shard], tmp_path / "full", config, device="cpu", threads=1)
    hist = [row for row in (tmp_path / "full" / "curve.csv").read_text().splitlines()[1:]]
    train_losses = [float(r.split(",")[1]) for r in hist]
    val_losses = [float(r.split(",")[2]) for r in hist]
    assert len(hist) == 4 and full["epochs_done"] == 4
    assert train_losses[-1] < 0.7 * train_losses[0]
    assert np.all(np.isfinite(val_losses))
    assert (tmp_path / "full" / "curve.png").stat().st_size > 0
    # interrupted after the first epoch (time limit 0), then resumed from the checkpoint
    part = cnn.train([shard], tmp_path / "part", config, device="cpu", max_minutes=0.0, threads=1)
    assert part["stopped_early_by_time_limit"] and part["epochs_done"] == 1
    resumed = cnn.train([shard], tmp_path / "part", config, device="cpu", threads=1)
    assert resumed["epochs_done"] == 4
    a = torch.load(tmp_path / "full" / "weights.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "part" / "weights.pt", weights_only=True)["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    # a checkpoint written with other settings is refused
    other = cnn.TrainConfig(**{**config.__dict__, "lr": 1e-3})
    with pytest.raises(InputError, match="different settings"):
        cnn.train([shard], tmp_path / "part", other, device="cpu", threads=1)


def test_fine_tune_starts_from_weights_and_keeps_their_validation_scans_out(tmp_path):
    first = synthetic_shard(tmp_path / "shard_a.h5", n_scans=3, seed=0)
    config = tiny_train_config(epochs=3, steps_per_epoch=10)
    base = cnn.train([first], tmp_path / "base", config, device="cpu", threads=1)
    (held,) = base["val_scans"]
    # a second shard and another split seed: the base model's validation scan stays out of training
    second = synthetic_shard(tmp_path / "shard_b.h5", n_scans=3, seed=1)
    tune = cnn.TrainConfig(
        **{**config.__dict__, "seed": 5, "epochs": 2, "init_weights": str(tmp_path / "base" / "weights.pt")}
    )
    train_names, val_names = cnn.split_scans([first, second], tune.val_fraction, tune.seed, keep_out=[held])
    assert tuple(held) in [tuple(v) for v in val_names] and tuple(held) not in [tuple(t) for t in train_names]
    # the fine-tune starts at the base model's loss, far below a fresh model's first epoch
    fresh = cnn.train(
        [first, second],
        tmp_path / "fresh",
        cnn.TrainConfig(**{**tune.__dict__, "init_weights": None}),
        device="cpu",
        threads=1,
    )
    tuned = cnn.train([first, second], tmp_path / "tuned", tune, device="cpu", threads=1)
    assert tuple(held) in [tuple(v) for v in tuned["val_scans"]]
    assert tuned["final_train_loss"] < 0.85 * fresh["final_train_loss"]
    assert tuned["final_train_loss"] < 1.2 * base["final_train_loss"]
    # weights of another network size are refused
    wide = cnn.TrainConfig(**{**tune.__dict__, "width": 16})
    with pytest.raises(InputError, match="width"):
        cnn.train([first], tmp_path / "wide", wide, device="cpu", threads=1)


def test_training_set_excludes_held_out_material():
    from octastem.cnn import data as cnn_data

    rng = np.random.default_rng(0)
    for _ in range(6):
        atoms, info = cnn_data.random_structure(rng, "hybrid_perovskite")
        symbols = atoms.get_chemical_symbols()
        # the held-out chemistry (Pb, Br and an organic cation) is never drawn
        assert not {"Pb", "Br", "C", "N", "H"} <= set(symbols)
        # the organic cation is methylammonium (C:N = 1:1), never formamidinium (C:N = 1:2)
        assert symbols.count("C") == symbols.count("N") > 0
        assert np.allclose(atoms.cell.angles(), 90.0, atol=0.5)
        assert min(atoms.cell.lengths()[:2]) >= cnn_data.MIN_CELL_A


def _in_plane_displacements(before, after):
    d = after.positions - before.positions
    lengths = before.cell.lengths()
    return d - np.round(d / lengths) * lengths


def test_static_distortion_splits_or_spreads_one_species():
    from octastem.cnn import data as cnn_data

    atoms, _ = cnn_data.random_structure(np.random.default_rng(2), "perovskite")
    seen = set()
    for k in range(12):
        out, info = cnn_data.static_distortion(atoms, np.random.default_rng(k))
        seen.add(info["static_mode"])
        d = _in_plane_displacements(atoms, out)
        symbols = np.array(atoms.get_chemical_symbols())
        moved = symbols == info["static_species"]
        amp = info["static_amplitude_A"]
        assert cnn_data.STATIC_AMPLITUDE_A[0] <= amp <= cnn_data.STATIC_AMPLITUDE_A[1]
        # only that species moves, only in the plane
        assert np.abs(d[~moved]).max() < 1e-9 and np.abs(d[:, 2]).max() < 1e-9
        if info["static_mode"] == "split":
            # every atom by the amplitude; along each column the direction alternates
            np.testing.assert_allclose(np.hypot(d[moved, 0], d[moved, 1]), amp, rtol=1e-9)
            pos = atoms.positions[moved]
            dm = d[moved]
            key = np.round(pos[:, :2] / 0.2).astype(int)
            for col in np.unique(key, axis=0):
                members = np.flatnonzero((key == col).all(axis=1))
                members = members[np.argsort(pos[members, 2])]
                if len(members) > 1:
                    np.testing.assert_allclose(dm[members[1:]], -dm[members[:-1]], atol=1e-9)
        else:
            rms = np.sqrt((d[moved, :2] ** 2).mean())
            assert 0.6 * amp < rms < 1.4 * amp
    assert seen == set(cnn_data.STATIC_MODES)


def test_simulate_scan_conventions():
    from ase import Atoms

    from octastem.cnn import simulate_scan

    atoms = Atoms("Au", positions=[[1.0, 2.0, 1.0]], cell=[4.0, 4.0, 2.0], pbc=True)
    sim = simulate_scan([atoms], 300e3, 20.0, 1.0, sampling_A=0.1, slice_thickness_A=1.0)
    ny, nx, n_ky, n_kx = sim["data"].shape
    assert (ny, nx) == (4, 4) and n_ky % 2 == 1 and n_kx % 2 == 1
    # noise-free patterns hold the fraction of the beam (~1 within 2.2 alpha)
    assert 0.8 < float(sim["data"].sum(axis=(2, 3)).mean()) <= 1.0 + 1e-4
    # the phase peaks at the atom: x = 1.0 A (column 10), y = 2.0 A (row 20)
    iy, ix = np.unravel_index(np.argmax(sim["phase_fine"]), sim["phase_fine"].shape)
    assert (iy, ix) == (20, 10)
    # COM points towards the atom (attractive potential): left of the atom -> deflection to +x
    k = np.arange(n_kx) - n_kx // 2
    com_x = (sim["data"] * k).sum(axis=(2, 3)) / sim["data"].sum(axis=(2, 3))
    assert com_x[2, 0] > 0 > com_x[2, 2]


def test_reconstruct_dispatch_uses_committed_weights():
    from octastem.stem import METHODS, reconstruct

    assert "cnn" in METHODS and cnn.DEFAULT_WEIGHTS.exists()
    stem = make_stem()
    image, sampling = reconstruct(stem, "cnn")
    assert image.shape == (6 * cnn.UPSAMPLE, 5 * cnn.UPSAMPLE) and sampling == pytest.approx(0.075)
    finer, s2 = reconstruct(stem, "cnn", sampling_A=0.05)  # Fourier-interpolated onto 0.05 A pixels
    assert finer.shape == (36, 30) and s2 == pytest.approx(0.05)


def test_held_out_structure_and_metrics():
    from octastem.cnn import held_out_frames, pearson, ssim

    frames = held_out_frames(reps=(2, 2, 2), rattle_A=0.0, n_frames=1)
    atoms = frames[0]
    br = atoms.positions[atoms.arrays["site"] == "Br"]
    # Br on the x bonds (x = 3 mod 6) moved by +-0.2 A along y, alternating along z
    on_x = np.isclose(br[:, 0] % 6.0, 3.0)
    dy = (br[on_x, 1] + 0.3) % 6.0 - 0.3
    np.testing.assert_allclose(np.abs(dy), 0.2, atol=1e-9)
    assert set(np.sign(dy)) == {-1.0, 1.0}
    rng = np.random.default_rng(0)
    a = rng.normal(size=(32, 32))
    assert pearson(a, 2 * a + 1) == pytest.approx(1.0)
    assert ssim(a, a) == pytest.approx(1.0)
    assert ssim(a, a + rng.normal(size=a.shape)) < 0.8
