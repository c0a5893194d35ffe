"""Frozen-feature cache: the image tower's outputs per client split, in memory or on disk.

With a frozen image tower and no augmentation, a client's image features never
change, so they are computed once (keyed by backbone weights, feature kind,
preprocessing, the shards' manifest checksums and the shard files' size and
modification time) and reused every round and every run.

A cached entry is never trusted blindly:

* Each disk entry (``<key>.safetensors``) stores the sha256 of its tensors (dtype, shape
  and bytes of the features, then of the labels) in its safetensors metadata, and
  loading recomputes and compares it. A damaged entry (flipped bytes, a truncated or
  unreadable file, or an entry without a checksum, as written by earlier flora versions) is
  **recomputed** from the shards and rewritten, with a ``RuntimeWarning`` that names the
  file; it is never used. Cost: one sha256 over the entry's bytes per load (about a
  second per GB), far less than encoding the images again.
* The key of a client split includes ``size:mtime_ns`` of each of its shard files
  (:meth:`flora.data.FederatedDataModule.shard_state`), so a shard that was changed,
  replaced or damaged after a warm run gets a new key: the shard is read again, its
  sha256 is checked against the manifest, and a bad shard gives the usual
  ``shard ... is corrupt`` error. Cost: one ``stat`` per shard per lookup. Changing a
  shard's bytes while restoring its size and mtime is not detected until the cache is
  cleared, but then the cached features still are those of the shard the manifest
  describes.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from flora.errors import FloraConfigError, check_choice
from flora.fileio import atomic_write

#: The metadata entry of a disk cache file that holds the tensors' sha256.
CHECKSUM_KEY = "sha256"


class FeatureCache:
    """``mode``: ``"memory"`` (this process), ``"disk"`` (memory + safetensors files in ``directory``) or ``"off"``."""

    def __init__(self, mode: str = "memory", directory: str | os.PathLike | None = None) -> None:
        check_choice("data.feature_cache", mode, ("memory", "disk", "off"))
        if mode == "disk" and directory is None:
            raise FloraConfigError("data.feature_cache: disk needs a cache directory")
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

    @staticmethod
    def checksum(features: Tensor, labels: Tensor) -> str:
        """sha256 over the dtype, shape and bytes of ``features`` and then ``labels``."""
        h = hashlib.sha256()
        for t in (features, labels):
            t = t.detach().cpu().contiguous()
            h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
            flat = t.reshape(-1)
            h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
        return h.hexdigest()

    def _load(self, path: Path) -> tuple[Tensor, Tensor] | None:
        """The verified entry at ``path``, or None (with a warning) when it cannot be trusted."""
        try:
            with safe_open(str(path), "pt") as fh:
                meta = fh.metadata() or {}
                value = (fh.get_tensor("features"), fh.get_tensor("labels"))
        except Exception as err:  # noqa: BLE001 - any unreadable entry is recomputed, never trusted
            problem = f"cannot be read ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        else:
            stored = meta.get(CHECKSUM_KEY)
            if stored is None:
                problem = "has no checksum (written by an older flora)"
            elif stored != self.checksum(*value):
                problem = "is corrupt (sha256 of its tensors does not match the stored one)"
            else:
                return value
        warnings.warn(f"feature cache entry {path} {problem}; recomputing it", RuntimeWarning, stacklevel=3)
        return None

    def get_or_compute(self, key: str, compute: Callable[[], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """Return cached ``(features, labels)`` for ``key`` or compute, store and return them."""
        if key in self._memory:
            self.hits += 1
            return self._memory[key]
        path = self.directory / f"{key}.safetensors" if self.mode == "disk" and self.directory else None
        if path is not None and path.exists():
            loaded = self._load(path)
            if loaded is not None:
                self.hits += 1
                self._memory[key] = loaded
                return loaded
            path.unlink(missing_ok=True)
        self.misses += 1
        feats, labels = compute()
        value = (feats.detach().cpu().contiguous(), labels.detach().cpu().contiguous())
        if self.mode in ("memory", "disk"):
            self._memory[key] = value
        if path is not None:
            tensors = {"features": value[0], "labels": value[1]}
            meta = {CHECKSUM_KEY: self.checksum(*value)}
            atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        return value
