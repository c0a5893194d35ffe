"""flora: multi-modal federated prompt learning for frozen vision-language models."""

__version__ = "0.1.0"
