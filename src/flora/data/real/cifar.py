"""CIFAR-10 and CIFAR-100 (fine labels) from the python release, in torchvision's layout.

The folder, file and key names come from ``torchvision.datasets.CIFAR10`` / ``CIFAR100``,
and torchvision downloads the archive when asked to (``download: true``). The files are
read here and not by torchvision's dataset classes, for two reasons:

* torchvision unpickles them with ``pickle.load``, which runs whatever code a file refers
  to. Here they are read with a restricted unpickler that only rebuilds what CIFAR files
  contain (dicts, lists, strings, bytes, numbers and numpy arrays); a file that refers to
  anything else (e.g. ``os.system``) is refused with a `FloraDataError` before any of it runs.
* torchvision accepts only the official files (it checks their md5 sums) and only string
  keys; here any tree in the layout is read (keys may be str or bytes), and a missing or
  damaged file gives a one-line `FloraDataError` that names it and how to fix it.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torchvision.datasets as tvd
from PIL import Image

from flora.data.real.base import pretty, require_dir, require_file
from flora.data.source import SourceDataset, check_index, check_split
from flora.errors import FloraConfigError, FloraDataError


@dataclass(frozen=True)
class _Release:
    """One CIFAR release: torchvision's class (layout, archive) and the key of the labels used."""

    torchvision: type[tvd.CIFAR10]
    label_key: str

    @property
    def folder(self) -> str:
        return self.torchvision.base_folder

    @property
    def files(self) -> dict[str, list[str]]:
        """The data files of each split, in sample order."""
        return {
            "train": [name for name, _ in self.torchvision.train_list],
            "test": [name for name, _ in self.torchvision.test_list],
        }

    @property
    def meta(self) -> str:
        return self.torchvision.meta["filename"]

    @property
    def names_key(self) -> str:
        return self.torchvision.meta["key"]


_RELEASES = {"cifar10": _Release(tvd.CIFAR10, "labels"), "cifar100": _Release(tvd.CIFAR100, "fine_labels")}


