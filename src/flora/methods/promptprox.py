"""PromptProx (FedProx-style): PromptFL plus a proximal term towards the prompt received this round."""

from __future__ import annotations

from collections.abc import Sequence
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

    def client_constants(self) -> dict[str, Tensor]:
        return {"received": self.received}  # each client's own received prompt

    def stacked_losses(self, params: dict[str, Tensor], batches: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
        """PromptFL's stacked cross-entropy plus each client's proximal term towards ``params["received"]``."""
        ce = super().stacked_losses(params, batches)
        ctx, received = params["prompt.ctx"], params.get("received")
        if received is None or received[0].numel() == 0:
            return ce + ctx.sum() * 0.0
        prox = 0.5 * self.mu * (ctx - received).pow(2).flatten(1).sum(1)
        return ce + prox.to(ce.dtype)


class PromptProx(ProximalPromptFL):
    """PromptProx: PromptFL trained with ``CE + (mu / 2) * ||P - P_glob||^2``, ``P_glob`` the received prompt."""

    display_name = "PromptProx"
    vectorised = True  # trainer.client_batch trains its clients together (ProximalPromptFL.stacked_losses)

    def __init__(self, *, mu: float = 0.5, **kwargs: Any) -> None:
        check_option("mu", mu, low=0)
        super().__init__(**kwargs)
        self.mu = mu
