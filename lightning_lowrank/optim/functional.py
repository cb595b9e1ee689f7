"""Adam(W) update rules as plain functions over tensors.

``adamw_step_`` is the dense rule (same arithmetic as torch's single-tensor AdamW);
``projected_adamw_step_`` runs the same moments on a projected gradient and maps the normalized
update back (GaLore). Both update ``param`` and the moment buffers in place.
"""

from __future__ import annotations

import math

from torch import Tensor

from lightning_lowrank.optim.projection import project, project_back


def _adam_direction(
    grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int, beta1: float, beta2: float, eps: float
) -> tuple[Tensor, float]:
    """Update both moments with ``grad`` and return (m / denom, 1 / bias_correction1)."""
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    return exp_avg / denom, 1 / bias_correction1


def _weight_decay_(param: Tensor, grad: Tensor, lr: float, weight_decay: float, decoupled: bool) -> Tensor:
    """AdamW shrinks the weight in place; Adam adds an L2 term to the gradient (returned)."""
    if weight_decay == 0:
        return grad
    if decoupled:
        param.mul_(1 - lr * weight_decay)
        return grad
    return grad.add(param, alpha=weight_decay)


def adamw_step_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool = True,
) -> None:
    """One dense Adam step; ``decoupled=False`` gives Adam's L2 penalty instead of AdamW's decay."""
    grad = _weight_decay_(param, grad, lr, weight_decay, decoupled)
    direction, inv_bc1 = _adam_direction(grad, exp_avg, exp_avg_sq, step, beta1, beta2, eps)
    param.add_(direction, alpha=-lr * inv_bc1)


def projected_adamw_step_(
    param: Tensor,
    grad: Tensor,
    P: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    scale: float,
    decoupled: bool = True,
) -> None:
    """One Adam step in the subspace spanned by ``P``'s columns.

    The moments have the projected shape ((r, n) or (m, r)); the normalized update is mapped back
    to (m, n) and multiplied by ``scale`` (GaLore's alpha). Weight decay acts on the full weight.
    """
    grad = _weight_decay_(param, grad, lr, weight_decay, decoupled)
    low_rank = project(grad, P)
    direction, inv_bc1 = _adam_direction(low_rank, exp_avg, exp_avg_sq, step, beta1, beta2, eps)
    param.add_(project_back(direction, P, param.shape), alpha=-lr * inv_bc1 * scale)
