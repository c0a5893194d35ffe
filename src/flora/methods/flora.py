"""FLORA: FedPGP's global prompt and low-rank term, kept orthogonal, with a CLIP-anchored loss and an image adapter."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from flora.methods.fedpgp import FedPGP
from flora.methods.options import check_choice, check_option
from flora.prompts import (
    ORTHO_GRAD_FLOOR,
    ImageAdapter,
    orthogonality_penalty,
    orthogonality_residuals,
    rowwise_cos,
)


class FLORA(FedPGP):
    """FLORA: global prompt ``sigma`` + orthogonal low-rank ``B A`` + an image adapter.

    Loss ``CE + mu * Lcon + l2_weight * (||A||_F + ||B||_F) + ortho_weight * ||B^T B - I_r||_F``
    with ``Lcon = mean_c CE([cos(z0, zG), cos(z0, zP)] / tau, 0)``. ``B`` starts with
    orthonormal columns. The adapter gates the image feature,
    ``f* = normalise(adapter(f) * f)``; ``adapter`` is ``global`` (uploaded and FedAvg'd),
    ``local`` (kept per client) or ``none``. FLORA's default learning rate is 1e-3 (the
    other methods' is 2e-3). ``ortho_grad_floor``: the orthogonality penalty's gradient is
    ``X / max(||X||, ortho_grad_floor)`` with ``X = B^T B - I_r``
    (:func:`~flora.prompts.orthogonality_residuals`; 0: the norm's own gradient, whose
    direction at orthonormal ``B`` is rounding noise; docs/fidelity.md).
    """

    display_name = "FLORA"
    vectorised = (
        True  # trainer.client_batch trains its clients together (FedPGP.stacked_losses and the two below)
    )
    orthonormal_init = True

    def __init__(
        self,
        *,
        l2_weight: float = 0.01,
        ortho_weight: float = 0.1,
        ortho_grad_floor: float = ORTHO_GRAD_FLOOR,
        adapter: str = "global",
        lr: float = 1e-3,
        **kwargs: Any,
    ) -> None:
        check_choice("adapter", adapter, ("global", "local", "none"))
        check_option("l2_weight", l2_weight, low=0)
        check_option("ortho_weight", ortho_weight, low=0)
        check_option("ortho_grad_floor", ortho_grad_floor, low=0)
        super().__init__(lr=lr, **kwargs)
        self.adapter_mode = adapter
        self.l2_weight = l2_weight
        self.ortho_weight = ortho_weight
        self.ortho_grad_floor = ortho_grad_floor
        self.adapter = ImageAdapter(self.backbone.embed_dim) if adapter != "none" else None
        # the adapter is reset, uploaded and evaluated with the part it belongs to
        self.global_params = ("prompt", "adapter") if adapter == "global" else ("prompt",)
        self.local_params = ("lowrank", "adapter") if adapter == "local" else ("lowrank",)

    def image_side(self, feats: Tensor) -> Tensor:
        if feats.dim() == 3:
            feats = feats[:, 0]
        use_adapter = self.adapter is not None and not (
            self.is_global_only and "adapter" in self.local_params
        )
        if not use_adapter:
            return F.normalize(feats.float(), dim=-1)
        return self.adapter(feats.to(self.adapter.fc1.weight.dtype))

    def stacked_image_side(self, params: dict[str, Tensor], feats: Tensor) -> Tensor:
        """The adapter of K clients at once on ``feats`` ``(K, B, d)``, each with its own weights."""
        if self.adapter is None:
            return F.normalize(feats.float(), dim=-1)
        w1, b1 = params["adapter.fc1.weight"], params["adapter.fc1.bias"]
        w2, b2 = params["adapter.fc2.weight"], params["adapter.fc2.bias"]
        f = feats.to(w1.dtype)
        hidden = F.relu(torch.baddbmm(b1.unsqueeze(1), f, w1.transpose(-1, -2)))
        gate = torch.softmax(torch.baddbmm(b2.unsqueeze(1), hidden, w2.transpose(-1, -2)), dim=-1)
        return F.normalize(gate * f, dim=-1)

    def stacked_regularisers(self, params: dict[str, Tensor]) -> Tensor:
        B, A = params["lowrank.B"], params["lowrank.A"]
        l2 = self.l2_weight * (torch.linalg.matrix_norm(A) + torch.linalg.matrix_norm(B))
        ortho = self.ortho_weight * orthogonality_residuals(B, self.ortho_grad_floor)
        return l2.float() + ortho.float()

    def negative_similarity(self, z_global: Tensor, z_personal: Tensor) -> Tensor:
        """FLORA anchors the negative pair on CLIP: ``cos(z0, zP)``."""
        return rowwise_cos(self.anchor.to(z_personal.dtype), z_personal)

    def regularisers(self) -> dict[str, Tensor]:
        B, A = self.lowrank.B, self.lowrank.A
        return {
            "l2": self.l2_weight * (torch.linalg.matrix_norm(A) + torch.linalg.matrix_norm(B)),
            "ortho": self.ortho_weight * orthogonality_penalty(B, self.ortho_grad_floor),
        }
