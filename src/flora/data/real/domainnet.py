"""DomainNet: six domains of the same 345 classes, with the official split files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from flora.data.real.base import FileDataset, Index, check_domains, pretty, require_dir, require_file
from flora.data.source import SPLITS
from flora.errors import FloraConfigError, FloraDataError

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


class DomainNet(FileDataset):
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
        self.domain_names = check_domains(list(DOMAINNET_DOMAINS) if domains is None else list(domains))
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
        require_file(
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

    def _build_index(self) -> Index:
        root = Path(self.root)
        require_dir(root, "DomainNet root", "set root to the folder with the extracted DomainNet domains")
        for d in self.domain_names:
            require_dir(
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
        index = Index(class_names=[pretty(c) for c in classes], domains={})
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
