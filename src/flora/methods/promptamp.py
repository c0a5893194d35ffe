"""PromptAMP (FedAMP-style): each client receives an attention-weighted mix of the others' prompts."""

from __future__ import annotations

from typing import Any

import torch

from flora.methods.base import StateDict
from flora.methods.last_uploads import KeepsLastUploads
from flora.methods.options import check_option
from flora.methods.promptprox import ProximalPromptFL


class PromptAMP(KeepsLastUploads, ProximalPromptFL):
    """PromptAMP (FedAMP-style attentive message passing).

    The server keeps every client's last uploaded prompt ``P_j`` (:attr:`client_prompts`).
    Client ``i`` receives ``U_i = w_ii P_i + sum_{j != i} w_ij P_j`` with
    ``w_ij ∝ exp(-||P_i - P_j||^2 / sigma)`` scaled so that ``sum_{j != i} w_ij = 1 - w_ii``
    (``self_weight``), trains from ``U_i`` with ``(lam / 2) * ||P - U_i||^2`` added, and is
    evaluated with its own last prompt. ``sigma`` defaults to the median pairwise squared
    distance of the stored prompts. Clients that never trained receive (and are evaluated
    with) the FedAvg prompt.
    """

    display_name = "PromptAMP"
    vectorised = True  # trainer.client_batch trains its clients together (ProximalPromptFL.stacked_losses)
    personalised = True
    last_uploads_key = "client_prompts"

    def __init__(
        self, *, lam: float = 1.0, self_weight: float = 0.5, sigma: float | None = None, **kwargs: Any
    ) -> None:
        check_option("lam", lam, low=0)
        check_option("self_weight", self_weight, low=0, high=1)
        check_option("sigma", sigma, low=0, low_open=True, allow_none=True)
        super().__init__(**kwargs)
        self.mu = lam  # the weight of the proximal term
        self.self_weight = self_weight
        self.sigma = sigma
        self._distances: tuple[list[int], torch.Tensor, float] | None = None

    @property
    def client_prompts(self) -> dict[int, StateDict]:
        """Every client's last uploaded prompt (client id -> state)."""
        return self.last_uploads

    @property
    def has_global_model(self) -> bool:
        return False

    def on_uploads_changed(self) -> None:
        self._distances = None

    def _pairwise(self) -> tuple[list[int], torch.Tensor, float]:
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
