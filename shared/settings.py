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
    for f in fields(cls):  # type: ignore[arg-type]
        if f.name in values and f.default is not MISSING:
            _check_type(f.name, values[f.name], f.default)
    return cls(**values)


def _check_type(name: str, value: object, default: object) -> None:
    """A setting must have its default's type (an int is fine where a float is expected)."""
    if default is None or value is None:
        return
    want: tuple[type, ...] = (type(default),)
    if isinstance(default, float) and not isinstance(default, bool):
        want = (int, float)
    if isinstance(value, bool) != isinstance(default, bool) or not isinstance(value, want):
        raise ValueError(
            f"setting {name!r} must be {type(default).__name__}, got {type(value).__name__} "
            f"{value!r}"
        )


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
