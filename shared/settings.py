"""Settings as value objects: named defaults, then a TOML file, then environment, then flags.

The dataclass field types are the schema. Every value, from whichever source, goes through
one conversion (:func:`msgspec.convert`): strictly for TOML and flags, which arrive typed, and
leniently for environment variables, which are always text. A value that does not fit raises
:class:`SettingsError` naming the key and where the value came from.
"""

from __future__ import annotations

import argparse
import os
import re
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")

# msgspec's lenient mode reads true/false/1/0 itself; these words are common in env files.
_BOOL_WORDS = {"yes": "true", "on": "true", "no": "false", "off": "false"}
# msgspec's "- at `$[1]`" suffix, for a tuple item that does not convert.
_POSITION = re.compile(r" - at `\$\[(\d+)\]`")


class SettingsError(ValueError):
    """A setting that cannot be used; the message names the key and its source."""


@dataclass(frozen=True)
class Sourced:
    """One converted setting and where it came from (for error messages)."""

    value: Any
    source: str


def load_settings(cls: type[T], args: argparse.Namespace, section: str, env_prefix: str) -> T:
    """Build ``cls``: defaults < ``--config`` TOML ``[section]`` < environment < flags.

    Raises SettingsError (a ValueError) naming the key and its source, OSError when the
    file cannot be read.
    """
    schema = settings_schema(cls)
    merged: dict[str, Sourced] = {}
    config = getattr(args, "config", None)
    if config is not None:
        merged.update(toml_settings(schema, _read_toml(Path(config)), str(config), section))
    merged.update(env_settings(schema, os.environ, env_prefix))
    merged.update(flag_settings(schema, args))
    return build(cls, section, merged)


def load_toml(cls: type[DataclassInstance], path: Path, section: str) -> dict[str, Any]:
    """Converted ``cls`` settings from ``path`` (a ``[section]`` table or top-level keys)."""
    found = toml_settings(settings_schema(cls), _read_toml(path), str(path), section)
    return {name: setting.value for name, setting in found.items()}


def settings_schema(cls: type[DataclassInstance]) -> dict[str, Any]:
    """Field name → resolved type of every constructor field of the dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls) if f.init}


def toml_settings(
    schema: Mapping[str, Any], document: Mapping[str, Any], origin: str, section: str
) -> dict[str, Sourced]:
    """Settings of a parsed TOML ``document``: its ``[section]`` table, else its top level.

    Keys may use ``-`` for ``_``; an unknown key is an error, not a silently ignored typo.
    """
    table = document.get(section, document)
    if not isinstance(table, Mapping):
        raise SettingsError(f"{origin}: [{section}] must be a table")
    where = f"{origin} [{section}]" if section in document else origin
    out: dict[str, Sourced] = {}
    for key, raw in table.items():
        name = key.replace("-", "_")
        if name not in schema:
            raise SettingsError(f"{where}: unknown setting {key!r}")
        out[name] = convert(raw, schema[name], f"{where} {key}", strict=True)
    return out


def env_settings(
    schema: Mapping[str, Any], environ: Mapping[str, str], prefix: str
) -> dict[str, Sourced]:
    """Settings from ``{prefix}{NAME}`` variables in ``environ``, converted from text.

    Tuples are comma-separated (``1,28,28``); booleans are true/false/1/0/yes/no/on/off; an
    empty value sets an optional setting to None.
    """
    out: dict[str, Sourced] = {}
    for name, hint in schema.items():
        var = prefix + name.upper()
        text = environ.get(var)
        if text is not None:
            source = f"environment variable {var}={text!r}"
            out[name] = convert(_shape_text(text, hint), hint, source, strict=False)
    return out


def flag_settings(schema: Mapping[str, Any], args: argparse.Namespace) -> dict[str, Sourced]:
    """Settings given as flags; argparse leaves an unset flag None, which overrides nothing."""
    out: dict[str, Sourced] = {}
    for name, hint in schema.items():
        value = getattr(args, name, None)
        if value is not None:
            out[name] = convert(value, hint, f"command-line {name}={value!r}", strict=True)
    return out


def convert(raw: object, hint: Any, source: str, *, strict: bool) -> Sourced:
    """``raw`` as type ``hint`` (msgspec's conversion), or SettingsError naming ``source``."""
    try:
        return Sourced(msgspec.convert(raw, hint, strict=strict), source)
    except msgspec.ValidationError as exc:
        raise SettingsError(f"{source}: {_reason(exc, from_text=not strict)}") from exc


def build(cls: type[T], section: str, settings: Mapping[str, Sourced]) -> T:
    """``cls`` from converted settings; its own range checks name the offending source."""
    try:
        return cls(**{name: setting.value for name, setting in settings.items()})
    except ValueError as exc:
        message = str(exc)
        raise SettingsError(
            f"invalid [{section}] setting: {message}{_blame(message, settings)}"
        ) from exc


def _blame(message: str, settings: Mapping[str, Sourced]) -> str:
    """`` (source)`` of the setting a range-check message starts with, e.g. ``rounds must``."""
    for name, setting in settings.items():
        if message.startswith((f"{name} ", f"{name.replace('_', '-')} ")):
            return f" ({setting.source})"
    return ""  # the default value, or a check that spans several settings


def _reason(exc: msgspec.ValidationError, *, from_text: bool) -> str:
    """msgspec's message in a settings error's words, e.g. ``expected int at index 1``."""
    reason = _POSITION.sub(r" at index \1", str(exc)).replace("`", "").replace("null", "None")
    if from_text:  # an environment value is always text: "got str" says nothing
        reason = reason.replace(", got str", "")
    return reason[:1].lower() + reason[1:]


def _shape_text(text: str, hint: Any) -> object:
    """An environment string in the shape msgspec's lenient mode converts to ``hint``."""
    args = typing.get_args(hint)
    if type(None) in args:
        if not text.strip():
            return None
        rest = [a for a in args if a is not type(None)]
        hint = rest[0] if len(rest) == 1 else hint
    if hint is str:
        return text  # verbatim: a password may start or end with a space
    text = text.strip()
    if typing.get_origin(hint) in (tuple, list):
        return [part.strip() for part in text.split(",")] if text else []
    if hint is bool:
        return _BOOL_WORDS.get(text.lower(), text)
    return text


def _read_toml(path: Path) -> dict[str, Any]:
    """Parse ``path``; a syntax error names the file (tomllib's message does not)."""
    with open(path, "rb") as fh:
        try:
            return tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"{path}: {exc}") from exc
