"""The low-rank context term ``B A`` and its orthogonality penalty."""

from __future__ import annotations

import contextlib

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


#: below this ``||B^T B - I_r||_F`` the penalty's gradient shrinks with it (:func:`orthogonality_residuals`)
ORTHO_GRAD_FLOOR = 1e-4


def orthogonality_residuals(B: Tensor, grad_floor: float = ORTHO_GRAD_FLOOR) -> Tensor:
    """``||B_n^T B_n - I_r||_F`` of each ``B_n`` of ``B`` ``(N, n_ctx, r)``: shape ``(N,)``.

    Computed in float32 (or the parameters' wider dtype), outside autocast: in bfloat16 a
    Gram matrix of unit columns is rounded by about 1e-2, far more than the deviation it
    measures.

    The value is the Frobenius norm. Its gradient, ``X / ||X||`` with ``X = B^T B - I``,
    is a unit vector whose direction is rounding noise when ``B`` is orthonormal to
    working precision (as FLORA's ``B`` starts); there the penalty would push ``B`` a
    fixed distance in an arbitrary direction, differently for every change in summation
    order. So the gradient is ``X / max(||X||, grad_floor)``: the norm's own above the
    floor, shrinking to zero with ``X`` below it. The value is unchanged. ``grad_floor=0``
    gives the norm's own gradient everywhere (zero where ``X`` is exactly zero).
    """
    if not grad_floor >= 0:
        raise ValueError(f"grad_floor must be >= 0, got {grad_floor}")
    eye = torch.eye(B.shape[-1], device=B.device, dtype=torch.promote_types(B.dtype, torch.float32))
    autocast = B.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(B.device.type)
    with torch.autocast(B.device.type, enabled=False) if autocast else contextlib.nullcontext():
        b = B.to(eye.dtype)
        squares = (b.transpose(-1, -2) @ b - eye).pow(2).sum((-2, -1))
    norm = squares.detach().sqrt()
    floor = norm.clamp_min(max(grad_floor, torch.finfo(norm.dtype).tiny))
    # value: norm; gradient: that of squares / (2 floor)
    return squares / (2 * floor) + (norm - norm.pow(2) / (2 * floor))


def orthogonality_penalty(B: Tensor, grad_floor: float = ORTHO_GRAD_FLOOR) -> Tensor:
    """``sum_n ||B_n^T B_n - I_r||_F`` for ``B`` of shape ``(n_ctx, r)`` or ``(N, n_ctx, r)``.

    Zero exactly when every ``B_n`` has orthonormal columns (``B B^T - I`` never is for
    ``r < n_ctx``, which is why the column form is used). See
    :func:`orthogonality_residuals` for its precision and its gradient near zero.
    """
    return orthogonality_residuals(B if B.dim() == 3 else B.unsqueeze(0), grad_floor).sum()
