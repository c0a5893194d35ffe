"""What the real-dataset loaders share: class-name spelling, file checks and the base class
of the folder-of-image-files datasets (`FileDataset`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from flora.data.source import SourceDataset, check_index, check_split
from flora.errors import FloraConfigError, FloraDataError


def pretty(name: str) -> str:
    """Human-readable class name: "aquarium_fish" -> "aquarium fish"."""
    return name.replace("_", " ").strip()


def require_dir(path: Path, what: str, fix: str) -> None:
    """FloraDataError ``"<what> not found: <path>; <fix>"`` unless `path` is a folder."""
    if not path.is_dir():
        raise FloraDataError(f"{what} not found: {path}; {fix}")


def require_file(path: Path, what: str, fix: str) -> None:
    """FloraDataError ``"<what> not found: <path>; <fix>"`` unless `path` is a file."""
    if not path.is_file():
        raise FloraDataError(f"{what} not found: {path}; {fix}")


def open_rgb(path: Path) -> Image.Image:
    """Open one image file as RGB; a missing or unreadable file is a FloraDataError."""
    if not path.is_file():
        raise FloraDataError(f"image file not found: {path}; check the dataset root or re-download the data")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise FloraDataError(
            f"cannot read image {path} ({err}); the file is corrupt, re-download it"
        ) from err


def check_domains(domains: list[str]) -> list[str]:
    """The ``data.dataset.domains`` option as strings: at least one, none repeated."""
    domains = [str(d) for d in domains]
    if not domains:
        raise FloraConfigError("data.dataset.domains must name at least one domain")
    if len(set(domains)) != len(domains):
        raise FloraConfigError(f"data.dataset.domains must not repeat, got {domains}")
    return domains


@dataclass
class Index:
    """Paths, labels and (optionally) domains of every sample of both splits."""

    class_names: list[str]
    paths: dict[str, list[Path]] = field(default_factory=dict)
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    domains: dict[str, np.ndarray] | None = None


class FileDataset(SourceDataset):
    """Base of the folder-of-image-files datasets: subclasses implement `_build_index`.

    The index is built on first use and kept; `image()` opens one file.
    """

    _index_cache: Index | None = None

    def _build_index(self) -> Index:
        raise NotImplementedError

    @property
    def _index(self) -> Index:
        if self._index_cache is None:
            index = self._build_index()
            if not index.class_names:
                raise FloraDataError(
                    f"{type(self).__name__} found no classes under {self._root_for_errors()}"
                )
            self._index_cache = index
        return self._index_cache

    def _root_for_errors(self) -> str:
        return str(getattr(self, "root", "?"))

    @property
    def class_names(self) -> list[str]:
        """Class names in label order."""
        return list(self._index.class_names)

    def labels(self, split: str) -> np.ndarray:
        """Int64 label of every sample of `split`."""
        check_split(split)
        return self._index.labels[split].copy()

    def size(self, split: str) -> int:
        """Number of samples in `split`."""
        check_split(split)
        return len(self._index.paths[split])

    def domains(self, split: str) -> np.ndarray | None:
        """Int64 domain index of every sample of `split` (None for single-domain data)."""
        check_split(split)
        if self._index.domains is None:
            return None
        return self._index.domains[split].copy()

    def image_path(self, split: str, index: int) -> Path:
        """Path of the image file of sample `index` of `split`."""
        check_split(split)
        paths = self._index.paths[split]
        return paths[check_index(split, index, len(paths))]

    def image(self, split: str, index: int) -> Image.Image:
        """The RGB image of sample `index` of `split` (opened from disk)."""
        return open_rgb(self.image_path(split, index))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.describe().items() if k != "class")
        return f"{type(self).__name__}({args})"
