"""Ingest of real detector files nobody here wrote (rosettasciio's test data, by URL + sha256 through
the registry): a Merlin 4 x 2 acquisition (full frames and a 128-row ROI) and a DECTRIS ARINA
master + data + scan metadata file. Each is read as rosettasciio reads it, bit for bit, and each
wrong setting is refused with a message naming the file and leaving no output."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from octastem.io import InputError, read_4dstem
from octastem.registry import fetch
from octastem.stem import ingest, open_source

CAL = {"energy_eV": 300e3, "semiangle_mrad": 20.0, "scan_step_A": 0.5, "k_sampling_mrad": 1.0, "scan_rotation_deg": 0}
MERLIN = ("001_4x2_6bit.mib", "002_4x2_6bit_roi128.mib")
ARINA = {
    "rsciio_arina_master": "test_00_master.h5",
    "rsciio_arina_data": "test_00_data_000001.h5",
    "rsciio_arina_scan_metadata": "test_00.h5",
}


def obtain(*names: str) -> list[Path]:
    """Verified local copies of registry entries; skips the test when they cannot be obtained."""
    try:
        return [fetch(name) for name in names]
    except InputError as e:
        pytest.skip(f"real detector file not obtainable (no mirror, no internet?): {e}")


@pytest.fixture(scope="module")
def merlin(tmp_path_factory) -> Path:
    """Folder holding the unpacked Merlin acquisitions (.mib + .hdr)."""
    pytest.importorskip("rsciio")
    (archive,) = obtain("rsciio_merlin_4x2")
    folder = tmp_path_factory.mktemp("merlin")
    with zipfile.ZipFile(archive) as z:
        z.extractall(folder)
    return folder


@pytest.fixture
def arina(tmp_path) -> Path:
    """Folder holding the ARINA master, data and scan metadata files side by side."""
    pytest.importorskip("hdf5plugin")
    folder = tmp_path / "arina"
    folder.mkdir()
    for name, path in zip(ARINA.values(), obtain(*ARINA), strict=True):
        shutil.copyfile(path, folder / name)
    return folder


def refused(src: Path, out_dir: Path, match: str, **kwargs) -> str:
    """The InputError message of ingesting ``src``; asserts it names the file and nothing was written."""
    out_dir.mkdir(exist_ok=True)
    kwargs.setdefault("calibration", CAL)
    with pytest.raises(InputError, match=match) as info:
        ingest(src, out_dir / "out.h5", progress=False, **kwargs)
    assert str(src) in str(info.value)
    assert list(out_dir.iterdir()) == []
    return str(info.value)


@pytest.mark.parametrize("name", MERLIN)
def test_merlin_reads_as_rosettasciio(tmp_path, merlin, name):
    from rsciio.quantumdetector import file_reader

    src = merlin / name
    theirs = np.asarray(file_reader(str(src))[0]["data"])  # rosettasciio's own raster (rows from the timestamps)
    stack = np.asarray(file_reader(str(src), navigation_shape=(8,))[0]["data"])
    assert theirs.shape[:2] == (2, 4)
    for scan_shape in (None, [2, 4]):
        with open_source(src, scan_shape=scan_shape) as s:
            mine = s.read(0, s.shape[0])
        assert mine.dtype == theirs.dtype == np.uint8
        np.testing.assert_array_equal(mine, theirs)
    # the raster: frame k of the acquisition is scan position (k // 4, k % 4)
    for k in range(8):
        np.testing.assert_array_equal(mine[k // 4, k % 4], stack[k])
    out = tmp_path / "out.h5"
    summary = ingest(src, out, calibration=CAL, progress=False)
    np.testing.assert_array_equal(read_4dstem(out).data, theirs.astype(np.float32))
    assert summary["shape"] == [2, 4, *theirs.shape[2:]] and summary["format"] == "mib"


@pytest.mark.parametrize(
    "scan_shape, match",
    [
        (
            [4, 2],
            r"'scan_shape' = \(4, 2\) contradicts the file: according to the frame timestamps .* a scan of "
            r"\(2, 4\) \(scan_y, scan_x\); expected scan_shape \[2, 4\]",
        ),
        ([8, 1], r"'scan_shape' = \(8, 1\) contradicts the file"),
        ([2, 2], r"'scan_shape' = \(2, 2\) needs 2 x 2 = 4 frames, the file holds 8"),
        ([4, 4], r"'scan_shape' = \(4, 4\) needs 4 x 4 = 16 frames, the file holds 8"),
    ],
)
def test_merlin_wrong_scan_shape_refused(tmp_path, merlin, scan_shape, match):
    refused(merlin / MERLIN[0], tmp_path / "results", match, calibration={**CAL, "scan_shape": scan_shape})


def test_merlin_header_file_given(tmp_path, merlin):
    refused(
        merlin / "001_4x2_6bit.hdr", tmp_path / "results", r"header file of a Merlin acquisition.*001_4x2_6bit\.mib"
    )


def test_merlin_truncated_copy_refused(tmp_path, merlin):
    src = tmp_path / "cut.mib"
    shutil.copyfile(merlin / MERLIN[0], src)
    shutil.copyfile(merlin / MERLIN[0].replace(".mib", ".hdr"), src.with_suffix(".hdr"))
    with open(src, "r+b") as fh:
        fh.truncate(src.stat().st_size - 1000)
    refused(src, tmp_path / "results", r"ends inside frame 8 \(64920 of its 65920 bytes\): truncated")


def test_arina_reads_as_rosettasciio(tmp_path, arina):
    import h5py
    from rsciio.arina import file_reader

    master = arina / "test_00_master.h5"
    out = tmp_path / "out.h5"
    summary = ingest(master, out, calibration=CAL, progress=False)
    stem = read_4dstem(out)
    assert summary["format"] == "arina" and stem.data.shape == (4, 4, 192, 192)
    assert summary["calibration_origin"]["energy_eV"] == "file" and stem.energy_eV == 300e3  # High Tension
    assert summary["calibration_origin"]["scan_step_A"] == "config"  # pixel size not marked calibrated
    assert summary["reader_notes"]["scan_metadata_file"] == "test_00.h5"
    theirs = file_reader(str(master))[0]["data"]
    np.testing.assert_array_equal(stem.data, theirs.astype(np.float32))
    with h5py.File(arina / "test_00_data_000001.h5", "r") as f:  # the bitshuffle/LZ4 frames themselves
        np.testing.assert_array_equal(stem.data.reshape(16, 192, 192), f["entry/data/data"][()])


def test_arina_without_scan_metadata(tmp_path, arina):
    (arina / "test_00.h5").unlink()
    master = arina / "test_00_master.h5"
    msg = refused(master, tmp_path / "results", r"a DECTRIS ARINA master file: 16 frames of 192 x 192 pixels")
    assert "entry/data/data_000001 (16 frames)" in msg and "scan_y x scan_x = 16" in msg
    refused(
        master,
        tmp_path / "results",
        r"needs 3 x 5 = 15 frames, the file holds 16",
        calibration={**CAL, "scan_shape": [3, 5]},
    )
    summary = ingest(master, tmp_path / "ok.h5", calibration={**CAL, "scan_shape": [4, 4]}, progress=False)
    assert summary["shape"] == [4, 4, 192, 192]


def test_arina_wrong_inputs_name_what_is_there(tmp_path, arina):
    results = tmp_path / "results"
    msg = refused(
        arina / "test_00_master.h5",
        results,
        r"'dataset' = 'entry/data/data' is not a dataset",
        dataset="entry/data/data",
    )
    assert "entry/data/data_000001 (16, 192, 192) uint32 -> test_00_data_000001.h5:/entry/data/data" in msg
    refused(
        arina / "test_00.h5",
        results,
        r"no 4D scan and no 3D frame stack .* give its master file "
        r"test_00_master\.h5",
    )
    refused(arina / "test_00_data_000001.h5", results, r"stack of 16 frames: set calibration field 'scan_shape'")
    refused(
        arina / "test_00_master.h5",
        results,
        r"contradicts the scan metadata file test_00\.h5",
        calibration={**CAL, "scan_shape": [2, 8]},
    )
    refused(arina, results, r"is a directory; expected the data file itself .*test_00_master\.h5")
