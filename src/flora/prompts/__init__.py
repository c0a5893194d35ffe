"""Small learnable parts shared by the methods; no federated knowledge lives here."""

from flora.prompts.adapter import ImageAdapter
from flora.prompts.class_tokens import ClassNameEmbeddings
from flora.prompts.context import PromptContext
from flora.prompts.linear import reset_linear
from flora.prompts.losses import pair_contrastive, rowwise_cos
from flora.prompts.lowrank import (
    ORTHO_GRAD_FLOOR,
    LowRankTerm,
    orthogonality_penalty,
    orthogonality_residuals,
)
from flora.prompts.transport import unbalanced_sinkhorn

__all__ = [
    "ClassNameEmbeddings",
    "ImageAdapter",
    "LowRankTerm",
    "PromptContext",
    "orthogonality_penalty",
    "orthogonality_residuals",
    "ORTHO_GRAD_FLOOR",
    "pair_contrastive",
    "reset_linear",
    "rowwise_cos",
    "unbalanced_sinkhorn",
]
