"""Frozen open_clip backbones with a prompted text tower."""

from flora.clip.backbone import ClassPrompts, CLIPBackbone, PretrainedWeightsError, list_flora_models

__all__ = ["CLIPBackbone", "ClassPrompts", "PretrainedWeightsError", "list_flora_models"]
