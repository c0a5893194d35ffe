"""The low-rank context term ``B A`` and its orthogonality penalty."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LowRankTerm(nn.Module):
    """``B A``: ``B`` is ``n_ctx x rank``, ``A`` is ``rank x width``.

    With ``orthonormal=True`` (FLORA) ``B`` starts with orthonormal columns (the Q of a
    QR decomposition of a Gaussian matrix); otherwise (FedPGP's ``U``) it starts
    N(0, ``init_std``). ``A`` always starts N(0, ``init_std``).
    """

    def __init__(
        self, n_ctx: int, width: int, rank: int = 8, init_std: float = 0.02, orthonormal: bool = True
    ):
        super().__init__()
        if not 1 <= rank <= min(n_ctx, width) and orthonormal:
            raise ValueError(
                f"rank must be in [1, min(n_ctx, width)] = [1, {min(n_ctx, width)}] for an orthonormal B"
            )
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.init_std = init_std
        self.orthonormal = orthonormal
        self.B = nn.Parameter(torch.empty(n_ctx, rank))
        self.A = nn.Parameter(torch.empty(rank, width))
        self.reset_parameters()

    @property
    def rank(self) -> int:
        return int(self.B.shape[1])

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        gauss = torch.randn(self.B.shape, generator=generator)
        if self.orthonormal:
            q, r = torch.linalg.qr(gauss)
            gauss = q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # unique Q: positive diagonal of R
        else:
            gauss = gauss * self.init_std
        self.B.copy_(gauss.to(self.B.device))
        self.A.copy_((torch.randn(self.A.shape, generator=generator) * self.init_std).to(self.A.device))

    def forward(self) -> Tensor:
        return self.B @ self.A


def orthogonality_penalty(B: Tensor) -> Tensor:
    """``sum_n ||B_n^T B_n - I_r||_F`` for ``B`` of shape ``(n_ctx, r)`` or ``(N, n_ctx, r)``.

    Zero exactly when every ``B_n`` has orthonormal columns (``B B^T - I`` never is for
    ``r < n_ctx``, which is why the column form is used).
    """
    if B.dim() == 2:
        B = B.unsqueeze(0)
    eye = torch.eye(B.shape[-1], device=B.device, dtype=B.dtype)
    gram = B.transpose(-1, -2) @ B
    return torch.linalg.matrix_norm(gram - eye, ord="fro").sum()
