"""PromptFL+FT: PromptFL, evaluated after each client fine-tunes a copy of the global prompt."""

from __future__ import annotations

from typing import Any

from flora.methods.options import check_option
from flora.methods.promptfl import PromptFL


class PromptFLFT(PromptFL):
    """PromptFL+FT: PromptFL, but every client is evaluated with a fine-tuned copy of the global prompt.

    Before evaluation each client trains a throw-away copy of the current global prompt
    on its own training data for ``ft_epochs``; the copy is never uploaded. The global
    part alone (``global_acc``, Novel-G) is the un-tuned global prompt.
    """

    display_name = "PromptFL+FT"
    vectorised = True  # trainer.client_batch trains its clients together (CoOpModule.stacked_losses)
    personalised = True

    def __init__(self, *, ft_epochs: int = 1, **kwargs: Any) -> None:
        check_option("ft_epochs", ft_epochs, low=0, integer=True)
        super().__init__(**kwargs)
        self.eval_finetune_epochs = ft_epochs
