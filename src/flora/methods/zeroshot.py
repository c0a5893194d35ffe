"""Zero-shot CLIP: no training; logits ``s * f . z0(c)``."""

from __future__ import annotations

from typing import Any

from flora.methods.base import FederatedPromptModule


class ZeroShotCLIP(FederatedPromptModule):
    """The frozen CLIP with a hand-written template. Nothing is trained or communicated."""

    display_name = "zero-shot"

    @classmethod
    def budget_options(cls, n_ctx: int, rank: int, lr: float) -> dict[str, Any]:
        return {}  # nothing is learned: no context, no rank, no learning rate
