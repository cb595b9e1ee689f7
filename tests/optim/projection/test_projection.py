"""Projection math checked against independent dense references written here."""

import math

import pytest
import torch

from lightning_lowrank.optim.projection.bases import (
    dct_basis,
    dct_select,
    is_left,
    project,
    project_back,
    subspace_similarity,
    svd_projection,
)

SHAPES = [(12, 20), (20, 12), (16, 16)]


def _top_subspace_projector(G: torch.Tensor, r: int) -> torch.Tensor:
    """Orthogonal projector onto the top-r eigenvectors of G G^T (or G^T G): the top singular subspace."""
    gram = G @ G.T if G.shape[0] < G.shape[1] else G.T @ G
    evals, evecs = torch.linalg.eigh(gram.double())
    top = evecs[:, torch.argsort(evals, descending=True)[:r]]
    return top @ top.T


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rank", [1, 4, 7])
def test_svd_projection_spans_top_singular_subspace(shape, rank):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    P = svd_projection(G, rank)
    d = min(shape)
    assert P.shape == (d, rank)
    torch.testing.assert_close(P.T @ P, torch.eye(rank, dtype=P.dtype), atol=1e-10, rtol=0)
    torch.testing.assert_close(P @ P.T, _top_subspace_projector(G, rank), atol=1e-8, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_project_and_back_shapes_and_full_rank_round_trip(shape):
    G = torch.randn(*shape, dtype=torch.float64)
    P = svd_projection(G, min(shape))
    R = project(G, P)
    expected = (min(shape), shape[1]) if shape[0] <= shape[1] else (shape[0], min(shape))
    assert R.shape == expected
    torch.testing.assert_close(project_back(R, P, G.shape), G)  # full rank: nothing is lost


@pytest.mark.parametrize("size", [1, 2, 5, 16])
def test_dct_basis_is_orthonormal_dct_ii(size):
    B = dct_basis(size, dtype=torch.float64)
    torch.testing.assert_close(B.T @ B, torch.eye(size, dtype=torch.float64), atol=1e-12, rtol=0)
    # Column k applied to a vector is the orthonormal DCT-II coefficient X_k, written out from its definition.
    x = torch.randn(size, dtype=torch.float64)
    for k in range(size):
        xk = sum(x[j].item() * math.cos(math.pi * k * (2 * j + 1) / (2 * size)) for j in range(size))
        xk *= math.sqrt(1 / size) if k == 0 else math.sqrt(2 / size)
        assert abs((B[:, k] @ x).item() - xk) < 1e-10


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rank", [1, 3, 8])
def test_dct_select_picks_top_r_by_coefficient_energy(shape, rank):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    left = shape[0] < shape[1]  # a square G goes right, as in GaLore
    d = min(shape)
    # Independent: DCT-II coefficients along the smaller side by the definition, then energy per frequency.
    j = torch.arange(d, dtype=torch.float64)
    energy = []
    for k in range(d):
        c = torch.cos(math.pi * k * (2 * j + 1) / (2 * d)) * (math.sqrt(1 / d) if k == 0 else math.sqrt(2 / d))
        coeff = c @ G if left else G @ c
        energy.append((coeff**2).sum().item())
    expected = sorted(range(d), key=lambda k: -energy[k])[:rank]  # best first
    idx = dct_select(G, rank, dct_basis(d, dtype=torch.float64))
    assert idx.dtype == torch.int64
    assert idx.tolist() == expected


def test_dct_selection_maximizes_captured_energy_among_basis_subsets():
    G = torch.randn(10, 30, generator=torch.Generator().manual_seed(2))
    B = dct_basis(10)
    idx = dct_select(G, 4, B)
    best = (B[:, idx].T @ G).norm() ** 2
    for trial in range(20):
        other = torch.randperm(10, generator=torch.Generator().manual_seed(trial))[:4]
        assert (B[:, other].T @ G).norm() ** 2 <= best + 1e-4


def test_side_rule():
    assert is_left((3, 5)) and not is_left((4, 4)) and not is_left((5, 3))  # square: right, as GaLore


@pytest.mark.parametrize("orthonormal", [False, True])
def test_subspace_similarity_of_overlapping_coordinate_subspaces(orthonormal):
    # Columns 0-3 vs columns 2-5 of the identity (scaled when not told they are orthonormal): 2 of 4 shared
    # directions, so the mean squared cosine of the principal angles is 2/4; the leading columns are orthogonal.
    eye = torch.eye(10, dtype=torch.float64)
    scale = 1.0 if orthonormal else 3.0
    principal, leading = subspace_similarity(eye[:, :4] * scale, eye[:, 2:6], orthonormal=orthonormal)
    assert principal == pytest.approx(0.5) and leading == pytest.approx(0.0)
    # A rotated copy of the same subspace: similarity 1 either way.
    rotation = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))).Q
    principal, _ = subspace_similarity(eye[:, :4], eye[:, :4] @ rotation, orthonormal=orthonormal)
    assert principal == pytest.approx(1.0)
