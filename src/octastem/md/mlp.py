"""Machine-learning potentials: load the study's MACE model on any device, make ASE calculators.

The reference potential was pickled on a CUDA device. A plain ``torch.load(map_location=...)``
does not reach the TorchScript modules e3nn builds inside it (their ``__setstate__`` calls
``torch.jit.load`` without a map location), so loading on a CPU-only machine fails. We route
those inner calls to the target device while unpickling.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

from octastem.compute import resolve_device
from octastem.io import InputError


def _import_torch():
    import mace  # noqa: F401  (must be imported before e3nn under torch 2.13)
    import torch

    return torch


@contextlib.contextmanager
def _jit_load_on(device: str):
    torch = _import_torch()
    original = torch.jit.load

    def load(f, map_location=None, _extra_files=None, **kwargs):
        return original(f, map_location=device, _extra_files=_extra_files, **kwargs)

    torch.jit.load = load
    try:
        yield
    finally:
        torch.jit.load = original


def load_mace_model(path: str | os.PathLike, device: str = "auto", dtype: str = "float32"):
    """Load a pickled MACE model onto ``device`` with parameters in ``dtype``."""
    torch = _import_torch()
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: MACE model file not found")
    device = resolve_device(device, "mlp")
    try:
        with _jit_load_on(device):
            model = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:
        raise InputError(f"{path}: not a loadable MACE model ({type(e).__name__}: {e})") from e
    if not hasattr(model, "atomic_numbers") or not hasattr(model, "r_max"):
        raise InputError(f"{path}: unpickled object is a {type(model).__name__}, not a MACE model")
    model = model.to(device=device, dtype=getattr(torch, dtype))
    model.eval()
    return model


def model_elements(model) -> list[int]:
    return [int(z) for z in model.atomic_numbers.tolist()]


def check_elements(atoms, model, name: str = "structure") -> None:
    """Raise InputError naming elements of ``atoms`` that ``model`` was not trained on."""
    from ase.data import chemical_symbols

    known = set(model_elements(model))
    missing = sorted(set(int(z) for z in np.unique(atoms.numbers)) - known)
    if missing:
        raise InputError(
            f"{name}: element(s) {[chemical_symbols[z] for z in missing]} are not covered by the potential "
            f"(it knows {[chemical_symbols[z] for z in sorted(known)]})"
        )


def mace_calculator(model, device: str = "auto", dtype: str = "float32", threads: int | None = None):
    """ASE calculator around an in-memory MACE model."""
    torch = _import_torch()
    from mace.calculators import MACECalculator

    if threads:
        torch.set_num_threads(int(threads))
    device = resolve_device(device, "mlp")
    # cuequivariance kernels accelerate the symmetric contraction on NVIDIA GPUs when installed
    enable_cueq = device.startswith("cuda") and cueq_available()
    return MACECalculator(models=model, device=device, default_dtype=dtype, enable_cueq=enable_cueq)


def cueq_available() -> bool:
    """True when the cuequivariance packages MACE uses for GPU acceleration are importable."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("cuequivariance", "cuequivariance_torch"))
