"""FederatedDataModule: per-client webdataset shards, prepared on demand, read per client."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision import transforms as T

from flora.data.features import FeatureCache
from flora.data.partition import Partitioner
from flora.data.shards import (
    empty_test_message,
    load_manifest,
    manifest_matches,
    manifest_not_found,
    read_client_samples,
    read_global_samples,
    shard_missing,
    unknown_client,
    write_federated_shards,
)
from flora.data.source import SourceDataset
from flora.errors import FloraDataError, check_range

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class FeatureDataset(TensorDataset):
    """Cached features and labels. A DataLoader batch is one indexing of the tensors
    (``__getitems__``, with :func:`_as_batched` as the collate function), not one
    ``__getitem__`` and a ``stack`` per sample: the same batches, without the per-sample
    Python that dominated loading from the cache."""

    def __getitems__(self, indices: list[int]) -> list[Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return [t[index] for t in self.tensors]


def _as_batched(batch: list[Tensor]) -> list[Tensor]:
    """Collate function of a :class:`FeatureDataset` loader: its batches come already stacked."""
    return batch


class _ImageDataset(Dataset):
    def __init__(self, images: list[Any], labels: np.ndarray, transform: Callable[[Any], Tensor]) -> None:
        self.images = images
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.transform(self.images[i]), self.labels[i]


class FederatedDataModule(L.LightningDataModule):
    """A federated dataset: one webdataset shard set per client plus a manifest.

    Args:
        root: folder with ``manifest.json`` and the client shards.
        dataset: the source dataset (e.g. ``flora.data.SyntheticShapes``); with
            ``partition`` it lets :meth:`prepare_data` write the shards when they are missing.
        partition: how the source is split over clients (``IID``, ``Dirichlet``, ...).
        prepare: write missing shards automatically (``flora prepare`` does it explicitly).
        batch_size / eval_batch_size: client DataLoader batch sizes.
        num_workers: DataLoader workers for image (non-cached) loading.
        augment: random-resized-crop + flip for training images (disables the feature cache).
        feature_cache: ``memory``, ``disk`` (under ``root/features``) or ``off``.
        verify_shards: check every shard's sha256 against the manifest when reading it.
        base_novel: the base-to-novel protocol: clients train on the base classes (the
            first half of the labels) only; every client is also evaluated on the whole
            base-class test set and on the novel-class test set.
        client_id: the client served by ``train_dataloader`` / ``val_dataloader`` /
            ``test_dataloader`` when the module is used with a plain ``lightning.Trainer``.

    Out-of-range options raise :class:`flora.errors.FloraConfigError` at construction
    (``data.batch_size must be >= 1, got 0``). :meth:`setup` refuses a manifest in which no
    client has test samples; clients without any train and are left out of evaluation
    (:attr:`evaluable_clients`).
    """

    def __init__(
        self,
        root: str = "data/synthetic",
        dataset: SourceDataset | None = None,
        partition: Partitioner | None = None,
        prepare: bool = True,
        batch_size: int = 32,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        augment: bool = False,
        feature_cache: str = "memory",
        verify_shards: bool = True,
        base_novel: bool = False,
        client_id: int = 0,
    ) -> None:
        super().__init__()
        check_range("data.batch_size", batch_size, low=1)
        check_range("data.eval_batch_size", eval_batch_size, low=1)
        check_range("data.num_workers", num_workers, low=0)
        check_range("data.client_id", client_id, low=0)
        self.root = Path(root)
        self.dataset = dataset
        self.partition = partition
        self.prepare = prepare
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.augment = augment
        self.verify_shards = verify_shards
        self.base_novel = base_novel
        self.client_id = client_id
        self.cache = FeatureCache(feature_cache, self.root / "features")
        self.manifest: dict[str, Any] | None = None
        self._transform: Callable[[Any], Tensor] | None = None
        self._train_transform: Callable[[Any], Tensor] | None = None
        self._shared: dict[str, tuple[list[Any], np.ndarray]] = {}

    # ------------------------------------------------------------ preparation
    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def prepare_data(self) -> None:
        """Write the shards if they are missing; refuse shards prepared with other parameters."""
        if self.manifest_path.exists():
            if self.dataset is not None and self.partition is not None:
                manifest = load_manifest(self.root)
                if not manifest_matches(manifest, self.dataset, self.partition, self.base_novel):
                    raise FloraDataError(
                        f"shards under {self.root} were prepared with other dataset/partition parameters; "
                        "choose another data.root or delete that folder"
                    )
            return
        if not self.prepare or self.dataset is None or self.partition is None:
            raise manifest_not_found(self.manifest_path)
        write_federated_shards(self.dataset, self.partition, self.root, base_novel=self.base_novel)

    def setup(self, stage: str | None = None) -> None:
        if self.manifest is None:
            manifest = load_manifest(self.root)
            if bool(manifest.get("base_novel", False)) != self.base_novel:
                raise FloraDataError(
                    f"shards under {self.root} were prepared with base_novel={manifest.get('base_novel', False)}, "
                    f"but data.base_novel is {self.base_novel}"
                )
            clients = manifest.get("clients", [])
            if clients and all(int(c.get("num_test", 0)) == 0 for c in clients):
                raise FloraDataError(
                    f"{self.root}: {empty_test_message(list(range(len(clients))), len(clients))}, so none "
                    "could be evaluated; prepare the data again into a new data.root with fewer clients "
                    "(data.partition.num_clients), a larger data.partition.min_size or data.partition.test: all"
                )
            self.manifest = manifest

    def _require_manifest(self) -> dict[str, Any]:
        if self.manifest is None:
            self.setup()
        assert self.manifest is not None
        return self.manifest

    @property
    def class_names(self) -> list[str]:
        """Classes of the training task in label order (the base classes under ``base_novel``)."""
        manifest = self._require_manifest()
        return list(manifest["base_classes"] if manifest.get("base_novel") else manifest["class_names"])

    @property
    def novel_class_names(self) -> list[str]:
        """Novel classes (never trained on) under ``base_novel``; empty otherwise."""
        return list(self._require_manifest().get("novel_classes", []))

    @property
    def has_novel(self) -> bool:
        return bool(self.novel_class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_clients(self) -> int:
        return int(self._require_manifest()["num_clients"])

    @property
    def evaluable_clients(self) -> list[int]:
        """The clients with test samples, in id order: the ones evaluation covers.

        A client without test samples (possible with many small clients) trains like any
        other; evaluation leaves it out and reports how many were left out
        (``clients_without_test``).
        """
        clients = self._require_manifest()["clients"]
        return [i for i, c in enumerate(clients) if int(c.get("num_test", 0)) > 0]

    def _client(self, client_id: int) -> dict[str, Any]:
        clients = self._require_manifest()["clients"]
        if not 0 <= client_id < len(clients):
            raise unknown_client(self.root, client_id, len(clients))
        return clients[client_id]

    def num_samples(self, client_id: int, split: str = "train") -> int:
        return int(self._client(client_id)[f"num_{split}"])

    def _shards(self, client_id: int | str, split: str) -> list[dict[str, Any]]:
        if isinstance(client_id, str):
            return list(self._require_manifest().get("global", {}).get(client_id, []))
        return list(self._client(client_id)["shards"][split])

    def shard_digest(self, client_id: int | str, split: str) -> str:
        """The manifest's sha256 of every shard of one client split (or shared test set)."""
        return ",".join(s["sha256"] for s in self._shards(client_id, split))

    def shard_state(self, client_id: int | str, split: str) -> str:
        """``size:mtime_ns`` of every shard file on disk, part of the feature-cache key.

        A shard that was changed, replaced or damaged after its features were cached gets
        a new key, so it is read (and its sha256 checked) again instead of being hidden
        by a warm cache. Cost: one ``stat`` per shard per lookup (no file is read).
        """
        states = []
        for shard in self._shards(client_id, split):
            path = self.root / shard["file"]
            try:
                st = path.stat()
            except FileNotFoundError:
                raise shard_missing(path) from None
            states.append(f"{st.st_size}:{st.st_mtime_ns}")
        return ",".join(states)

    # ------------------------------------------------------------- transforms
    def set_transform(self, transform: Callable[[Any], Tensor], image_size: int | None = None) -> None:
        """Use the backbone's preprocessing (the federated trainer calls this)."""
        self._transform = transform
        if image_size is not None:
            self._train_transform = T.Compose(
                [T.RandomResizedCrop(image_size, scale=(0.5, 1.0)), T.RandomHorizontalFlip(), transform]
            )

    def _eval_tf(self) -> Callable[[Any], Tensor]:
        if self._transform is None:
            module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
            backbone = getattr(module, "backbone", None)
            if backbone is not None:
                self.set_transform(backbone.preprocess, backbone.image_size)
            else:
                self._transform = T.Compose([T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
        assert self._transform is not None
        return self._transform

    # ------------------------------------------------------------------ data
    def read_split(self, client_id: int, split: str) -> tuple[list[Any], np.ndarray]:
        """Decoded images and labels of one client's split, read from its verified shards."""
        images, labels = read_client_samples(
            self.root, self._require_manifest(), client_id, split, verify=self.verify_shards
        )
        if split == "train" and len(labels) == 0:
            raise FloraDataError(f"client {client_id} has no training data in {self.root}")
        return images, np.asarray(labels)

    def _read(self, client_id: int | str, split: str) -> tuple[list[Any], np.ndarray]:
        if isinstance(client_id, str):  # a shared test set: "base" or "novel", read once per process
            if client_id not in self._shared:
                images, labels = read_global_samples(
                    self.root, self._require_manifest(), client_id, self.verify_shards
                )
                if client_id == "novel":
                    labels = labels - len(self.class_names)  # novel labels count from 0 in the novel task
                self._shared[client_id] = (images, labels)
            return self._shared[client_id]
        return self.read_split(client_id, split)

    def image_dataset(self, client_id: int | str, split: str, train: bool = False) -> Dataset:
        images, labels = self._read(client_id, split)
        tf = self._eval_tf()
        if train and self.augment and self._train_transform is not None:
            tf = self._train_transform
        return _ImageDataset(images, labels, tf)

    def feature_dataset(
        self, client_id: int | str, split: str, encoder: Callable[[Tensor], Tensor], encoder_key: str
    ) -> FeatureDataset:
        """Cached frozen features of one client's split, computed with ``encoder`` on a miss."""

        def compute() -> tuple[Tensor, Tensor]:
            ds = self.image_dataset(client_id, split)
            loader = DataLoader(ds, batch_size=self.eval_batch_size, num_workers=self.num_workers)
            feats, labels = [], []
            for x, y in loader:
                feats.append(encoder(x).float().cpu())
                labels.append(y)
            if not feats:
                return torch.empty(0), torch.empty(0, dtype=torch.long)
            return torch.cat(feats), torch.cat(labels)

        key = FeatureCache.make_key(
            encoder_key,
            repr(self._eval_tf()),
            self.shard_digest(client_id, split),
            client_id,
            self.shard_state(client_id, split),
        )
        feats, labels = self.cache.get_or_compute(key, compute)
        return FeatureDataset(feats, labels)

    def client_loader(
        self,
        client_id: int | str,
        split: str = "train",
        *,
        train: bool = False,
        seed: int = 0,
        encoder: Callable[[Tensor], Tensor] | None = None,
        encoder_key: str | None = None,
    ) -> DataLoader:
        """A DataLoader over one client's split (or the shared ``"base"`` / ``"novel"`` test set).

        Yields cached frozen features when ``encoder`` is given and caching applies,
        transformed images otherwise.
        """
        collate: Callable[[Any], Any] | None = None
        if encoder is not None and self.uses_feature_cache:
            ds: Dataset = self.feature_dataset(client_id, split, encoder, encoder_key or "")
            workers, collate = 0, _as_batched  # a batch is one indexing of the cached tensors
        else:
            ds = self.image_dataset(client_id, split, train=train)
            workers = self.num_workers
        gen = torch.Generator().manual_seed(seed)
        return DataLoader(
            ds,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            generator=gen if train else None,
            num_workers=workers,
            persistent_workers=False,
            collate_fn=collate,
        )

    @property
    def uses_feature_cache(self) -> bool:
        return self.cache.enabled and not self.augment

    # ------------------------------------------- plain lightning.Trainer use
    def train_dataloader(self) -> DataLoader:
        return self.client_loader(
            self.client_id, "train", train=True, seed=int(os.environ.get("PL_GLOBAL_SEED", 0))
        )

    def val_dataloader(self) -> DataLoader:
        return self._client_test_loader()

    def test_dataloader(self) -> DataLoader:
        return self._client_test_loader()

    def _client_test_loader(self) -> DataLoader:
        if self.num_samples(self.client_id, "test") == 0:
            raise FloraDataError(
                f"client {self.client_id} has no test samples in {self.root}; choose another data.client_id "
                f"(the first clients with test samples: {self.evaluable_clients[:5]})"
            )
        return self.client_loader(self.client_id, "test")
