"""pFedPrompt: a global user consensus prompt (GUC) plus a local, non-parametric few-shot memory (LFA)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flora.methods.promptfl import CoOpModule


class ClassMemory(nn.Module):
    """Per-class prototypes of one client's training images (keys) and which classes it has.

    Held as non-trainable parameters so that they travel with the client's local state.
    """

    def __init__(self) -> None:
        super().__init__()
        self.keys = nn.Parameter(torch.zeros(0, 0), requires_grad=False)
        self.present = nn.Parameter(torch.zeros(0), requires_grad=False)

    def resize(self, num_classes: int, dim: int, device: torch.device) -> None:
        self.keys = nn.Parameter(torch.zeros(num_classes, dim, device=device), requires_grad=False)
        self.present = nn.Parameter(torch.zeros(num_classes, device=device), requires_grad=False)

    @property
    def is_built(self) -> bool:
        return bool(self.present.numel()) and bool(self.present.sum() > 0)

    @torch.no_grad()
    def clear(self) -> None:
        self.keys.zero_()
        self.present.zero_()


class PFedPrompt(CoOpModule):
    """pFedPrompt: logits ``s * f . g(P, c) + alpha * LFA(q)``.

    ``P`` (the GUC) is shared and FedAvg'd as in PromptFL. The LFA memory is built once per
    client from its own training set with the frozen image tower and never leaves the
    client: keys are per-class prototypes (the re-normalised mean of the images' query
    features), values one-hot labels, and for a query ``q``,
    ``LFA(q) = exp(-beta * (1 - q . K^T)) V``; classes the client has no image of get 0.
    The query feature is the L2-normalised mean of the patch tokens (``lfa_features:
    patch``) or the pooled feature (``global``). The paper's exact attention form is not
    public: this is a reconstruction. LFA only applies to the task its memory was built
    for, so Novel classes (and the global part alone) are scored by the GUC.
    """

    global_params = ("prompt",)
    local_params = ("memory",)

    def __init__(
        self,
        class_names: Sequence[str] | None = None,
        n_ctx: int = 16,
        alpha: float = 1.0,
        beta: float = 5.5,
        lfa_features: str = "patch",
        ctx_init_std: float = 0.02,
        clip_model: str = "flora-tiny",
        clip_pretrained: str | None = "shipped",
        template: str = "a photo of a {}.",
        lr: float = 2e-3,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
    ) -> None:
        if lfa_features not in ("patch", "global"):
            raise ValueError(f"lfa_features must be 'patch' or 'global', got {lfa_features!r}")
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.feature_kind = lfa_features
        self.memory_classes: list[str] = []
        super().__init__(
            None, n_ctx, ctx_init_std, clip_model, clip_pretrained, template, lr, momentum, weight_decay
        )
        self.alpha = alpha
        self.beta = beta
        self.memory = ClassMemory()
        if class_names is not None:
            self.set_task(list(class_names))

    def set_task(self, class_names: Sequence[str]) -> None:
        super().set_task(class_names)
        memory = getattr(self, "memory", None)
        if memory is not None and not self.memory_classes:
            # the first task is the one the clients train on: the memory is sized for it
            memory.resize(len(self.class_names), self.backbone.embed_dim, self.anchor.device)
            self.memory_classes = list(self.class_names)

    def reset_global_parameters(self, generator: torch.Generator) -> None:
        self.prompt.reset_parameters(generator)

    def reset_local_parameters(self, generator: torch.Generator) -> None:
        self.memory.clear()

    # ----------------------------------------------------------------- memory
    def query(self, feats: Tensor) -> Tensor:
        """The LFA query feature ``(B, d)`` of cached/encoded image features."""
        if feats.dim() == 3:
            pooled = (
                feats[:, 1:].mean(1) if self.feature_kind == "patch" and feats.shape[1] > 1 else feats[:, 0]
            )
        else:
            pooled = feats
        return F.normalize(pooled.float(), dim=-1)

    @torch.no_grad()
    def before_local_training(self, batches: Iterable[Sequence[Tensor]]) -> None:
        """Build the client's memory from its training set once (the image tower is frozen)."""
        if self.memory.is_built or not self.memory_classes:
            return
        n_cls, dim = self.memory.keys.shape
        sums = torch.zeros(n_cls, dim, device=self.memory.keys.device)
        counts = torch.zeros(n_cls, device=self.memory.keys.device)
        for batch in batches:
            x, y = batch[0], batch[1].to(sums.device)
            q = self.query(self.image_features(x)).to(sums.device)
            sums.index_add_(0, y, q)
            counts += torch.bincount(y, minlength=n_cls).to(counts.dtype)
        if counts.sum() == 0:
            raise ValueError("pFedPrompt: the client has no training samples to build its memory from")
        present = counts > 0
        keys = torch.zeros_like(sums)
        keys[present] = F.normalize(sums[present] / counts[present, None], dim=-1)
        self.memory.keys.copy_(keys)
        self.memory.present.copy_(present.to(self.memory.present.dtype))

    def lfa_logits(self, feats: Tensor) -> Tensor | None:
        """``exp(-beta * (1 - q . K^T)) V`` for the memory's task, or None when it does not apply."""
        if self.class_names != self.memory_classes or not self.memory.is_built:
            return None
        q = self.query(feats)
        affinity = torch.exp(-self.beta * (1.0 - q @ self.memory.keys.t().to(q.dtype)))
        return affinity * self.memory.present.to(q.dtype)  # V is one-hot per prototype: column c is class c

    # ---------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        feats = self.image_features(x)
        logits = super().forward(feats)
        if self._zero_shot or self.is_global_only:
            return logits
        lfa = self.lfa_logits(feats)
        return logits if lfa is None else logits + self.alpha * lfa.to(logits.dtype)

    def on_train_start(self) -> None:
        """With a plain ``lightning.Trainer``: build the memory from the training DataLoader."""
        loader = self.trainer.train_dataloader
        if loader is not None:
            with torch.no_grad():
                self.before_local_training([b[0].to(self.device), b[1].to(self.device)] for b in loader)


__all__ = ["ClassMemory", "PFedPrompt"]
