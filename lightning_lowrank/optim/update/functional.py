"""One layer's update as plain functions over tensors: project, inner rule, residual, project back.

The optimizer (``dispatch.py`` picks this path or the multi-tensor one there), its layer-wise twin (``layerwise.py``)
and so the DDP comm hook all update a layer through these. ``moments`` is the rule's buffers (updated in place),
``state`` the layer's other tensors (the residual's last norm), ``step`` the update's 1-based count, known on the
host. Nothing here reads a device value.

P and the moments are in the layer's state dtype, which may differ from the weight's (bf16 weights keep float32 state
by default, ``storage.state_dtype``): the gradient is projected into the state dtype (``project_gradient``), the rule
runs there, and the update is projected back in it and rounded once into the weight (``add_projected_back``); neither
holds a float32 copy of a whole bf16 gradient. Residuals (``frugal``/``fira``/``apollo``) and Subset-Norm's complement
work on the full gradient by type promotion, so with a wider state they hold full-size transients in it (their
complement G - P P^T G is a difference of nearly equal numbers, which bf16 would cancel away), and each of their adds
rounds into the weight on its own, as before.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_lowrank.optim.projection.bases import is_left, project, project_back
from lightning_lowrank.optim.update import muon, rules, trion
from lightning_lowrank.optim.update.residuals import residual_update

# The most elements of a weight-sized tensor cast to a wider state dtype at once (``project_gradient``,
# ``add_projected_back``): 2^24, a 64 MiB float32 slice (a float32 copy of a 4096 x 11008 gradient is 180 MiB).
UPCAST_ELEMENTS = 1 << 24


def projected_update(
    p: Tensor,
    grad: Tensor,
    P: Tensor,
    moments: dict[str, Tensor],
    state: dict[str, Tensor],
    group: Mapping[str, Any],
    rule: str,
    step: int,
    norm: Callable[[Tensor], Tensor] | None = None,
    shape: torch.Size | None = None,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> None:
    """Update ``p`` with its full gradient ``grad`` through the subspace of ``P`` (and the group's residual).

    ``norm``: the Frobenius norm the residual's growth limiter takes (for the rows of a sharded weight, summed over
    the ranks: ``sharding.global_norm``); by default ``Tensor.norm``. ``shape``: the whole weight's where ``p`` is
    its rows (Muon's step size reads it); ``reduce``: sums over the ranks holding its other rows (Muon's
    Newton-Schulz, ``sharding.RowSum``)."""
    lr, scale, side = float(group["lr"]), group["scale"], group["side"]
    param_rms = rms(p) if rule == "adafactor" else 0.0
    grad = decay_before(p, grad, rule, group)
    low_rank = project_gradient(grad, P, side)
    direction, step_size = rules.direction(
        rule, low_rank, moments, step, group, param_rms, grad, shape or p.shape, reduce
    )
    if rule == "subset_norm":  # Subspace-Momentum: the complement takes an SGD step at the subset's rate
        complement = (grad - project_back(low_rank, P, p.shape, side)) * rules.subset_norm_scale(moments, group["eps"])
        add_scaled(p, project_back(direction, P, p.shape, side) + complement, step_size, -scale)
        return
    kind = group["residual"]
    back = project_back(low_rank, P, p.shape, side) if kind in ("frugal", "fira") else None  # apollo never reads it
    extra, factor = residual_update(kind, grad, low_rank, direction, back, state, group, norm)
    if kind == "apollo":  # the scaled raw gradient replaces the projected update
        add_scaled(p, extra, step_size, -math.sqrt(scale))
    else:
        add_projected_back(p, direction, P, step_size, -scale, side)
    if kind == "frugal":  # state-free: plain lr, no bias correction
        p.add_(extra, alpha=-lr * factor)
    elif kind == "fira":  # as in Fira's code: the bias-corrected step size, and scale only on the projected part
        add_scaled(p, extra, step_size, -1.0)
    decay_after(p, rule, group)


def trion_layer_update(
    p: Tensor, grad: Tensor, moments: dict[str, Tensor], group: Mapping[str, Any], rank: int, basis: Callable
) -> None:
    """Trion's step on one weight (``trion.py``), with the group's Muon settings: momentum, decoupled decay, its
    Newton-Schulz (torch's form: coefficients, steps, eps, ``ns_dtype``) and the lr factor of ``trion_scaling`` (by
    default the one of ``adjust_lr_fn``). ``basis(size, dtype, device)``: the shared DCT basis (its transpose is
    Trion's DCT-III matrix), used by ``dct_scorer="matmul"``; ``"fft"`` scores with Makhoul's FFT."""
    buffer = moments["momentum_buffer"]
    scaling, scorer, dct = trion_settings(p, buffer, group, basis)
    lr, wd = float(group["lr"]), group["weight_decay"]
    ns = trion_ns(group)
    trion.trion_update(p, grad.to(buffer.dtype), buffer, rank, lr, group["momentum"], wd, scaling, scorer, ns, dct=dct)


def trion_settings(p: Tensor, buffer: Tensor, group: Mapping[str, Any], basis: Callable) -> tuple[str, str, Any]:
    """(lr scaling, scorer, DCT-III matrix or None) of a Trion layer, from the group's options."""
    scaling = group["trion_scaling"] or ("kimi" if group["adjust_lr_fn"] == "match_rms_adamw" else "kj")
    matmul = group["dct_scorer"] == "matmul"
    dct = basis(min(p.shape), buffer.dtype, buffer.device).T if matmul else None
    return scaling, "matmul" if matmul else "makhoul", dct


def trion_ns(group: Mapping[str, Any]) -> Callable[[Tensor], Tensor]:
    """The group's Newton-Schulz (torch's form) as Trion's callable."""
    dtype = muon.NS_DTYPES[group["ns_dtype"]]
    return lambda X: muon.newton_schulz(X, group["ns_coefficients"], group["ns_steps"], group["eps"], dtype)


def low_rank_update(
    p: Tensor, low_rank: Tensor, P: Tensor, moments: dict[str, Tensor], group: Mapping[str, Any], rule: str, step: int
) -> None:
    """``projected_update`` for a gradient that arrives already projected (layer-wise accumulation, low-rank DDP).

    ``low_rank`` is P^T G (or G P), in any dtype (the DDP hook sends it in the gradient's): the rule reads it in the
    state dtype. Only for rules that need nothing of the full gradient at the update (``residual="none"``, no
    Subset-Norm). Adam's L2 penalty is projected on its own (P^T (G + wd W) = P^T G + wd P^T W).
    """
    scale, wd, side = group["scale"], group["weight_decay"], group["side"]
    param_rms = rms(p) if rule == "adafactor" else 0.0
    low_rank = low_rank.to(P.dtype)
    if wd != 0 and not group["decoupled_weight_decay"]:
        low_rank = low_rank.add(project_gradient(p, P, side), alpha=wd)
    else:
        decay_before(p, low_rank, rule, group)  # decoupled: shrinks p (unless it decays after the update)
    direction, step_size = rules.direction(rule, low_rank, moments, step, group, param_rms, shape=p.shape)
    add_projected_back(p, direction, P, step_size, -scale, side)
    decay_after(p, rule, group)


def project_gradient(grad: Tensor, P: Tensor, side: str = "auto") -> Tensor:
    """``project(grad, P, side)`` in P's dtype (the layer's state dtype), computed in the wider of the two dtypes.

    Same dtypes (every float32 or float64 run): ``project`` itself. A state narrower than the gradient: P (d x r) is
    cast up and the small result down. A wider state (bf16 weight, float32 state: the default): the gradient is cast
    up one slice of at most ``UPCAST_ELEMENTS`` at a time along the axis the projection keeps, so the result is the
    float32 product of the bf16 values (exact inputs, float32 sums) while the transient is that slice, not a float32
    copy of the whole gradient. Casting P down instead would save the slices but round P and then every entry of
    the result to bf16's 8 bits before the moments see it.
    """
    if grad.dtype == P.dtype:
        return project(grad, P, side)
    work = torch.promote_types(grad.dtype, P.dtype)
    if work == grad.dtype:
        return project(grad, P.to(work), side).to(P.dtype)
    left, wide = is_left(grad.shape, side), P.to(work)
    slices = _slices(grad, grad.shape, left)
    parts = [(wide.T @ g.to(work) if left else g.to(work) @ wide).to(P.dtype) for g in slices]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1 if left else 0)


