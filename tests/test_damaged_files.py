"""Damaged inputs of the MD analysis and the fitter: an InputError naming the file and what was
expected, and no output written."""

import h5py
import numpy as np
import pytest

from octastem import io, stages
from octastem.config import schema_defaults
from octastem.io import InputError
from octastem.md import read_frames
from octastem.structure import build_fapbbr3


def write_trajectory(path, n_frames: int, *, attrs: dict, short: dict | None = None) -> None:
    """A trajectory file of ``n_frames`` frames of the cubic cell with attributes ``attrs``;
    ``short`` names datasets written with fewer frames (name -> frames)."""
    atoms = build_fapbbr3((1, 1, 1))
    short = short or {}
    data = {
        "time_fs": 10.0 * np.arange(n_frames),
        "positions": np.repeat(atoms.positions[None], n_frames, axis=0),
        "cell": np.repeat(atoms.cell.array[None], n_frames, axis=0),
        "energy_eV": np.full(n_frames, -50.0),
        "temperature_K": np.full(n_frames, 300.0),
    }
    with h5py.File(path, "w") as f:
        f["numbers"] = atoms.numbers
        for name, values in data.items():
            f[name] = values[: short.get(name, n_frames)]
        f.attrs.update(attrs)


def analyse(trajectory, tmp_path):
    """The md_analysis stage on ``trajectory``; its two outputs."""
    outputs = tmp_path / "out" / "analysis.json", tmp_path / "out" / "average.extxyz"
    outputs[0].parent.mkdir(exist_ok=True)
    stages.md_analysis(
        trajectory=trajectory, output=outputs[0], average_structure=outputs[1], start_fs=0.0, reps=(1, 1, 1)
    )
    return outputs


FINISHED = dict(total_fs=40.0, frame_interval_fs=10.0, n_frames=5)


def test_complete_trajectory_is_analysed(tmp_path):
    path = tmp_path / "trajectory.h5"
    write_trajectory(path, 5, attrs=FINISHED)
    assert all(p.exists() for p in analyse(path, tmp_path))


@pytest.mark.parametrize(
    "attrs, promise",
    [
        (FINISHED, "its attribute n_frames promises 5"),
        ({"total_fs": 40.0, "frame_interval_fs": 10.0}, "its attributes total_fs=40, frame_interval_fs=10 promise 5"),
    ],
)
def test_trajectory_with_fewer_frames_than_promised(tmp_path, attrs, promise):
    """An interrupted copy: a readable file that ends before its last frame."""
    path = tmp_path / "trajectory.h5"
    write_trajectory(path, 3, attrs=attrs)
    with pytest.raises(InputError, match=f"trajectory.h5: trajectory holds 3 frames, {promise}"):
        analyse(path, tmp_path)
    assert not any((tmp_path / "out").iterdir())


def test_trajectory_datasets_of_unequal_length(tmp_path):
    path = tmp_path / "trajectory.h5"
    write_trajectory(path, 5, attrs=FINISHED, short={"energy_eV": 4})
    expected = "trajectory.h5: trajectory datasets hold different numbers of frames .*energy_eV 4"
    with pytest.raises(InputError, match=expected):
        analyse(path, tmp_path)
    assert not any((tmp_path / "out").iterdir())
    with pytest.raises(InputError, match="time_fs 5, positions 5, cell 5, energy_eV 4, temperature_K 5"):
        read_frames(path)


def test_trajectory_positions_must_match_the_atoms(tmp_path):
    path = tmp_path / "trajectory.h5"
    write_trajectory(path, 5, attrs=FINISHED)
    with h5py.File(path, "a") as f:
        del f["numbers"]
        f["numbers"] = np.ones(3, int)
    with pytest.raises(InputError, match=r"'positions' has shape \(5, 12, 3\), expected \(frames, 3, 3\)"):
        read_frames(path)


def test_truncated_image_given_to_the_fitter(tmp_path):
    image = tmp_path / "image.h5"
    rng = np.random.default_rng(0)
    io.write_image(image, rng.random((64, 64)), sampling_A=0.2, kind="phase", n_cells=2, cell_A=6.0)
    raw = image.read_bytes()
    image.write_bytes(raw[: len(raw) // 2])  # an interrupted copy
    out = tmp_path / "fit"
    out.mkdir()
    with pytest.raises(InputError, match="image.h5: not a readable HDF5 image file, truncated or corrupt"):
        stages.fit(
            image_path=image,
            table=out / "columns.csv",
            summary=out / "summary.json",
            types=schema_defaults("fit", "types"),
            window_A=None,
            se_method=schema_defaults("fit", "se_method"),
            seed=0,
        )
    assert not any(out.iterdir())


def test_image_must_be_2d(tmp_path):
    image = tmp_path / "stack.h5"
    with h5py.File(image, "w") as f:
        f["image"] = np.zeros((2, 8, 8), np.float32)
        f["image"].attrs["sampling_A"] = 0.2
    with pytest.raises(InputError, match=r"stack.h5: field 'image' must be 2D \(y, x\), got shape \(2, 8, 8\)"):
        io.read_image(image)
