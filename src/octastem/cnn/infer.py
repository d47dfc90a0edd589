"""CNN inference: a phase image from a 4D-STEM dataset, streamed over scan rows.

For every scan position the network predicts the phase in a patch of ``PATCH`` x ``PATCH``
pixels around it, sampled ``UPSAMPLE`` times finer than the scan step. The patches are combined
by weighted overlap-add (periodic, like iCOM) into a phase image of (scan_y * UPSAMPLE,
scan_x * UPSAMPLE) pixels; pixel (jy, jx) lies at (x = jx * step_x / UPSAMPLE,
y = jy * step_y / UPSAMPLE), so scan position (iy, ix) is pixel (iy * UPSAMPLE, ix * UPSAMPLE).

:func:`overlap_add` and :func:`extract_patches` are the numpy references of the overlap-add;
:class:`_DeviceOps` does the same arithmetic in torch on the model's device.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from octastem.io import InputError, Stem4D, open_4dstem

from .input import (
    INPUT_SCALE,
    N_CHANNELS,
    N_K,
    PATCH,
    UPSAMPLE,
    _rebin_matrix,
    check_scan,
    probe_pattern,
    sampling_parameter,
)
from .model import load_model

# ----------------------------------------------------------------------------------------------
# Overlap-add (numpy reference)
# ----------------------------------------------------------------------------------------------


def patch_window(patch: int = PATCH) -> np.ndarray:
    """Separable overlap-add weights (patch, patch): cos^2 taper, positive everywhere."""
    c = (patch - 1) / 2
    h = np.cos(np.pi * (np.arange(patch) - c) / (patch + 1)) ** 2
    return np.outer(h, h).astype(np.float64)


def overlap_add(patches: np.ndarray, out_shape: tuple[int, int], row0: int = 0, image=None, weight=None):
    """Accumulate patches (rows, scan_x, P, P) of scan rows row0.. into a periodic image.

    Patch pixel (py, px) of position (iy, ix) lands on image pixel
    ((iy * f + py - P // 2) mod H, (ix * f + px - P // 2) mod W), weighted by :func:`patch_window`.
    Returns (image_sum, weight_sum); the phase image is image_sum / weight_sum.
    """
    H, W = out_shape
    rows, nx, P, _ = patches.shape
    f = UPSAMPLE
    c = P // 2
    win = patch_window(P)
    if image is None:
        image = np.zeros(out_shape, dtype=np.float64)
        weight = np.zeros(out_shape, dtype=np.float64)
    iy = (np.arange(rows) + row0) * f
    ix = np.arange(nx) * f
    for py in range(P):
        ry = (iy + py - c) % H
        for px in range(P):
            rx = (ix + px - c) % W
            image[np.ix_(ry, rx)] += win[py, px] * patches[:, :, py, px]
            weight[np.ix_(ry, rx)] += win[py, px]
    return image, weight


def extract_patches(image: np.ndarray, scan_shape: tuple[int, int], patch: int = PATCH) -> np.ndarray:
    """Patches (scan_y, scan_x, P, P) of a periodic image around every scan position (inverse view of overlap_add)."""
    ny, nx = scan_shape
    H, W = image.shape
    c = patch // 2
    ry = (np.arange(ny)[:, None] * UPSAMPLE + np.arange(patch)[None, :] - c) % H
    rx = (np.arange(nx)[:, None] * UPSAMPLE + np.arange(patch)[None, :] - c) % W
    return image[ry[:, None, :, None], rx[None, :, None, :]]


# ----------------------------------------------------------------------------------------------
# Sources: a Stem4D in memory or a 4D-STEM file read row by row
# ----------------------------------------------------------------------------------------------


@dataclass
class _Source:
    """Row access to a 4D-STEM dataset in memory or in an HDF5 file, with its calibration."""

    rows: Callable[[list[int]], np.ndarray]  # row indices -> (len, scan_x, k_y, k_x)
    shape: tuple
    energy_eV: float
    semiangle_mrad: float
    step_x_A: float
    step_y_A: float
    k_x_mrad: float
    k_y_mrad: float
    name: str


def _calibration(attrs: dict, name: str) -> dict:
    """The calibration of the 4D-STEM attributes ``attrs``; per-axis values fall back to the scalars."""

    def get(key, fallback_key=None):
        value = attrs.get(key, attrs.get(fallback_key)) if fallback_key else attrs.get(key)
        if value is None:
            raise InputError(f"{name}: missing calibration '{fallback_key or key}'")
        try:
            value = float(value)
        except (TypeError, ValueError) as e:
            raise InputError(f"{name}: calibration '{key}' is not a number ({value!r})") from e
        if not (np.isfinite(value) and value > 0):
            raise InputError(f"{name}: calibration '{key}' must be a positive number, got {value}")
        return value

    return {
        "energy_eV": get("energy_eV"),
        "semiangle_mrad": get("semiangle_mrad"),
        "step_x_A": get("scan_step_x_A", "scan_step_A"),
        "step_y_A": get("scan_step_y_A", "scan_step_A"),
        "k_x_mrad": get("k_sampling_x_mrad", "k_sampling_mrad"),
        "k_y_mrad": get("k_sampling_y_mrad", "k_sampling_mrad"),
    }


@contextlib.contextmanager
def _open_source(source: Stem4D | str | os.PathLike) -> Iterator[_Source]:
    if isinstance(source, Stem4D):
        data = np.asarray(source.data)
        cal = _calibration(source.attrs, "cnn")
        if data.ndim != 4:
            raise InputError(f"cnn: field 'data' must be 4D (scan_y, scan_x, k_y, k_x), got shape {data.shape}")
        yield _Source(rows=lambda idx: data[idx], shape=data.shape, name="cnn", **cal)
        return
    name = str(Path(source))
    with open_4dstem(source) as (ds, attrs):

        def rows(idx):
            idx = list(idx)
            # h5py needs increasing indices; read sorted unique rows and reorder
            uniq = sorted(set(idx))
            block = ds[uniq]
            pos = {r: i for i, r in enumerate(uniq)}
            return block[[pos[r] for r in idx]]

        yield _Source(rows=rows, shape=ds.shape, name=name, **_calibration(attrs, name))


# ----------------------------------------------------------------------------------------------
# Inference on the model's device
# ----------------------------------------------------------------------------------------------


class _DeviceOps:
    """Rebinning, kernel assembly and overlap-add as torch operations on the model's device.

    The same arithmetic as :func:`~octastem.cnn.input.canonical_patterns`,
    :func:`~octastem.cnn.input.kernel_inputs` and :func:`overlap_add` (numpy references), so a
    GPU does the whole per-pattern work and only raw rows travel from the host.
    """

    def __init__(self, src: _Source, dev, out_shape: tuple[int, int]):
        import torch

        self.torch = torch
        self.dev = dev
        self.name = src.name
        self.ry = torch.from_numpy(_rebin_matrix(src.shape[2], src.k_y_mrad, src.semiangle_mrad)).float().to(dev)
        self.rx = torch.from_numpy(_rebin_matrix(src.shape[3], src.k_x_mrad, src.semiangle_mrad)).float().to(dev)
        self.probe = torch.from_numpy(probe_pattern() * INPUT_SCALE).to(dev)
        self.win = torch.from_numpy(patch_window(PATCH)).float().to(dev)
        self.out_shape = out_shape
        self.image = torch.zeros(out_shape[0] * out_shape[1], dtype=torch.float64, device=dev)
        self.weight = torch.zeros_like(self.image)

    def raw(self, rows_fn, idx):
        raw = self.torch.from_numpy(np.ascontiguousarray(rows_fn(idx), dtype=np.float32)).to(self.dev)
        if not bool(self.torch.isfinite(raw).all()) or bool((raw < 0).any()):
            raise InputError(
                f"{self.name}: field 'data' contains NaN, infinite or negative values in rows {idx[0]}..{idx[-1]}"
            )
        return raw

    def total(self, raw) -> float:
        """Sum of the canonical patterns of ``raw`` (without forming them)."""
        return float(self.torch.einsum("rcij,i,j->", raw.double(), self.ry.sum(0).double(), self.rx.sum(0).double()))

    def inputs(self, raw, norm: float, s_param: float):
        """(rows * scan_x, N_CHANNELS, N_K, N_K) inputs for the centre rows of ``raw`` (rows + 2 rows)."""
        torch = self.torch
        canon = torch.einsum("oi,rcij,pj->rcop", self.ry, raw, self.rx) * (INPUT_SCALE / norm)
        rows, nx = canon.shape[0] - 2, canon.shape[1]
        chans = [torch.roll(canon[1 + dy : 1 + dy + rows], -dx, dims=1) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        chans.append(self.probe.expand(rows, nx, N_K, N_K))
        chans.append(torch.full((rows, nx, N_K, N_K), float(s_param), device=self.dev))
        return torch.stack(chans, dim=2).reshape(rows * nx, N_CHANNELS, N_K, N_K)

    def add(self, patches, row0: int) -> None:
        """Weighted overlap-add of patches (rows, scan_x, P, P) of scan rows row0.. (periodic)."""
        torch = self.torch
        H, W = self.out_shape
        rows, nx = patches.shape[:2]
        c = PATCH // 2
        off = torch.arange(PATCH, device=self.dev) - c
        ry = ((torch.arange(rows, device=self.dev) + row0)[:, None] * UPSAMPLE + off[None, :]) % H  # (rows, P)
        rx = (torch.arange(nx, device=self.dev)[:, None] * UPSAMPLE + off[None, :]) % W  # (nx, P)
        flat = (ry[:, None, :, None] * W + rx[None, :, None, :]).reshape(-1)
        w = self.win.expand(rows, nx, PATCH, PATCH)
        self.image.index_add_(0, flat, (patches * w).reshape(-1).double())
        self.weight.index_add_(0, flat, w.reshape(-1).double())

    def result(self) -> np.ndarray:
        phase = (self.image / self.weight).reshape(self.out_shape)
        return (phase - phase.mean()).cpu().numpy()


def predict_phase(
    source: Stem4D | str | os.PathLike,
    weights: str | os.PathLike | None = None,
    model=None,
    device: str = "auto",
    batch_size: int = 4096,
    chunk_rows: int | None = None,
    progress: bool = False,
    threads: int | None = None,
) -> tuple[np.ndarray, float]:
    """CNN phase image (rad, zero mean) of a 4D-STEM dataset and its sampling (A/pixel).

    ``source``: a :class:`Stem4D` or the path of an internal 4D-STEM HDF5 file (read row by row).
    The scan is processed in chunks of ``chunk_rows`` scan rows (default: as many rows as make
    ``batch_size`` positions), so memory stays bounded by the chunk, the network batch and the
    output image whatever the scan size; the data are read twice (the first pass sums the counts
    for the dose normalisation). Rebinning, network and overlap-add run on the model's device
    (``device``: "auto" takes a GPU when one is visible). Boundaries are periodic, as for iCOM.
    The image is (scan_y * 4, scan_x * 4) at sampling (step_x + step_y) / 8 A. ``threads``: CPU
    threads for torch.
    """
    import torch
    from tqdm.auto import tqdm

    if threads:
        torch.set_num_threads(int(threads))
    if model is None:
        model = load_model(weights, device)
    dev = next(model.parameters()).device
    with _open_source(source) as src, torch.inference_mode():
        check_scan(src.shape, src.k_x_mrad, src.k_y_mrad, src.semiangle_mrad, name=src.name)
        ny, nx = src.shape[:2]
        if chunk_rows is None:
            chunk_rows = max(1, batch_size // nx)
        chunk_rows = max(1, int(chunk_rows))
        ops = _DeviceOps(src, dev, (ny * UPSAMPLE, nx * UPSAMPLE))
        # pass 1: mean total of the canonical patterns (dose normalisation)
        total = 0.0
        for r0 in range(0, ny, chunk_rows):
            total += ops.total(ops.raw(src.rows, list(range(r0, min(ny, r0 + chunk_rows)))))
        norm = total / (ny * nx)
        if not norm > 0:
            raise InputError(f"{src.name}: all diffraction patterns are empty (zero counts)")
        step = 0.5 * (src.step_x_A + src.step_y_A)
        s_param = sampling_parameter(src.energy_eV, src.semiangle_mrad, step)
        bar = tqdm(total=ny * nx, desc="cnn phase", unit="pattern", disable=not progress)
        for r0 in range(0, ny, chunk_rows):
            r1 = min(ny, r0 + chunk_rows)
            x = ops.inputs(ops.raw(src.rows, [(r % ny) for r in range(r0 - 1, r1 + 1)]), norm, s_param)
            preds = torch.cat([model(x[b0 : b0 + batch_size]).float() for b0 in range(0, len(x), batch_size)])
            ops.add(preds.reshape(r1 - r0, nx, PATCH, PATCH), r0)
            bar.update((r1 - r0) * nx)
        bar.close()
        phase = ops.result()
    return phase.astype(np.float32), float(step / UPSAMPLE)
