"""Learned context vectors: the CoOp prompt."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class PromptContext(nn.Module):
    """``n_ctx`` learned token embeddings of width ``width``, initialised N(0, ``init_std``)."""

    def __init__(self, n_ctx: int, width: int, init_std: float = 0.02) -> None:
        super().__init__()
        if n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1, got {n_ctx}")
        self.init_std = init_std
        self.ctx = nn.Parameter(torch.empty(n_ctx, width))
        self.reset_parameters()

    @property
    def n_ctx(self) -> int:
        return int(self.ctx.shape[0])

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        values = torch.randn(self.ctx.shape, generator=generator) * self.init_std
        self.ctx.copy_(values.to(self.ctx.device))

    def forward(self) -> Tensor:
        return self.ctx
