"""Loaders for real image datasets stored on disk: CIFAR-10/100, the CoOp few-shot benchmarks,
DomainNet and Office-Caltech-10.

Every loader indexes its files lazily (on first use, so building one from a config never
touches the disk) and keeps only paths and labels in memory; `image()` opens one file.
Sample order never depends on directory listing order, and class names are in label order,
with "_" replaced by " ".  Problems with the files on disk raise `FloraDataError` with a
one-line message naming the path and how to fix it; bad constructor arguments raise
`flora.errors.FloraConfigError` naming the option (``data.dataset.<name>``).

CIFAR's python release is a set of pickles. They are read with a restricted unpickler that
only rebuilds what those files contain (dicts, lists, strings, bytes, numbers and numpy
arrays); a file that refers to anything else (e.g. ``os.system``) is refused with a
`FloraDataError` before any of it runs.
"""

from __future__ import annotations

import io
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from flora.data.synthetic import SPLITS, SourceDataset
from flora.errors import FloraConfigError, FloraDataError, check_range

__all__ = [
    "COOP_PRESETS",
    "DOMAINNET_DOMAINS",
    "DOMAINNET_FL_CLASSES",
    "OFFICE_CALTECH10_CLASSES",
    "OFFICE_CALTECH10_DOMAINS",
    "CIFAR",
    "CoOpDataset",
    "DomainNet",
    "OfficeCaltech10",
]

#: File suffixes (lower case) accepted as images when scanning folders.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _pretty(name: str) -> str:
    """Human-readable class name: "aquarium_fish" -> "aquarium fish"."""
    return name.replace("_", " ").strip()


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {list(SPLITS)}")


def _check_index(split: str, index: int, size: int) -> int:
    index = int(index)
    if not 0 <= index < size:
        raise IndexError(f"index {index} out of range for split {split!r} of size {size}")
    return index


def _open_rgb(path: Path) -> Image.Image:
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


def _require_dir(path: Path, what: str, fix: str) -> None:
    if not path.is_dir():
        raise FloraDataError(f"{what} not found: {path}; {fix}")


def _require_file(path: Path, what: str, fix: str) -> None:
    if not path.is_file():
        raise FloraDataError(f"{what} not found: {path}; {fix}")


@dataclass
class _Index:
    """Paths, labels and (optionally) domains of every sample of both splits."""

    class_names: list[str]
    paths: dict[str, list[Path]] = field(default_factory=dict)
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    domains: dict[str, np.ndarray] | None = None


class _FileDataset(SourceDataset):
    """Base of the folder-of-image-files datasets: subclasses implement `_build_index`."""

    _index_cache: _Index | None = None

    def _build_index(self) -> _Index:
        raise NotImplementedError

    @property
    def _index(self) -> _Index:
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
        _check_split(split)
        return self._index.labels[split].copy()

    def size(self, split: str) -> int:
        """Number of samples in `split`."""
        _check_split(split)
        return len(self._index.paths[split])

    def domains(self, split: str) -> np.ndarray | None:
        """Int64 domain index of every sample of `split` (None for single-domain data)."""
        _check_split(split)
        if self._index.domains is None:
            return None
        return self._index.domains[split].copy()

    def image_path(self, split: str, index: int) -> Path:
        """Path of the image file of sample `index` of `split`."""
        _check_split(split)
        paths = self._index.paths[split]
        return paths[_check_index(split, index, len(paths))]

    def image(self, split: str, index: int) -> Image.Image:
        """The RGB image of sample `index` of `split` (opened from disk)."""
        return _open_rgb(self.image_path(split, index))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.describe().items() if k != "class")
        return f"{type(self).__name__}({args})"


# --------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100


@dataclass(frozen=True)
class _CifarSpec:
    folder: str
    train: tuple[str, ...]
    test: str
    meta: str
    label_key: str
    names_key: str
    torchvision_class: str


