"""PromptFL: one CoOp context, uploaded every round and FedAvg'd."""

from __future__ import annotations

from flora.methods.coop import CoOpModule


class PromptFL(CoOpModule):
    """PromptFL: one context trained with CE, uploaded every round and FedAvg'd. Nothing local."""

    display_name = "PromptFL"
    vectorised = True  # trainer.client_batch trains its clients together (CoOpModule.stacked_losses)
    global_params = ("prompt",)
