"""The CoOp few-shot benchmarks (Caltech101, DTD, Food101, Flowers102, OxfordPets): a folder of
images plus CoOp's ``split_zhou_*.json`` split file, one loader for all five."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from flora.data.real.base import FileDataset, Index, pretty, require_dir, require_file
from flora.errors import FloraConfigError, FloraDataError

#: name -> (dataset folder under root, image folder inside it, split file inside it).
COOP_PRESETS: dict[str, tuple[str, str, str]] = {
    "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "oxford_pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "oxford_flowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "food101": ("food-101", "images", "split_zhou_Food101.json"),
    "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json"),
}


class CoOpDataset(FileDataset):
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

    def _build_index(self) -> Index:
        fix = f"download {self.name} and CoOp's {self.split_file.name} as described in CoOp's DATASETS.md"
        require_dir(
            Path(self.root), "dataset root", f"set root to the folder that holds {self.dataset_dir.name}/"
        )
        require_file(self.split_file, "CoOp split file", fix)
        require_dir(self.image_dir, "image folder", fix)
        try:
            content = json.loads(self.split_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise FloraDataError(f"cannot read split file {self.split_file} ({err}); re-download it") from err
        parts = {"train": ["train", "val"] if self.include_val else ["train"], "test": ["test"]}
        if not isinstance(content, dict):
            raise FloraDataError(f"split file {self.split_file} is not a JSON object; re-download it")
        names: dict[int, str] = {}
        index = Index(class_names=[])
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
        index.class_names = [pretty(names[k]) for k in range(len(names))]
        return index

    def describe(self) -> dict[str, Any]:
        """Constructor arguments plus "class"."""
        return {"class": "CoOpDataset", "name": self.name, "root": self.root, "include_val": self.include_val}
