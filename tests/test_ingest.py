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


def write_mib(
    path: Path, frames: np.ndarray, scan_shape, exposure_ns=1_000_000, data_type="U16", planned=None, per_trigger=None
):
    """A Merlin .mib (single chip, 12-bit U16, 384-byte headers) and its .hdr, per the Merlin manual.

    The timestamps jump by a second at each scan row; the .hdr records ``planned`` frames (default:
    all) and ``per_trigger`` frames per trigger (default: one scan row)."""
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
                data_type,
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
    per_trigger = scan_shape[1] if per_trigger is None else per_trigger
    hdr = (
        f"HDR,\t\nFrames in Acquisition (Number):\t{n if planned is None else planned}\n"
        f"Frames per Trigger (Number):\t{per_trigger}\nEnd\t"
    )
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


@pytest.mark.parametrize("field", ["energy_eV", "semiangle_mrad", "scan_step_A", "k_sampling_mrad"])
def test_missing_calibration(tmp_path, field):
    src = tmp_path / "raw.npy"
    np.save(src, counts())
    cal = {k: v for k, v in CAL.items() if k != field}
    assert_fails(tmp_path, src, f"'{field}' is missing", calibration=cal)


def test_unset_rotation_is_measured_and_needs_the_origin_measurement(tmp_path):
    src = tmp_path / "raw.npy"
    np.save(src, counts())
    cal = {k: v for k, v in CAL.items() if k != "scan_rotation_deg"}
    assert_fails(tmp_path, src, "'scan_rotation_deg' is unset .* origin = 'off' skips", calibration=cal, origin="off")
    # flat noise holds no disc to measure anything from
    assert_fails(tmp_path, src, "no bright-field disc found in the mean pattern", calibration=cal, origin="plane")


@pytest.mark.parametrize(
    "field, value, slip",
    [
        ("energy_eV", 300.0, r"kV or keV typed as eV \(did you mean 300000\?\)"),
        ("semiangle_mrad", 0.02, r"rad typed as mrad \(did you mean 20\?\)"),
        ("scan_step_A", 0.004, r"nm typed as A \(did you mean 0.04\?\)"),
        ("scan_step_A", 40.0, r"pm typed as A \(did you mean 0.4\?\)"),
    ],
)
def test_implausible_calibration_names_the_slip(tmp_path, field, value, slip):
    src = tmp_path / "raw.npy"
    np.save(src, counts())
    match = rf"'{field}' = {value:g} \(config\) is implausible; expected .*{slip}"
    assert_fails(tmp_path, src, match, calibration={**CAL, field: value})


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


def test_directory_is_refused(tmp_path):
    folder = tmp_path / "scan_001"
    folder.mkdir()
    (folder / "scan_001.mib").write_bytes(b"")
    assert_fails(tmp_path, folder, r"is a directory; expected the data file itself.*scan_001\.mib")


def test_wrong_dataset_lists_the_datasets(tmp_path):
    src = tmp_path / "raw.h5"
    with h5py.File(src, "w") as f:
        f.create_dataset("entry/frames", data=counts(shape=(2, 3, 8, 8)))
        f.create_dataset("entry/stack", data=counts(shape=(2, 3, 8, 8)).reshape(6, 8, 8))
        f.create_dataset("entry/dark", data=np.zeros((8, 8)))
    match = r"'dataset' = 'entry/frame' is not a dataset.*entry/frames \(2, 3, 8, 8\) uint16; entry/stack \(6, 8, 8\)"
    assert_fails(tmp_path, src, match + ".*other datasets: entry/dark", dataset="entry/frame")
    # two frame stacks and no `dataset`: both listed
    with h5py.File(src, "a") as f:
        del f["entry/frames"]
        f.create_dataset("entry/stack_b", data=counts(shape=(2, 3, 8, 8)).reshape(6, 8, 8))
    match = r"'dataset' .* must be configured: it holds 2 candidate.*entry/stack \(6, 8, 8\) uint16; entry/stack_b"
    assert_fails(tmp_path, src, match)


