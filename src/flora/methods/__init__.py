"""Federated prompt-learning methods, one LightningModule each."""

from flora.methods.base import FederatedPromptModule, Role
from flora.methods.fedotp import FedOTP
from flora.methods.fedpgp import FLORA, FedPGP
from flora.methods.pfedmoap import PFedMoAP
from flora.methods.pfedprompt import PFedPrompt
from flora.methods.promptfl import CoOpModule, LocalCoOp, PromptFL
from flora.methods.variants import PromptAMP, PromptFLFT, PromptPer, PromptProx
from flora.methods.zeroshot import ZeroShotCLIP

__all__ = [
    "FLORA",
    "CoOpModule",
    "FedOTP",
    "FedPGP",
    "FederatedPromptModule",
    "LocalCoOp",
    "PFedMoAP",
    "PFedPrompt",
    "PromptAMP",
    "PromptFL",
    "PromptFLFT",
    "PromptPer",
    "PromptProx",
    "Role",
    "ZeroShotCLIP",
]