_CIFAR_SPECS = {
    "cifar10": _CifarSpec(
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
        "batches.meta",
        "labels",
        "label_names",
        "CIFAR10",
    ),
    "cifar100": _CifarSpec(
        "cifar-100-python", ("train",), "test", "meta", "fine_labels", "fine_label_names", "CIFAR100"
    ),
}


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
    _require_file(
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
        if name not in _CIFAR_SPECS:
            raise FloraConfigError(f"data.dataset.name must be one of {sorted(_CIFAR_SPECS)}, got {name!r}")
        self.name = name
        self.root = root
        self.download = download
        self._spec = _CIFAR_SPECS[name]
        self._names: list[str] | None = None
        self._splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def folder(self) -> Path:
        """The extracted ``cifar-*`` folder."""
        return Path(self.root) / self._spec.folder

    def _ensure_folder(self) -> None:
        if self.folder.is_dir():
            return
        if not self.download:
            raise FloraDataError(
                f"CIFAR folder not found: {self.folder}; set download: true or place the extracted "
                f"{self._spec.folder} folder under {self.root}"
            )
        try:
            import torchvision.datasets as tvd
        except ImportError as err:  # pragma: no cover - torchvision is a dependency
            raise FloraDataError(
                f"downloading {self.name} needs torchvision; install it or place {self.folder}"
            ) from err
        Path(self.root).mkdir(parents=True, exist_ok=True)
        getattr(tvd, self._spec.torchvision_class)(root=str(self.root), train=True, download=True)
        _require_dir(self.folder, "CIFAR folder", "the download did not create it; place the files manually")

    @property
    def class_names(self) -> list[str]:
        """Class names in label order ("_" replaced by " ")."""
        if self._names is None:
            self._ensure_folder()
            path = self.folder / self._spec.meta
            names = _get_key(_load_pickle(path), self._spec.names_key, path)
            names = [_pretty(n.decode("latin1") if isinstance(n, bytes) else str(n)) for n in names]
            if not names:
                raise FloraDataError(f"{path} lists no class names; re-download the data")
            self._names = names
        return list(self._names)

    def _load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        _check_split(split)
        if split not in self._splits:
            self._ensure_folder()
            files = self._spec.train if split == "train" else (self._spec.test,)
            data, labels = [], []
            for fname in files:
                path = self.folder / fname
                batch = _load_pickle(path)
                x = np.asarray(_get_key(batch, "data", path), dtype=np.uint8)
                y = np.asarray(_get_key(batch, self._spec.label_key, path), dtype=np.int64)
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
        row = data[_check_index(split, index, len(data))]
        return Image.fromarray(np.ascontiguousarray(row.reshape(3, 32, 32).transpose(1, 2, 0)), "RGB")

    def describe(self) -> dict[str, Any]:
        """Constructor arguments plus "class"."""
        return {"class": "CIFAR", "name": self.name, "root": self.root, "download": self.download}

    def __repr__(self) -> str:
        return f"CIFAR(name={self.name!r}, root={self.root!r}, download={self.download!r})"


# --------------------------------------------------------------------------------------------
# CoOp benchmarks (folder of images + split_zhou_*.json)

#: name -> (dataset folder under root, image folder inside it, split file inside it).
COOP_PRESETS: dict[str, tuple[str, str, str]] = {
    "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "oxford_pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "oxford_flowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "food101": ("food-101", "images", "split_zhou_Food101.json"),
    "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json"),
}


