"""What happens to the part of the gradient outside the subspace, G - P P^T G.

GaLore drops it (``none``). The others turn a rank-r update into a full-rank one at no optimizer-state cost
beyond a scalar. Notation: R = projected gradient, D = the inner rule's direction for R (e.g. Adam's
m_hat / (sqrt(v_hat) + eps)), "channel" = each column of a wide weight (rows of a tall one), i.e. the axis the
projection keeps; norms over the rank axis give one factor per channel.

* ``frugal`` (FRUGAL, Zmushko et al. 2025): the residual gets a state-free step, signSGD (default) or SGD,
  at ``lr * residual_lr_scale``.
* ``fira`` (Fira, Chen et al.; matches fira 1.0.2 ``FiraAdamW``): the residual G - alpha P P^T G times
  phi = ||D||_channel / (||R||_channel + 1e-8) (how much the inner rule rescaled that channel), then the norm-growth
  limiter (below), added to alpha P D; both parts take the bias-corrected step size. As in Fira's code, alpha
  (``scale``) multiplies the projected part, also inside the residual, which is the true complement only at alpha=1
  (``fira_complement="exact"`` subtracts P P^T G instead).
* ``apollo`` (APOLLO, Zhu et al. 2025; matches apollo-torch 1.0.3 ``APOLLOAdamW``): the subspace only estimates
  scales; the update is the raw full gradient times phi per channel (``apollo_scale_type="channel"``) or one factor
  ||D||_F / (||R||_F + 1e-8) (``"tensor"``, APOLLO-Mini, meant for rank 1), with the same limiter, multiplied by
  sqrt(scale) (APOLLO's convention; APOLLO-Mini's recipe is scale=128). Its projection is its own by default
  (``projector="gaussian"``: N(0, 1/r) entries, not orthonormal, so R keeps about the norm of G).

Both read D = m / (sqrt(v) + eps) without bias correction, as the reference code does: with the default
``adam_form`` they run transformers' Adam form (``rules.ADAM_FORMS``), whose bias corrections live in the step size.
The limiter is Fira's: with S_t the scaled residual, limiter = max(||S_t|| / (N_{t-1} + 1e-8), gamma) / gamma,
S_t <- S_t / limiter and N_t = ||S_t|| / limiter (gamma = ``limiter_gamma``, 1.01), all in tensors (no host read).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_lowrank.optim.projection.bases import is_left

RESIDUALS = ("none", "frugal", "fira", "apollo")
FRUGAL_RULES = ("signsgd", "sgd")
APOLLO_SCALE_TYPES = ("channel", "tensor")
# Fira's residual: "scaled" is its code's G - scale P P^T G; "exact" the complement G - P P^T G (the same at scale 1).
FIRA_COMPLEMENTS = ("scaled", "exact")
RESIDUAL_NORM = "residual_norm"  # the limiter's last norm, ``limit_growth``
# The state each residual keeps in ``state[p]``, with its kind (``state_layout``).
STATE_KEYS = {"none": {}, "frugal": {}, "fira": {RESIDUAL_NORM: "residual"}, "apollo": {RESIDUAL_NORM: "residual"}}


def channel_ratio(
    direction: Tensor, low_rank: Tensor, full_shape: torch.Size, tensor_wise: bool = False, side: str = "auto"
) -> Tensor:
    """||D|| / ||R|| per channel (a (1, n) or (m, 1) tensor that broadcasts over the full weight), or one scalar."""
    if tensor_wise:
        return direction.norm() / (low_rank.norm() + 1e-8)
    dim = 0 if is_left(full_shape, side) else 1  # the rank axis
    return direction.norm(dim=dim, keepdim=True) / (low_rank.norm(dim=dim, keepdim=True) + 1e-8)


def limit_growth(
    update: Tensor, state: dict[str, Tensor], gamma: float, norm_of: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """Fira's norm-growth limiter; keeps the last (limited) norm in ``state["residual_norm"]`` (a scalar tensor, at
    least float32 so a float64 run keeps float64). ``norm_of``: the Frobenius norm (over all ranks' rows for a
    sharded weight); by default ``Tensor.norm``."""
    norm = update.norm() if norm_of is None else norm_of(update)
    norm = norm.to(torch.promote_types(norm.dtype, torch.float32))
    previous = state.get(RESIDUAL_NORM)
    if previous is None:
        state[RESIDUAL_NORM] = norm.reshape(())
        return update
    limiter = torch.clamp(norm / (previous + 1e-8), min=gamma) / gamma
    state[RESIDUAL_NORM] = (norm / limiter).reshape(())
    return update / limiter.to(update.dtype)


def residual_update(
    kind: str,
    grad: Tensor,
    low_rank: Tensor,
    direction: Tensor,
    back: Tensor,
    state: dict[str, Tensor],
    group: dict[str, Any],
    norm_of: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor | None, float]:
    """The full-size update to add besides the projected one, and the factor it is applied with relative to lr.

    ``back`` is P applied to ``low_rank`` (the part of ``grad`` inside the subspace). Returns (None, 0) for ``none``.
    For ``apollo`` the returned update replaces the projected one (``functional.projected_update`` applies only it).
    """
    if kind == "none":
        return None, 0.0
    if kind == "frugal":
        residual = grad - back
        step = residual.sign() if group["frugal_rule"] == "signsgd" else residual
        return step, group["residual_lr_scale"]
    tensor_wise = kind == "apollo" and group["apollo_scale_type"] == "tensor"
    phi = channel_ratio(direction, low_rank, grad.shape, tensor_wise=tensor_wise, side=group["side"])
    if kind == "fira":
        alpha = group["scale"] if group["fira_complement"] == "scaled" else 1.0
        return limit_growth((grad - alpha * back) * phi, state, group["limiter_gamma"], norm_of), 1.0
    if kind == "apollo":
        return limit_growth(grad * phi, state, group["limiter_gamma"], norm_of), 1.0
    raise ValueError(f"Unknown residual {kind!r}; choose one of {', '.join(RESIDUALS)}")
