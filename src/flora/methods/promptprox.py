"""PromptProx (FedProx-style): PromptFL plus a proximal term towards the prompt received this round."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from flora.methods.base import StateDict
from flora.methods.options import check_option
from flora.methods.promptfl import PromptFL


class ProximalPromptFL(PromptFL):
    """PromptFL plus ``(mu / 2) * ||P - P_received||^2``; a subclass sets ``mu`` from its own option.

    ``P_received`` is the prompt the client received this round (a constant); the
    gradient flows to ``P`` only. Outside a federated run (a plain ``lightning.Trainer``)
    nothing has been received and the loss is plain cross-entropy.
    """

    mu: float = 0.0

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.register_buffer("received", torch.empty(0), persistent=False)

    def load_global_state(self, state: StateDict) -> None:
        super().load_global_state(state)
        self.received = self.prompt.ctx.detach().clone()

    def proximal_term(self) -> Tensor:
        """``(mu / 2) * ||P - P_received||^2`` (0 when nothing has been received)."""
        if self.received.numel() == 0:
            return self.prompt.ctx.sum() * 0.0
        return 0.5 * self.mu * (self.prompt.ctx - self.received).pow(2).sum()

    def compute_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        ce, parts = super().compute_loss(x, y)
        prox = self.proximal_term()
        return ce + prox.to(ce.dtype), {**parts, "prox": prox.detach()}


class PromptProx(ProximalPromptFL):
    """PromptProx: PromptFL trained with ``CE + (mu / 2) * ||P - P_glob||^2``, ``P_glob`` the received prompt."""

    display_name = "PromptProx"

    def __init__(self, *, mu: float = 0.5, **kwargs: Any) -> None:
        check_option("mu", mu, low=0)
        super().__init__(**kwargs)
        self.mu = mu