def _get_key(d: Any, key: str, path: Path) -> Any:
    """`d[key]` for a pickle dict whose keys may be str or bytes."""
    if isinstance(d, dict):
        if key in d:
            return d[key]
        if key.encode() in d:
            return d[key.encode()]
    raise FloraDataError(
        f"{path} has no {key!r} entry; the file is not a CIFAR python pickle, re-download it"
    )


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The numpy callables that pickled arrays and scalars refer to, under numpy 1.x and 2.x names."""
    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy(._)core.multiarray._reconstruct
    scalar = np.int64(0).__reduce__()[0]  # numpy(._)core.multiarray.scalar
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = scalar
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]  # numpy(._)core.numeric._frombuffer (pickle protocol 5)
    if getattr(frombuffer, "__name__", "") == "_frombuffer":
        for core in ("numpy.core", "numpy._core"):
            allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    import _codecs

    allowed[("_codecs", "encode")] = _codecs.encode  # bytes in protocol-2 pickles written by Python 3
    return allowed


class _RefusedGlobal(pickle.UnpicklingError):
    pass


class _CifarUnpickler(pickle.Unpickler):
    """Rebuilds builtin containers/scalars and numpy arrays only; any other global is refused."""

    _allowed: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if _CifarUnpickler._allowed is None:
            _CifarUnpickler._allowed = _numpy_globals()
        obj = _CifarUnpickler._allowed.get((module, name))
        if obj is None:
            raise _RefusedGlobal(f"{module}.{name}")
        return obj


def _load_pickle(path: Path) -> Any:
    require_file(
        path, "CIFAR file", "re-download the data (download: true) or place the original files there"
    )
    try:
        data = path.read_bytes()
    except OSError as err:
        raise FloraDataError(f"cannot read CIFAR file {path} ({err}); re-download the data") from err
    try:
        return _CifarUnpickler(io.BytesIO(data), encoding="latin1").load()
    except _RefusedGlobal as err:
        raise FloraDataError(
            f"CIFAR file {path} refers to {err}, which a CIFAR data file never contains; "
            "refusing to load it (it may be malicious), re-download the data"
        ) from None
    except Exception as err:  # noqa: BLE001 - any malformed pickle is a data error
        raise FloraDataError(
            f"cannot read CIFAR file {path} ({type(err).__name__}: {err}); re-download the data"
        ) from err


class CIFAR(SourceDataset):
    """CIFAR-10 or CIFAR-100 (fine labels) from the original python-pickle release.

    Layout under `root` (as extracted from https://www.cs.toronto.edu/~kriz/cifar.html, or as
    written by ``torchvision.datasets.CIFAR10/CIFAR100(root, download=True)``)::

        root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
        root/cifar-100-python/{train, test, meta}

    Images are 32x32 RGB.  The split arrays are read on first use (one split at a time).

    Args:
        name: "cifar10" or "cifar100".
        root: Folder that contains the extracted ``cifar-*`` folder.
        download: Fetch the archive with torchvision when the folder is missing.
    """

    def __init__(self, name: str = "cifar10", root: str = "data/raw", download: bool = False) -> None:
        if name not in _RELEASES:
            raise FloraConfigError(f"data.dataset.name must be one of {sorted(_RELEASES)}, got {name!r}")
        self.name = name
        self.root = root
        self.download = download
        self._release = _RELEASES[name]
        self._names: list[str] | None = None
        self._splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def folder(self) -> Path:
        """The extracted ``cifar-*`` folder."""
        return Path(self.root) / self._release.folder

    def _ensure_folder(self) -> None:
        if self.folder.is_dir():
            return
        if not self.download:
            raise FloraDataError(
                f"CIFAR folder not found: {self.folder}; set download: true or place the extracted "
                f"{self._release.folder} folder under {self.root}"
            )
        from torchvision.datasets.utils import download_and_extract_archive

        tv = self._release.torchvision
        download_and_extract_archive(tv.url, str(self.root), filename=tv.filename, md5=tv.tgz_md5)
        require_dir(self.folder, "CIFAR folder", "the download did not create it; place the files manually")

    @property
    def class_names(self) -> list[str]:
        """Class names in label order ("_" replaced by " ")."""
        if self._names is None:
            self._ensure_folder()
            path = self.folder / self._release.meta
            names = _get_key(_load_pickle(path), self._release.names_key, path)
            names = [pretty(n.decode("latin1") if isinstance(n, bytes) else str(n)) for n in names]
            if not names:
                raise FloraDataError(f"{path} lists no class names; re-download the data")
            self._names = names
        return list(self._names)

    def _load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        check_split(split)
        if split not in self._splits:
            self._ensure_folder()
            data, labels = [], []
            for fname in self._release.files[split]:
                path = self.folder / fname
                batch = _load_pickle(path)
                x = np.asarray(_get_key(batch, "data", path), dtype=np.uint8)
                y = np.asarray(_get_key(batch, self._release.label_key, path), dtype=np.int64)
                if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(y) != len(x):
                    raise FloraDataError(
                        f"{path} holds data of shape {x.shape} with {len(y)} labels, expected (N, 3072) "
                        "with N labels; re-download the data"
                    )
                data.append(x)
                labels.append(y)
            y = np.concatenate(labels)
            k = len(self.class_names)
            if len(y) and (y.min() < 0 or y.max() >= k):
                raise FloraDataError(f"{self.folder} has labels outside [0, {k}); re-download the data")
            self._splits[split] = (np.concatenate(data), y)
        return self._splits[split]

    def labels(self, split: str) -> np.ndarray:
        """Int64 label of every sample of `split`."""
        return self._load(split)[1].copy()

    def size(self, split: str) -> int:
        """Number of samples in `split`."""
        return len(self._load(split)[1])

    def image(self, split: str, index: int) -> Image.Image:
        """The 32x32 RGB image of sample `index` of `split`."""
        data = self._load(split)[0]
        row = data[check_index(split, index, len(data))]
        return Image.fromarray(np.ascontiguousarray(row.reshape(3, 32, 32).transpose(1, 2, 0)), "RGB")

    def describe(self) -> dict[str, Any]:
        """Constructor arguments plus "class"."""
        return {"class": "CIFAR", "name": self.name, "root": self.root, "download": self.download}

    def __repr__(self) -> str:
        return f"CIFAR(name={self.name!r}, root={self.root!r}, download={self.download!r})"
