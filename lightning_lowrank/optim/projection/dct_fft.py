"""Orthonormal DCT-II through one FFT (Makhoul 1980), so DCT scoring never builds a d x d basis.

Scoring a (m, n) gradient against the full DCT basis costs a d x d matrix plus an O(d^2 n) product;
the FFT route costs O(d log d * n) and no basis. Values match ``projection.dct_basis`` /
``projection.dct_scores`` (up to floating-point rounding).

Makhoul's method for a length-N signal x: reorder it to v = [x0, x2, x4, ..., x5, x3, x1] (even
indices ascending, then odd indices descending). With V = FFT(v),

    sum_j x_j cos(pi k (2j + 1) / (2N)) = Re(V_k exp(-i pi k / (2N))) = Re V_k cos(t_k) + Im V_k sin(t_k),

t_k = pi k / (2N). The orthonormal DCT-II scales that by sqrt(1/N) for k = 0 and sqrt(2/N) otherwise.
Since v is real only the half spectrum ``rfft`` returns is computed: V_{N-k} = conj(V_k) gives the rest.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from lightning_lowrank.optim.projection.bases import dct_norm_order

# Dtypes torch.fft handles on every device; anything else (half, bfloat16) is transformed in float32.
_FFT_DTYPES = (torch.float32, torch.float64)


@functools.lru_cache(maxsize=32)
def _plan(n: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Reorder index and scaled twiddles for length ``n``, cached because an optimizer reuses a few sizes every step.

    Returns ``(perm, cos_lo, sin_lo, cos_hi, sin_hi)``: ``cos_lo/sin_lo`` are the scaled cos/sin of t_k for
    k = 0..n//2 (read straight off the rfft output); ``cos_hi/sin_hi`` are those for k = n-1 down to n//2+1,
    in the order of the rfft bins j = n - k = 1..n-n//2-1 they are computed from. Built in float64 so the
    cast is the only rounding. Callers must not modify the returned tensors (they are shared).
    """
    perm = torch.cat([torch.arange(0, n, 2), torch.arange(1, n, 2).flip(0)]).to(device)
    k = torch.arange(n, dtype=torch.float64)
    scale = torch.full((n,), math.sqrt(2.0 / n), dtype=torch.float64)
    scale[0] = math.sqrt(1.0 / n)
    cos = torch.cos(math.pi * k / (2 * n)) * scale
    sin = torch.sin(math.pi * k / (2 * n)) * scale
    half = n // 2 + 1
    parts = (cos[:half], sin[:half], cos[half:].flip(0), sin[half:].flip(0))
    return (perm, *(p.to(dtype=dtype, device=device).contiguous() for p in parts))


def _dct2_along(x: Tensor, dim: int) -> Tensor:
    """Orthonormal DCT-II along ``dim`` of a float32/float64 tensor; the result is a new tensor.

    Transforms along ``dim`` in place of moving it last: on CPU that measured faster than a transpose for
    both orientations of a (d, n) gradient.
    """
    dim = dim % x.ndim
    n = x.shape[dim]
    perm, cos_lo, sin_lo, cos_hi, sin_hi = _plan(n, x.dtype, x.device)
    view = [1] * x.ndim
    view[dim] = -1
    spec = torch.fft.rfft(x.index_select(dim, perm), dim=dim)
    re, im = spec.real, spec.imag
    half = n // 2 + 1
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out.narrow(dim, 0, half).copy_(re * cos_lo.view(view) + im * sin_lo.view(view))
    if n > half:
        # Bins k > n//2 come from rfft bin j = n - k through V_k = conj(V_j): X_k = Re V_j cos t_k - Im V_j sin t_k.
        hi = re.narrow(dim, 1, n - half) * cos_hi.view(view) - im.narrow(dim, 1, n - half) * sin_hi.view(view)
        out.narrow(dim, half, n - half).copy_(hi.flip(dim))
    return out


def _dct2_work(x: Tensor, dim: int) -> Tensor:
    """DCT-II along ``dim`` in the working precision (float32 for half/bfloat16, which torch.fft lacks on CPU)."""
    if not x.is_floating_point():
        raise TypeError(f"dct2 needs a real floating-point tensor, got {x.dtype}")
    work = x if x.dtype in _FFT_DTYPES else x.float()
    if work.numel() == 0:  # MKL's FFT rejects an empty batch; the transform of nothing is nothing.
        return work.clone()
    return _dct2_along(work, dim)


def dct2(x: Tensor, dim: int = -1) -> Tensor:
    """Orthonormal DCT-II of x along `dim`, via one FFT of length N (Makhoul 1980), without building the N x N basis.

    Equals x @ dct_basis(N) along that dim (x.movedim(dim, -1) @ basis, moved back). Half and bfloat16
    inputs are transformed in float32 and returned in their own dtype.
    """
    return _dct2_work(x, dim).to(x.dtype)


def dct_scores_fft(grad: Tensor, left: bool, norm: str = "l2") -> Tensor:
    """l2 (or, ``norm="l1"``, l1) norm of grad's DCT-II coefficients per frequency on the smaller side: for left (rows
    are the smaller side, m < n) transform along dim 0 and take norms over dim 1; else transform along dim 1 and take
    norms over dim 0. Same values as ``projection.dct_scores(grad, dct_basis(d), norm)``.

    The scores stay in the working precision (float32 for half/bfloat16 gradients): they only feed a top-r
    choice, and rounding them back to bfloat16 would manufacture ties.
    """
    if grad.ndim != 2:
        raise ValueError(f"dct_scores_fft needs a 2-D gradient, got shape {tuple(grad.shape)}")
    dim = 0 if left else 1
    return torch.linalg.vector_norm(_dct2_work(grad, dim), ord=dct_norm_order(norm), dim=1 - dim)
