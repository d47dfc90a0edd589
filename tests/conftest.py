import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _mirror():
    m = os.environ.get("OCTASTEM_MIRROR")
    if not m and (REPO.parent / "shared" / "data").exists():
        m = str(REPO.parent / "shared" / "data")
        os.environ["OCTASTEM_MIRROR"] = m
    return m


@pytest.fixture(scope="session")
def reference_model_path():
    """Path of the study's MACE potential (mirror or download); skips when neither is reachable."""
    from octastem.io import InputError
    from octastem.registry import fetch

    _mirror()
    try:
        return fetch("reference_mace")
    except InputError as e:
        pytest.skip(f"reference potential not available: {e}")


@pytest.fixture(scope="session")
def reference_calc(reference_model_path):
    from octastem.md.mlp import load_mace_model, mace_calculator

    model = load_mace_model(reference_model_path, device="cpu")
    return model, mace_calculator(model, device="cpu", threads=2)
