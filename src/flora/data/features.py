"""Frozen-feature cache: the image tower's outputs per client split, in memory or on disk.

With a frozen image tower and no augmentation, a client's image features never
change, so they are computed once (keyed by backbone weights, feature kind,
preprocessing and the shard checksums) and reused every round and every run.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor


class FeatureCache:
    """``mode``: ``"memory"`` (this process), ``"disk"`` (memory + safetensors files in ``directory``) or ``"off"``."""

    def __init__(self, mode: str = "memory", directory: str | os.PathLike | None = None) -> None:
        if mode not in ("memory", "disk", "off"):
            raise ValueError(f"feature_cache must be 'memory', 'disk' or 'off', got {mode!r}")
        if mode == "disk" and directory is None:
            raise ValueError("feature_cache: disk needs a cache directory")
        self.mode = mode
        self.directory = Path(directory) if directory is not None else None
        self._memory: dict[str, tuple[Tensor, Tensor]] = {}
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @staticmethod
    def make_key(*parts: object) -> str:
        return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()[:24]

    def get_or_compute(self, key: str, compute: Callable[[], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """Return cached ``(features, labels)`` for ``key`` or compute, store and return them."""
        if key in self._memory:
            self.hits += 1
            return self._memory[key]
        path = self.directory / f"{key}.safetensors" if self.mode == "disk" and self.directory else None
        if path is not None and path.exists():
            try:
                data = load_file(str(path))
                value = (data["features"], data["labels"])
                self.hits += 1
                self._memory[key] = value
                return value
            except Exception:  # noqa: BLE001 - a damaged cache entry is recomputed, never trusted
                path.unlink(missing_ok=True)
        self.misses += 1
        feats, labels = compute()
        value = (feats.detach().cpu().contiguous(), labels.detach().cpu().contiguous())
        if self.mode in ("memory", "disk"):
            self._memory[key] = value
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            save_file({"features": value[0], "labels": value[1]}, str(tmp))
            os.replace(tmp, path)
        return value
