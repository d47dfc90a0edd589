"""Ingest of raw 4D-STEM files: round trips per format, calibration, bounded memory, bad input."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest

from octastem.io import InputError, read_4dstem
from octastem.stem import ingest
from octastem.units import electron_wavelength_A

CAL = {
    "energy_eV": 300e3,
    "semiangle_mrad": 20.0,
    "scan_step_A": 0.5,
    "k_sampling_mrad": 1.25,
    "scan_rotation_deg": 12.0,
}
COUNTS_PER_E = 4.0


def counts(shape=(6, 5, 8, 7), electrons_per_position=50.0, seed=0, dtype=np.uint16):
    """Poisson detector counts (counts_per_electron = COUNTS_PER_E) with a known mean dose."""
    rng = np.random.default_rng(seed)
    lam = np.full(shape, electrons_per_position / (shape[2] * shape[3]))
    return (rng.poisson(lam) * COUNTS_PER_E).astype(dtype)


def dose_of(data, step=CAL["scan_step_A"]):
    return data.sum(dtype=np.float64) / COUNTS_PER_E / (data.shape[0] * data.shape[1] * step**2)


def leftovers(folder: Path, name: str):
    return [p.name for p in folder.iterdir() if name in p.name]


def test_npy_round_trip(tmp_path):
    data = counts()
    np.save(tmp_path / "raw.npy", data)
    out = tmp_path / "out.h5"
    summary = ingest(
        tmp_path / "raw.npy",
        out,
        calibration=CAL,
        counts_per_electron=COUNTS_PER_E,
        dose_e_per_A2=dose_of(data),
        chunk_positions=10,
        progress=False,
    )
    stem = read_4dstem(out)
    np.testing.assert_array_equal(stem.data, data.astype(np.float32) / COUNTS_PER_E)
    assert stem.data.dtype == np.float32
    assert stem.energy_eV == CAL["energy_eV"] and stem.scan_rotation_deg == CAL["scan_rotation_deg"]
    assert stem.dose_e_per_A2 == pytest.approx(dose_of(data), rel=1e-9)
    assert summary["format"] == "npy" and summary["chunk_rows"] == 2
    assert summary["calibration_origin"]["energy_eV"] == "config"
    assert stem.source == str(tmp_path / "raw.npy")


def test_hdf5_dataset_path_and_file_calibration(tmp_path):
    data = counts(dtype=np.uint32)
    src = tmp_path / "raw.h5"
    with h5py.File(src, "w") as f:
        f.create_dataset("other/image", data=np.zeros((3, 3)))
        ds = f.create_dataset("entry/scan/frames", data=data, chunks=(1, 5, 8, 7))
        ds.attrs["scan_step_A"] = 0.25  # file calibration wins over the configured 0.5 A
    out = tmp_path / "out.h5"
    summary = ingest(
        src, out, dataset="entry/scan/frames", calibration=CAL, counts_per_electron=COUNTS_PER_E, progress=False
    )
    stem = read_4dstem(out)
    np.testing.assert_array_equal(stem.data, data / COUNTS_PER_E)
    assert stem.scan_step_A == 0.25 and summary["calibration_origin"]["scan_step_A"] == "file"
    assert stem.dose_e_per_A2 == pytest.approx(dose_of(data, 0.25), rel=1e-9)


def test_memory_bounded(tmp_path):
    """A file ~10 chunks long is streamed with peak traced memory below 3 chunks of float32."""
    shape = (80, 16, 32, 32)  # 5.2 MB as float32, 2.6 MB as uint16
    rng = np.random.default_rng(1)
    arr = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.uint16, shape=shape)
    for r in range(shape[0]):
        arr[r] = rng.poisson(0.05, size=shape[1:])
    arr.flush()
    del arr
    chunk_positions = 8 * 16  # 8 rows = 1/10 of the scan
    chunk_bytes = chunk_positions * 32 * 32 * 4
    tracemalloc.start()
    try:
        ingest(
            tmp_path / "big.npy", tmp_path / "out.h5", calibration=CAL, chunk_positions=chunk_positions, progress=True
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * chunk_bytes, f"peak {peak / 1e6:.2f} MB vs chunk {chunk_bytes / 1e6:.2f} MB"
    with h5py.File(tmp_path / "out.h5", "r") as f:
        assert f["data"].shape == shape


def test_emdfile_round_trip(tmp_path):
    emdfile = pytest.importorskip("emdfile")
    data = counts()
    arr = emdfile.Array(
        data=data,
        name="datacube",
        units="counts",
        dims=[0.04, 0.04, 0.1, 0.1],
        dim_units=["nm", "nm", "1/A", "1/A"],
        dim_names=["Ry", "Rx", "Qy", "Qx"],
    )
    root = emdfile.Root(name="root")
    root.tree(arr)
    src = tmp_path / "raw.emd"
    emdfile.save(str(src), root, mode="o")
    out = tmp_path / "out.h5"
    summary = ingest(src, out, calibration=CAL, counts_per_electron=COUNTS_PER_E, progress=False)
    stem = read_4dstem(out)
    assert summary["format"] == "emd"
    np.testing.assert_array_equal(stem.data, data / COUNTS_PER_E)
    assert stem.scan_step_A == pytest.approx(0.4)  # 0.04 nm from the file
    assert summary["calibration_origin"]["scan_step_A"] == "file"
    expected_mrad = 0.1 * electron_wavelength_A(300e3) * 1e3  # 0.1 1/A at 300 kV
    assert stem.k_sampling_mrad == pytest.approx(expected_mrad, rel=1e-6)
    assert electron_wavelength_A(300e3) == pytest.approx(0.019687, rel=1e-4)


def write_mib(path: Path, frames: np.ndarray, scan_shape, exposure_ns=1_000_000):
    """A Merlin .mib (single chip, 12-bit U16, 384-byte headers) and its .hdr, per the Merlin manual."""
    n, h, w = frames.shape
    with open(path, "wb") as f:
        for i in range(n):
            t = f"2024-01-01T00:00:{i // scan_shape[1]:02d}.{i % scan_shape[1]:06d}Z"
            fields = [
                "MQ1",
                f"{i + 1:06d}",
                "00384",
                "01",
                f"{w:04d}",
                f"{h:04d}",
                "U16",
                "   1x1",
                "01",
                t,
                f"{exposure_ns}ns",
                "0",
                "",
            ]  # header ends: timestamp, exposure, bit depth
            header = ",".join(fields).encode()
            f.write(header + b"\x00" * (384 - len(header)))
            f.write(frames[i].astype(">u2").tobytes())
    hdr = f"HDR,\t\nFrames in Acquisition (Number):\t{n}\nFrames per Trigger (Number):\t{scan_shape[1]}\nEnd\t"
    path.with_suffix(".hdr").write_text(hdr)


def test_mib_round_trip(tmp_path):
    pytest.importorskip("rsciio")
    data = counts(shape=(4, 6, 8, 8))
    src = tmp_path / "raw.mib"
    write_mib(src, data.reshape(-1, 8, 8), scan_shape=(4, 6))
    out = tmp_path / "out.h5"
    summary = ingest(src, out, calibration=CAL, counts_per_electron=COUNTS_PER_E, progress=False)
    stem = read_4dstem(out)
    assert summary["format"] == "mib"
    # rosettasciio flips Merlin frames vertically (detector readout order)
    np.testing.assert_array_equal(stem.data, data[:, :, ::-1, :] / COUNTS_PER_E)


def test_empad_round_trip(tmp_path):
    pytest.importorskip("rsciio")
    data = np.random.default_rng(3).gamma(2.0, 1.0, size=(3, 4, 128, 128)).astype(np.float32)
    raw = np.zeros((3, 4, 130, 128), dtype="<f4")  # 2 footer rows per frame
    raw[:, :, :128] = data
    raw.tofile(tmp_path / "scan_x4_y3.raw")
    (tmp_path / "scan.xml").write_text(
        "<root><raw_file filename='scan_x4_y3.raw'/><pix_x>4</pix_x><pix_y>3</pix_y></root>"
    )
    out = tmp_path / "out.h5"
    summary = ingest(tmp_path / "scan.xml", out, calibration=CAL, progress=False)
    stem = read_4dstem(out)
    assert summary["format"] == "empad" and stem.data.shape == (3, 4, 128, 128)
    np.testing.assert_array_equal(stem.data, data)


# ---------------------------------------------------------------------------------------------- errors


def assert_fails(tmp_path, src, match, **kwargs):
    out = tmp_path / "out.h5"
    kwargs.setdefault("calibration", CAL)
    with pytest.raises(InputError, match=match) as info:
        ingest(src, out, progress=False, **kwargs)
    assert not out.exists()
    assert leftovers(tmp_path, "out.h5") == []
    assert str(src) in str(info.value)  # the message names the file


def test_truncated_hdf5(tmp_path):
    src = tmp_path / "raw.h5"
    with h5py.File(src, "w") as f:
        f.create_dataset("data", data=counts(shape=(20, 10, 16, 16)))
    size = src.stat().st_size
    with open(src, "r+b") as fh:
        fh.truncate(size // 2)
    assert_fails(tmp_path, src, "truncated or corrupt")


def test_truncated_npy(tmp_path):
    src = tmp_path / "raw.npy"
    np.save(src, counts())
    with open(src, "r+b") as fh:
        fh.truncate(src.stat().st_size - 100)
    assert_fails(tmp_path, src, "truncated or corrupt")


def test_wrong_rank(tmp_path):
    src = tmp_path / "raw.npy"
    np.save(src, np.ones((4, 5, 6)))
    assert_fails(tmp_path, src, "'data' must be 4D.*scan_shape")
    np.save(src, np.ones((4, 5)))
    assert_fails(tmp_path, src, r"rank 2")


def test_stack_with_scan_shape(tmp_path):
    src = tmp_path / "raw.npy"
    data = counts(shape=(6, 5, 8, 7))
    np.save(src, data.reshape(30, 8, 7))
    out = tmp_path / "stack.h5"
    ingest(src, out, calibration={**CAL, "scan_shape": [6, 5]}, counts_per_electron=COUNTS_PER_E, progress=False)
    np.testing.assert_array_equal(read_4dstem(out).data, data / COUNTS_PER_E)
    assert_fails(tmp_path, src, "scan_shape", calibration={**CAL, "scan_shape": [7, 5]})


@pytest.mark.parametrize("bad, match", [(np.nan, "NaN"), (-1.0, "negative")])
def test_nan_and_negative(tmp_path, bad, match):
    data = counts().astype(np.float32)
    data[4, 3, 2, 1] = bad
    src = tmp_path / "raw.h5"
    with h5py.File(src, "w") as f:
        f.create_dataset("data", data=data)
    assert_fails(tmp_path, src, rf"{match}.*\(4, 3\), pixel \(2, 1\)", chunk_positions=5)


@pytest.mark.parametrize(
    "field", ["energy_eV", "semiangle_mrad", "scan_step_A", "k_sampling_mrad", "scan_rotation_deg"]
)
def test_missing_calibration(tmp_path, field):
    src = tmp_path / "raw.npy"
    np.save(src, counts())
    cal = {k: v for k, v in CAL.items() if k != field}
    assert_fails(tmp_path, src, f"'{field}' is missing", calibration=cal)


def test_invalid_calibration(tmp_path):
    src = tmp_path / "raw.npy"
    np.save(src, counts())
    assert_fails(tmp_path, src, "'scan_step_A' must be a positive", calibration={**CAL, "scan_step_A": -0.5})


def test_inconsistent_dose(tmp_path):
    data = counts()
    src = tmp_path / "raw.npy"
    np.save(src, data)
    dose = dose_of(data)
    # forgetting the counts per electron inflates the dose 4x
    assert_fails(tmp_path, src, r"'dose_e_per_A2': configured .* expected agreement within 20%", dose_e_per_A2=dose)
    # the right conversion passes at 15% off, fails at 30% off
    ingest(
        src,
        tmp_path / "ok.h5",
        calibration=CAL,
        dose_e_per_A2=dose * 1.15,
        counts_per_electron=COUNTS_PER_E,
        progress=False,
    )
    assert_fails(tmp_path, src, "dose_e_per_A2", dose_e_per_A2=dose * 1.3, counts_per_electron=COUNTS_PER_E)


def test_missing_file_and_bad_format(tmp_path):
    with pytest.raises(InputError, match="not found"):
        ingest(tmp_path / "nope.npy", tmp_path / "out.h5", calibration=CAL, progress=False)
    np.save(tmp_path / "raw.npy", counts())
    assert_fails(tmp_path, tmp_path / "raw.npy", "'fmt'", fmt="tiff-stack")
