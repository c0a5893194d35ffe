"""Local CoOp: every client trains its own CoOp context and never communicates."""

from __future__ import annotations

from flora.methods.coop import CoOpModule


class LocalCoOp(CoOpModule):
    """Local CoOp: every client trains its own context and never communicates."""

    display_name = "Local"
    vectorised = True  # trainer.client_batch trains its clients together (CoOpModule.stacked_losses)
    personalised = True
    local_params = ("prompt",)
