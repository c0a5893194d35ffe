"""PromptFL and Local CoOp: one learned context, shared (FedAvg) or kept per client."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from flora.methods.base import FederatedPromptModule, check_context_options
from flora.prompts import PromptContext


class CoOpModule(FederatedPromptModule):
    """A CoOp prompt learner: context ``P`` (n_ctx x d_t) placed before the class name."""

    def __init__(
        self,
        class_names: Sequence[str] | None = None,
        n_ctx: int = 16,
        ctx_init_std: float = 0.02,
        clip_model: str = "flora-tiny",
        clip_pretrained: str | None = "shipped",
        template: str = "a photo of a {}.",
        lr: float = 2e-3,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
    ) -> None:
        check_context_options(n_ctx, ctx_init_std)
        self._n_ctx = n_ctx
        super().__init__(None, clip_model, clip_pretrained, template, lr, momentum, weight_decay)
        self.prompt = PromptContext(n_ctx, self.backbone.token_width, ctx_init_std)
        if class_names is not None:
            self.set_task(list(class_names))

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    def text_features(self) -> Tensor:
        return self.backbone.encode_prompted(self.prompt.ctx, self._require_task())


class PromptFL(CoOpModule):
    """PromptFL: one context trained with CE, uploaded every round and FedAvg'd. Nothing local."""

    global_params = ("prompt",)

    def reset_global_parameters(self, generator: torch.Generator) -> None:
        self.prompt.reset_parameters(generator)


class LocalCoOp(CoOpModule):
    """Local CoOp: every client trains its own context and never communicates."""

    local_params = ("prompt",)

    def reset_local_parameters(self, generator: torch.Generator) -> None:
        self.prompt.reset_parameters(generator)