def test_lone_frame_stack_needs_its_scan_shape(tmp_path):
    src = tmp_path / "stack.h5"
    data = counts(shape=(3, 3, 8, 8))
    with h5py.File(src, "w") as f:
        f.create_dataset("entry/frames", data=data.reshape(9, 8, 8))
    assert_fails(tmp_path, src, r"stack of 9 frames: set calibration field 'scan_shape'")
    assert_fails(tmp_path, src, r"'scan_shape' = \(2, 4\) needs 2 x 4 = 8 frames, the file holds 9", **_shape(2, 4))
    ingest(src, tmp_path / "ok.h5", calibration={**CAL, "scan_shape": [3, 3]}, progress=False)
    np.testing.assert_array_equal(read_4dstem(tmp_path / "ok.h5").data, data)


def test_scan_shape_must_match_a_4d_scan(tmp_path):
    src = tmp_path / "raw.npy"
    np.save(src, counts(shape=(6, 5, 8, 7)))
    assert_fails(
        tmp_path, src, r"'scan_shape' = \(5, 6\) contradicts the scan of the 4D data, \(6, 5\)", **_shape(5, 6)
    )


def _shape(ny, nx):
    return {"calibration": {**CAL, "scan_shape": [ny, nx]}}


# ---------------------------------------------------------------------------------------------- Merlin


@pytest.fixture
def nine_frames(tmp_path):
    """A Merlin acquisition of 9 frames: a 3 x 3 scan (3 frames per trigger) and its frames."""
    pytest.importorskip("rsciio")
    data = counts(shape=(3, 3, 8, 8))
    src = tmp_path / "nine.mib"
    write_mib(src, data.reshape(9, 8, 8), scan_shape=(3, 3))
    return src, data


@pytest.mark.parametrize("scan_shape, needs", [((2, 4), 8), ((2, 2), 4), ((4, 4), 16)])
def test_mib_frame_count_must_match_scan_shape(tmp_path, nine_frames, scan_shape, needs):
    src, _ = nine_frames
    match = rf"nine\.mib: field 'scan_shape' = \({scan_shape[0]}, {scan_shape[1]}\) needs .* = {needs} frames, "
    assert_fails(tmp_path, src, match + "the file holds 9", **_shape(*scan_shape))


def test_mib_scan_rows_from_the_hdr(tmp_path, nine_frames):
    from rsciio.quantumdetector import file_reader

    src, data = nine_frames
    out = tmp_path / "nine.h5"
    summary = ingest(src, out, calibration={**CAL, "scan_shape": [3, 3]}, progress=False)
    expected = np.asarray(file_reader(str(src), navigation_shape=(3, 3))[0]["data"])
    np.testing.assert_array_equal(read_4dstem(out).data, expected)
    np.testing.assert_array_equal(expected, data[:, :, ::-1, :])  # rows, columns; readout flipped vertically
    assert summary["shape"] == [3, 3, 8, 8]
    # the .hdr records 3 frames per trigger (one scan row): a 9 x 1 scan contradicts it
    assert_fails(tmp_path, src, r"contradicts the file: according to the \.hdr .* a scan of \(3, 3\)", **_shape(9, 1))


def test_mib_single_frame(tmp_path):
    pytest.importorskip("rsciio")
    src = tmp_path / "frame.mib"
    write_mib(src, counts(shape=(1, 1, 8, 8)).reshape(1, 8, 8), scan_shape=(1, 1))
    assert_fails(tmp_path, src, r"a single Merlin frame \(8 x 8 pixels, U16\), not a 4D scan")
    src.with_suffix(".hdr").unlink()
    assert_fails(tmp_path, src, "a single Merlin frame")


def test_mib_raw_counter_data(tmp_path):
    pytest.importorskip("rsciio")
    src = tmp_path / "raw.mib"
    write_mib(src, counts(shape=(2, 2, 8, 8)).reshape(4, 8, 8), scan_shape=(2, 2), data_type="R64")
    assert_fails(tmp_path, src, "a Merlin RAW acquisition .*R64.*rosettasciio does not decode RAW", **_shape(2, 2))


