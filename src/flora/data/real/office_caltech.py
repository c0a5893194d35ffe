"""Office-Caltech-10: the 10 classes shared by Office-31 and Caltech-256, in four domains."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from flora.data.real.base import FileDataset, Index, check_domains, pretty, require_dir
from flora.data.source import SPLITS
from flora.errors import FloraDataError, check_range

#: File suffixes (lower case) accepted as images when scanning folders.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")

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


class OfficeCaltech10(FileDataset):
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
        self.domain_names = check_domains(
            list(OFFICE_CALTECH10_DOMAINS) if domains is None else list(domains)
        )
        self.test_fraction = float(test_fraction)
        self.seed = seed

    def _n_test(self, n: int) -> int:
        if n < 2 or self.test_fraction <= 0:
            return 0
        return min(max(1, round(self.test_fraction * n)), n - 1)

    def _build_index(self) -> Index:
        root = Path(self.root)
        require_dir(
            root, "Office-Caltech-10 root", "set root to the folder with amazon/, caltech/, dslr/, webcam/"
        )
        paths: dict[str, list[Path]] = {s: [] for s in SPLITS}
        labels: dict[str, list[int]] = {s: [] for s in SPLITS}
        doms: dict[str, list[int]] = {s: [] for s in SPLITS}
        for di, d in enumerate(self.domain_names):
            require_dir(
                root / d, f"Office-Caltech-10 domain folder {d!r}", f"place the {d} images under {root}"
            )
            for k, cls in enumerate(OFFICE_CALTECH10_CLASSES):
                folder = root / d / cls
                require_dir(folder, "Office-Caltech-10 class folder", f"place the {cls} images of {d} there")
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
        return Index(
            class_names=[pretty(c) for c in OFFICE_CALTECH10_CLASSES],
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
