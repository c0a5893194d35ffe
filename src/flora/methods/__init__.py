"""Federated prompt-learning methods, one LightningModule each (one file per method).

:data:`REGISTRY` maps each method's display name to its class, in the order of the
benchmark tables.
"""

from flora.methods.base import FederatedPromptModule, Role, StateDict, Upload
from flora.methods.cmfl import CMFL
from flora.methods.coop import CoOpModule
from flora.methods.fedotp import FedOTP
from flora.methods.fedpgp import FedPGP
from flora.methods.flora import FLORA
from flora.methods.last_uploads import KeepsLastUploads
from flora.methods.local_coop import LocalCoOp
from flora.methods.pfedmoap import PFedMoAP
from flora.methods.pfedprompt import PFedPrompt
from flora.methods.promptamp import PromptAMP
from flora.methods.promptfl import PromptFL
from flora.methods.promptfl_ft import PromptFLFT
from flora.methods.promptper import PromptPer
from flora.methods.promptprox import PromptProx
from flora.methods.zeroshot import ZeroShotCLIP

#: display name -> method class, in the order of the benchmark tables
REGISTRY: dict[str, type[FederatedPromptModule]] = {
    cls.display_name: cls
    for cls in (
        ZeroShotCLIP,
        LocalCoOp,
        PromptFL,
        PromptFLFT,
        PromptPer,
        PromptProx,
        PromptAMP,
        PFedPrompt,
        FedOTP,
        PFedMoAP,
        FedPGP,
        FLORA,
        CMFL,
    )
}
#: registered methods that need an optional extra; left out of the benchmarks' default method list
OPTIONAL_METHODS: tuple[str, ...] = (CMFL.display_name,)

__all__ = [
    "CMFL",
    "FLORA",
    "REGISTRY",
    "CoOpModule",
    "FedOTP",
    "FedPGP",
    "FederatedPromptModule",
    "KeepsLastUploads",
    "LocalCoOp",
    "OPTIONAL_METHODS",
    "PFedMoAP",
    "PFedPrompt",
    "PromptAMP",
    "PromptFL",
    "PromptFLFT",
    "PromptPer",
    "PromptProx",
    "Role",
    "StateDict",
    "Upload",
    "ZeroShotCLIP",
]
