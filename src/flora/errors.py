"""Error types whose message is shown to the user as one line (``flora: error: ...``).

Every check of user input raises one of these with a message that names the
parameter or file, the value it got and what is allowed. The ``flora`` command prints
the message without a traceback (set ``FLORA_DEBUG=1`` for one).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

__all__ = [
    "FloraConfigError",
    "FloraDataError",
    "FloraConfigWarning",
    "FloraDataWarning",
    "FloraRunError",
    "check_choice",
    "check_range",
]


class FloraDataError(RuntimeError):
    """A data problem (missing/corrupt shard or manifest, impossible partition, ...).

    The message is a single line that names the problem, the file or client involved and,
    where possible, how to fix it.
    """


class FloraDataWarning(UserWarning):
    """Data that works but not as a user may expect (e.g. clients without test samples, which are not evaluated)."""


class FloraConfigWarning(UserWarning):
    """An option that cannot take effect for this method or setup (e.g. ``client_batch`` on a method that trains one client at a time)."""


class FloraConfigError(ValueError):
    """A configuration value is out of range or inconsistent with another one."""


class FloraRunError(RuntimeError):
    """A run cannot start or continue as asked (run folder in use, checkpoint mismatch, non-finite upload, ...)."""


def check_range(
    name: str,
    value: float | int | None,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
) -> None:
    """Raise :class:`FloraConfigError` unless ``low <= value <= high`` (``<`` where the bound is open).

    ``name`` is the option as the user writes it (e.g. ``trainer.rounds``).
    """
    if value is None:
        if allow_none:
            return
        raise FloraConfigError(f"{name} must be set")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FloraConfigError(f"{name} must be a number, got {value!r}")
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high or value != value:  # value != value: NaN
        if low is not None and high is not None:
            what = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        elif low is not None:
            what = f"{'>' if low_open else '>='} {low}"
        else:
            what = f"{'<' if high_open else '<='} {high}"
        raise FloraConfigError(f"{name} must be {what}, got {value!r}")


def check_choice(name: str, value: Any, choices: Collection[str]) -> None:
    """Raise ``FloraConfigError("<name> must be 'a', 'b' or 'c', got 'x'")`` unless ``value`` is a choice."""
    if value in choices:
        return
    quoted = [repr(c) for c in choices]
    allowed = quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
    raise FloraConfigError(f"{name} must be {allowed}, got {value!r}")
