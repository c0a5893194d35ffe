"""Seeded initialisation of ``nn.Linear`` layers that works on any device."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

#: draws a ``shape`` tensor from U(-1/sqrt(fan_in), 1/sqrt(fan_in)) on the CPU
Draw = Callable[[torch.Size, int, "torch.Generator | None"], Tensor]


def uniform_draw(shape: torch.Size, fan_in: int, generator: torch.Generator | None) -> Tensor:
    """``uniform_(-bound, bound)`` with ``bound = 1 / fan_in ** 0.5``."""
    bound = 1.0 / fan_in**0.5
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def scaled_rand_draw(shape: torch.Size, fan_in: int, generator: torch.Generator | None) -> Tensor:
    """``rand * 2 * bound - bound`` with ``bound = 1 / sqrt(fan_in)``."""
    bound = 1.0 / math.sqrt(fan_in)
    return torch.rand(shape, generator=generator) * 2 * bound - bound


@torch.no_grad()
def reset_linear(
    layers: Iterable[nn.Linear], generator: torch.Generator | None, draw: Draw = uniform_draw
) -> None:
    """PyTorch's default ``nn.Linear`` initialisation, drawn from ``generator``.

    Weight then bias, layer by layer, each from U(-1/sqrt(in_features), 1/sqrt(in_features)),
    drawn on the CPU (where the federated trainer's generators live) and copied to the
    layer's device, so the values are the same on every device. The two ``draw`` forms
    give the same distribution but differ in the last bit: each module keeps the one its
    seeded runs were made with (:func:`uniform_draw` for pFedMoAP's gate,
    :func:`scaled_rand_draw` for FLORA's image adapter).
    """
    for layer in layers:
        weight = draw(layer.weight.shape, layer.in_features, generator)
        bias = draw(layer.bias.shape, layer.in_features, generator)
        layer.weight.copy_(weight.to(layer.weight.device))
        layer.bias.copy_(bias.to(layer.bias.device))