class CoOpDataset(_FileDataset):
    """A CoOp benchmark: images in a folder plus CoOp's ``split_zhou_*.json`` split file.

    Layout under `root` (see CoOp's DATASETS.md, https://github.com/KaiyangZhou/CoOp, for
    where to download each dataset and its split file)::

        root/caltech-101/{101_ObjectCategories/, split_zhou_Caltech101.json}
        root/oxford_pets/{images/, split_zhou_OxfordPets.json}
        root/oxford_flowers/{jpg/, split_zhou_OxfordFlowers.json}
        root/food-101/{images/, split_zhou_Food101.json}
        root/dtd/{images/, split_zhou_DescribableTextures.json}

    The split file is ``{"train": [[impath, label, classname], ...], "val": [...], "test": [...]}``
    with `impath` relative to the image folder.  Sample order is the file's order.

    Args:
        name: One of `COOP_PRESETS`.
        root: Folder that contains the dataset folders.
        include_val: Add the JSON "val" entries to the train split.
    """

    def __init__(self, name: str = "oxford_pets", root: str = "data/raw", include_val: bool = False) -> None:
        if name not in COOP_PRESETS:
            raise FloraConfigError(f"data.dataset.name must be one of {sorted(COOP_PRESETS)}, got {name!r}")
        self.name = name
        self.root = root
        self.include_val = include_val

    @property
    def dataset_dir(self) -> Path:
        return Path(self.root) / COOP_PRESETS[self.name][0]

    @property
    def image_dir(self) -> Path:
        return self.dataset_dir / COOP_PRESETS[self.name][1]

    @property
    def split_file(self) -> Path:
        return self.dataset_dir / COOP_PRESETS[self.name][2]

    def _root_for_errors(self) -> str:
        return str(self.split_file)

    def _build_index(self) -> _Index:
        fix = f"download {self.name} and CoOp's {self.split_file.name} as described in CoOp's DATASETS.md"
        _require_dir(
            Path(self.root), "dataset root", f"set root to the folder that holds {self.dataset_dir.name}/"
        )
        _require_file(self.split_file, "CoOp split file", fix)
        _require_dir(self.image_dir, "image folder", fix)
        try:
            content = json.loads(self.split_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise FloraDataError(f"cannot read split file {self.split_file} ({err}); re-download it") from err
        parts = {"train": ["train", "val"] if self.include_val else ["train"], "test": ["test"]}
        if not isinstance(content, dict):
            raise FloraDataError(f"split file {self.split_file} is not a JSON object; re-download it")
        names: dict[int, str] = {}
        index = _Index(class_names=[])
        for split, keys in parts.items():
            paths: list[Path] = []
            labels: list[int] = []
            for key in keys:
                entries = content.get(key)
                if not isinstance(entries, list):
                    raise FloraDataError(f"split file {self.split_file} has no {key!r} list; re-download it")
                for i, entry in enumerate(entries):
                    try:
                        impath, label, classname = entry
                        label = int(label)
                    except (TypeError, ValueError) as err:
                        raise FloraDataError(
                            f"{self.split_file}: entry {key}[{i}] is {entry!r}, expected "
                            "[impath, label, classname]; re-download the split file"
                        ) from err
                    if label < 0:
                        raise FloraDataError(
                            f"{self.split_file}: entry {key}[{i}] has negative label {label}"
                        )
                    if names.setdefault(label, str(classname)) != str(classname):
                        raise FloraDataError(
                            f"{self.split_file}: label {label} is named both {names[label]!r} and "
                            f"{classname!r}; re-download the split file"
                        )
                    paths.append(self.image_dir / impath)
                    labels.append(label)
            index.paths[split] = paths
            index.labels[split] = np.asarray(labels, dtype=np.int64)
        if not names:
            raise FloraDataError(f"split file {self.split_file} lists no images; re-download it")
        missing = sorted(set(range(max(names) + 1)) - set(names))
        if missing:
            raise FloraDataError(
                f"{self.split_file}: labels {missing[:5]} have no images, labels must be 0..K-1; "
                "re-download the split file"
            )
        index.class_names = [_pretty(names[k]) for k in range(len(names))]
        return index

    def describe(self) -> dict[str, Any]:
        """Constructor arguments plus "class"."""
        return {"class": "CoOpDataset", "name": self.name, "root": self.root, "include_val": self.include_val}


# --------------------------------------------------------------------------------------------
# DomainNet

#: The six DomainNet domains.
DOMAINNET_DOMAINS: list[str] = ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"]

#: The 10-class subset of DomainNet used by federated-learning papers (e.g. FedBN, FedPR).
DOMAINNET_FL_CLASSES: list[str] = [
    "bird",
    "feather",
    "headphones",
    "ice_cream",
    "teapot",
    "tiger",
    "whale",
    "windmill",
    "wine_glass",
    "zebra",
]


def _check_domains(domains: list[str]) -> list[str]:
    domains = [str(d) for d in domains]
    if not domains:
        raise FloraConfigError("data.dataset.domains must name at least one domain")
    if len(set(domains)) != len(domains):
        raise FloraConfigError(f"data.dataset.domains must not repeat, got {domains}")
    return domains


class DomainNet(_FileDataset):
    """DomainNet (http://ai.bu.edu/M3SDA/): six domains, 345 classes; by default the 10-class FL subset.

    Layout under `root` (the per-domain zip files and the ``*_train.txt`` / ``*_test.txt``
    split files from the DomainNet page, extracted side by side)::

        root/<domain>/<class>/<file>.jpg
        root/<domain>_train.txt      # lines "<domain>/<class>/<file>.jpg <label>"
        root/<domain>_test.txt

    Labels are renumbered 0..K-1 in the order of `classes` (or, with `all_classes`, in the
    order of the split files' label numbers).  Each split is the concatenation over
    `domains` (in the given order) of that domain's samples, sorted by path; `domains(split)`
    gives every sample's domain index.

    Args:
        root: The DomainNet folder.
        domains: Domains to use, in order; default all six (`DOMAINNET_DOMAINS`).
        classes: Class folder names to keep, in label order; default `DOMAINNET_FL_CLASSES`.
        all_classes: Use every class found in the split files (ignores `classes`).
    """

    def __init__(
        self,
        root: str = "data/raw/domainnet",
        domains: list[str] | None = None,
        classes: list[str] | None = None,
        all_classes: bool = False,
    ) -> None:
        self.root = root
        self.domain_names = _check_domains(list(DOMAINNET_DOMAINS) if domains is None else list(domains))
        self.classes = list(DOMAINNET_FL_CLASSES) if classes is None else [str(c) for c in classes]
        self.all_classes = all_classes
        if not all_classes:
            if not self.classes:
                raise FloraConfigError(
                    "data.dataset.classes must name at least one class (or set all_classes: true)"
                )
            if len(set(self.classes)) != len(self.classes):
                raise FloraConfigError(f"data.dataset.classes must not repeat, got {self.classes}")

    def _read_split_file(self, path: Path) -> list[tuple[str, str, int]]:
        """Sorted (relative path, class folder, original label) of every line of a split file."""
        _require_file(
            path, "DomainNet split file", f"download {path.name} from the DomainNet page into {self.root}"
        )
        rows = []
        for lineno, line in enumerate(path.read_text().splitlines(), start=1):
            line = line.strip()
            if not line:
                continue
            fields = line.rsplit(maxsplit=1)
            parts = fields[0].split("/")
            try:
                label = int(fields[1]) if len(fields) == 2 else None
            except ValueError:
                label = None
            if label is None or len(parts) != 3:
                raise FloraDataError(
                    f"{path}:{lineno}: expected '<domain>/<class>/<file> <label>', got {line!r}; "
                    "re-download the split file"
                )
            rows.append((fields[0], parts[1], label))
        rows.sort()
        return rows

    def _build_index(self) -> _Index:
        root = Path(self.root)
        _require_dir(root, "DomainNet root", "set root to the folder with the extracted DomainNet domains")
        for d in self.domain_names:
            _require_dir(
                root / d, f"DomainNet domain folder {d!r}", f"download and extract {d}.zip into {root}"
            )
        rows = {
            (d, s): self._read_split_file(root / f"{d}_{s}.txt") for d in self.domain_names for s in SPLITS
        }
        label_of: dict[str, int] = {}
        for key, split_rows in rows.items():
            for _, cls, label in split_rows:
                if label_of.setdefault(cls, label) != label:
                    raise FloraDataError(
                        f"{root / f'{key[0]}_{key[1]}.txt'}: class {cls!r} has labels {label_of[cls]} "
                        f"and {label}; re-download the split files"
                    )
        if self.all_classes:
            classes = sorted(label_of, key=lambda c: (label_of[c], c))
        else:
            classes = list(self.classes)
            missing = [c for c in classes if c not in label_of]
            if missing:
                raise FloraDataError(
                    f"DomainNet classes {missing} do not occur in the split files under {root}; "
                    "use DomainNet class folder names (e.g. 'ice_cream')"
                )
        new_label = {c: k for k, c in enumerate(classes)}
        index = _Index(class_names=[_pretty(c) for c in classes], domains={})
        for s in SPLITS:
            paths: list[Path] = []
            labels: list[int] = []
            doms: list[int] = []
            for di, d in enumerate(self.domain_names):
                for rel, cls, _ in rows[(d, s)]:
                    if cls in new_label:
                        paths.append(root / rel)
                        labels.append(new_label[cls])
                        doms.append(di)
            index.paths[s] = paths
            index.labels[s] = np.asarray(labels, dtype=np.int64)
            index.domains[s] = np.asarray(doms, dtype=np.int64)
        return index

    def describe(self) -> dict[str, Any]:
        """Constructor arguments plus "class"."""
        return {
            "class": "DomainNet",
            "root": self.root,
            "domains": list(self.domain_names),
            "classes": list(self.classes),
            "all_classes": self.all_classes,
        }


# --------------------------------------------------------------------------------------------
# Office-Caltech-10

#: The four Office-Caltech-10 domains.
OFFICE_CALTECH10_DOMAINS: list[str] = ["amazon", "caltech", "dslr", "webcam"]

#: The ten Office-Caltech-10 class folder names, in label order.
OFFICE_CALTECH10_CLASSES: list[str] = [
    "back_pack",
    "bike",
    "calculator",
    "headphones",
    "keyboard",
    "laptop_computer",
    "monitor",
    "mouse",
    "mug",
    "projector",
]


def _image_files(folder: Path) -> list[Path]:
    """Image files directly inside `folder`, sorted by name (hidden files skipped)."""
    return sorted(
        (p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")),
        key=lambda p: p.name,
    )


class OfficeCaltech10(_FileDataset):
    """Office-Caltech-10: the 10 classes shared by Office-31 and Caltech-256, in four domains.

    Layout under `root` (e.g. the ``office_caltech_10`` folder distributed with FedBN,
    https://github.com/med-air/FedBN, or built from Office-31 and Caltech-256)::

        root/<domain>/<class>/<image files>     # domains amazon, caltech, dslr, webcam

    There is no official split: each (domain, class) group is split with
    ``np.random.default_rng([seed, domain_index, class_index])``, putting round(test_fraction * n)
    of its images (at least one when n >= 2 and test_fraction > 0, and never all of them) in the
    test split.  Each split is domain-major, then class, then file name.

    Args:
        root: The Office-Caltech-10 folder.
        domains: Domains to use, in order; default all four.
        test_fraction: Fraction of every (domain, class) group used for testing, in [0, 1).
        seed: Seed of the train/test split.
    """

    def __init__(
        self,
        root: str = "data/raw/office_caltech_10",
        domains: list[str] | None = None,
        test_fraction: float = 0.2,
        seed: int = 0,
    ) -> None:
        check_range("data.dataset.test_fraction", test_fraction, low=0.0, high=1.0, high_open=True)
        check_range("data.dataset.seed", seed, low=0)
        self.root = root
        self.domain_names = _check_domains(
            list(OFFICE_CALTECH10_DOMAINS) if domains is None else list(domains)
        )
        self.test_fraction = float(test_fraction)
        self.seed = seed

    def _n_test(self, n: int) -> int:
        if n < 2 or self.test_fraction <= 0:
            return 0
        return min(max(1, round(self.test_fraction * n)), n - 1)

    def _build_index(self) -> _Index:
        root = Path(self.root)
        _require_dir(
            root, "Office-Caltech-10 root", "set root to the folder with amazon/, caltech/, dslr/, webcam/"
        )
        paths: dict[str, list[Path]] = {s: [] for s in SPLITS}
        labels: dict[str, list[int]] = {s: [] for s in SPLITS}
        doms: dict[str, list[int]] = {s: [] for s in SPLITS}
        for di, d in enumerate(self.domain_names):
            _require_dir(
                root / d, f"Office-Caltech-10 domain folder {d!r}", f"place the {d} images under {root}"
            )
            for k, cls in enumerate(OFFICE_CALTECH10_CLASSES):
                folder = root / d / cls
                _require_dir(folder, "Office-Caltech-10 class folder", f"place the {cls} images of {d} there")
                files = _image_files(folder)
                rng = np.random.default_rng([self.seed, di, k])
                is_test = np.zeros(len(files), dtype=bool)
                is_test[rng.permutation(len(files))[: self._n_test(len(files))]] = True
                for f, t in zip(files, is_test.tolist()):
                    s = "test" if t else "train"
                    paths[s].append(f)
                    labels[s].append(k)
                    doms[s].append(di)
        if not paths["train"]:
            raise FloraDataError(
                f"no image files found under {root}; place the Office-Caltech-10 images there"
            )
        return _Index(
            class_names=[_pretty(c) for c in OFFICE_CALTECH10_CLASSES],
            paths=paths,
            labels={s: np.asarray(v, dtype=np.int64) for s, v in labels.items()},
            domains={s: np.asarray(v, dtype=np.int64) for s, v in doms.items()},
        )

    def describe(self) -> dict[str, Any]:
        """Constructor arguments plus "class"."""
        return {
            "class": "OfficeCaltech10",
            "root": self.root,
            "domains": list(self.domain_names),
            "test_fraction": self.test_fraction,
            "seed": self.seed,
        }
