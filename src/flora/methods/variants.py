"""PromptFL with the classic FL personalisation recipes: +FT, FedPer, FedProx and FedAMP.

All four learn the same CoOp context as PromptFL (``n_ctx x d_t``, N(0, 0.02)) with
cross-entropy; they differ in what is shared and in what each client optimises.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from flora.errors import FloraConfigError
from flora.methods.base import FederatedPromptModule, StateDict, check_context_options, check_option
from flora.methods.promptfl import PromptFL
from flora.prompts import PromptContext


class PromptFLFT(PromptFL):
    """PromptFL+FT: PromptFL, but every client is evaluated with a fine-tuned copy of the global prompt.

    Before evaluation each client trains a throw-away copy of the current global prompt
    on its own training data for ``ft_epochs``; the copy is never uploaded. The global
    part alone (``global_acc``, Novel-G) is the un-tuned global prompt.
    """

    def __init__(
        self,
        class_names: Sequence[str] | None = None,
        n_ctx: int = 16,
        ft_epochs: int = 1,
        ctx_init_std: float = 0.02,
        clip_model: str = "flora-tiny",
        clip_pretrained: str | None = "shipped",
        template: str = "a photo of a {}.",
        lr: float = 2e-3,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
    ) -> None:
        check_option("ft_epochs", ft_epochs, low=0, integer=True)
        super().__init__(
            class_names,
            n_ctx,
            ctx_init_std,
            clip_model,
            clip_pretrained,
            template,
            lr,
            momentum,
            weight_decay,
        )
        self.eval_finetune_epochs = ft_epochs


class PromptPer(FederatedPromptModule):
    """PromptPer (FedPer-style split): context ``[P_g ; P_p]``; only ``P_g`` is uploaded and FedAvg'd.

    ``P_p`` (``n_local`` tokens) stays on the client. There is no stand-alone global model
    (a prompt without its personal tokens is a different prompt), so the global-only
    metrics are not reported.
    """

    global_params = ("prompt",)
    local_params = ("personal",)
    n_ctx_option = "n_global + model.n_local"

    def __init__(
        self,
        class_names: Sequence[str] | None = None,
        n_global: int = 8,
        n_local: int = 8,
        ctx_init_std: float = 0.02,
        clip_model: str = "flora-tiny",
        clip_pretrained: str | None = "shipped",
        template: str = "a photo of a {}.",
        lr: float = 2e-3,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
    ) -> None:
        for name, value in (("n_global", n_global), ("n_local", n_local)):
            if isinstance(value, int) and not isinstance(value, bool) and value < 1:
                raise FloraConfigError(
                    f"model.{name} must be >= 1, got {value}: PromptPer needs at least one global and one "
                    "local token (n_local=0 is PromptFL, n_global=0 is Local CoOp)"
                )
            check_context_options(value, ctx_init_std, n_ctx_name=name)
        self._n_ctx = n_global + n_local
        super().__init__(None, clip_model, clip_pretrained, template, lr, momentum, weight_decay)
        self.prompt = PromptContext(n_global, self.backbone.token_width, ctx_init_std)
        self.personal = PromptContext(n_local, self.backbone.token_width, ctx_init_std)
        if class_names is not None:
            self.set_task(list(class_names))

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    @property
    def has_global_model(self) -> bool:
        return False

    def reset_global_parameters(self, generator: torch.Generator) -> None:
        self.prompt.reset_parameters(generator)

    def reset_local_parameters(self, generator: torch.Generator) -> None:
        self.personal.reset_parameters(generator)

    def text_features(self) -> Tensor:
        ctx = torch.cat([self.prompt.ctx, self.personal.ctx], dim=0)
        return self.backbone.encode_prompted(ctx, self._require_task())


class PromptProx(PromptFL):
    """PromptProx (FedProx-style): PromptFL plus ``(mu / 2) * ||P - P_glob||^2``.

    ``P_glob`` is the prompt the client received this round (a constant); the gradient
    flows to ``P`` only. Outside a federated run (a plain ``lightning.Trainer``) nothing
    has been received and the loss is plain cross-entropy.
    """

    def __init__(
        self,
        class_names: Sequence[str] | None = None,
        n_ctx: int = 16,
        mu: float = 0.5,
        ctx_init_std: float = 0.02,
        clip_model: str = "flora-tiny",
        clip_pretrained: str | None = "shipped",
        template: str = "a photo of a {}.",
        lr: float = 2e-3,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
    ) -> None:
        check_option("mu", mu, low=0)
        super().__init__(
            class_names,
            n_ctx,
            ctx_init_std,
            clip_model,
            clip_pretrained,
            template,
            lr,
            momentum,
            weight_decay,
        )
        self.mu = mu
        self.register_buffer("received", torch.empty(0), persistent=False)

    def load_global_state(self, state: StateDict) -> None:
        super().load_global_state(state)
        self.received = self.prompt.ctx.detach().clone()

    def proximal_term(self) -> Tensor:
        """``(mu / 2) * ||P - P_received||^2`` (0 when nothing has been received)."""
        if self.received.numel() == 0:
            return self.prompt.ctx.sum() * 0.0
        return 0.5 * self.mu * (self.prompt.ctx - self.received).pow(2).sum()

    def compute_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        ce, parts = super().compute_loss(x, y)
        prox = self.proximal_term()
        return ce + prox.to(ce.dtype), {**parts, "prox": prox.detach()}


class PromptAMP(PromptProx):
    """PromptAMP (FedAMP-style attentive message passing).

    The server keeps every client's last uploaded prompt ``P_j``. Client ``i`` receives
    ``U_i = w_ii P_i + sum_{j != i} w_ij P_j`` with ``w_ij ∝ exp(-||P_i - P_j||^2 / sigma)``
    scaled so that ``sum_{j != i} w_ij = 1 - w_ii`` (``self_weight``), trains from ``U_i``
    with ``(lam / 2) * ||P - U_i||^2`` added, and is evaluated with its own last prompt.
    ``sigma`` defaults to the median pairwise squared distance of the stored prompts.
    Clients that never trained receive (and are evaluated with) the FedAvg prompt.
    """

    def __init__(
        self,
        class_names: Sequence[str] | None = None,
        n_ctx: int = 16,
        lam: float = 1.0,
        self_weight: float = 0.5,
        sigma: float | None = None,
        ctx_init_std: float = 0.02,
        clip_model: str = "flora-tiny",
        clip_pretrained: str | None = "shipped",
        template: str = "a photo of a {}.",
        lr: float = 2e-3,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
    ) -> None:
        check_option("lam", lam, low=0)  # passed on as PromptProx's mu: named as the user wrote it
        check_option("self_weight", self_weight, low=0, high=1)
        check_option("sigma", sigma, low=0, low_open=True, allow_none=True)
        super().__init__(
            class_names,
            n_ctx,
            lam,
            ctx_init_std,
            clip_model,
            clip_pretrained,
            template,
            lr,
            momentum,
            weight_decay,
        )
        self.self_weight = self_weight
        self.sigma = sigma
        self.client_prompts: dict[int, StateDict] = {}
        self._distances: tuple[list[int], Tensor, float] | None = None

    @property
    def has_global_model(self) -> bool:
        return False

    # ------------------------------------------------------------------ server
    def aggregate(self, uploads: Sequence[tuple[int, int, StateDict]], current: StateDict) -> StateDict:
        for cid, _, state in uploads:
            self.client_prompts[int(cid)] = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
        self._distances = None
        return super().aggregate(uploads, current)

    def _pairwise(self) -> tuple[list[int], Tensor, float]:
        """Client ids, their squared-distance matrix and ``sigma``; computed once per round."""
        if self._distances is None:
            ids = sorted(self.client_prompts)
            flat = torch.stack(
                [
                    torch.cat([v.double().flatten() for _, v in sorted(self.client_prompts[c].items())])
                    for c in ids
                ]
            )
            d2 = torch.cdist(flat, flat).pow(2)
            sigma = self.sigma
            if sigma is None:
                iu = torch.triu_indices(len(ids), len(ids), offset=1)
                pairs = d2[iu[0], iu[1]]
                sigma = float(pairs.median()) if pairs.numel() else 1.0
                sigma = sigma if sigma > 0 else 1.0  # identical prompts: uniform weights
            self._distances = (ids, d2, sigma)
        return self._distances

    def message_weights(self, client_id: int) -> dict[int, float]:
        """``w_ij`` for every stored client ``j`` (``j = i`` included) of client ``client_id``."""
        ids, d2, sigma = self._pairwise()
        i = ids.index(client_id)
        others = [k for k in range(len(ids)) if k != i]
        if not others:
            return {client_id: 1.0}
        w = torch.softmax(-d2[i, others] / sigma, dim=0) * (1.0 - self.self_weight)
        out = {ids[k]: float(x) for k, x in zip(others, w, strict=True)}
        out[client_id] = self.self_weight
        return out

    def download_state(self, client_id: int, global_state: StateDict) -> StateDict:
        if client_id not in self.client_prompts:
            return global_state
        weights = self.message_weights(client_id)
        return {
            name: sum(w * self.client_prompts[j][name].double() for j, w in weights.items()).to(value.dtype)
            for name, value in global_state.items()
        }

    def evaluation_state(self, client_id: int, global_state: StateDict) -> StateDict:
        return self.client_prompts.get(client_id, global_state)

    def server_state_dict(self) -> dict[str, Any]:
        return {"client_prompts": {str(c): s for c, s in self.client_prompts.items()}}

    def load_server_state_dict(self, state: dict[str, Any]) -> None:
        self.client_prompts = {int(c): dict(s) for c, s in state.get("client_prompts", {}).items()}
        self._distances = None
