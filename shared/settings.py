"""Settings as value objects: named defaults, then a TOML file, then environment, then flags."""

from __future__ import annotations

import argparse
import os
import tomllib
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def load_settings(cls: type[T], args: argparse.Namespace, section: str, env_prefix: str) -> T:
    """Build ``cls``: defaults < ``--config`` TOML ``[section]`` < environment < flags."""
    values: dict[str, Any] = {}
    config = getattr(args, "config", None)
    if config is not None:
        values.update(load_toml(cls, Path(config), section))
    values.update(_from_env(cls, env_prefix))
    for f in fields(cls):  # type: ignore[arg-type]
        flag = getattr(args, f.name, None)
        if flag is not None:
            values[f.name] = flag
    return cls(**values)


def load_toml(cls: type[Any], path: Path, section: str) -> dict[str, Any]:
    """Read ``cls`` settings from ``path`` (a ``[section]`` table or top-level keys)."""
    with open(path, "rb") as fh:
        raw = tomllib.load(fh)
    raw = raw.get(section, raw)
    known = {f.name: f for f in fields(cls)}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ValueError(f"{path}: unknown setting {key!r} in [{section}]")
        out[name] = tuple(value) if isinstance(value, list) else value
    return out


def _from_env(cls: type[Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(cls):
        raw = os.environ.get(prefix + f.name.upper())
        if raw is None:
            continue
        default = f.default if f.default is not MISSING else None
        out[f.name] = _coerce(raw, default, prefix + f.name.upper())
    return out


def _coerce(raw: str, default: object, key: str) -> object:
    try:
        if isinstance(default, bool):
            return raw.strip().lower() in ("1", "true", "yes", "on")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, tuple):
            return tuple(int(p) for p in raw.split(","))
    except ValueError as exc:
        raise ValueError(f"environment variable {key}={raw!r}: {exc}") from exc
    return raw