def test_mib_truncated_and_interrupted(tmp_path):
    pytest.importorskip("rsciio")
    frames = counts(shape=(3, 3, 8, 8)).reshape(9, 8, 8)
    src = tmp_path / "cut.mib"
    write_mib(src, frames, scan_shape=(3, 3))
    with open(src, "r+b") as fh:
        fh.truncate(src.stat().st_size - 100)
    assert_fails(tmp_path, src, r"ends inside frame 9 \(412 of its 512 bytes\): truncated")
    # 9 frames of a planned 4 x 4 scan: refused without a scan shape, not cut to whole rows
    src = tmp_path / "stopped.mib"
    write_mib(src, frames, scan_shape=(3, 4), planned=16)
    assert_fails(tmp_path, src, r"the \.hdr records 16 frames in the acquisition, the file holds 9")
    assert_fails(tmp_path, src, r"scan rows are 4 frames long, and 9 frames are not whole rows", **_shape(3, 3))


def test_mib_without_recorded_rows_needs_scan_shape(tmp_path):
    pytest.importorskip("rsciio")
    frames = counts(shape=(2, 3, 8, 8)).reshape(6, 8, 8)
    src = tmp_path / "flat.mib"
    write_mib(src, frames, scan_shape=(1, 6), per_trigger=1)  # evenly spaced frames, one trigger
    assert_fails(tmp_path, src, r"stack of 6 Merlin frames whose scan shape the file does not record")
    ingest(src, tmp_path / "ok.h5", calibration={**CAL, "scan_shape": [2, 3]}, progress=False)
    assert read_4dstem(tmp_path / "ok.h5").data.shape == (2, 3, 8, 8)


def test_not_a_mib_file(tmp_path):
    src = tmp_path / "notes.mib"
    src.write_text("scan notes, not frames")
    assert_fails(tmp_path, src, "not a Merlin .mib file")


# ---------------------------------------------------------------------------------------------- ARINA


def write_arina(folder: Path, frames: np.ndarray, per_file: int, scan_shape=None, mask=None) -> Path:
    """A DECTRIS ARINA acquisition: master file linking to bitshuffle/LZ4 data files (+ scan metadata)."""
    hdf5plugin = pytest.importorskip("hdf5plugin")
    n = len(frames)
    master = folder / "scan_master.h5"
    with h5py.File(master, "w") as f:
        for i, start in enumerate(range(0, n, per_file), start=1):
            name = f"scan_data_{i:06d}.h5"
            with h5py.File(folder / name, "w") as d:
                chunk = frames[start : start + per_file]
                d.create_dataset("entry/data/data", data=chunk, chunks=(1, *chunk.shape[1:]), **hdf5plugin.Bitshuffle())
            f[f"entry/data/data_{i:06d}"] = h5py.ExternalLink(name, "/entry/data/data")
        spec = "entry/instrument/detector/detectorSpecific"
        f[f"{spec}/nimages"], f[f"{spec}/ntrigger"] = np.uint64(1), np.uint64(n)
        f[f"{spec}/pixel_mask"] = np.zeros(frames.shape[1:], np.uint32) if mask is None else mask
    if scan_shape is not None:
        write_scan_metadata(folder, scan_shape)
    return master


def write_scan_metadata(folder: Path, scan_shape) -> None:
    """The scan metadata file next to ``scan_master.h5``: scan shape, 200 kV, 0.05 nm calibrated steps."""
    with h5py.File(folder / "scan.h5", "w") as m:
        attrs = m.create_group("STEM Metadata").attrs
        attrs["NumPixelsY"], attrs["NumPixelsX"] = scan_shape
        attrs["High Tension"], attrs["Pixel Size"] = np.array([200000.0]), np.array([0.05])
        attrs["IsPixelSizeCalibrated"] = np.array([1], np.uint8)


