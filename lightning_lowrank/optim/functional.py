"""One layer's update as plain functions over tensors: project, inner rule, residual, project back.

The optimizer (``projected.py``), its layer-wise twin (``layerwise.py``) and so the DDP comm hook all update a layer
through these. ``moments`` is the rule's buffers (updated in place), ``state`` the layer's other tensors (the
residual's last norm), ``step`` the update's 1-based count, known on the host. Nothing here reads a device value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim.adam import adam

from lightning_lowrank.optim import rules
from lightning_lowrank.optim.projection import project, project_back
from lightning_lowrank.optim.residuals import residual_update


def projected_update(
    p: Tensor,
    grad: Tensor,
    P: Tensor,
    moments: dict[str, Tensor],
    state: dict[str, Tensor],
    group: Mapping[str, Any],
    rule: str,
    step: int,
) -> None:
    """Update ``p`` with its full gradient ``grad`` through the subspace of ``P`` (and the group's residual)."""
    lr, scale = float(group["lr"]), group["scale"]
    param_rms = rms(p) if rule == "adafactor" else 0.0
    grad = decay_before(p, grad, rule, group)
    low_rank = project(grad, P)
    direction, step_size = rules.direction(rule, low_rank, moments, step, group, param_rms, full_grad=grad)
    if rule == "subset_norm":  # Subspace-Momentum: the complement takes an SGD step at the subset's rate
        complement = (grad - project_back(low_rank, P, p.shape)) * rules.subset_norm_scale(moments, group["eps"])
        add_scaled(p, project_back(direction, P, p.shape) + complement, step_size, -scale)
        return
    kind = group["residual"]
    back = project_back(low_rank, P, p.shape) if kind in ("frugal", "fira") else None  # apollo never reads it
    extra, factor = residual_update(kind, grad, low_rank, direction, back, state, group)
    if kind == "apollo":  # the scaled raw gradient replaces the projected update
        add_scaled(p, extra, step_size, -math.sqrt(scale))
    else:
        add_scaled(p, project_back(direction, P, p.shape), step_size, -scale)
    if kind == "frugal":  # state-free: plain lr, no bias correction
        p.add_(extra, alpha=-lr * factor)
    elif kind == "fira":  # as in Fira's code: the bias-corrected step size, and scale only on the projected part
        add_scaled(p, extra, step_size, -1.0)
    decay_after(p, rule, group)


def low_rank_update(
    p: Tensor, low_rank: Tensor, P: Tensor, moments: dict[str, Tensor], group: Mapping[str, Any], rule: str, step: int
) -> None:
    """``projected_update`` for a gradient that arrives already projected (layer-wise accumulation, low-rank DDP).

    ``low_rank`` is P^T G (or G P): only for rules that need nothing of the full gradient at the update
    (``residual="none"``, no Subset-Norm). Adam's L2 penalty is projected on its own (P^T (G + wd W) = P^T G +
    wd P^T W).
    """
    scale, wd = group["scale"], group["weight_decay"]
    param_rms = rms(p) if rule == "adafactor" else 0.0
    if wd != 0 and not group["decoupled_weight_decay"]:
        low_rank = low_rank.add(project(p, P), alpha=wd)
    else:
        decay_before(p, low_rank, rule, group)  # decoupled: shrinks p (unless it decays after the update)
    direction, step_size = rules.direction(rule, low_rank, moments, step, group, param_rms)
    add_scaled(p, project_back(direction, P, p.shape), step_size, -scale)
    decay_after(p, rule, group)


def dense_update(
    p: Tensor, grad: Tensor, moments: dict[str, Tensor], group: Mapping[str, Any], rule: str, step: int
) -> None:
    """The rule on the full gradient (what its torch optimizer does)."""
    param_rms = rms(p) if rule == "adafactor" else 0.0
    grad = decay_before(p, grad, rule, group)
    direction, step_size = rules.direction(rule, grad, moments, step, group, param_rms)
    add_scaled(p, direction, step_size, -1.0)
    decay_after(p, rule, group)


def dense_adam(params: list[Tensor], states: list[dict[str, Tensor]], group: Mapping[str, Any]) -> None:
    """torch's own functional Adam(W) over a list of dense parameters: its foreach or fused kernels, the user's
    ``foreach``/``fused`` choice, and CPU step counters that it advances itself."""
    beta1, beta2 = group["betas"]
    adam(
        params,
        [p.grad for p in params],
        [s["exp_avg"] for s in states],
        [s["exp_avg_sq"] for s in states],
        [],
        [s["step"] for s in states],
        foreach=group.get("foreach"),
        fused=group.get("fused"),
        has_complex=any(torch.is_complex(p) for p in params),
        decoupled_weight_decay=group["decoupled_weight_decay"],
        amsgrad=False,
        beta1=beta1,
        beta2=beta2,
        lr=group["lr"],
        weight_decay=group["weight_decay"],
        eps=group["eps"],
        maximize=False,
    )


def decay_before(p: Tensor, grad: Tensor, rule: str, group: Mapping[str, Any]) -> Tensor:
    """Weight decay applied before the update: L2 into the gradient, or torch's decoupled shrink of the weight."""
    if rules.decays_after_update(rule, group):
        return grad
    return rules.weight_decay_(p, grad, float(group["lr"]), group["weight_decay"], group["decoupled_weight_decay"])


def decay_after(p: Tensor, rule: str, group: Mapping[str, Any]) -> None:
    """transformers' AdamW (``adam_form="hf"``: GaLore, Fira, APOLLO) decays the weight after the update."""
    if rules.decays_after_update(rule, group) and group["weight_decay"] != 0:
        p.add_(p, alpha=-float(group["lr"]) * group["weight_decay"])


def rms(t: Tensor) -> Tensor:
    """RMS of a weight as a 0-d tensor on its device (Adafactor's relative step; no host read)."""
    return t.norm(2) / math.sqrt(t.numel())


def add_scaled(p: Tensor, update: Tensor, step_size: float | Tensor, factor: float) -> None:
    """p += factor * step_size * update, with a step size that is a Python number or a 0-d device tensor
    (Adafactor's, computed without reading the device)."""
    if isinstance(step_size, Tensor):
        p.addcmul_(update, (step_size * factor).to(update.dtype))
    else:
        p.add_(update, alpha=step_size * factor)
