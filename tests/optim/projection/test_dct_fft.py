"""FFT DCT-II (Makhoul) checked against the DCT-II definition written out here, and against the matmul path."""

import math

import pytest
import torch

from lightning_lowrank.optim.projection.bases import dct_basis, dct_scores
from lightning_lowrank.optim.projection.dct_fft import dct2, dct_scores_fft

SIZES = [1, 2, 3, 7, 16, 31, 64]
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def _definition_matrix(n: int) -> torch.Tensor:
    """C[k, j] = a_k cos(pi k (2j + 1) / (2n)), a_0 = sqrt(1/n), a_k = sqrt(2/n): the definition, entry by entry."""
    C = torch.empty(n, n, dtype=torch.float64)
    for k in range(n):
        a = math.sqrt((1.0 if k == 0 else 2.0) / n)
        for j in range(n):
            C[k, j] = a * math.cos(math.pi * k * (2 * j + 1) / (2 * n))
    return C


def _reference_dct2(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Definition-based DCT-II of a 2-D tensor along ``dim``, computed in float64."""
    C = _definition_matrix(x.shape[dim])
    x64 = x.double()
    return C @ x64 if dim == 0 else x64 @ C.T


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_definition_matrix_is_orthonormal():
    """The reference itself must be right, or every comparison below is vacuous."""
    C = _definition_matrix(9)
    torch.testing.assert_close(C @ C.T, torch.eye(9, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("dim", [0, -1])
@pytest.mark.parametrize("n", SIZES)
def test_dct2_matches_definition(n: int, dim: int, dtype: torch.dtype):
    shape = (n, 5) if dim == 0 else (5, n)
    x = torch.randn(*shape, generator=_gen(n), dtype=dtype)
    out = dct2(x, dim=dim)
    assert out.dtype == dtype and out.shape == x.shape
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), _reference_dct2(x, 0 if dim == 0 else 1), atol=tol, rtol=tol)


@pytest.mark.parametrize("n", SIZES)
def test_dct2_matches_project_basis_matmul(n: int):
    """Same convention as the matmul path: dct2(x) == x @ dct_basis(N) along the last dim, and the dim-0 analogue."""
    basis = dct_basis(n, torch.float64)
    x = torch.randn(4, n, generator=_gen(100 + n), dtype=torch.float64)
    torch.testing.assert_close(dct2(x), x @ basis, atol=1e-10, rtol=1e-10)
    y = x.T.contiguous()
    torch.testing.assert_close(dct2(y, dim=0), basis.T @ y, atol=1e-10, rtol=1e-10)


def test_dct2_inner_dim_of_3d_input():
    """A middle dim is transformed like ``movedim(dim, -1) @ basis`` moved back."""
    x = torch.randn(3, 7, 4, generator=_gen(1), dtype=torch.float64)
    expected = (x.movedim(1, -1) @ dct_basis(7, torch.float64)).movedim(-1, 1)
    torch.testing.assert_close(dct2(x, dim=1), expected, atol=1e-10, rtol=1e-10)


def test_dct2_detects_a_single_frequency():
    """A pure cosine at frequency 5 puts all its (unit) energy into coefficient 5."""
    n, freq = 16, 5
    x = _definition_matrix(n)[freq].unsqueeze(0)
    expected = torch.zeros(1, n, dtype=torch.float64)
    expected[0, freq] = 1.0
    torch.testing.assert_close(dct2(x), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("shape", [(12, 40), (40, 12)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_scores_match_matmul_scores(shape: tuple[int, int], dtype: torch.dtype):
    left = shape[0] <= shape[1]
    grad = torch.randn(*shape, generator=_gen(7), dtype=dtype)
    basis = dct_basis(min(shape), dtype)
    expected = (basis.T @ grad).norm(dim=1) if left else (grad @ basis).norm(dim=0)
    scores = dct_scores_fft(grad, left)
    assert scores.shape == (min(shape),)
    torch.testing.assert_close(scores, expected, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(scores, dct_scores(grad, basis), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("shape", [(12, 40), (40, 12)])
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("rank", [1, 4, 8])
def test_scores_pick_the_same_top_r_as_matmul(shape: tuple[int, int], seed: int, rank: int):
    """What the projector consumes is the top-r set; with Gaussian gradients exact ties have probability zero."""
    left = shape[0] <= shape[1]
    grad = torch.randn(*shape, generator=_gen(seed))
    fft_scores = dct_scores_fft(grad, left)
    matmul_scores = dct_scores(grad, dct_basis(min(shape)))
    fft_top = set(torch.topk(fft_scores, rank).indices.tolist())
    matmul_top = set(torch.topk(matmul_scores, rank).indices.tolist())
    if fft_top != matmul_top:
        # Only a near-tie at the r-th place may swap members; check the swapped scores really are tied.
        kth = torch.topk(matmul_scores, rank).values[-1]
        for i in fft_top ^ matmul_top:
            assert abs(matmul_scores[i] - kth) <= 1e-4 * kth


@pytest.mark.parametrize("shape", [(0, 5), (5, 0)])
@pytest.mark.parametrize("dim", [0, -1])
def test_dct2_of_empty_input_is_empty(shape: tuple[int, int], dim: int):
    assert dct2(torch.empty(shape), dim=dim).shape == shape


def test_scores_reject_non_matrix():
    with pytest.raises(ValueError):
        dct_scores_fft(torch.randn(4), True)


def test_bfloat16_input_round_trips_dtype():
    x = torch.randn(6, 31, generator=_gen(3)).to(torch.bfloat16)
    out = dct2(x, dim=-1)
    assert out.dtype == torch.bfloat16
    # Within bf16 rounding of the float32 transform of the same (already bf16-rounded) values.
    torch.testing.assert_close(out.float(), _reference_dct2(x, 1).float(), atol=3e-2, rtol=1e-2)
    out0 = dct2(x.T, dim=0)
    assert out0.dtype == torch.bfloat16
    # Same transform along the other dim; allow one bf16 rounding step of difference.
    torch.testing.assert_close(out0.float(), out.float().T, atol=1e-2, rtol=1e-2)


def test_bfloat16_scores_are_float32_and_match():
    """bf16 gradients are scored in float32 so the top-r choice is not blurred by bf16 ties."""
    grad = torch.randn(12, 40, generator=_gen(4)).to(torch.bfloat16)
    scores = dct_scores_fft(grad, True)
    assert scores.dtype == torch.float32
    expected = (dct_basis(12, torch.float64).T @ grad.double()).norm(dim=1).float()
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)


def test_float16_input_round_trips_dtype():
    x = torch.randn(3, 16, generator=_gen(5)).to(torch.float16)
    out = dct2(x)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), _reference_dct2(x, 1).float(), atol=5e-3, rtol=5e-3)


def test_integer_input_is_rejected():
    with pytest.raises(TypeError):
        dct2(torch.arange(8))