def add_projected_back(
    p: Tensor, direction: Tensor, P: Tensor, step_size: float | Tensor, factor: float, side: str = "auto"
) -> None:
    """p += factor * step_size * project_back(direction, P), computed in the state dtype and rounded once into the
    weight's. With a state wider than the weight, slice by slice as ``project_gradient``: the (m, n) update is never
    held whole in float32 (as a bf16 update it would be half that size, but would round the update before the add).
    """
    if p.dtype == P.dtype == direction.dtype:
        add_scaled(p, project_back(direction, P, p.shape, side), step_size, factor)
        return
    work = torch.promote_types(p.dtype, P.dtype)
    if work == p.dtype:  # a state narrower than the weight: the update in the weight's dtype
        add_scaled(p, project_back(direction.to(work), P.to(work), p.shape, side), step_size, factor)
        return
    left, P, direction = is_left(p.shape, side), P.to(work), direction.to(work)
    for w, d in zip(_slices(p, p.shape, left), _slices(direction, p.shape, left)):
        add_scaled(w, P @ d if left else d @ P.T, step_size, factor)


def _slices(t: Tensor, full_shape: torch.Size, left: bool) -> tuple[Tensor, ...]:
    """Views of ``t`` (a weight-shaped or projected tensor of a weight of ``full_shape``) along the axis a projection
    keeps (columns on the left, rows on the right), each at most ``UPCAST_ELEMENTS`` elements of the full weight."""
    size = max(1, UPCAST_ELEMENTS // (full_shape[0] if left else full_shape[1]))
    return t.split(size, dim=1 if left else 0)


def dense_update(
    p: Tensor,
    grad: Tensor,
    moments: dict[str, Tensor],
    group: Mapping[str, Any],
    rule: str,
    step: int,
    shape: torch.Size | None = None,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> None:
    """The rule on the full gradient (what its torch optimizer does); ``shape`` and ``reduce`` as in
    ``projected_update``, for the rows of a sharded weight."""
    param_rms = rms(p) if rule == "adafactor" else 0.0
    grad = decay_before(p, grad, rule, group)
    direction, step_size = rules.direction(rule, grad, moments, step, group, param_rms, None, shape or p.shape, reduce)
    add_scaled(p, direction, step_size, -1.0)
    decay_after(p, rule, group)


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
