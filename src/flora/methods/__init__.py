"""Federated prompt-learning methods, one LightningModule each."""

from flora.methods.base import FederatedPromptModule, Role
from flora.methods.fedpgp import FLORA, FedPGP
from flora.methods.promptfl import CoOpModule, LocalCoOp, PromptFL
from flora.methods.zeroshot import ZeroShotCLIP

__all__ = [
    "FLORA",
    "CoOpModule",
    "FedPGP",
    "FederatedPromptModule",
    "LocalCoOp",
    "PromptFL",
    "Role",
    "ZeroShotCLIP",
]
