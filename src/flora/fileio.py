"""Writing files so that a reader never sees half of one.

Every file flora writes that a later run reads (checkpoints, client states, cached
features, shipped weights, reports, manifests) is written to a temporary file next to
its destination and renamed over it: a crash leaves the previous file intact and, at
worst, a ``<name>.tmp<pid>`` file, which the run-folder cleanup removes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def temporary_path(path: str | os.PathLike[str]) -> Path:
    """The temporary file ``path`` is written to before the rename: ``<name>.tmp<pid>``."""
    path = Path(path)
    return path.with_name(f"{path.name}.tmp{os.getpid()}")


def is_temporary(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a temporary file left by :func:`atomic_write` (``*.tmp<digits>``)."""
    suffix = Path(path).suffix
    return suffix.startswith(".tmp") and suffix[4:].isdigit()


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` to write the file, then rename ``tmp`` over ``path``.

    The parent folder is created; on any error the temporary file is removed and
    ``path`` is left as it was. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """:func:`atomic_write` of a text file (UTF-8)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
