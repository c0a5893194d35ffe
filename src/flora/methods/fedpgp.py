"""FedPGP: a global prompt plus a per-client low-rank term, with a contrastive generalisation loss."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from flora.errors import FloraConfigError
from flora.methods.coop import CoOpModule
from flora.methods.options import check_option
from flora.prompts import LowRankTerm, pair_contrastive, rowwise_cos


class FedPGP(CoOpModule):
    """FedPGP: context ``sigma + U V`` with ``sigma`` global and ``U`` (n_ctx x r), ``V`` (r x d_t) local.

    Loss ``CE(s f . zP) + mu * mean_c CE([cos(z0, zG), cos(zG, zP)] / tau, 0)`` with
    ``zP = g(sigma + UV)``, ``zG = g(sigma)``, ``z0`` the cached anchor. In the module,
    ``sigma`` is ``prompt``, ``U`` is ``lowrank.B`` and ``V`` is ``lowrank.A``.
    """

    display_name = "FedPGP"
    vectorised = True  # trainer.client_batch trains its clients together (stacked_losses)
    personalised = True
    global_params: tuple[str, ...] = ("prompt",)
    local_params: tuple[str, ...] = ("lowrank",)
    #: whether ``B`` starts with orthonormal columns (FLORA) instead of N(0, ctx_init_std)
    orthonormal_init = False

    def __init__(self, *, rank: int = 8, mu: float = 1.0, tau: float = 0.5, **kwargs: Any) -> None:
        check_option("rank", rank, low=1, integer=True)
        check_option("mu", mu, low=0)
        check_option("tau", tau, low=0, low_open=True)
        self.rank, self.mu, self.tau = rank, mu, tau
        super().__init__(**kwargs)
        self.lowrank = LowRankTerm(
            self.n_ctx, self.backbone.token_width, rank, self.prompt.init_std, self.orthonormal_init
        )

    def validate_options(self) -> None:
        if self.orthonormal_init and self.rank > self.n_ctx:
            raise FloraConfigError(
                f"model.rank must be <= model.n_ctx ({self.n_ctx}) so that B ({self.n_ctx} x rank) can have "
                f"orthonormal columns, got {self.rank}"
            )

    @classmethod
    def budget_options(cls, n_ctx: int, rank: int, lr: float) -> dict[str, Any]:
        return {**super().budget_options(n_ctx, rank, lr), "rank": rank}

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

    def stacked_losses(self, params: dict[str, Tensor], batches: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
        """K clients' losses in batched operations: one text-tower call for every ``sigma + B A`` and ``sigma``.

        The batches are padded to the largest one; padded rows count in no loss. Each part
        (cross-entropy, contrastive term, :meth:`stacked_regularisers`) is that of
        :meth:`compute_loss` per client.
        """
        k = len(batches)
        ctx = params["prompt.ctx"]
        personal = ctx + params["lowrank.B"] @ params["lowrank.A"]
        z = self.backbone.encode_prompted(
            torch.stack([personal, ctx], dim=1).flatten(0, 1), self._require_task()
        )
        z = z.unflatten(0, (k, 2))
        z_personal, z_global = z[:, 0], z[:, 1]
        feats = [self.image_features(x) for x, _ in batches]
        sizes = torch.tensor([len(f) for f in feats], device=ctx.device)
        padded = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True)  # (K, B_max, d)
        labels = torch.nn.utils.rnn.pad_sequence([y for _, y in batches], batch_first=True)
        valid = torch.arange(padded.shape[1], device=ctx.device) < sizes[:, None]
        img = self.stacked_image_side(params, padded)
        logits = self.backbone.logit_scale * img @ z_personal.to(img.dtype).transpose(-1, -2)
        ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(k, -1)
        ce = (ce * valid).sum(1) / sizes
        anchor = self.anchor.to(z_global.dtype)
        pos, neg = rowwise_cos(anchor, z_global), self.negative_similarity(z_global, z_personal)
        con = -torch.log_softmax(torch.stack([pos, neg], dim=-1) / self.tau, dim=-1)[..., 0].mean(-1)
        return ce.float() + (self.mu * con).float() + self.stacked_regularisers(params)

    def stacked_image_side(self, params: dict[str, Tensor], feats: Tensor) -> Tensor:
        """:meth:`image_side` of K clients at once, ``feats`` ``(K, B, d)`` (no learned image side here)."""
        return F.normalize(feats.float(), dim=-1)

    def stacked_regularisers(self, params: dict[str, Tensor]) -> Tensor:
        """The sum of :meth:`regularisers` per client ``(K,)`` (none here)."""
        return torch.zeros(params["prompt.ctx"].shape[0], device=params["prompt.ctx"].device)
