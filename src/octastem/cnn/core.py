"""CNN phase reconstruction from 4D-STEM with super-resolution (after Friedrich et al., Microsc.
Microanal. 29 (2023) 395).

For every scan position the 3x3 kernel of neighbouring diffraction patterns, together with the
probe, goes into a small convolutional network that predicts the phase of the object in a patch
of ``PATCH`` x ``PATCH`` pixels around that position, sampled ``UPSAMPLE`` times finer than the
scan step. The patches are combined by weighted overlap-add (periodic, like iCOM) into a phase
image of (scan_y * UPSAMPLE, scan_x * UPSAMPLE) pixels; pixel (jy, jx) lies at
(x = jx * step_x / UPSAMPLE, y = jy * step_y / UPSAMPLE), so scan position (iy, ix) is pixel
(iy * UPSAMPLE, ix * UPSAMPLE).

Network input (per position): ``N_K`` x ``N_K`` channels of

- the 9 neighbouring patterns (rows iy-1..iy+1, columns ix-1..ix+1, periodic), rebinned onto a
  canonical detector grid spanning +-2 alpha (alpha the convergence semi-angle) with
  count-preserving area weights, divided by the mean total of the canonical patterns over the
  scan and scaled so the bright-field disc is ~1 (dose-independent input);
- the probe: the vacuum pattern (uniform aperture disc) on the same grid, same normalisation;
- the dimensionless sampling ``alpha * step / lambda`` (scan step in units of the probe's
  resolution) as a constant channel; it fixes the relation between deflection and phase.

Target: the phase of the object, sigma(E) times the frame-averaged projected potential (rad),
band-limited to the aperture diameter 2 alpha / lambda (the information limit of 4D-STEM) and
with zero mean over the scan (the absolute phase offset is not measured, as for iCOM).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np

from octastem.io import InputError, Stem4D, atomic_path, provenance

UPSAMPLE = 4  #: output pixels per scan step
N_K = 20  #: canonical detector bins per axis, spanning +-2 alpha
KERNEL = 3  #: scan positions per axis in the input kernel
PATCH = KERNEL * UPSAMPLE + 1  #: output patch (pixels per axis), centred on the scan position
EXTENT_ALPHA = 2.0  #: half-width of the canonical detector grid in units of alpha
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[3] / "resources" / "cnn" / "weights.pt"


# ----------------------------------------------------------------------------------------------
# Canonical input and target
# ----------------------------------------------------------------------------------------------


def _rebin_matrix(n_in: int, dk_mrad: float, semiangle_mrad: float, n_out: int = N_K) -> np.ndarray:
    """(n_out, n_in) area-overlap weights from detector pixels (axis at n_in // 2) to canonical bins.

    Entry (o, j) is the fraction of input pixel j inside output bin o, so counts are preserved.
    """
    half = EXTENT_ALPHA * semiangle_mrad
    edges_out = np.linspace(-half, half, n_out + 1)
    centres = (np.arange(n_in) - n_in // 2) * dk_mrad
    lo_in, hi_in = centres - dk_mrad / 2, centres + dk_mrad / 2
    lo = np.maximum(edges_out[:-1, None], lo_in[None, :])
    hi = np.minimum(edges_out[1:, None], hi_in[None, :])
    return np.clip(hi - lo, 0.0, None) / dk_mrad


def check_patterns(
    shape: Sequence[int], k_sampling_x_mrad: float, k_sampling_y_mrad: float, semiangle_mrad: float, name: str = "cnn"
) -> None:
    """Raise InputError unless (..., k_y, k_x) patterns cover +-2 alpha and the calibration is valid.

    The detector must reach ``EXTENT_ALPHA * alpha`` along both axes (within half a pixel) and
    hold at least ``N_K // 2`` pixels per axis.
    """
    for key, value in (
        ("k_sampling_x_mrad", k_sampling_x_mrad),
        ("k_sampling_y_mrad", k_sampling_y_mrad),
        ("semiangle_mrad", semiangle_mrad),
    ):
        if not (np.isfinite(value) and value > 0):
            raise InputError(f"{name}: calibration '{key}' must be a positive number, got {value}")
    n_ky, n_kx = shape[-2:]
    if min(n_ky, n_kx) < N_K // 2:
        raise InputError(
            f"{name}: diffraction patterns of {n_ky}x{n_kx} pixels are too small (need >= {N_K // 2} per axis)"
        )
    need = EXTENT_ALPHA * semiangle_mrad
    for n, dk, axis in ((n_kx, k_sampling_x_mrad, "k_x"), (n_ky, k_sampling_y_mrad, "k_y")):
        reach = min(n // 2, n - 1 - n // 2) * dk + dk / 2
        if reach < 0.97 * need:
            raise InputError(
                f"{name}: diffraction patterns of size {n_ky}x{n_kx} reach only {reach:.1f} mrad along {axis} "
                f"(k-sampling {dk} mrad); the CNN needs +-{need:.1f} mrad (2 x the {semiangle_mrad} mrad semi-angle)"
            )


def canonical_patterns(
    data: np.ndarray, k_sampling_x_mrad: float, k_sampling_y_mrad: float, semiangle_mrad: float
) -> np.ndarray:
    """Rebin (..., k_y, k_x) patterns onto the canonical (..., N_K, N_K) grid over +-2 alpha (float32).

    Count-preserving (area weights): a pattern's counts inside the grid are kept.
    """
    data = np.asarray(data)
    check_patterns(data.shape, k_sampling_x_mrad, k_sampling_y_mrad, semiangle_mrad)
    ry = _rebin_matrix(data.shape[-2], k_sampling_y_mrad, semiangle_mrad).astype(np.float32)
    rx = _rebin_matrix(data.shape[-1], k_sampling_x_mrad, semiangle_mrad).astype(np.float32)
    return np.einsum("oi,...ij,pj->...op", ry, data.astype(np.float32, copy=False), rx, optimize=True)


def probe_pattern(n_k: int = N_K, oversample: int = 8) -> np.ndarray:
    """Vacuum diffraction pattern (aperture disc of radius alpha) on the canonical grid, summing to 1."""
    n = n_k * oversample
    k = (np.arange(n) + 0.5) / n * 2 * EXTENT_ALPHA - EXTENT_ALPHA  # units of alpha
    disc = (k[None, :] ** 2 + k[:, None] ** 2 <= 1.0).astype(np.float64)
    binned = disc.reshape(n_k, oversample, n_k, oversample).sum(axis=(1, 3))
    return (binned / binned.sum()).astype(np.float32)


#: multiplies (pattern / mean total) so the bright-field disc is ~1 per bin
INPUT_SCALE = math.pi * N_K**2 / (4 * EXTENT_ALPHA**2)


def wavelength_A(energy_eV: float) -> float:
    """Relativistic electron wavelength (A) at ``energy_eV`` (same as abtem's energy2wavelength)."""
    hc_keV_A, mc2_keV = 12.398419843320026, 510.99895069
    e_keV = float(energy_eV) * 1e-3
    return hc_keV_A / math.sqrt(e_keV * (2.0 * mc2_keV + e_keV))


def sampling_parameter(energy_eV: float, semiangle_mrad: float, step_A: float) -> float:
    """alpha * step / lambda: the scan step in units of the probe's resolution lambda / alpha."""
    return float(semiangle_mrad * 1e-3 * step_A / wavelength_A(energy_eV))


def target_phase(
    phase_fine: np.ndarray,
    out_shape: tuple[int, int],
    cell_A: tuple[float, float],
    energy_eV: float,
    semiangle_mrad: float,
) -> np.ndarray:
    """Band-limited phase on the output grid: ``phase_fine`` (y, x) (rad, periodic over ``cell_A``)
    low-pass filtered to |k| <= 2 alpha / lambda, zero mean, Fourier-resampled to ``out_shape``.

    This is the reference every reconstruction is scored against; iCOM images are compared after
    the same band limit (:func:`band_limit`).
    """
    phase_fine = np.asarray(phase_fine, dtype=np.float64)
    ny, nx = phase_fine.shape
    my, mx = out_shape
    k_max = 2.0 * semiangle_mrad * 1e-3 / wavelength_A(energy_eV)
    spec = np.fft.fft2(phase_fine)
    fy = np.fft.fftfreq(ny, d=cell_A[1] / ny)
    fx = np.fft.fftfreq(nx, d=cell_A[0] / nx)
    spec *= (fy[:, None] ** 2 + fx[None, :] ** 2) <= k_max**2
    spec[0, 0] = 0.0
    iy = np.fft.fftfreq(ny, d=1.0 / ny).astype(int)
    ix = np.fft.fftfreq(nx, d=1.0 / nx).astype(int)
    keep_y = np.abs(iy) < (my + 1) // 2
    keep_x = np.abs(ix) < (mx + 1) // 2
    out = np.zeros((my, mx), dtype=complex)
    out[np.ix_(iy[keep_y] % my, ix[keep_x] % mx)] = spec[np.ix_(keep_y, keep_x)]
    return (np.real(np.fft.ifft2(out)) * (my * mx) / (ny * nx)).astype(np.float32)


def band_limit(
    image: np.ndarray, sampling_xy_A: tuple[float, float], energy_eV: float, semiangle_mrad: float
) -> np.ndarray:
    """Periodic image (y, x) low-pass filtered to |k| <= 2 alpha / lambda, zero mean."""
    ny, nx = image.shape
    cell = (nx * sampling_xy_A[0], ny * sampling_xy_A[1])
    return target_phase(image, (ny, nx), cell, energy_eV, semiangle_mrad)


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Architecture of :class:`PhaseCNN` (stored with the weights)."""

    n_k: int = N_K
    patch: int = PATCH
    upsample: int = UPSAMPLE
    width: int = 32
    hidden: int = 256
    in_channels: int = KERNEL * KERNEL + 2


def build_model(config: ModelConfig | None = None):
    """The patch-predicting CNN: 3 convolutions (two with stride 2) and two dense layers."""
    import torch
    from torch import nn

    config = config or ModelConfig()
    w = config.width
    n = config.n_k
    n4 = (n + 3) // 4

    class PhaseCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = config
            self.features = nn.Sequential(
                nn.Conv2d(config.in_channels, w, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(w, w, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(w, 2 * w, 3, stride=2, padding=1),
                nn.ReLU(),
            )
            self.head = nn.Sequential(
                nn.Flatten(),
                nn.Linear(2 * w * n4 * n4, config.hidden),
                nn.ReLU(),
                nn.Linear(config.hidden, config.patch * config.patch),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            """(B, in_channels, n_k, n_k) -> (B, patch, patch) phase (rad)."""
            return self.head(self.features(x)).view(-1, config.patch, config.patch)

    return PhaseCNN()


def resolve_device(device: str = "auto") -> str:
    """ "auto" -> "cuda" when a GPU is visible, else "cpu"; other values are passed through."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"cnn: device {device!r} requested but no CUDA device is available")
    return device


def read_weights(weights: str | os.PathLike | None = None) -> dict:
    """The validated contents of a weights file (default ``resources/cnn/weights.pt``): 'model'
    (state dict), 'config' (:class:`ModelConfig` fields) and 'metadata'."""
    import torch

    path = Path(weights) if weights is not None else DEFAULT_WEIGHTS
    if not path.exists():
        raise InputError(f"{path}: CNN weights not found (train them with octastem.cnn.train or give a path)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise InputError(f"{path}: not a readable CNN weights file ({e})") from e
    if not isinstance(blob, dict) or "model" not in blob or "config" not in blob:
        raise InputError(f"{path}: expected a dict with 'model' (state dict) and 'config', got {type(blob).__name__}")
    config = ModelConfig(**blob["config"])
    if (config.upsample, config.patch, config.n_k) != (UPSAMPLE, PATCH, N_K):
        raise InputError(
            f"{path}: weights for upsample={config.upsample}, patch={config.patch}, n_k={config.n_k}; this code "
            f"uses {UPSAMPLE}, {PATCH}, {N_K}"
        )
    return blob


def load_model(weights: str | os.PathLike | None = None, device: str = "auto"):
    """Model with weights from ``weights`` (default ``resources/cnn/weights.pt``), in eval mode."""
    blob = read_weights(weights)
    model = build_model(ModelConfig(**blob["config"]))
    model.load_state_dict(blob["model"])
    model.eval()
    return model.to(resolve_device(device))


# ----------------------------------------------------------------------------------------------
# Kernels and overlap-add
# ----------------------------------------------------------------------------------------------


def kernel_inputs(canon_rows: np.ndarray, norm: float, s_param: float) -> np.ndarray:
    """Network inputs for the centre rows of ``canon_rows`` (rows+2, scan_x, N_K, N_K).

    ``canon_rows`` holds one extra row above and below (periodic neighbours); columns wrap
    around. Returns (rows * scan_x, 11, N_K, N_K) float32.
    """
    rows = canon_rows.shape[0] - 2
    nx = canon_rows.shape[1]
    x = canon_rows * (INPUT_SCALE / norm)
    out = np.empty((rows, nx, KERNEL * KERNEL + 2, N_K, N_K), dtype=np.float32)
    c = 0
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            out[:, :, c] = np.roll(x[1 + dy : 1 + dy + rows], -dx, axis=1)
            c += 1
    out[:, :, c] = probe_pattern() * INPUT_SCALE
    out[:, :, c + 1] = s_param
    return out.reshape(rows * nx, KERNEL * KERNEL + 2, N_K, N_K)


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
# Inference (streamed over scan rows)
# ----------------------------------------------------------------------------------------------


@dataclass
class _Source:
    """Row access to a 4D-STEM dataset in memory or in an HDF5 file, with its calibration."""

    rows: object  # callable(list of row indices) -> (len, scan_x, k_y, k_x)
    shape: tuple
    energy_eV: float
    semiangle_mrad: float
    step_x_A: float
    step_y_A: float
    k_x_mrad: float
    k_y_mrad: float
    name: str


def _calibration(attrs: dict, extra: dict, name: str) -> dict:
    def get(key, fallback_key=None):
        value = extra.get(key, attrs.get(fallback_key or key)) if fallback_key else attrs.get(key)
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
        attrs = {k: getattr(source, k) for k in ("energy_eV", "semiangle_mrad", "scan_step_A", "k_sampling_mrad")}
        cal = _calibration(attrs, dict(source.extra), "cnn")
        if data.ndim != 4:
            raise InputError(f"cnn: field 'data' must be 4D (scan_y, scan_x, k_y, k_x), got shape {data.shape}")
        yield _Source(rows=lambda idx: data[idx], shape=data.shape, name="cnn", **cal)
        return
    path = Path(source)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    with h5py.File(path, "r") as f:
        if "data" not in f:
            raise InputError(f"{path}: missing dataset 'data' (scan_y, scan_x, k_y, k_x)")
        ds = f["data"]
        if ds.ndim != 4:
            raise InputError(f"{path}: field 'data' must be 4D (scan_y, scan_x, k_y, k_x), got shape {ds.shape}")
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in ds.attrs.items()}

        def rows(idx):
            idx = list(idx)
            # h5py needs increasing indices; read sorted unique rows and reorder
            uniq = sorted(set(idx))
            block = ds[uniq]
            pos = {r: i for i, r in enumerate(uniq)}
            return block[[pos[r] for r in idx]]

        yield _Source(rows=rows, shape=ds.shape, name=str(path), **_calibration(attrs, attrs, str(path)))


def _validate_source(src: _Source) -> None:
    ny, nx = src.shape[:2]
    if ny < KERNEL or nx < KERNEL:
        raise InputError(
            f"{src.name}: scan of {ny}x{nx} positions is smaller than the {KERNEL}x{KERNEL} kernel of the CNN"
        )
    check_patterns(src.shape, src.k_x_mrad, src.k_y_mrad, src.semiangle_mrad, name=src.name)


class _DeviceOps:
    """Rebinning, kernel assembly and overlap-add as torch operations on the model's device.

    The same arithmetic as :func:`canonical_patterns`, :func:`kernel_inputs` and
    :func:`overlap_add` (numpy references), so a GPU does the whole per-pattern work and only raw
    rows travel from the host.
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
        """(rows * scan_x, 11, N_K, N_K) inputs for the centre rows of ``raw`` (rows + 2 rows)."""
        torch = self.torch
        canon = torch.einsum("oi,rcij,pj->rcop", self.ry, raw, self.rx) * (INPUT_SCALE / norm)
        rows, nx = canon.shape[0] - 2, canon.shape[1]
        chans = [torch.roll(canon[1 + dy : 1 + dy + rows], -dx, dims=1) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        chans.append(self.probe.expand(rows, nx, N_K, N_K))
        chans.append(torch.full((rows, nx, N_K, N_K), float(s_param), device=self.dev))
        return torch.stack(chans, dim=2).reshape(rows * nx, KERNEL * KERNEL + 2, N_K, N_K)

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
        _validate_source(src)
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


# ----------------------------------------------------------------------------------------------
# Training data and training
# ----------------------------------------------------------------------------------------------


class TrainingSet:
    """All scans of some shards in memory, with index tables for random batches of kernels.

    Batches draw a dose per example (``noise_free_fraction`` noise free, the rest log-uniform in
    ``dose_range``) and Poisson noise at that dose on the fly, so noise never repeats.
    """

    def __init__(self, shards: Sequence[str | os.PathLike], scans: Sequence[tuple[str, str]] | None = None):
        pats, phases, nbr, tidx, s_par, n_e_area, norm, inv_var, scan_of = [], [], [], [], [], [], [], [], []
        n_pos = n_pix = 0
        self.names = []
        for shard in shards:
            shard = Path(shard)
            if not shard.exists():
                raise InputError(f"{shard}: training shard not found")
            with h5py.File(shard, "r") as f:
                keys = sorted(k for k in f if k.startswith("scan_"))
                for key in keys:
                    if scans is not None and (str(shard), key) not in scans:
                        continue
                    g = f[key]
                    p = g["patterns"][()].astype(np.float32)
                    t = g["phase"][()].astype(np.float32)
                    ny, nx = p.shape[:2]
                    if p.shape[2:] != (N_K, N_K) or t.shape != (ny * UPSAMPLE, nx * UPSAMPLE):
                        raise InputError(
                            f"{shard}:{key}: patterns {p.shape} / phase {t.shape} do not match "
                            f"N_K={N_K}, UPSAMPLE={UPSAMPLE}"
                        )
                    a = dict(g.attrs)
                    iy, ix = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
                    nb = np.stack(
                        [((iy + dy) % ny) * nx + (ix + dx) % nx for dy in (-1, 0, 1) for dx in (-1, 0, 1)], -1
                    )
                    nbr.append(nb.reshape(-1, 9) + n_pos)
                    H, W = t.shape
                    c = PATCH // 2
                    ry = (iy[..., None] * UPSAMPLE + np.arange(PATCH) - c) % H
                    rx = (ix[..., None] * UPSAMPLE + np.arange(PATCH) - c) % W
                    ti = ry[..., :, None] * W + rx[..., None, :]
                    tidx.append(ti.reshape(ny * nx, PATCH * PATCH) + n_pix)
                    step = 0.5 * (a["scan_step_x_A"] + a["scan_step_y_A"])
                    k = len(self.names)
                    scan_of.append(np.full(ny * nx, k))
                    s_par.append(sampling_parameter(a["energy_eV"], a["semiangle_mrad"], step))
                    n_e_area.append(a["scan_step_x_A"] * a["scan_step_y_A"])
                    norm.append(float(p.sum(axis=(2, 3)).mean()))
                    inv_var.append(1.0 / max(float(t.var()), 1e-6))
                    pats.append(p.reshape(-1, N_K, N_K))
                    phases.append(t.ravel())
                    n_pos += ny * nx
                    n_pix += H * W
                    self.names.append((str(shard), key))
        if not self.names:
            raise InputError(f"cnn: no training scans found in {list(map(str, shards))}")
        self.patterns = np.concatenate(pats)
        self.phase = np.concatenate(phases)
        self.neighbours = np.concatenate(nbr)
        self.target_index = np.concatenate(tidx)
        self.scan_of = np.concatenate(scan_of)
        self.s_param = np.asarray(s_par, dtype=np.float32)
        self.area = np.asarray(n_e_area, dtype=np.float32)
        self.norm = np.asarray(norm, dtype=np.float32)
        self.inv_var = np.asarray(inv_var, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.neighbours)

    def batch(
        self, index: np.ndarray, rng: np.random.Generator, dose_range=(10.0, 1e4), noise_free_fraction=0.15, doses=None
    ):
        """(inputs (B, 11, N_K, N_K), targets (B, P, P), weights (B,)) as float32 numpy arrays.

        ``doses`` (B,) fixes the dose per example (inf: noise free) instead of drawing it.
        """
        index = np.asarray(index)
        scan = self.scan_of[index]
        p = self.patterns[self.neighbours[index]]  # (B, 9, N_K, N_K), fraction of beam
        if doses is None:
            doses = np.exp(rng.uniform(np.log(dose_range[0]), np.log(dose_range[1]), size=len(index)))
            doses[rng.random(len(index)) < noise_free_fraction] = np.inf
        doses = np.asarray(doses, dtype=np.float64)
        n_e = doses * self.area[scan]
        noisy = np.isfinite(n_e)
        if np.any(noisy):
            lam = p[noisy] * n_e[noisy, None, None, None]
            p = p.copy()
            p[noisy] = rng.poisson(lam).astype(np.float32) / n_e[noisy, None, None, None]
        x = np.empty((len(index), KERNEL * KERNEL + 2, N_K, N_K), dtype=np.float32)
        x[:, :9] = p * (INPUT_SCALE / self.norm[scan])[:, None, None, None]
        x[:, 9] = probe_pattern() * INPUT_SCALE
        x[:, 10] = self.s_param[scan][:, None, None]
        y = self.phase[self.target_index[index]].reshape(-1, PATCH, PATCH)
        return x, y, self.inv_var[scan]


@dataclass
class TrainConfig:
    """Training settings (stored in checkpoints and the model card)."""

    seed: int = 0
    epochs: int = 20
    steps_per_epoch: int = 200
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.1
    val_batches: int = 8
    dose_min: float = 10.0
    dose_max: float = 1e4
    noise_free_fraction: float = 0.15
    width: int = 32
    hidden: int = 256
    init_weights: str | None = None  # fine-tune: start from these weights (same width and hidden)


def split_scans(
    shards: Sequence[str | os.PathLike], val_fraction: float, seed: int, keep_out: Sequence | None = None
) -> tuple[list, list]:
    """Deterministic split of all (shard, scan) names into training and validation scans.

    ``keep_out``: (shard, scan) names that go to validation whatever the draw (the validation
    scans of the weights a fine-tune starts from, so they stay unseen)."""
    names = []
    for shard in shards:
        with h5py.File(shard, "r") as f:
            names += [(str(shard), k) for k in sorted(f) if k.startswith("scan_")]
    rng = np.random.default_rng(seed + 7919)
    order = rng.permutation(len(names))
    n_val = max(1, int(round(val_fraction * len(names)))) if len(names) > 1 else 0
    forced = {(Path(a).name, b) for a, b in (keep_out or [])}
    is_val = np.zeros(len(names), bool)
    is_val[order[:n_val]] = True
    for i, (a, b) in enumerate(names):
        if (Path(a).name, b) in forced:
            is_val[i] = True
    val = [names[i] for i in order if is_val[i]]
    train = [names[i] for i in order if not is_val[i]]
    return train, val


def _save_checkpoint(path: Path, state: dict) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def train(
    shards: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    config: TrainConfig | None = None,
    device: str = "auto",
    progress: bool = False,
    max_minutes: float | None = None,
    threads: int | None = None,
) -> dict:
    """Train the CNN on ``shards``; writes to ``out_dir``: ``checkpoint.pt`` (after every epoch,
    resumed from when present), ``weights.pt`` (final), ``curve.csv`` / ``curve.png`` (training
    and validation loss per epoch) and ``training.json``.

    ``config.init_weights``: fine-tune, starting from those weights; their validation scans
    (recorded in their metadata) stay in validation.

    Loss: mean squared patch error divided by the variance of the scan's target phase
    (scale-free across thin/light and thick/heavy crystals). Validation: held-out scans
    (``val_fraction``) at fixed doses and noise seeds. Deterministic for a given seed on one
    device (``torch.use_deterministic_algorithms``). ``max_minutes`` stops after the epoch that
    crosses the limit (the run then depends on the machine's speed; recorded in training.json).
    ``threads``: CPU threads for torch (default: torch's choice).
    """
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    config = config or TrainConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    torch.manual_seed(config.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    init = read_weights(config.init_weights) if config.init_weights is not None else None
    keep_out = init.get("metadata", {}).get("val_scans") if init else None
    train_names, val_names = split_scans(shards, config.val_fraction, config.seed, keep_out=keep_out)
    train_set = TrainingSet(shards, train_names)
    val_set = TrainingSet(shards, val_names) if val_names else None
    mconf = ModelConfig(width=config.width, hidden=config.hidden)
    model = build_model(mconf).to(dev)
    if init is not None:
        if {k: init["config"].get(k) for k in ("width", "hidden")} != {"width": mconf.width, "hidden": mconf.hidden}:
            raise InputError(
                f"init_weights: {config.init_weights}: network width/hidden {init['config']} differ from the "
                f"training settings (width={mconf.width}, hidden={mconf.hidden})"
            )
        model.load_state_dict(init["model"])
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    total_steps = config.epochs * config.steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=total_steps, pct_start=0.1)
    history: list[dict] = []
    start_epoch = 0
    ckpt = out_dir / "checkpoint.pt"
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if state.get("train_config") != asdict(config):
            raise InputError(
                f"{ckpt}: checkpoint was written with different settings; delete it or use the same config"
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        history = state["history"]
        start_epoch = state["epoch"]
        torch.set_rng_state(state["torch_rng"])

    # fixed validation examples: doses cycle through 10, 48, 144, 1000 e/A^2 and noise free
    val_batches = []
    if val_set is not None:
        vrng = np.random.default_rng(config.seed + 1)
        val_doses = np.array([10.0, 48.0, 144.0, 1000.0, np.inf])
        for _ in range(config.val_batches):
            idx = vrng.integers(len(val_set), size=config.batch_size)
            val_batches.append(val_set.batch(idx, vrng, doses=val_doses[np.arange(len(idx)) % len(val_doses)]))

    def loss_fn(pred, y, w):
        return (((pred - y) ** 2).mean(dim=(1, 2)) * w).mean()

    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    stopped_early = False
    for epoch in range(start_epoch, config.epochs):
        # one generator per epoch: a resumed run draws the same batches as an uninterrupted one
        rng = np.random.default_rng([config.seed, epoch])
        model.train()
        losses = []
        t0 = time.perf_counter()
        for _ in tqdm(range(config.steps_per_epoch), desc=f"epoch {epoch + 1}/{config.epochs}", disable=not progress):
            idx = rng.integers(len(train_set), size=config.batch_size)
            x, y, w = train_set.batch(idx, rng, (config.dose_min, config.dose_max), config.noise_free_fraction)
            x, y, w = (torch.from_numpy(a).to(dev) for a in (x, y, w))
            loss = loss_fn(model(x), y, w)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        model.eval()
        with torch.inference_mode():
            val = [
                float(
                    loss_fn(
                        model(torch.from_numpy(x).to(dev)), torch.from_numpy(y).to(dev), torch.from_numpy(w).to(dev)
                    )
                )
                for x, y, w in val_batches
            ]
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": float(np.mean(losses)),
                "val_loss": float(np.mean(val)) if val else math.nan,
                "lr": float(sched.get_last_lr()[0]),
                "seconds": time.perf_counter() - t0,
            }
        )
        _save_checkpoint(
            ckpt,
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "epoch": epoch + 1,
                "history": history,
                "torch_rng": torch.get_rng_state(),
                "train_config": asdict(config),
                "config": asdict(mconf),
            },
        )
        write_curve(out_dir, history, plot=False)
        if max_minutes is not None and (time.perf_counter() - t_start) / 60 > max_minutes and epoch + 1 < config.epochs:
            stopped_early = True
            break

    summary = {
        "train_config": asdict(config),
        "model_config": asdict(mconf),
        "n_train_scans": len(train_names),
        "n_val_scans": len(val_names),
        "n_train_positions": len(train_set),
        "val_scans": val_names,
        "epochs_done": len(history),
        "stopped_early_by_time_limit": stopped_early,
        "final_train_loss": history[-1]["train_loss"] if history else math.nan,
        "final_val_loss": history[-1]["val_loss"] if history else math.nan,
        "device": dev,
        "n_parameters": int(sum(p.numel() for p in model.parameters())),
        "provenance": json.loads(provenance(seed=config.seed, shards=[str(s) for s in shards])),
    }
    save_weights(out_dir / "weights.pt", model, summary)
    write_curve(out_dir, history)
    from octastem.io import write_json

    write_json(out_dir / "training.json", summary)
    return summary


def save_weights(path: str | os.PathLike, model, metadata: dict | None = None) -> None:
    """Weights file: {'model': state dict (CPU, float32), 'config': ModelConfig, 'metadata': ...}."""
    import torch

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"model": state, "config": asdict(model.config), "metadata": metadata or {}}, tmp)


def write_curve(out_dir: str | os.PathLike, history: list[dict], plot: bool = True) -> None:
    """curve.csv and (``plot``) curve.png: training and validation loss against epoch, in ``out_dir``."""
    out_dir = Path(out_dir)
    with atomic_path(out_dir / "curve.csv") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["epoch", "train_loss", "val_loss", "lr", "seconds"])
        writer.writeheader()
        writer.writerows(history)
    if not plot:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ep = [h["epoch"] for h in history]
    ax.semilogy(ep, [h["train_loss"] for h in history], "o-", label="training")
    ax.semilogy(ep, [h["val_loss"] for h in history], "s-", label="validation (held-out scans)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("patch MSE / target variance")
    ax.legend()
    fig.tight_layout()
    with atomic_path(out_dir / "curve.png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
