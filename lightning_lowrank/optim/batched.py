"""Many projected Adam(W) layers in one pass: the multi-tensor twin of ``functional.projected_update``.

``functional.projected_update`` runs one layer at a time: per layer, a projection, about eight elementwise kernels
for Adam's moments, a back-projection and an add. With many small layers those launches (a GPU) or per-op overheads
(a CPU) dominate, as torch's ``_multi_tensor_adam`` exists to avoid. Here the moments of all of a param group's
projected layers are updated with ``torch._foreach_*`` ops (a handful of launches however many layers), and each
layer's projection and back-projection are one matmul each (the back-projection fused with the add: ``addmm_``).

The math is ``rules.direction("adamw", ...)`` in both Adam forms, op for op; ``tests/test_batched.py`` checks it
against the single-layer path. Only what that path would do with nothing but the subspace: rule Adam(W), no residual,
no Subset-Norm or lazy Hessian, full-precision moments in the weight's dtype (``can_batch``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_lowrank.optim import rules
from lightning_lowrank.optim.projection import is_left

CHUNK_ELEMENTS = 2**21  # projected-gradient elements per multi-tensor run: bounds its temporaries to a few 8 MiB


def can_batch(group: Mapping[str, Any], rule: str) -> bool:
    """Whether a group's projected layers may step together (per group: every layer in it shares these)."""
    return rule == "adamw" and group["residual"] == "none" and group["state_bits"] is None


def projected_adam(
    params: Sequence[Tensor],
    Ps: Sequence[Tensor],
    states: Sequence[dict[str, Tensor]],
    steps: Sequence[int],
    group: Mapping[str, Any],
    grads: Sequence[Tensor] | None = None,
) -> None:
    """One Adam(W) update of every layer in ``params`` through its ``P`` (``steps``: each update's 1-based count).

    Equals ``functional.projected_update(p, p.grad, P, state, state, group, "adamw", step)`` for each layer. The
    layers go in runs of at most ``CHUNK_ELEMENTS`` projected-gradient elements: a multi-tensor op holds its
    temporaries (projected gradients, denominators, directions) for every layer of a run at once. ``grads``: the
    gradients when they are not ``p.grad`` (an FSDP2 shard's local rows)."""
    grads = [p.grad for p in params] if grads is None else list(grads)
    start, size = 0, 0
    for i, (p, P) in enumerate(zip(params, Ps)):
        size += P.shape[1] * max(p.shape)
        if size > CHUNK_ELEMENTS and i > start:
            _projected_adam(params[start:i], Ps[start:i], states[start:i], steps[start:i], group, grads[start:i])
            start, size = i, P.shape[1] * max(p.shape)
    _projected_adam(params[start:], Ps[start:], states[start:], steps[start:], group, grads[start:])


def _projected_adam(
    params: Sequence[Tensor],
    Ps: Sequence[Tensor],
    states: Sequence[dict[str, Tensor]],
    steps: Sequence[int],
    group: Mapping[str, Any],
    grads: Sequence[Tensor],
) -> None:
    lr, wd, scale, eps = float(group["lr"]), group["weight_decay"], group["scale"], group["eps"]
    beta1, beta2 = group["betas"]
    hf = rules.adam_form(group) == "hf"
    decay_after = rules.decays_after_update("adamw", group)
    shrink = 1.0  # torch's decoupled decay, p *= 1 - lr * wd, fused into the back-projection's addmm_ (beta)
    if wd != 0 and not decay_after:
        if group["decoupled_weight_decay"]:
            shrink = 1 - lr * wd
        else:  # Adam's L2 penalty goes into the gradient before it is projected
            grads = torch._foreach_add(grads, params, alpha=wd)
    lefts = [is_left(p.shape, group["side"]) for p in params]
    low = [P.T @ g if left else g @ P for g, P, left in zip(grads, Ps, lefts)]
    m = [s["exp_avg"] for s in states]
    v = [s["exp_avg_sq"] for s in states]
    torch._foreach_lerp_(m, low, 1 - beta1)
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, low, low, value=1 - beta2)
    denom = torch._foreach_sqrt(v)
    if hf:  # m / (sqrt(v) + eps), both bias corrections in the step size
        torch._foreach_add_(denom, eps)
        sizes = [lr * math.sqrt(1 - beta2**t) / (1 - beta1**t) for t in steps]
    else:  # m / (sqrt(v) / sqrt(1 - beta2^t) + eps), step size lr / (1 - beta1^t)
        torch._foreach_div_(denom, [math.sqrt(1 - beta2**t) for t in steps])
        torch._foreach_add_(denom, eps)
        sizes = [lr / (1 - beta1**t) for t in steps]
    directions = torch._foreach_div(m, denom)
    for p, P, d, left, size in zip(params, Ps, directions, lefts, sizes):
        if left:
            p.addmm_(P, d, beta=shrink, alpha=-size * scale)
        else:
            p.addmm_(d, P.T, beta=shrink, alpha=-size * scale)
    if decay_after and wd != 0:  # transformers' AdamW decays after the update
        torch._foreach_add_(params, params, alpha=-lr * wd)
