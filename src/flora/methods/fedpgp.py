"""FedPGP and FLORA: a global prompt plus a per-client low-rank term.

Both learn ``sigma`` (global, FedAvg'd) and a local low-rank term ``B A`` and train the
personalised context ``sigma + B A`` with cross-entropy plus a contrastive
generalisation term over the anchor features ``z0``. FLORA adds an orthonormal
initialisation and an orthogonality penalty on ``B``, an L2 penalty on both factors,
a CLIP-anchored negative pair and an attention-style image adapter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from flora.errors import FloraConfigError
from flora.methods.base import check_choice, check_context_options, check_option
from flora.methods.promptfl import CoOpModule
from flora.prompts import FeatureGate, LowRankTerm, orthogonality_penalty, pair_contrastive, rowwise_cos


class FedPGP(CoOpModule):
    """FedPGP: context ``sigma + U V`` with ``sigma`` global and ``U`` (n_ctx x r), ``V`` (r x d_t) local.

    Loss ``CE(s f . zP) + mu * mean_c CE([cos(z0, zG), cos(zG, zP)] / tau, 0)`` with
    ``zP = g(sigma + UV)``, ``zG = g(sigma)``, ``z0`` the cached anchor. In the module,
    ``U`` is ``lowrank.B`` and ``V`` is ``lowrank.A``.
    """

    global_params: tuple[str, ...] = ("prompt",)
    local_params: tuple[str, ...] = ("lowrank",)
    orthonormal_init = False

    def __init__(
        self,
        class_names: Sequence[str] | None = None,
        n_ctx: int = 16,
        rank: int = 8,
        mu: float = 1.0,
        tau: float = 0.5,
        ctx_init_std: float = 0.02,
        clip_model: str = "flora-tiny",
        clip_pretrained: str | None = "shipped",
        template: str = "a photo of a {}.",
        lr: float = 2e-3,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
    ) -> None:
        check_context_options(n_ctx, ctx_init_std)
        check_option("rank", rank, low=1, integer=True)
        if self.orthonormal_init and isinstance(n_ctx, int) and rank > n_ctx:
            raise FloraConfigError(
                f"model.rank must be <= model.n_ctx ({n_ctx}) so that B ({n_ctx} x rank) can have "
                f"orthonormal columns, got {rank}"
            )
        check_option("mu", mu, low=0)
        check_option("tau", tau, low=0, low_open=True)
        super().__init__(
            None, n_ctx, ctx_init_std, clip_model, clip_pretrained, template, lr, momentum, weight_decay
        )
        self.mu = mu
        self.tau = tau
        self.lowrank = LowRankTerm(
            n_ctx, self.backbone.token_width, rank, ctx_init_std, self.orthonormal_init
        )
        if class_names is not None:
            self.set_task(list(class_names))

    # ------------------------------------------------------------ parameters
    def reset_global_parameters(self, generator: torch.Generator) -> None:
        self.prompt.reset_parameters(generator)

    def reset_local_parameters(self, generator: torch.Generator) -> None:
        self.lowrank.reset_parameters(generator)

    # --------------------------------------------------------------- forward
    def personal_context(self) -> Tensor:
        return self.prompt.ctx + self.lowrank()

    def text_features(self) -> Tensor:
        ctx = self.prompt.ctx if self.is_global_only else self.personal_context()
        return self.backbone.encode_prompted(ctx, self._require_task())

    def personal_and_global_text(self) -> tuple[Tensor, Tensor]:
        """``(zP, zG)`` from one batched pass of the text tower."""
        z = self.backbone.encode_prompted(
            torch.stack([self.personal_context(), self.prompt.ctx]), self._require_task()
        )
        return z[0], z[1]

    def negative_similarity(self, z_global: Tensor, z_personal: Tensor) -> Tensor:
        """FedPGP's negative pair: the global and the personalised class features."""
        return rowwise_cos(z_global, z_personal)

    def contrastive_term(self, z_global: Tensor, z_personal: Tensor) -> Tensor:
        anchor = self.anchor.to(z_global.dtype)
        return pair_contrastive(
            rowwise_cos(anchor, z_global), self.negative_similarity(z_global, z_personal), self.tau
        )

    def regularisers(self) -> dict[str, Tensor]:
        """Extra weighted loss terms (name -> already weighted value)."""
        return {}

    def compute_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        z_personal, z_global = self.personal_and_global_text()
        logits = self.logits_from(self.image_side(self.image_features(x)), z_personal)
        parts = {
            "ce": F.cross_entropy(logits, y),
            "con": self.mu * self.contrastive_term(z_global, z_personal),
        }
        parts.update(self.regularisers())
        loss = torch.stack([v.float() for v in parts.values()]).sum()
        return loss, {k: v.detach() for k, v in parts.items()}


