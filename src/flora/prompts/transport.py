"""Unbalanced entropic optimal transport between an image's patches and a set of prompts (FedOTP)."""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def unbalanced_sinkhorn(
    cost: Tensor,
    patch_mass: float,
    prompt_mass: float,
    eps: float = 0.1,
    max_iter: int = 100,
    tol: float = 1e-3,
) -> Tensor:
    """Transport plans ``T`` (``(..., M, N)``) for a batch of costs ``(..., M, N)``.

    The patch marginal is an inequality, ``T 1 <= patch_mass`` (each of the M patches
    may send at most ``patch_mass``), the prompt marginal an equality,
    ``T^T 1 = prompt_mass``. With ``K = exp(-C / eps)`` the scalings iterate
    ``u = min(a / (K v), 1)``, ``v = b / (K^T u)`` until the mean change of ``v`` is below
    ``tol`` or ``max_iter`` iterations; ``T = diag(u) K diag(v)``. Computed in float32
    without gradient. Raises ``FloatingPointError`` when the plan is not finite.
    """
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    kernel = torch.exp(-cost.float() / eps)
    m, n = kernel.shape[-2], kernel.shape[-1]
    a = torch.full(kernel.shape[:-1], patch_mass, dtype=kernel.dtype, device=kernel.device)
    b = torch.full((*kernel.shape[:-2], n), prompt_mass, dtype=kernel.dtype, device=kernel.device)
    u = torch.ones_like(a)
    v = torch.ones_like(b)
    tiny = torch.finfo(kernel.dtype).tiny
    for _ in range(max_iter):
        previous = v
        u = torch.clamp(a / (kernel @ v.unsqueeze(-1)).squeeze(-1).clamp_min(tiny), max=1.0)
        v = b / (kernel.transpose(-1, -2) @ u.unsqueeze(-1)).squeeze(-1).clamp_min(tiny)
        if (v - previous).abs().mean() < tol:
            break
    plan = u.unsqueeze(-1) * kernel * v.unsqueeze(-2)
    if not torch.isfinite(plan).all():
        raise FloatingPointError(
            f"optimal transport produced a non-finite plan (eps={eps}, {m} patches x {n} prompts); "
            "raise eps or check the features for NaN"
        )
    return plan
