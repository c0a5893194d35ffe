"""Zero-shot CLIP: no training; logits ``s * f . z0(c)``."""

from __future__ import annotations

from flora.methods.base import FederatedPromptModule


class ZeroShotCLIP(FederatedPromptModule):
    """The frozen CLIP with a hand-written template. Nothing is trained or communicated."""
