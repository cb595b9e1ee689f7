"""Subspace projections for a 2-D gradient ``G`` of shape (m, n).

A projection is a matrix ``P`` (d x r) with orthonormal columns on the *smaller* side of G,
d = min(m, n):

* ``m <= n`` ("left"):  R = P^T G  has shape (r, n), and the update maps back as P R.
* ``m >  n`` ("right"): R = G P    has shape (m, r), and the update maps back as R P^T.

Projecting the smaller side keeps the stored P small (GaLore's choice). Everything here is plain
torch over tensors, without Lightning, so it can be tested alone.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

PROJECTORS = ("svd", "dct")


def is_left(shape: torch.Size | tuple[int, ...]) -> bool:
    """True when the rows are the smaller side, so P multiplies G from the left."""
    return shape[0] <= shape[1]


def effective_rank(shape: torch.Size | tuple[int, ...], rank: int) -> int:
    """The rank actually used for a matrix: never more than its smaller side."""
    return min(rank, min(shape))


def project(grad: Tensor, P: Tensor) -> Tensor:
    """Map a full gradient (m, n) into the subspace: (r, n) or (m, r)."""
    return P.T @ grad if is_left(grad.shape) else grad @ P


def project_back(low_rank: Tensor, P: Tensor, full_shape: torch.Size) -> Tensor:
    """Map a low-rank tensor back to the full (m, n) shape."""
    return P @ low_rank if is_left(full_shape) else low_rank @ P.T


def svd_projection(grad: Tensor, rank: int) -> Tensor:
    """Top-``rank`` singular vectors of ``grad`` on its smaller side (GaLore).

    Half-precision gradients are decomposed in float32 (CPU has no bf16 SVD); P is returned in the
    gradient's dtype.
    """
    work = grad if grad.dtype in (torch.float32, torch.float64) else grad.float()
    U, _, Vh = torch.linalg.svd(work, full_matrices=False)
    P = U[:, :rank] if is_left(grad.shape) else Vh[:rank].T
    return P.to(grad.dtype).contiguous()


def dct_basis(size: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """Orthonormal DCT-II basis as a (size, size) matrix whose *columns* are the basis vectors.

    Column k is sqrt(2/size) * cos(pi * k * (2j + 1) / (2 size)) over j, with column 0 scaled by
    1/sqrt(2). Built in float64 so the cast to ``dtype`` is the only rounding.
    """
    j = torch.arange(size, dtype=torch.float64).unsqueeze(1)
    k = torch.arange(size, dtype=torch.float64).unsqueeze(0)
    basis = math.sqrt(2.0 / size) * torch.cos(math.pi * k * (2 * j + 1) / (2 * size))
    basis[:, 0] /= math.sqrt(2.0)
    return basis.to(dtype=dtype, device=device)


def dct_scores(grad: Tensor, basis: Tensor) -> Tensor:
    """Alignment of each basis column with ``grad``: the l2 norm of G's coefficients on it.

    Picking the top-r by l2 score maximises the captured energy ||P^T G||_F^2 over subsets of the basis.
    """
    if is_left(grad.shape):
        return (basis.T @ grad).norm(dim=1)
    return (grad @ basis).norm(dim=0)


def dct_select(grad: Tensor, rank: int, basis: Tensor) -> Tensor:
    """Indices (sorted, int64) of the ``rank`` DCT basis columns best aligned with ``grad``."""
    scores = dct_scores(grad.to(basis.dtype), basis)
    return torch.topk(scores, rank, sorted=False).indices.sort().values
