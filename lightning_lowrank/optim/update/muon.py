"""Muon's orthogonalized step (torch.optim.Muon, torch 2.13) as plain functions over tensors.

``rules.direction("muon", ...)`` runs it on a projected momentum (r x n, or m x r): Newton-Schulz commutes with an
orthogonal change of basis (NS(Qᵀ B) = Qᵀ NS(B) for Q with orthonormal columns spanning B's columns), so with a full
orthonormal P the projected step equals Muon's in exact arithmetic, and with P the identity it is Muon's bit for bit.
The learning-rate adjustment reads the *full* weight's shape, as torch's ``_adjust_lr`` does.

``newton_schulz`` is torch's ``_zeropower_via_newtonschulz`` op for op, with the dtype it iterates in as an argument
(torch: bfloat16; ``ns_dtype``). With ``reduce`` it runs on a row shard of a tall matrix (FSDP2: each rank holds rows
of the projected momentum): the Frobenius norm and the (cols x cols) Gram matrix are the only quantities that need
every row, so each iteration costs one small all-reduce; the rest is local. Plain torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

NS_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
ADJUST_LR_FNS = (None, "original", "match_rms_adamw")


def newton_schulz(
    X: Tensor,
    coefficients: Sequence[float],
    steps: int,
    eps: float,
    dtype: torch.dtype = torch.bfloat16,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """The quintic Newton-Schulz iteration towards the orthogonal factor of ``X`` (in ``dtype``; US'Vᵀ with S' near
    1, not exactly UVᵀ, as torch's). ``reduce``: sums a tensor over the ranks that hold the other rows of ``X`` (a
    row shard of a tall matrix: rows >= cols overall)."""
    a, b, c = coefficients
    if reduce is not None:
        return _newton_schulz_rows(X.to(dtype), a, b, c, steps, eps, reduce)
    Y = X.to(dtype)
    tall = X.size(0) > X.size(1)
    if tall:
        Y = Y.T
    Y = Y.div(Y.norm().clamp(min=eps))
    for _ in range(steps):
        gram = Y @ Y.T
        update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        Y = torch.addmm(Y, update, Y, beta=a)
    return Y.T if tall else Y


def _newton_schulz_rows(
    B: Tensor, a: float, b: float, c: float, steps: int, eps: float, reduce: Callable[[Tensor], Tensor]
) -> Tensor:
    """The tall form on this rank's rows: Y = Bᵀ in torch's loop, so Y Yᵀ = Bᵀ B (summed over ranks) and
    Y <- a Y + (b A + c A²) Y becomes B <- a B + B (b A + c A²) (A symmetric)."""
    norm = reduce(B.pow(2).sum()).sqrt()
    B = B / norm.clamp(min=eps)
    for _ in range(steps):
        gram = reduce(B.T @ B)
        update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        B = torch.addmm(B, B, update, beta=a)
    return B


def adjust_lr(lr: float, adjust_lr_fn: str | None, shape: Sequence[int]) -> float:
    """torch's ``_adjust_lr``: the step size for a weight of ``shape`` (its full shape, never a projection's)."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr


def direction(
    grad: Tensor, buffer: Tensor, group: dict, shape: Sequence[int], reduce: Callable[[Tensor], Tensor] | None = None
) -> tuple[Tensor, float]:
    """Muon's momentum (``buffer``, updated in place) and orthogonalized direction for ``grad`` (projected or full),
    with its step size; the direction in the buffer's dtype."""
    momentum = group["momentum"]
    buffer.lerp_(grad, 1 - momentum)
    update = grad.lerp(buffer, momentum) if group["nesterov"] else buffer
    ortho = newton_schulz(
        update, group["ns_coefficients"], group["ns_steps"], group["eps"], NS_DTYPES[group["ns_dtype"]], reduce
    )
    return ortho.to(buffer.dtype), adjust_lr(float(group["lr"]), group["adjust_lr_fn"], shape)
