"""FedOTP: a global and a local prompt, matched to an image's patches by unbalanced optimal transport."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from flora.methods.coop import CoOpModule
from flora.methods.options import check_option
from flora.prompts import PromptContext, unbalanced_sinkhorn


class FedOTP(CoOpModule):
    """FedOTP: ``ctx[0]`` global (FedAvg'd) and ``ctx[1]`` local, both ``n_ctx x d_t``.

    For an image with normalised patch features ``F`` (``M x d``) and class ``c``,
    ``S_mn = F_m . g(ctx_n, c)``; the plan ``T`` of the unbalanced entropic OT with cost
    ``1 - S``, patch marginal ``<= 1/M`` and prompt marginal ``gamma / 2`` is computed
    without gradient, and the logit is ``s * sum_mn T_mn S_mn``; CE trains both prompts.
    The global part alone uses ``ctx[0]`` with the same per-prompt mass. ``ctx[0]`` is
    ``prompt``, ``ctx[1]`` is ``personal``; :meth:`text_features` is the global prompt's.
    """

    display_name = "FedOTP"
    personalised = True
    global_params = ("prompt",)
    local_params = ("personal",)
    feature_kind = "patch"

    def __init__(
        self,
        *,
        gamma: float = 0.8,
        eps: float = 0.1,
        ot_max_iter: int = 100,
        ot_tol: float = 1e-3,
        **kwargs: Any,
    ) -> None:
        check_option("gamma", gamma, low=0, low_open=True, high=1)
        check_option("eps", eps, low=0, low_open=True)
        check_option("ot_max_iter", ot_max_iter, low=1, integer=True)
        check_option("ot_tol", ot_tol, low=0)
        super().__init__(**kwargs)
        self.gamma, self.eps, self.ot_max_iter, self.ot_tol = gamma, eps, ot_max_iter, ot_tol
        self.personal = PromptContext(self.n_ctx, self.backbone.token_width, self.prompt.init_std)

    def prompt_features(self) -> Tensor:
        """``(N, n_cls, d)`` class features of the prompts in use (N = 2, or 1 for the global part alone)."""
        if self.is_global_only:
            ctx = self.prompt.ctx.unsqueeze(0)
        else:
            ctx = torch.stack([self.prompt.ctx, self.personal.ctx])
        return self.backbone.encode_prompted(ctx, self._require_task())

    def ot_logits(self, feats: Tensor, text: Tensor) -> Tensor:
        """``s * sum_mn T_mn S_mn`` for patch features ``(B, 1 + M, d)`` and prompt features ``(N, C, d)``."""
        if feats.dim() != 3 or feats.shape[1] < 2:
            raise ValueError(
                f"FedOTP needs patch features (B, 1 + M, d), got shape {tuple(feats.shape)}; "
                "use a ViT backbone and feature_kind 'patch'"
            )
        patches = F.normalize(feats[:, 1:].float(), dim=-1)
        sim = torch.einsum("bmd,ncd->bcmn", patches, text.float())
        m = sim.shape[-2]
        plan = unbalanced_sinkhorn(
            1.0 - sim.detach(), 1.0 / m, self.gamma / 2, self.eps, self.ot_max_iter, self.ot_tol
        )
        return self.backbone.logit_scale * (plan * sim).sum(dim=(-1, -2))

    def forward(self, x: Tensor) -> Tensor:
        if self.is_zero_shot:
            return super().forward(x)
        return self.ot_logits(self.image_features(x), self.cached_for_eval(self.prompt_features))
