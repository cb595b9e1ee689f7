"""What happens to the part of the gradient outside the subspace, G - P P^T G.

GaLore drops it (``none``). The others turn a rank-r update into a full-rank one at no optimizer-state cost
beyond a scalar. Notation: R = projected gradient, D = the inner rule's direction for R (e.g. Adam's
m_hat / (sqrt(v_hat) + eps)), "channel" = each column of a wide weight (rows of a tall one), i.e. the axis the
projection keeps; norms over the rank axis give one factor per channel.

* ``frugal`` (FRUGAL, Zmushko et al. 2025): the residual gets a state-free step, signSGD (default) or SGD,
  at ``lr * residual_lr_scale``.
* ``fira`` (Fira, Chen et al.): the residual times phi = ||D||_channel / ||R||_channel (how much the inner rule
  rescaled that channel), with the norm-growth limiter: if ||S_t|| > gamma ||S_{t-1}||, S_t is scaled down to
  gamma ||S_{t-1}|| (gamma = ``limiter_gamma``, 1.01). As in Fira's code, ``scale`` multiplies only the projected
  part; the residual here is the true complement G - P P^T G (Fira's code subtracts alpha P P^T G).
* ``apollo`` (APOLLO, Zhu et al. 2025): the subspace only estimates scales; the update is the raw full gradient
  times phi per channel (``apollo_scale_type="channel"``) or one factor ||D||_F / ||R||_F (``"tensor"``,
  APOLLO-Mini, meant for rank 1), with the same limiter, and multiplied by sqrt(scale) (APOLLO's convention;
  APOLLO-Mini's recipe is scale=128).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_lowrank.optim.projection import is_left

RESIDUALS = ("none", "frugal", "fira", "apollo")
FRUGAL_RULES = ("signsgd", "sgd")
APOLLO_SCALE_TYPES = ("channel", "tensor")


def channel_ratio(direction: Tensor, low_rank: Tensor, full_shape: torch.Size, tensor_wise: bool = False) -> Tensor:
    """||D|| / ||R|| per channel (a (1, n) or (m, 1) tensor that broadcasts over the full weight), or one scalar."""
    if tensor_wise:
        return direction.norm() / (low_rank.norm() + 1e-8)
    dim = 0 if is_left(full_shape) else 1  # the rank axis
    return direction.norm(dim=dim, keepdim=True) / (low_rank.norm(dim=dim, keepdim=True) + 1e-8)


def limit_growth(update: Tensor, state: dict[str, Tensor], gamma: float) -> Tensor:
    """Fira's norm-growth limiter; keeps the last norm in ``state["residual_norm"]`` (a scalar tensor)."""
    norm = update.norm()
    previous = state.get("residual_norm")
    if previous is not None and previous > 0 and norm > gamma * previous:
        update = update * (gamma * previous / norm)
        norm = gamma * previous
    state["residual_norm"] = norm.detach().reshape(()).to(torch.float32)
    return update


def residual_update(
    kind: str,
    grad: Tensor,
    low_rank: Tensor,
    direction: Tensor,
    back: Tensor,
    state: dict[str, Tensor],
    group: dict[str, Any],
) -> tuple[Tensor | None, float]:
    """The full-size update to add besides the projected one, and the factor it is applied with relative to lr.

    ``back`` is P applied to ``low_rank`` (the part of ``grad`` inside the subspace). Returns (None, 0) for ``none``.
    For ``apollo`` the returned update replaces the projected one (see ``replaces_projected``).
    """
    if kind == "none":
        return None, 0.0
    if kind == "frugal":
        residual = grad - back
        step = residual.sign() if group["frugal_rule"] == "signsgd" else residual
        return step, group["residual_lr_scale"]
    tensor_wise = kind == "apollo" and group["apollo_scale_type"] == "tensor"
    phi = channel_ratio(direction, low_rank, grad.shape, tensor_wise=tensor_wise)
    if kind == "fira":
        return limit_growth((grad - back) * phi, state, group["limiter_gamma"]), 1.0
    if kind == "apollo":
        return limit_growth(grad * phi, state, group["limiter_gamma"]), 1.0
    raise ValueError(f"Unknown residual {kind!r}; choose one of {', '.join(RESIDUALS)}")


def replaces_projected(kind: str) -> bool:
    """APOLLO applies only its scaled full gradient; the others add to the projected update."""
    return kind == "apollo"
