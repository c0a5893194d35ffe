"""Error type for every problem with prepared or source data."""

from __future__ import annotations

__all__ = ["FloraDataError"]


class FloraDataError(RuntimeError):
    """A data problem (missing/corrupt shard or manifest, impossible partition, ...).

    The message is a single line that names the problem, the file or client involved and,
    where possible, how to fix it.
    """
