"""pFedPrompt: a global user consensus prompt (GUC) plus a local, non-parametric few-shot memory (LFA)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flora.methods.base import StateDict
from flora.methods.coop import CoOpModule
from flora.methods.options import check_choice, check_option


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

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """A new client's memory is empty (nothing is drawn from ``generator``)."""
        self.clear()


class PFedPrompt(CoOpModule):
    """pFedPrompt: logits ``s * f . g(P, c) + alpha * LFA(q)``.

    ``P`` (the GUC) is shared and FedAvg'd as in PromptFL. The LFA memory is built once per
    client from its own training set with the frozen image tower and never leaves the
    client: keys are per-class prototypes (the re-normalised mean of the images' query
    features), values one-hot labels, and for a query ``q``,
    ``LFA(q) = exp(-beta * (1 - q . K^T)) V``; classes the client has no image of get 0.
    The query feature is the L2-normalised mean of the patch tokens (``lfa_features:
    patch``) or the pooled feature (``global``). The paper's exact attention form is not
    public: this is a reconstruction.

    The memory belongs to the task the client trains on, whatever ``class_names`` the
    model was built with: until a memory has been built or loaded, it is re-sized for
    every task set (the federated trainer sets the training task first), and
    :meth:`before_local_training` always builds it for the task being trained (a memory
    built for another task is cleared and rebuilt). Once a memory exists, setting another
    task (Novel evaluation) keeps it as it is, so that every client's stored memory still
    loads. LFA is added only when the current task is exactly the memory's task and the
    memory is built. It deliberately adds nothing, and the logits are the GUC's alone:

    - on another task, e.g. Novel classes, of which the memory has no prototype;
    - for a client that never trained (its memory is empty);
    - for the global part alone (:meth:`global_only`) and zero-shot evaluation.
    """

    display_name = "pFedPrompt"
    personalised = True
    global_params = ("prompt",)
    local_params = ("memory",)

    def __init__(
        self, *, alpha: float = 1.0, beta: float = 5.5, lfa_features: str = "patch", **kwargs: Any
    ) -> None:
        check_choice("lfa_features", lfa_features, ("patch", "global"))
        check_option("alpha", alpha, low=0)
        check_option("beta", beta, low=0)
        self.feature_kind = lfa_features
        super().__init__(**kwargs)
        self.alpha = alpha
        self.beta = beta
        self.memory = ClassMemory()
        #: the classes (label order) the memory's rows stand for
        self.memory_classes: list[str] = []
        # True once a memory was built or loaded: from then on a new task no longer re-sizes it
        self._memory_fixed = False

    def set_task(self, class_names: Sequence[str]) -> None:
        super().set_task(class_names)
        if not self._memory_fixed:
            self._size_memory_for_task()

    def _size_memory_for_task(self) -> None:
        """An empty memory with one row per class of the current task."""
        n_cls, dim = len(self.class_names), self.backbone.embed_dim
        if tuple(self.memory.keys.shape) != (n_cls, dim) or self.memory.keys.device != self.anchor.device:
            self.memory.resize(n_cls, dim, self.anchor.device)
        else:
            self.memory.clear()
        self.memory_classes = list(self.class_names)

    def load_local_state(self, state: StateDict) -> None:
        super().load_local_state(state)
        self._memory_fixed = True

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

    @property
    def memory_applies(self) -> bool:
        """Whether LFA is added now: a built memory of exactly the current task."""
        return self.class_names == self.memory_classes and self.memory.is_built

    @torch.no_grad()
    def before_local_training(self, batches: Iterable[Sequence[Tensor]]) -> None:
        """Build the client's memory for the task it trains on, once (the image tower is frozen)."""
        self._require_task()
        if self.memory_classes == self.class_names and self.memory.is_built:
            return
        if self.memory_classes != self.class_names or self.memory.keys.shape[0] != self.num_classes:
            self._size_memory_for_task()  # the memory follows the task the client trains on
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
        self._memory_fixed = True

    def lfa_logits(self, feats: Tensor) -> Tensor | None:
        """``exp(-beta * (1 - q . K^T)) V`` for the memory's task, or None when it does not apply."""
        if not self.memory_applies:
            return None
        q = self.query(feats)
        affinity = torch.exp(-self.beta * (1.0 - q @ self.memory.keys.t().to(q.dtype)))
        return affinity * self.memory.present.to(q.dtype)  # V is one-hot per prototype: column c is class c

    # ---------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        feats = self.image_features(x)
        logits = super().forward(feats)
        if self.is_zero_shot or self.is_global_only:
            return logits
        lfa = self.lfa_logits(feats)
        return logits if lfa is None else logits + self.alpha * lfa.to(logits.dtype)

    def on_train_start(self) -> None:
        """With a plain ``lightning.Trainer``: build the memory from the training DataLoader."""
        loader = self.trainer.train_dataloader
        if loader is not None:
            with torch.no_grad():
                self.before_local_training([b[0].to(self.device), b[1].to(self.device)] for b in loader)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)  # sets (and sizes the memory for) the checkpoint's task
        if any(k.startswith("memory.") for k in checkpoint.get("state_dict", {})):
            self._memory_fixed = True


__all__ = ["ClassMemory", "PFedPrompt"]
