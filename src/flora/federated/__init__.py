"""The Fabric-orchestrated federated loop."""

from flora.federated.sampling import ClientSampler
from flora.federated.store import ClientState, ClientStore, DiskClientStore, MemoryClientStore
from flora.federated.trainer import FederatedTrainer

__all__ = [
    "ClientSampler",
    "ClientState",
    "ClientStore",
    "DiskClientStore",
    "FederatedTrainer",
    "MemoryClientStore",
]
