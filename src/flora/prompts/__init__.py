"""Small learnable parts shared by the methods; no federated knowledge lives here."""

from flora.prompts.context import PromptContext

__all__ = ["PromptContext"]
