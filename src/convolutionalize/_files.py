"""Atomic file output: write to a temporary file beside the target, rename on success.

Every writer in the package (converted models, maps, pictures, JSON) goes through
:func:`atomic_path`, so a failure never leaves a partial or half-written output behind.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside ``path`` (same suffix), moved onto ``path`` if the block succeeds.

    Raises:
        ValueError: the directory does not exist, is not a directory, or is not writable.
    """
    path = Path(path)
    if not path.parent.is_dir():
        problem = "is not a directory" if path.parent.exists() else "does not exist"
        raise ValueError(f"cannot write {path}: {path.parent} {problem}")
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        tmp.open("xb").close()
    except OSError as exc:
        raise ValueError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
