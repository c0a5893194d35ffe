"""pFedMoAP: a local prompt plus a mixture of the nearest other clients' prompts, gated by attention."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flora.errors import FloraConfigError
from flora.methods.base import StateDict
from flora.methods.coop import CoOpModule
from flora.methods.last_uploads import KeepsLastUploads
from flora.methods.options import check_option
from flora.prompts import reset_linear

EXPERT_PREFIX = "expert."


def feature_pool(x: Tensor, width: int) -> Tensor:
    """Adaptive average pooling of the last dimension to ``width``."""
    shape = x.shape
    return F.adaptive_avg_pool1d(x.reshape(-1, 1, shape[-1]).float(), width).reshape(*shape[:-1], width)


class ExpertGate(nn.Module):
    """One multi-head attention layer (q/k/v/out projections with bias) with a fixed score scale."""

    def __init__(self, width: int = 128, heads: int = 8, scale: float = 10.0) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"gate width {width} is not divisible by {heads} heads")
        self.width, self.heads, self.scale = width, heads, scale
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def reset_parameters(self, generator: torch.Generator) -> None:
        reset_linear((self.q, self.k, self.v, self.out), generator)

    def forward(self, query: Tensor, keys: Tensor) -> Tensor:
        """``query (B, w)``, ``keys = values (C, E, w)`` -> the per-class mixture ``(B, C, w)``."""
        h, dh = self.heads, self.width // self.heads
        q = self.q(query).view(query.shape[0], h, dh)
        k = self.k(keys).view(*keys.shape[:2], h, dh)
        v = self.v(keys).view(*keys.shape[:2], h, dh)
        scores = torch.einsum("bhd,cehd->bche", q, k) * self.scale
        mixed = torch.einsum("bche,cehd->bchd", scores.softmax(-1), v)
        return self.out(mixed.reshape(query.shape[0], keys.shape[0], self.width))


class PFedMoAP(KeepsLastUploads, CoOpModule):
    """pFedMoAP: logits ``l_M + lambda * l_L``.

    The prompt ``P`` is downloaded as the FedAvg prompt ``P_g`` each round, trained locally
    and uploaded; the server keeps every client's last upload (the :attr:`pool`). Client
    ``i`` also downloads its ``num_experts`` nearest pool prompts (L2 distance to its own
    last upload, itself excluded) as frozen experts, whose class features
    ``T_j = pool(g(P_j, c))`` are computed once without gradient. ``l_L = s f . g(P, c)``;
    for each class the gate (local, never uploaded) attends from ``pool(f)`` over
    ``[pool(g(P, c)); T_1c; ...]`` with score scale 10, and
    ``l_M = s * cos(pool(f), T_MoE[c])``. Clients with no experts yet (first
    participation) train plain CoOp from ``P_g``. The global part alone is ``P_g``
    without experts or gate.
    """

    display_name = "pFedMoAP"
    personalised = True
    global_params = ("prompt",)
    local_params = ("gate",)
    last_uploads_key = "pool"

    def __init__(
        self,
        *,
        num_experts: int = 9,
        gate_width: int = 128,
        gate_heads: int = 8,
        gate_scale: float = 10.0,
        lam: float = 0.5,
        gate_lr: float = 0.01,
        **kwargs: Any,
    ) -> None:
        check_option("num_experts", num_experts, low=1, integer=True)
        check_option("gate_width", gate_width, low=1, integer=True)
        check_option("gate_heads", gate_heads, low=1, integer=True)
        if gate_width % gate_heads:
            raise FloraConfigError(
                f"model.gate_width ({gate_width}) must be divisible by model.gate_heads ({gate_heads})"
            )
        check_option("gate_scale", gate_scale, low=0, low_open=True)
        check_option("lam", lam, low=0)
        check_option("gate_lr", gate_lr, low=0, low_open=True)
        super().__init__(**kwargs)
        self.num_experts, self.lam, self.gate_lr = num_experts, lam, gate_lr
        self.gate = ExpertGate(gate_width, gate_heads, gate_scale)
        # non-persistent buffers, so that they follow the module's device and dtype
        self.expert_prompts: Tensor | None
        self._expert_text: Tensor | None
        self.register_buffer("expert_prompts", None, persistent=False)
        self.register_buffer("_expert_text", None, persistent=False)

    @property
    def pool(self) -> dict[int, StateDict]:
        """Every client's last uploaded prompt (client id -> state)."""
        return self.last_uploads

    def set_task(self, class_names: Sequence[str]) -> None:
        super().set_task(class_names)
        self._expert_text = None

    # ------------------------------------------------------------------ server
    def experts_of(self, client_id: int) -> list[int]:
        """The pool clients nearest to ``client_id``'s last upload (none before it first uploads)."""
        own = self.pool.get(client_id)
        if own is None:
            return []
        others = sorted(c for c in self.pool if c != client_id)
        dist = {c: float((self.pool[c]["prompt.ctx"] - own["prompt.ctx"]).double().norm()) for c in others}
        return sorted(others, key=lambda c: (dist[c], c))[: self.num_experts]

    def download_state(self, client_id: int, global_state: StateDict) -> StateDict:
        experts = self.experts_of(client_id)
        extra = {f"{EXPERT_PREFIX}{k}": self.pool[c]["prompt.ctx"] for k, c in enumerate(experts)}
        return {**global_state, **extra}

    def load_global_state(self, state: StateDict) -> None:
        experts = sorted(
            (k for k in state if k.startswith(EXPERT_PREFIX)), key=lambda k: int(k.split(".")[1])
        )
        super().load_global_state({k: v for k, v in state.items() if not k.startswith(EXPERT_PREFIX)})
        device = self.prompt.ctx.device
        self.expert_prompts = torch.stack([state[k] for k in experts]).to(device) if experts else None
        self._expert_text = None

    # ----------------------------------------------------------------- forward
    def expert_text(self) -> Tensor | None:
        """``(E, n_cls, d_g)`` pooled class features of the experts, computed once per download and task."""
        if self.expert_prompts is None:
            return None
        if self._expert_text is None:
            with torch.no_grad():
                feats = self.backbone.encode_prompted(self.expert_prompts, self._require_task())
            self._expert_text = feature_pool(feats, self.gate.width)
        return self._expert_text

    def forward(self, x: Tensor) -> Tensor:
        if self.is_zero_shot:
            return super().forward(x)
        f = self.image_side(self.image_features(x))
        text = self.cached_for_eval(self.text_features)
        local = self.logits_from(f, text)
        experts = None if self.is_global_only else self.expert_text()
        if experts is None:
            return local
        keys = torch.cat([feature_pool(text, self.gate.width).unsqueeze(1), experts.transpose(0, 1)], dim=1)
        query = feature_pool(f, self.gate.width)
        mixed = self.gate(query, keys)
        moe = self.backbone.logit_scale * torch.einsum(
            "bd,bcd->bc", F.normalize(query, dim=-1), F.normalize(mixed, dim=-1)
        )
        return moe + self.lam * local

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        groups = [
            {"params": [self.prompt.ctx], "lr": hp.lr},
            {"params": list(self.gate.parameters()), "lr": self.gate_lr},
        ]
        return torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
