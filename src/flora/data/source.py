"""The `SourceDataset` interface every dataset implements, and the checks its methods share.

A source dataset is a labelled image dataset with the two splits in `SPLITS`. The shard
writer (:mod:`flora.data.shards`) only ever talks to this interface, so the synthetic
world (:mod:`flora.data.synthetic`) and the real datasets (:mod:`flora.data.real`) are
interchangeable.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["SPLITS", "SourceDataset", "check_index", "check_split"]

#: Names of the two splits every source dataset provides.
SPLITS: tuple[str, ...] = ("train", "test")


def check_split(split: str) -> None:
    """Raise ``ValueError`` unless `split` is one of `SPLITS`."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {list(SPLITS)}")


def check_index(split: str, index: int, size: int) -> int:
    """`index` as an int; ``IndexError`` unless ``0 <= index < size`` (the size of `split`)."""
    index = int(index)
    if not 0 <= index < size:
        raise IndexError(f"index {index} out of range for split {split!r} of size {size}")
    return index


class SourceDataset(ABC):
    """A labelled image dataset with a train and a test split (see `SPLITS`).

    Implementations must be deterministic: the same arguments always give the same labels
    and the same images, and `describe()` identifies the data (it is stored in manifests).
    """

    @property
    @abstractmethod
    def class_names(self) -> list[str]:
        """Class names in label order."""

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)

    @abstractmethod
    def labels(self, split: str) -> np.ndarray:
        """Int64 label of every sample of `split`, in sample order."""

    def domains(self, split: str) -> np.ndarray | None:
        """Int64 domain (style) index of every sample of `split`, or None for one domain."""
        return None

    @abstractmethod
    def size(self, split: str) -> int:
        """Number of samples in `split`."""

    @abstractmethod
    def image(self, split: str, index: int) -> Image.Image:
        """The RGB image of sample `index` of `split`."""

    def caption(self, split: str, index: int) -> str:
        """A short English caption of the sample."""
        return f"a photo of a {self.class_names[int(self.labels(split)[index])]}"

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON-serialisable description (with a "class" key) identifying the data."""
