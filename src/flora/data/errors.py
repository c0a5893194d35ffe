"""The data package's error type (defined in :mod:`flora.errors`, importable from here too)."""

from __future__ import annotations

from flora.errors import FloraDataError

__all__ = ["FloraDataError"]
