"""The CNN (:class:`ModelConfig`, :func:`build_model`) and its weights files.

A weights file is a ``torch.save`` of a dict of plain types, loadable with
``torch.load(..., weights_only=True)``: ``'model'`` (state dict, CPU float32 tensors),
``'config'`` (the :class:`ModelConfig` fields) and ``'metadata'`` (the training summary).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from octastem.compute import resolve_device
from octastem.io import InputError, atomic_path

from .input import N_CHANNELS, N_K, PATCH, UPSAMPLE

#: the committed weights (``resources/cnn/weights.pt`` of the repository)
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[3] / "resources" / "cnn" / "weights.pt"


@dataclass
class ModelConfig:
    """Architecture of :class:`PhaseCNN` (stored with the weights)."""

    n_k: int = N_K
    patch: int = PATCH
    upsample: int = UPSAMPLE
    width: int = 32
    hidden: int = 256
    in_channels: int = N_CHANNELS


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


def read_weights(weights: str | os.PathLike | None = None) -> dict:
    """The validated contents of a weights file (default ``resources/cnn/weights.pt``): 'model'
    (state dict), 'config' (:class:`ModelConfig` fields) and 'metadata'."""
    import torch

    path = Path(weights) if weights is not None else DEFAULT_WEIGHTS
    if not path.exists():
        raise InputError(f"{path}: CNN weights not found (train them with octastem.cnn.train or give a path)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
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
    return model.to(resolve_device(device, "cnn"))


def save_weights(path: str | os.PathLike, model, metadata: dict | None = None) -> None:
    """Weights file: {'model': state dict (CPU, float32), 'config': ModelConfig, 'metadata': ...}."""
    import torch

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"model": state, "config": asdict(model.config), "metadata": metadata or {}}, tmp)