def test_arina_round_trip(tmp_path):
    data = counts(shape=(3, 4, 12, 12), dtype=np.uint32)  # square frames: rosettasciio's reader needs them
    master = write_arina(tmp_path, data.reshape(12, 12, 12), per_file=5, scan_shape=(3, 4))
    out = tmp_path / "out.h5"
    summary = ingest(master, out, calibration=CAL, counts_per_electron=COUNTS_PER_E, progress=False)
    stem = read_4dstem(out)
    np.testing.assert_array_equal(stem.data, data / COUNTS_PER_E)  # 3 data files joined, rows filled in order
    assert summary["format"] == "arina" and summary["reader_notes"]["data_links"][-1] == "entry/data/data_000003"
    assert stem.energy_eV == 200e3 and stem.scan_step_A == pytest.approx(0.5)  # from the scan metadata file
    assert summary["calibration_origin"]["energy_eV"] == "file"
    rsciio_arina = pytest.importorskip("rsciio.arina")
    theirs = rsciio_arina.file_reader(str(master), navigation_shape=(3, 4))[0]["data"]
    np.testing.assert_array_equal(theirs.reshape(12, 12, 12), data.reshape(12, 12, 12))


def test_arina_scan_shape_checks(tmp_path):
    frames = counts(shape=(3, 4, 12, 10), dtype=np.uint32).reshape(12, 12, 10)
    master = write_arina(tmp_path, frames, per_file=12)
    assert_fails(
        tmp_path,
        master,
        r"a DECTRIS ARINA master file: 12 frames of 12 x 10 pixels \(uint32\) in "
        r"entry/data/data_000001 \(12 frames\); no scan metadata file scan\.h5",
    )
    assert_fails(
        tmp_path, master, r"'scan_shape' = \(4, 4\) needs 4 x 4 = 16 frames, the file holds 12", **_shape(4, 4)
    )
    write_scan_metadata(tmp_path, (3, 4))
    assert_fails(tmp_path, master, r"contradicts the scan metadata file scan\.h5.*\(3, 4\)", **_shape(4, 3))
    write_scan_metadata(tmp_path, (4, 4))
    assert_fails(tmp_path, master, r"scan\.h5 records a scan of .* \(4, 4\), 16 positions, but the data files hold 12")


def test_arina_missing_data_file_and_filter(tmp_path, monkeypatch):
    frames = counts(shape=(2, 4, 12, 10), dtype=np.uint32).reshape(8, 12, 10)
    master = write_arina(tmp_path, frames, per_file=4, scan_shape=(2, 4))
    monkeypatch.setattr(h5py.h5z, "filter_avail", lambda fid: fid != 32008)
    assert_fails(tmp_path, master, r"compressed with HDF5 filter 32008 \(bitshuffle\).*hdf5plugin")
    monkeypatch.undo()
    (tmp_path / "scan_data_000002.h5").unlink()
    assert_fails(
        tmp_path,
        master,
        r"entry/data/data_000002 links to scan_data_000002\.h5:/entry/data/data, which is "
        "missing",
    )
    # naming a dataset that is not there lists what the master holds, through its links
    assert_fails(
        tmp_path,
        master,
        r"'entry/data/data' is not a dataset.*entry/data/data_000001 \(4, 12, 10\) uint32 "
        r"-> scan_data_000001\.h5:/entry/data/data",
        dataset="entry/data/data",
    )


def test_arina_flagged_pixels_read_as_zero(tmp_path):
    frames = counts(shape=(2, 2, 12, 10), dtype=np.uint32).reshape(4, 12, 10)
    mask = np.zeros((12, 10), np.uint32)
    mask[3, 4] = 2  # a dead pixel: the detector writes its largest count there
    frames[:, 3, 4] = np.iinfo(np.uint32).max
    master = write_arina(tmp_path, frames, per_file=4, scan_shape=(2, 2), mask=mask)
    summary = ingest(master, tmp_path / "out.h5", calibration=CAL, progress=False)
    stem = read_4dstem(tmp_path / "out.h5")
    assert summary["reader_notes"]["pixels_masked"] == 1 and stem.data[:, :, 3, 4].max() == 0
    expected = frames.astype(np.float32)
    expected[:, 3, 4] = 0
    np.testing.assert_array_equal(stem.data.reshape(4, 12, 10), expected)