class FLORA(FedPGP):
    """FLORA: global prompt ``sigma`` + orthogonal low-rank ``B A`` + an image adapter.

    Loss ``CE + mu * Lcon + l2_weight * (||A||_F + ||B||_F) + ortho_weight * ||B^T B - I_r||_F``
    with ``Lcon = mean_c CE([cos(z0, zG), cos(z0, zP)] / tau, 0)``. The adapter gates the
    image feature, ``f* = normalise(adapter(f) * f)``; ``adapter`` is ``global``
    (uploaded and FedAvg'd), ``local`` (kept per client) or ``none``.
    """

    orthonormal_init = True

    def __init__(
        self,
        class_names: Sequence[str] | None = None,
        n_ctx: int = 16,
        rank: int = 8,
        mu: float = 1.0,
        tau: float = 0.5,
        l2_weight: float = 0.01,
        ortho_weight: float = 0.1,
        adapter: str = "global",
        ctx_init_std: float = 0.02,
        clip_model: str = "flora-tiny",
        clip_pretrained: str | None = "shipped",
        template: str = "a photo of a {}.",
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
    ) -> None:
        check_choice("adapter", adapter, ("global", "local", "none"))
        check_option("l2_weight", l2_weight, low=0)
        check_option("ortho_weight", ortho_weight, low=0)
        super().__init__(
            None,
            n_ctx,
            rank,
            mu,
            tau,
            ctx_init_std,
            clip_model,
            clip_pretrained,
            template,
            lr,
            momentum,
            weight_decay,
        )
        self.adapter_mode = adapter
        self.l2_weight = l2_weight
        self.ortho_weight = ortho_weight
        self.adapter = FeatureGate(self.backbone.embed_dim) if adapter != "none" else None
        self.global_params = ("prompt", "adapter") if adapter == "global" else ("prompt",)
        self.local_params = ("lowrank", "adapter") if adapter == "local" else ("lowrank",)
        if class_names is not None:
            self.set_task(list(class_names))

    def reset_global_parameters(self, generator: torch.Generator) -> None:
        self.prompt.reset_parameters(generator)
        if self.adapter is not None and self.adapter_mode == "global":
            self.adapter.reset_parameters(generator)

    def reset_local_parameters(self, generator: torch.Generator) -> None:
        self.lowrank.reset_parameters(generator)
        if self.adapter is not None and self.adapter_mode == "local":
            self.adapter.reset_parameters(generator)

    def image_side(self, feats: Tensor) -> Tensor:
        if feats.dim() == 3:
            feats = feats[:, 0]
        use_adapter = self.adapter is not None and not (self.is_global_only and self.adapter_mode == "local")
        if not use_adapter:
            return F.normalize(feats.float(), dim=-1)
        return self.adapter(feats.to(self.adapter.fc1.weight.dtype))

    def negative_similarity(self, z_global: Tensor, z_personal: Tensor) -> Tensor:
        """FLORA anchors the negative pair on CLIP: ``cos(z0, zP)``."""
        return rowwise_cos(self.anchor.to(z_personal.dtype), z_personal)

    def regularisers(self) -> dict[str, Tensor]:
        B, A = self.lowrank.B, self.lowrank.A
        return {
            "l2": self.l2_weight * (torch.linalg.matrix_norm(A) + torch.linalg.matrix_norm(B)),
            "ortho": self.ortho_weight * orthogonality_penalty(B),
        }
