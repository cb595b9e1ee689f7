"""Trion's step (ista-daslab-optimizers 1.1.15, ``fft_low_rank/trion.py``) as plain functions over tensors.

Trion (Modoranu et al., "FFT-based Dynamic Subspace Selection for Low-Rank Adaptive Optimization of Large Language
Models", arXiv 2505.17967) is Muon on a low-rank part of the momentum, with Dion's error feedback in place of an
SVD. For a weight W (m x n) with gradient G, every step:

1. M += G (the buffer keeps everything not yet applied: no decay factor, the error feedback does that job);
2. transform M with the DCT on its smaller side (d = min(m, n)) and score each of the d frequencies by the l1 norm
   of its coefficients; keep the ``rank`` best (chosen anew every step, from M, not from G);
3. m = M's coefficients on those r frequencies ((m x r) when m >= n, "right"; (r x n) when m < n, "left");
4. M -= (1 - mu) * (m mapped back through the r DCT vectors): a fraction mu of the used part stays in the buffer;
5. O = NS(m) (Newton-Schulz); the update is O mapped back, times a shape factor (``SCALINGS``), after decoupled
   weight decay: W <- (1 - lr * wd) W - lr * scale * update.

State: the m x n buffer, as Muon's momentum, plus r indices per step, so **no memory saving against Muon**. The
savings are compute (Newton-Schulz on r x n, or m x r, in place of m x n) and communication: under DDP the reference
computes each weight's (O, indices) on one rank and all-gathers those (r x n values and r integers) instead of m x n.
That split is not here: ``trion_direction`` runs on the owning rank, the caller gathers (O, indices), and every rank
runs ``trion_apply``; ``trion_update`` is both halves for one weight on one process.

The DCT. With Q[k, j] = c_k cos(pi k (2j + 1) / (2d)), c_0 = sqrt(1/d), c_k = sqrt(2/d), the reference's
``dct3_matrix(d)`` is Q = ``bases.dct_basis(d).T`` (``trion_dct_matrix``) and its ``dct_type2_makhoul(X)`` is
X @ Q^T = ``dct_fft.dct2(X, dim=-1)``. In the P (d x r, orthonormal columns) convention of ``projection.bases``, the
reference scores with these columns:

=========  =====================================  =========================================
scorer     right (m >= n): S = M P_full            left (m < n): S = P_full^T M
=========  =====================================  =========================================
matmul     S = M Q: columns of Q (DCT-III rows)    S = Q M: columns of Q^T = dct_basis
makhoul    S = dct2(M, rows): columns of Q^T       S = dct2(M, columns): columns of Q^T
=========  =====================================  =========================================

and maps back through the same columns, except in one case (below).

What differs from the reference:

* Makhoul + left: the reference scores with Q^T's columns (S = Q M) but maps back with Q's (it caches Q^T for
  Makhoul and reads rows of it), so the error feedback removes (1 - mu) Q_r Q'_r^T M, not a projection of M, and
  the update is mapped back through other vectors than the ones it was computed in. We map back through the scoring
  columns (at full rank the buffer becomes mu * M, as in every other case); ``makhoul_left_as_reference=True`` does
  what the reference does. The other three cases match it op for op.
* The reference's own DCT cannot run as published: its uncached path calls ``dct3_matrix(..., device=device,
  dtype=dtype)`` with neither name defined (NameError), and ``Trion.step`` calls ``get_dct_matrix``, defined
  nowhere. Its cache holds Q for matmul and Q^T for Makhoul, keyed by (d, rank) only (no dtype or device);
  ``tests/parity/test_trion_parity.py`` fills that cache and supplies ``get_dct_matrix`` as a read of it.
* Precision: Q is built in float64 and cast (the reference builds it in float32 and casts: about 1e-6 apart); the
  Makhoul twiddles are float64 too (the reference's are complex64 unless torch's default dtype is float64).
* Indices come best first (``top_indices``); the reference's ``topk(sorted=False)`` leaves their order unspecified.
  The step does not depend on it: Newton-Schulz commutes with permuting m's rows or columns.
* Newton-Schulz is whatever callable the caller passes (tests pass float64). ``newton_schulz_eps`` is the
  reference's ``zeropower_via_newtonschulz5``: X / (||X||_F + 1e-7), bfloat16 by default. ``muon.newton_schulz``
  (torch's) divides by max(||X||_F, eps) instead, a relative difference of eps / ||X||_F before the iterations.
* An unknown scaling type raises ValueError (the reference fails later, on an unbound name).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lightning_lowrank.optim.projection.bases import dct_basis, dct_columns, is_left, top_indices
from lightning_lowrank.optim.projection.dct_fft import dct2

SCORERS = ("matmul", "makhoul")
SCALINGS = ("kj", "none", "kimi", "dion")
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7

NewtonSchulz = Callable[[Tensor], Tensor]


def newton_schulz_eps(
    X: Tensor,
    steps: int = 5,
    coefficients: Sequence[float] = NS_COEFFICIENTS,
    eps: float = NS_EPS,
    dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """The quintic Newton-Schulz iteration as the reference writes it: in ``dtype``, on the wide orientation, after
    dividing by the Frobenius norm plus ``eps`` (torch's form clamps the norm instead: ``muon.newton_schulz``).
    Returned in ``dtype``; batched over leading dimensions."""
    a, b, c = coefficients
    tall = X.size(-2) > X.size(-1)
    Y = X.to(dtype)
    if tall:
        Y = Y.mT
    Y = Y / (Y.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        gram = Y @ Y.mT
        poly = b * gram + (c * gram) @ gram
        Y = a * Y + poly @ Y
    return Y.mT if tall else Y


def trion_dct_matrix(size: int, dtype: torch.dtype, device: torch.device | str | None = None) -> Tensor:
    """The reference's ``dct3_matrix(size)``: Q[k, j] = c_k cos(pi k (2j + 1) / (2 size)), i.e. ``dct_basis(size).T``
    (built in float64, then cast). M @ Q is the DCT-III of M's rows, Q @ M the DCT-II of its columns."""
    return dct_basis(size, dtype=dtype, device=device).T.contiguous()


def trion_scale(shape: Sequence[int], scaling: str) -> float:
    """The factor on the learning rate for an (R, C) weight (R = rows, ``shape[0]``), as ``Trion.step`` computes it."""
    rows, cols = shape[0], shape[1]
    if scaling == "kj":
        return max(1.0, rows / cols) ** 0.5
    if scaling == "none":
        return 1.0
    if scaling == "kimi":
        return 0.2 * math.sqrt(max(rows, cols))
    if scaling == "dion":
        return (rows / cols) ** 0.5
    raise ValueError(f"Unknown scaling {scaling!r}; choose one of {', '.join(map(repr, SCALINGS))}")


def _check(shape: Sequence[int], rank: int, scorer: str) -> None:
    if len(shape) != 2:
        raise ValueError(f"Trion needs a 2-D weight, got shape {tuple(shape)}")
    if scorer not in SCORERS:
        raise ValueError(f"Unknown scorer {scorer!r}; choose one of {', '.join(map(repr, SCORERS))}")
    if not 0 < rank <= min(shape):
        raise ValueError(f"rank must be in [1, {min(shape)}] for shape {tuple(shape)}, got {rank}")


def _uses_q_columns(scorer: str, left: bool, makhoul_left_as_reference: bool) -> bool:
    """Whether a case maps back through columns of Q (else of Q^T = dct_basis): see the module's table."""
    if scorer == "matmul":
        return not left
    return left and makhoul_left_as_reference


def trion_columns(
    size: int,
    indices: Tensor,
    q_columns: bool,
    dtype: torch.dtype,
    device: torch.device | str | None = None,
    dct: Tensor | None = None,
) -> Tensor:
    """(size, r): columns ``indices`` of Q (``q_columns``) or of Q^T = ``dct_basis(size)``, taken from ``dct`` (Q,
    e.g. cached by the caller) when given. Q^T's columns without ``dct`` come from the formula (no size x size)."""
    if dct is not None:
        return dct[:, indices] if q_columns else dct[indices, :].T
    if q_columns:
        return trion_dct_matrix(size, dtype, device)[:, indices.to(device)]
    return dct_columns(size, indices, dtype, device)


def trion_direction(
    grad: Tensor,
    buffer: Tensor,
    rank: int,
    momentum: float,
    scorer: str = "matmul",
    ns: NewtonSchulz | None = None,
    *,
    dct: Tensor | None = None,
    makhoul_left_as_reference: bool = False,
) -> tuple[Tensor, Tensor]:
    """One weight's Trion direction: ``buffer`` (M, m x n, updated in place) gets G added, its ``rank`` DCT
    frequencies with the largest l1 norm of coefficients on the smaller side are chosen, their coefficients m
    ((m x r) or (r x n)) are removed from M with weight (1 - momentum), and m goes through ``ns``.

    ``scorer``: "matmul" (the coefficients as a product with Q, which ``dct`` supplies or is built) or "makhoul"
    (one FFT per row or column, ``dct_fft.dct2``). ``ns``: any Newton-Schulz callable (default
    ``newton_schulz_eps``: the reference's, in bfloat16). Returns (NS(m) in M's dtype, indices: int64, best first).
    """
    _check(grad.shape, rank, scorer)
    ns = newton_schulz_eps if ns is None else ns
    buffer.add_(grad)
    left = is_left(buffer.shape)
    size = min(buffer.shape)
    if scorer == "matmul":
        if dct is None:
            dct = trion_dct_matrix(size, buffer.dtype, buffer.device)
        coeffs = dct @ buffer if left else buffer @ dct
    else:
        coeffs = dct2(buffer, dim=0 if left else 1)
    scores = torch.linalg.vector_norm(coeffs, ord=1, dim=1 if left else 0)
    indices = top_indices(scores, rank)
    low = coeffs.index_select(0 if left else 1, indices)
    P = trion_columns(
        size, indices, _uses_q_columns(scorer, left, makhoul_left_as_reference), buffer.dtype, buffer.device, dct
    )
    buffer.add_(P @ low if left else low @ P.T, alpha=-(1 - momentum))
    return ns(low).to(buffer.dtype), indices


def trion_select(
    grad: Tensor, buffer: Tensor, rank: int, scorer: str = "matmul", *, dct: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The first half of ``trion_direction`` without touching the buffer's feedback: the ``rank`` best frequencies of
    ``buffer + grad`` (which the caller has already added) and their coefficients m. What one rank computes for a layer
    when the work is split over ranks; ``trion_feedback`` then runs on every rank."""
    left = is_left(buffer.shape)
    if scorer == "matmul":
        if dct is None:
            dct = trion_dct_matrix(min(buffer.shape), buffer.dtype, buffer.device)
        coeffs = dct @ buffer if left else buffer @ dct
    else:
        coeffs = dct2(buffer, dim=0 if left else 1)
    indices = top_indices(torch.linalg.vector_norm(coeffs, ord=1, dim=1 if left else 0), rank)
    return coeffs.index_select(0 if left else 1, indices), indices


def trion_feedback(
    buffer: Tensor, low: Tensor, indices: Tensor, momentum: float, scorer: str = "matmul", *, dct: Tensor | None = None
) -> None:
    """Dion's error feedback: (1 - momentum) of the used part ``low`` (on frequencies ``indices``) leaves the buffer."""
    left = is_left(buffer.shape)
    q_columns = _uses_q_columns(scorer, left, False)
    P = trion_columns(min(buffer.shape), indices, q_columns, buffer.dtype, buffer.device, dct)
    buffer.add_(P @ low if left else low @ P.T, alpha=-(1 - momentum))


def trion_map_back(
    ortho: Tensor,
    indices: Tensor,
    shape: Sequence[int],
    scorer: str = "matmul",
    *,
    dct: Tensor | None = None,
    makhoul_left_as_reference: bool = False,
) -> Tensor:
    """The full (m, n) update from a direction (r x n or m x r) and its frequency ``indices``."""
    left = is_left(tuple(shape))
    q_columns = _uses_q_columns(scorer, left, makhoul_left_as_reference)
    P = trion_columns(min(shape), indices, q_columns, ortho.dtype, ortho.device, dct)
    return P @ ortho if left else ortho @ P.T


def trion_apply(
    param: Tensor,
    ortho: Tensor,
    indices: Tensor,
    lr: float,
    weight_decay: float = 0.0,
    scaling: str = "kj",
    scorer: str = "matmul",
    *,
    dct: Tensor | None = None,
    makhoul_left_as_reference: bool = False,
) -> None:
    """``Trion.step``'s second half on one weight, in place: decoupled decay first, then the mapped-back direction:
    W <- (1 - lr * wd) W - lr * trion_scale(W.shape, scaling) * update."""
    scale = trion_scale(param.shape, scaling)
    update = trion_map_back(
        ortho, indices, param.shape, scorer, dct=dct, makhoul_left_as_reference=makhoul_left_as_reference
    )
    param.mul_(1 - lr * weight_decay).add_(update, alpha=-lr * scale)


def trion_update(
    param: Tensor,
    grad: Tensor,
    buffer: Tensor,
    rank: int,
    lr: float,
    momentum: float = 0.95,
    weight_decay: float = 0.0,
    scaling: str = "kj",
    scorer: str = "matmul",
    ns: NewtonSchulz | None = None,
    *,
    dct: Tensor | None = None,
    makhoul_left_as_reference: bool = False,
) -> tuple[Tensor, Tensor]:
    """The reference's Trion step for one ``use_muon`` weight: ``trion_direction`` then ``trion_apply``, ``param``
    and ``buffer`` updated in place. Returns the direction and its indices (what the reference all-gathers).
    Defaults as the reference's group: momentum 0.95, no decay (its lr default, 0.02, is the caller's to pass)."""
    trion_scale(param.shape, scaling)  # an unknown scaling fails before the buffer is touched
    _check(param.shape, rank, scorer)
    ortho, indices = trion_direction(
        grad, buffer, rank, momentum, scorer, ns, dct=dct, makhoul_left_as_reference=makhoul_left_as_reference
    )
    trion_apply(
        param,
        ortho,
        indices,
        lr,
        weight_decay,
        scaling,
        scorer,
        dct=dct,
        makhoul_left_as_reference=makhoul_left_as_reference,
    )
    return ortho, indices
