"""PromptPer (FedPer-style split): a context of shared tokens followed by personal ones."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from flora.errors import FloraConfigError
from flora.methods.base import FederatedPromptModule
from flora.methods.options import check_context_options
from flora.prompts import PromptContext


class PromptPer(FederatedPromptModule):
    """PromptPer: context ``[P_g ; P_p]``; only ``P_g`` is uploaded and FedAvg'd.

    ``P_p`` (``n_local`` tokens) stays on the client. There is no stand-alone global model
    (a prompt without its personal tokens is a different prompt), so the global-only
    metrics are not reported.
    """

    display_name = "PromptPer"
    vectorised = True  # trainer.client_batch trains its clients together (stacked_losses)
    personalised = True
    global_params = ("prompt",)
    local_params = ("personal",)
    n_ctx_option = "n_global + model.n_local"

    def __init__(
        self, *, n_global: int = 8, n_local: int = 8, ctx_init_std: float = 0.02, **kwargs: Any
    ) -> None:
        for name, value in (("n_global", n_global), ("n_local", n_local)):
            if isinstance(value, int) and not isinstance(value, bool) and value < 1:
                raise FloraConfigError(
                    f"model.{name} must be >= 1, got {value}: PromptPer needs at least one global and one "
                    "local token (n_local=0 is PromptFL, n_global=0 is Local CoOp)"
                )
            check_context_options(value, ctx_init_std, n_ctx_name=name)
        self._n_ctx = n_global + n_local
        super().__init__(**kwargs)
        self.prompt = PromptContext(n_global, self.backbone.token_width, ctx_init_std)
        self.personal = PromptContext(n_local, self.backbone.token_width, ctx_init_std)

    @classmethod
    def budget_options(cls, n_ctx: int, rank: int, lr: float) -> dict[str, Any]:
        """The budget's ``n_ctx`` tokens split in two: ``n_ctx - n_ctx // 2`` shared, ``n_ctx // 2`` personal."""
        return {"lr": lr, "n_global": n_ctx - n_ctx // 2, "n_local": n_ctx // 2}

    @property
    def has_global_model(self) -> bool:
        return False

    def text_features(self) -> Tensor:
        ctx = torch.cat([self.prompt.ctx, self.personal.ctx], dim=0)
        return self.backbone.encode_prompted(ctx, self._require_task())

    def stacked_losses(self, params: dict[str, Tensor], batches: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
        """Cross-entropy of K clients' contexts ``[P_g ; P_p]``: one text-tower call."""
        ctx = torch.cat([params["prompt.ctx"], params["personal.ctx"]], dim=1)
        return self.stacked_cross_entropy(self.backbone.encode_prompted(ctx, self._require_task()), batches)
