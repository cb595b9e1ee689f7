"""Protected subspaces (Sculpting Subspaces, Nayak et al. 2025): updates confined to a weight's orthogonal complement.

For a weight W (m x n) with protected singular directions U (m x k) and V (n x k) (orthonormal columns, the top k of
W's SVD at the start of a task), every update is confined to the two-sided complement,

    dW <- (I - U Uᵀ) dW (I - V Vᵀ),

so Uᵀ W and W V, and with them W's top-k singular triples, stay as they were. As mini_trainer's OSFT does since its
issue 90, the *final* update is confined (after the inner rule and the decoupled weight decay), not only the gradient:
Adam's elementwise scaling would carry a confined gradient back into the protected subspace. ``confined`` takes the
update as W_after - W_before around one layer's update, so any rule, residual or low-rank state is confined alike.

Each side is stored as the smaller of its basis and the basis of its complement (``side_keys``: m - k < k keeps the
complement Q, and (I - U Uᵀ) X = Q Qᵀ X), in float32 (float64 for a float64 weight). Plain torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

# State keys, by side: the protected basis, or the basis of its complement when that is smaller.
LEFT, LEFT_COMPLEMENT, RIGHT, RIGHT_COMPLEMENT = "protect_u", "protect_u_perp", "protect_v", "protect_v_perp"
STATE_KEYS = {key: "protected_bases" for key in (LEFT, LEFT_COMPLEMENT, RIGHT, RIGHT_COMPLEMENT)}


def is_protected(state: dict[str, Tensor]) -> bool:
    return LEFT in state or LEFT_COMPLEMENT in state


def store_bases(state: dict[str, Tensor], weight: Tensor, U: Tensor, V: Tensor) -> None:
    """Keep ``weight``'s protected bases in ``state``, each side as the smaller of the basis and its complement."""
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
            Q = torch.linalg.qr(basis, mode="complete").Q
            state[complement_key] = Q[:, k:].contiguous()
        else:
            state[key] = basis.contiguous()


def drop(state: dict[str, Tensor]) -> None:
    for key in STATE_KEYS:
        state.pop(key, None)


def protected_rank(state: dict[str, Tensor], weight: Tensor) -> int:
    """k, the number of protected directions (0 when unprotected)."""
    if LEFT in state:
        return state[LEFT].shape[1]
    if LEFT_COMPLEMENT in state:
        return weight.shape[0] - state[LEFT_COMPLEMENT].shape[1]
    return 0


def confine(update: Tensor, state: dict[str, Tensor]) -> Tensor:
    """(I - U Uᵀ) update (I - V Vᵀ), in the bases' dtype."""
    X = update.to(_basis_dtype(state))
    if LEFT in state:
        U = state[LEFT]
        X = X - U @ (U.T @ X)
    else:
        Q = state[LEFT_COMPLEMENT]
        X = Q @ (Q.T @ X)
    if RIGHT in state:
        V = state[RIGHT]
        X = X - (X @ V) @ V.T
    else:
        Q = state[RIGHT_COMPLEMENT]
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


def _basis_dtype(state: dict[str, Tensor]) -> torch.dtype:
    return (state.get(LEFT) if LEFT in state else state[LEFT_COMPLEMENT]).dtype
