"""Machine-learning potentials: load the study's MACE model on any device, make ASE calculators.

A MACE model file is a pickle, and unpickling runs code named in the file. :func:`load_mace_model`
therefore reads the file's bytes once, checks their sha256 against the recorded ones
(:func:`recorded_model_sha256`: the registry's entries in ``resources/external.yaml``, e.g. the
reference potential unpacked in the cache, and the ``*.sha256`` records next to the committed
student in ``resources/student/``) and unpickles exactly those bytes; a file matching no record is
unpickled only with ``trust=True`` (the config key ``md.trust_model_file``).

Loading a model also switches TorchScript's optimising executor off for the process's calling
thread (:func:`_unoptimised_torchscript`), so that a force does not depend on how many
evaluations came before.

The reference potential was pickled on a CUDA device. A plain ``torch.load(map_location=...)``
does not reach the TorchScript modules e3nn builds inside it (their ``__setstate__`` calls
``torch.jit.load`` without a map location), so loading on a CPU-only machine fails. We route
those inner calls to the target device while unpickling.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
from pathlib import Path

import numpy as np

from octastem.compute import resolve_device
from octastem.io import InputError

log = logging.getLogger(__name__)

#: Folder of the committed student model and its sha256 record(s) (``<file>.sha256``, sha256sum format).
STUDENT_DIR = Path(__file__).resolve().parents[3] / "resources" / "student"
#: The config key that lets a model file matching no recorded sha256 be unpickled.
TRUST_KEY = "md.trust_model_file"


def _import_torch():
    import mace  # noqa: F401  (must be imported before e3nn under torch 2.13)
    import torch

    return torch


def _unoptimised_torchscript(torch) -> None:
    """Run TorchScript (e3nn's scripted modules inside MACE) unoptimised from here on, in this thread.

    TorchScript's profiling executor runs the first call of a scripted function with a profiling
    graph and later calls with an optimised one, whose float32 results differ in the last bits.
    Once a function has its optimised plan, ``torch.jit.optimized_execution(False)`` no longer
    brings the unoptimised one back, so forces would depend on how many evaluations the process
    had made before (of any MACE model: the scripted functions are shared). Switched off before a
    model is first evaluated, every evaluation runs the same plan; on the CPU this costs nothing
    measurable.
    """
    torch._C._set_graph_executor_optimize(False)  # what torch.jit.optimized_execution(False) sets


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


def recorded_model_sha256(registry: str | os.PathLike | None = None) -> dict[str, str]:
    """sha256 (hex) -> where it is recorded, for every model file whose content is known.

    From the registry (``registry``, default ``resources/external.yaml``): ``member_sha256`` of an
    entry unpacked from an archive, else its ``sha256``; from ``resources/student/*.sha256``: the
    first field of each line (``sha256sum`` format, so ``sha256sum -c`` checks them too).
    """
    from octastem.registry import load_registry

    known = {}
    for name, entry in load_registry(registry).items():
        sha = entry.get("member_sha256") if entry.get("member") else entry["sha256"]
        if sha:
            known[str(sha).lower()] = f"registry entry '{name}'"
    for record in sorted(STUDENT_DIR.glob("*.sha256")):
        for line in record.read_text().splitlines():
            fields = line.split()
            if fields:
                known[fields[0].lower()] = str(record.relative_to(STUDENT_DIR.parents[1]))
    return known


def _verified_bytes(path: Path, trust: bool, trust_key: str, registry) -> bytes:
    """The bytes of model file ``path`` once their sha256 is recorded (or ``trust`` is set)."""
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    source = recorded_model_sha256(registry).get(sha)
    if source is not None:
        log.info("%s: sha256 %s matches %s", path, sha, source)
        return data
    if trust:
        log.warning("%s: sha256 %s is recorded nowhere; unpickled because %s is set", path, sha, trust_key)
        return data
    raise InputError(
        f"{path}: unverified MACE model file (sha256 {sha} matches no record in resources/external.yaml "
        f"or resources/student/*.sha256); a model file is a pickle, and unpickling it runs code from it. "
        f"If you trust this file, set {trust_key}: true"
    )


def load_mace_model(
    path: str | os.PathLike,
    device: str = "auto",
    dtype: str = "float32",
    *,
    trust: bool = False,
    trust_key: str = TRUST_KEY,
    registry: str | os.PathLike | None = None,
):
    """Load a pickled MACE model onto ``device`` with parameters in ``dtype``.

    The file is unpickled only when its sha256 is recorded (:func:`recorded_model_sha256`) or
    ``trust`` is set; else an :class:`InputError` names the file and ``trust_key``, the setting
    that would allow it. The bytes checked are the bytes unpickled (read once).
    """
    torch = _import_torch()
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: MACE model file not found")
    device = resolve_device(device, "mlp")
    data = _verified_bytes(path, trust, trust_key, registry)
    _unoptimised_torchscript(torch)
    try:
        with _jit_load_on(device):
            # the sha256 of exactly these bytes was checked (or trusted) just above
            model = torch.load(io.BytesIO(data), map_location=device, weights_only=False)
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
    """ASE calculator around an in-memory MACE model.

    ``threads``: torch's CPU thread count (None: the process's current one). The count is kept on
    the calculator as ``torch_threads``, so that :func:`octastem.md.run_npt` runs with the thread
    count the calculator was made for whatever the process set since.
    """
    torch = _import_torch()
    from mace.calculators import MACECalculator

    if threads:
        torch.set_num_threads(int(threads))
    _unoptimised_torchscript(torch)
    device = resolve_device(device, "mlp")
    # cuequivariance kernels accelerate the symmetric contraction on NVIDIA GPUs when installed
    enable_cueq = device.startswith("cuda") and cueq_available()
    calc = MACECalculator(models=model, device=device, default_dtype=dtype, enable_cueq=enable_cueq)
    calc.torch_threads = int(threads) if threads else torch.get_num_threads()
    return calc


def cueq_available() -> bool:
    """True when the cuequivariance packages MACE uses for GPU acceleration are importable."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("cuequivariance", "cuequivariance_torch"))
