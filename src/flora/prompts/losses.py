"""Loss terms shared by the prompt methods."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rowwise_cos(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity of matching rows of ``a`` and ``b`` (``(n, d)`` -> ``(n,)``)."""
    return F.cosine_similarity(a, b, dim=-1)


def pair_contrastive(pos: Tensor, neg: Tensor, tau: float) -> Tensor:
    """Mean over rows of ``CE([pos, neg] / tau, target 0)``: pull the positive pair, push the negative."""
    logits = torch.stack([pos, neg], dim=1) / tau
    return F.cross_entropy(logits, torch.zeros(len(pos), dtype=torch.long, device=pos.device))
