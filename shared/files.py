"""Durable files: the one atomic write used for every file fedmq must not lose half of.

A crash (power loss included, on POSIX file systems) leaves either the old file or the new
one, never a mix: the data goes to a temporary file in the same directory, is fsynced, renamed
over the target, and the directory is fsynced so the rename itself is durable.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomic(path: Path | str, data: bytes | Callable[[BinaryIO], object]) -> None:
    """Replace ``path`` by ``data`` (bytes, or a function that writes to the open file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path | str) -> None:
    """Make renames and new files in ``directory`` durable (where the platform allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms that cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory: nothing more to do
        pass
    finally:
        os.close(fd)


def is_temporary(name: str) -> bool:
    """True for the name of a temporary file :func:`write_atomic` left behind in a crash."""
    return name.startswith(".") and name.endswith(".tmp")
