"""FLORA's attention-style image adapter: a softmax gate over feature dimensions."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FeatureGate(nn.Module):
    """``a = softmax(W2 relu(W1 f + b1) + b2)`` over the ``d`` features; output ``normalise(a * f)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """PyTorch's default Linear initialisation, drawn from ``generator``."""
        for layer in (self.fc1, self.fc2):
            bound = 1.0 / math.sqrt(layer.in_features)
            w = torch.rand(layer.weight.shape, generator=generator) * 2 * bound - bound
            b = torch.rand(layer.bias.shape, generator=generator) * 2 * bound - bound
            layer.weight.copy_(w.to(layer.weight.device))
            layer.bias.copy_(b.to(layer.bias.device))

    def gate(self, f: Tensor) -> Tensor:
        return torch.softmax(self.fc2(F.relu(self.fc1(f))), dim=-1)

    def forward(self, f: Tensor) -> Tensor:
        return F.normalize(self.gate(f) * f, dim=-1)
