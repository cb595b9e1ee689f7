"""``protected_refresh``: a protected weight's subspace chosen from its gradient as it is, or from the part of it the
protection lets through, (I - U Uᵀ) G (I - V Vᵀ). Checked against the SVD and the DCT scores written out densely."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_lowrank.optim import ProjectedOptimizer


def _orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64)).Q


def _first_refresh(projector: str, protected_refresh: str):
    """A 12 x 20 float64 weight (P on the left, 12 x 3), 4 directions protected, one step: (P, G, U, V)."""
    W = torch.nn.Parameter(torch.randn(12, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    opt = ProjectedOptimizer(
        [W], lr=1e-3, rank=3, projector=projector, protected_refresh=protected_refresh, dct_norm="l2"
    )
    U, V = _orthonormal(12, 4, 1), _orthonormal(20, 4, 2)
    opt.protect({W: (U, V)})
    W.grad = torch.randn(12, 20, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    G = W.grad.clone()
    opt.step()
    return opt.projection_matrix(W), G, U, V


def _confined(G, U, V):
    return (torch.eye(12, dtype=G.dtype) - U @ U.T) @ G @ (torch.eye(20, dtype=G.dtype) - V @ V.T)


def _same_span(A: torch.Tensor, B: torch.Tensor) -> None:
    torch.testing.assert_close((A.T @ B).abs().svd().S, torch.ones(A.shape[1], dtype=A.dtype), rtol=0, atol=1e-10)


@pytest.mark.parametrize("protected_refresh", ["gradient", "complement"])
def test_svd_subspace_of_the_gradient_or_of_its_protected_complement(protected_refresh):
    P, G, U, V = _first_refresh("svd", protected_refresh)
    source = G if protected_refresh == "gradient" else _confined(G, U, V)
    _same_span(P, torch.linalg.svd(source).U[:, :3])
    if protected_refresh == "complement":  # no rank spent on what the confinement removes
        assert (U.T @ P).abs().max() < 1e-12
    else:
        assert (U.T @ P).abs().max() > 1e-3


def _dct2(d: int) -> torch.Tensor:
    """Orthonormal DCT-II basis, columns are the frequencies (written out from the definition)."""
    i, j = torch.arange(d, dtype=torch.float64)[:, None], torch.arange(d, dtype=torch.float64)[None, :]
    D = torch.cos(math.pi * (2 * i + 1) * j / (2 * d)) * math.sqrt(2 / d)
    D[:, 0] /= math.sqrt(2)
    return D


@pytest.mark.parametrize("protected_refresh", ["gradient", "complement"])
def test_dct_columns_by_alignment_with_the_gradient_or_its_protected_complement(protected_refresh):
    P, G, U, V = _first_refresh("dct", protected_refresh)
    source = G if protected_refresh == "gradient" else _confined(G, U, V)
    D = _dct2(12)
    chosen = (D.T @ source).norm(dim=1).topk(3).indices
    _same_span(P, D[:, chosen])


def test_complement_differs_from_gradient_here():
    """The two choices differ on this case (so the tests above can tell them apart)."""
    P_g = _first_refresh("svd", "gradient")[0]
    P_c = _first_refresh("svd", "complement")[0]
    assert (P_g.T @ P_c).abs().svd().S.min() < 0.99


def test_unknown_protected_refresh_is_refused():
    W = torch.nn.Parameter(torch.zeros(4, 6))
    with pytest.raises(ValueError, match="protected_refresh"):
        ProjectedOptimizer([W], rank=2, protected_refresh="weights")


def test_the_default_chooses_inside_the_complement():
    """The continual study's decision (docs/benchmarks.md): SVD inside the complement learns more, forgets no more."""
    W = torch.nn.Parameter(torch.zeros(4, 6))
    assert ProjectedOptimizer([W], rank=2).param_groups[0]["protected_refresh"] == "complement"
