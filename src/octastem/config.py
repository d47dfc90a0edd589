"""The configuration schema (``config/schema.yaml``) as the one source of default settings.

Snakemake validates every config against the schema and fills in its defaults before any job
starts. Library code that needs the same defaults outside Snakemake (a dataclass of settings, a
unit test, a benchmark) reads them here instead of repeating the numbers.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import yaml

from .io import InputError

SCHEMA = Path(__file__).resolve().parents[2] / "config" / "schema.yaml"


@functools.lru_cache(maxsize=None)
def _schema(path: str) -> dict:
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: configuration schema not found")
    with open(p) as f:
        return yaml.safe_load(f)


def _node(keys: tuple[str, ...], path: str) -> dict:
    node = _schema(path)
    for i, key in enumerate(keys):
        props = node.get("properties", {})
        if key not in props:
            raise KeyError(f"{path}: no setting {'.'.join(keys[: i + 1])!r} in the schema")
        node = props[key]
    return node


def _defaults(node: dict) -> Any:
    """A node's default; for an object whose default is ``{}``, the defaults of its properties."""
    default = node.get("default")
    props = node.get("properties")
    if props is not None and (default is None or default == {}):
        filled = {k: _defaults(v) for k, v in props.items()}
        return {k: v for k, v in filled.items() if v is not None or "default" in props[k]}
    return default


def schema_defaults(*keys: str, path: str | Path = SCHEMA) -> Any:
    """Default value of the setting ``keys`` (e.g. ``schema_defaults("cnn", "train")``) in the schema.

    For an object, a dict of its properties' defaults (recursively), the same values Snakemake's
    ``validate(..., set_default=True)`` fills in. A copy: changing it does not change the schema."""
    import copy

    return copy.deepcopy(_defaults(_node(tuple(keys), str(path))))
