"""FLORA's attention-style image adapter: a softmax gate over feature dimensions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flora.prompts.linear import reset_linear, scaled_rand_draw


class ImageAdapter(nn.Module):
    """``a = softmax(W2 relu(W1 f + b1) + b2)`` over the ``d`` features; output ``normalise(a * f)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """PyTorch's default Linear initialisation, drawn from ``generator``."""
        reset_linear((self.fc1, self.fc2), generator, scaled_rand_draw)

    def gate(self, f: Tensor) -> Tensor:
        return torch.softmax(self.fc2(F.relu(self.fc1(f))), dim=-1)

    def forward(self, f: Tensor) -> Tensor:
        return F.normalize(self.gate(f) * f, dim=-1)
