"""Datasets, partitioners, per-client shards, the federated datamodule and the feature cache."""

from flora.data.datamodule import FederatedDataModule
from flora.data.features import FeatureCache
from flora.data.partition import (
    IID,
    Dirichlet,
    Domains,
    FewShot,
    Partition,
    Partitioner,
    Pathological,
    base_novel_split,
)
from flora.data.real import CIFAR, CoOpDataset, DomainNet, OfficeCaltech10
from flora.data.shards import (
    load_manifest,
    manifest_matches,
    read_client_samples,
    read_global_samples,
    write_federated_shards,
)
from flora.data.source import SourceDataset
from flora.data.synthetic import SyntheticShapes
from flora.errors import FloraDataError

__all__ = [
    "CIFAR",
    "CoOpDataset",
    "DomainNet",
    "OfficeCaltech10",
    "IID",
    "Dirichlet",
    "Domains",
    "FeatureCache",
    "FederatedDataModule",
    "FewShot",
    "FloraDataError",
    "Partition",
    "Partitioner",
    "Pathological",
    "SourceDataset",
    "SyntheticShapes",
    "base_novel_split",
    "load_manifest",
    "manifest_matches",
    "read_client_samples",
    "read_global_samples",
    "write_federated_shards",
]
