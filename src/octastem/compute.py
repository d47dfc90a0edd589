"""Compute devices: the one resolver of ``device`` settings (auto | cpu | cuda[:n]) for torch code."""

from __future__ import annotations

from .io import InputError


def resolve_device(device: str = "auto", who: str = "octastem") -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; ``cuda`` without a GPU is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"{who}: device '{device}' requested but no CUDA device is visible")
    return device
