"""Checks of the ``model.*`` options: run before the backbone is loaded, each error names its option."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from flora.errors import FloraConfigError, check_range


def check_option(
    name: str,
    value: float | int | None,
    *,
    integer: bool = False,
    **bounds: Any,
) -> None:
    """Range-check the model option ``name`` (``FloraConfigError`` naming it ``model.<name>``).

    ``bounds`` are those of :func:`flora.errors.check_range`; ``integer`` also rejects
    non-integral values, and infinities are always rejected.
    """
    check_range(f"model.{name}", value, **bounds)
    if value is None:
        return
    if integer and not isinstance(value, int):
        raise FloraConfigError(f"model.{name} must be an integer, got {value!r}")
    if isinstance(value, float) and math.isinf(value):
        raise FloraConfigError(f"model.{name} must be finite, got {value!r}")


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    """``FloraConfigError`` naming ``model.<name>`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise FloraConfigError(f"model.{name} must be one of {allowed}, got {value!r}")


def check_context_options(n_ctx: int, ctx_init_std: float, n_ctx_name: str = "n_ctx") -> None:
    """The options every learned context shares: at least one token, a non-negative init std."""
    check_option(n_ctx_name, n_ctx, low=1, integer=True)
    check_option("ctx_init_std", ctx_init_std, low=0)


def check_template(template: Any) -> None:
    """``model.template`` must be a string with one ``{}`` where the class name goes."""
    try:
        filled = template.format("\0") if isinstance(template, str) else ""
    except (IndexError, KeyError, ValueError):
        filled = ""
    if "\0" not in filled:
        raise FloraConfigError(
            f"model.template must contain {{}} where the class name goes, got {template!r}"
        )
