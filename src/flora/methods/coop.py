"""CoOp: one learned context placed before every class name (the prompt most methods build on)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from flora.methods.base import FederatedPromptModule
from flora.methods.options import check_context_options
from flora.prompts import PromptContext


class CoOpModule(FederatedPromptModule):
    """A CoOp prompt learner: context ``P`` (``n_ctx x d_t``, N(0, ``ctx_init_std``)) before the class name.

    Not a method of its own: it leaves ``prompt`` without a role, which its subclasses
    give (PromptFL shares it, Local CoOp keeps it).

    Args:
        n_ctx: learned context tokens.
        ctx_init_std: standard deviation of the context's Gaussian initialisation.
        **kwargs: the options of :class:`FederatedPromptModule` (``lr``, ``clip_model``, ...).
    """

    def __init__(self, *, n_ctx: int = 16, ctx_init_std: float = 0.02, **kwargs: Any) -> None:
        check_context_options(n_ctx, ctx_init_std)
        self._n_ctx = n_ctx
        super().__init__(**kwargs)
        self.prompt = PromptContext(n_ctx, self.backbone.token_width, ctx_init_std)

    @classmethod
    def budget_options(cls, n_ctx: int, rank: int, lr: float) -> dict[str, Any]:
        return {**super().budget_options(n_ctx, rank, lr), "n_ctx": n_ctx}

    def text_features(self) -> Tensor:
        return self.backbone.encode_prompted(self.prompt.ctx, self._require_task())

    def stacked_losses(self, params: dict[str, Tensor], batches: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
        """Cross-entropy of K clients' contexts ``params["prompt.ctx"]`` ``(K, n_ctx, d_t)``: one text-tower call."""
        text = self.backbone.encode_prompted(params["prompt.ctx"], self._require_task())
        return self.stacked_cross_entropy(text, batches)
