"""Error type for every problem with prepared or source data, and the data options' range checks.

:class:`flora.errors.FloraConfigError` lives in :mod:`flora.errors`, which imports this
module; the helpers below import it lazily so that either module can be imported first.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

__all__ = ["FloraDataError", "check_choice", "check_option", "config_error"]


class FloraDataError(RuntimeError):
    """A data problem (missing/corrupt shard or manifest, impossible partition, ...).

    The message is a single line that names the problem, the file or client involved and,
    where possible, how to fix it.
    """


def config_error(message: str) -> ValueError:
    """A :class:`flora.errors.FloraConfigError` (a ``ValueError``) with ``message``."""
    from flora.errors import FloraConfigError

    return FloraConfigError(message)


def check_option(name: str, value: Any, **bounds: Any) -> None:
    """:func:`flora.errors.check_range` for the data option ``name`` (as the user writes it)."""
    from flora.errors import check_range

    check_range(name, value, **bounds)


def check_choice(name: str, value: Any, choices: Collection[str]) -> None:
    """Raise ``FloraConfigError("<name> must be 'a', 'b' or 'c', got 'x'")`` unless ``value`` is a choice."""
    if value in choices:
        return
    quoted = [repr(c) for c in choices]
    allowed = quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
    raise config_error(f"{name} must be {allowed}, got {value!r}")
