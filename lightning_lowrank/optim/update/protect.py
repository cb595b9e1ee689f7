"""Protected subspaces (Sculpting Subspaces, Nayak et al. 2025): updates confined to a weight's orthogonal complement.

For a weight W (m x n) with protected singular directions U (m x k) and V (n x k) (orthonormal columns, the top k of
W's SVD at the start of a task), every update is confined to the two-sided complement,

    dW <- (I - U Uᵀ) dW (I - V Vᵀ),

so Uᵀ W and W V, and with them W's top-k singular triples, stay as they were. As mini_trainer's OSFT does since its
issue 90, the *final* update is confined (after the inner rule and the decoupled weight decay), not only the gradient:
Adam's elementwise scaling would carry a confined gradient back into the protected subspace. ``confined`` takes the
update as W_after - W_before around one layer's update, so any rule, residual or low-rank state is confined alike.

Each side is stored as the smaller of its basis and the basis of its complement (m - k < k keeps the complement Q,
and (I - U Uᵀ) X = Q Qᵀ X), in float32 (float64 for a float64 weight), or with ``bits`` 8 or 4 as ``quantize``'s
group-wise codes, scale and zero (``key_codes``, ``key_scale``, ``key_zero``; k in ``protect_rank``, an int64 on the
CPU: the host reads it for the stored shape): 25.8% or 13.3% of float32's bytes in groups of 256.

Quantized bases are dequantized at each update and used in the same formulas, but they are only nearly orthonormal,
so the protection holds to within the quantization error, not exactly (re-orthonormalizing them at every step would
cost a QR per layer and step). The top-k singular values move at second order in that error, their subspace at first
order. Measured (``test_protect.py``: a 64 x 48 weight, k = 8, 20 AdamW steps, lr 1e-3), the largest relative change
of the top-k singular values: float32 bases 1.9e-8, 8 bits 1.9e-6, 4 bits 6.1e-4, unprotected 0.127; the sine of the
largest angle between the top-k subspaces: 7.9e-8, 1.0e-3, 1.4e-2, 0.132. Plain torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from lightning_lowrank.optim.state.host_ints import read_int
from lightning_lowrank.optim.state.quantize import dequantize, quantize

# State keys, by side: the protected basis, or the basis of its complement when that is smaller.
LEFT, LEFT_COMPLEMENT, RIGHT, RIGHT_COMPLEMENT = "protect_u", "protect_u_perp", "protect_v", "protect_v_perp"
SIDES = (LEFT, LEFT_COMPLEMENT, RIGHT, RIGHT_COMPLEMENT)
PARTS = ("codes", "scale", "zero")  # a quantized side ``key``: ``key_codes``, ``key_scale``, ``key_zero``
RANK = "protect_rank"  # k, with quantized sides (a float side's shape gives it); a host int (``host_ints.HOST_KEYS``)
STATE_KEYS = {key: "protected_bases" for key in (*SIDES, *(f"{s}_{part}" for s in SIDES for part in PARTS), RANK)}
BITS = (None, 8, 4)
GROUP_SIZE = 256  # elements per quantization group (scale and zero), as ``proj_group_size``'s default


def check_bits(bits: int | None, group_size: int = GROUP_SIZE) -> None:
    """Refuse a storage the bases cannot have, before any state is replaced."""
    if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS):
        raise ValueError(f"protect: bits must be one of None, 8, 4 (float, 8-bit or 4-bit bases), got {bits!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"protect: group_size must be an int >= 1, got {group_size!r}")


def is_protected(state: dict[str, Tensor]) -> bool:
    return LEFT in state or LEFT_COMPLEMENT in state or RANK in state


def store_bases(
    state: dict[str, Tensor],
    weight: Tensor,
    U: Tensor,
    V: Tensor,
    bits: int | None = None,
    group_size: int = GROUP_SIZE,
) -> None:
    """Keep ``weight``'s protected bases in ``state``, each side as the smaller of the basis and its complement, in
    full precision or quantized to ``bits`` (8 or 4) in groups of ``group_size`` elements."""
    check_bits(bits, group_size)
    m, n = weight.shape
    if U.ndim != 2 or V.ndim != 2 or U.shape[0] != m or V.shape[0] != n or U.shape[1] != V.shape[1]:
        raise ValueError(
            f"protect: a weight of shape {tuple(weight.shape)} takes U (m x k) and V (n x k) with the same k, "
            f"got U {tuple(U.shape)} and V {tuple(V.shape)}"
        )
    k = U.shape[1]
    if not 1 <= k <= min(m, n):
        raise ValueError(f"protect: k must be between 1 and min(m, n) = {min(m, n)}, got {k}")
    drop(state)
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    for basis, size, key, complement_key in ((U, m, LEFT, LEFT_COMPLEMENT), (V, n, RIGHT, RIGHT_COMPLEMENT)):
        basis = basis.to(device=weight.device, dtype=dtype)
        if size - k < k:  # the complement is smaller: its basis, from a full QR of the protected one
            key, basis = complement_key, torch.linalg.qr(basis, mode="complete").Q[:, k:]
        if bits is None:
            state[key] = basis.contiguous()
        else:
            state.update({f"{key}_{part}": t for part, t in quantize(basis, bits, group_size).items()})
    if bits is not None:
        state[RANK] = torch.tensor(k, dtype=torch.int64)  # on the CPU whatever the weight's device


def drop(state: dict[str, Tensor]) -> None:
    for key in STATE_KEYS:
        state.pop(key, None)


def protected_rank(state: dict[str, Tensor], weight: Tensor) -> int:
    """k, the number of protected directions (0 when unprotected)."""
    if RANK in state:
        return read_int(state[RANK])
    if LEFT in state:
        return state[LEFT].shape[1]
    if LEFT_COMPLEMENT in state:
        return weight.shape[0] - state[LEFT_COMPLEMENT].shape[1]
    return 0


def confine(update: Tensor, state: dict[str, Tensor]) -> Tensor:
    """(I - U Uᵀ) update (I - V Vᵀ), in the bases' dtype (quantized bases: dequantized to float32, float64 for a
    float64 update)."""
    m, n = update.shape
    k = protected_rank(state, update)
    dtype = torch.promote_types(update.dtype, torch.float32) if RANK in state else _basis_dtype(state)
    X = update.to(dtype)
    U = _basis(state, LEFT, (m, k), dtype)
    if U is not None:
        X = X - U @ (U.T @ X)
    else:
        Q = _basis(state, LEFT_COMPLEMENT, (m, m - k), dtype)
        X = Q @ (Q.T @ X)
    V = _basis(state, RIGHT, (n, k), dtype)
    if V is not None:
        X = X - (X @ V) @ V.T
    else:
        Q = _basis(state, RIGHT_COMPLEMENT, (n, n - k), dtype)
        X = (X @ Q) @ Q.T
    return X


@contextmanager
def confined(weight: Tensor, state: dict[str, Tensor]) -> Iterator[None]:
    """Confine whatever the block does to ``weight`` (a protected layer's whole update): a copy of the weight before,
    the difference after, confined and added back. The copy is one layer's, for the length of its update."""
    if not is_protected(state):
        yield
        return
    before = weight.detach().clone()
    yield
    change = confine(weight.detach() - before, state)
    weight.detach().copy_(before.to(change.dtype).add_(change))


def _basis(state: dict[str, Tensor], key: str, shape: tuple[int, int], dtype: torch.dtype) -> Tensor | None:
    """Side ``key`` as a matrix of ``shape`` (dequantized if kept in bits), None if the state keeps the other one."""
    if key in state:
        return state[key]
    q = {part: state.get(f"{key}_{part}") for part in PARTS}
    return None if q["codes"] is None else dequantize(q, shape, dtype)


def _basis_dtype(state: dict[str, Tensor]) -> torch.dtype:
    return (state.get(LEFT) if LEFT in state else state[LEFT_COMPLEMENT]).dtype
