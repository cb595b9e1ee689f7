"""``compile=`` (and ``torch.compile(optimizer.step)``): a projected layer's Adam(W) update as one compiled function.

What is compiled: ``adam_layer``, the math of the multi-tensor pass (``dispatch.projected_adam``) for one layer: the
gradient projected, Adam's moments, the direction projected back and added, weight decay in either Adam form. A
graph is the two matmuls and the elementwise work between them, which inductor fuses into a few kernels. It compiles
once per layer shape, dtype, device and projection side (``dynamic=False``), and never again as the step count, the
learning rate or the bias corrections change: every number that changes from step to step goes in as a tensor, as in
torch's ``capturable`` optimizers. Those numbers (``step_table``: the step size lr / (1 - beta1^t) or its ``hf``
form, sqrt(1 - beta2^t), the decoupled shrink 1 - lr * wd, the decay after the update, the L2 factor) are computed on
the host from the step counts it already holds (``host_ints``), one row per layer, and reach the device in one copy
per step; nothing reads the device. What stays a Python constant, so that changing it compiles again: the betas, eps,
the Adam form, whether decay is L2, the projection side (set once in practice).

Which layers: those of the multi-tensor pass (``dispatch.can_batch``: rule Adam(W), no residual, full-precision
moments), in any state dtype: a bf16 weight with float32 state has its gradient cast to float32 whole here (the eager
path casts it in slices, ``functional.project_gradient``). Everything else (residuals, 8-bit moments, SGD, Adafactor,
Subset-Norm, Sophia, and the dense parameters through torch's own Adam(W)) runs eagerly, as without ``compile``. The
numbers are the eager pass's up to rounding: the back-projection's add is a multiply and an add, not ``addmm_``
(``tests/optim/update/test_compile.py``).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_lowrank.optim.projection.bases import is_left
from lightning_lowrank.optim.update import rules

# Columns of a layer's row in the step table, padded to ROW columns so that every row starts 16-byte aligned (inductor
# assumes aligned inputs and copies a misaligned one first).
STEP_SIZE, CORRECTION2, SHRINK, DECAY, L2 = range(5)
ROW = 8


def adam_layer(
    p: Tensor,
    grad: Tensor,
    P: Tensor,
    m: Tensor,
    v: Tensor,
    row: Tensor,
    left: bool,
    beta1: float,
    beta2: float,
    eps: float,
    hf: bool,
    l2: bool,
) -> None:
    """One Adam(W) update of ``p`` through ``P`` (``row``: this layer's step-table row, on P's device)."""
    if l2:  # Adam's L2 penalty goes into the gradient before it is projected
        grad = grad + p * row[L2]
    grad = grad.to(P.dtype)
    low = P.T @ grad if left else grad @ P
    m.lerp_(low, 1 - beta1)
    v.mul_(beta2).addcmul_(low, low, value=1 - beta2)
    # hf: m / (sqrt(v) + eps), both bias corrections in the step size; torch: m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    direction = m / (v.sqrt() + eps if hf else v.sqrt() / row[CORRECTION2] + eps)
    back = P @ direction if left else direction @ P.T
    p.mul_(row[SHRINK]).add_(back * row[STEP_SIZE])
    if hf and not l2:  # transformers' AdamW decays after the update (its decoupled decay; DECAY is 0 without one)
        p.add_(p * row[DECAY])


def step_table(steps: Sequence[int], group: Mapping[str, Any], scale: float) -> list[list[float]]:
    """Per layer (``steps``: each one's 1-based update count), what changes from step to step, by the columns above:
    the signed step size times ``scale``, sqrt(1 - beta2^t), the decoupled shrink, the factor of the decay after the
    update and the L2 factor (each 1 or 0 where the group has no such decay)."""
    lr, wd = float(group["lr"]), group["weight_decay"]
    beta1, beta2 = group["betas"]
    hf = rules.adam_form(group) == "hf"
    after = rules.decays_after_update("adamw", group)
    decoupled = group["decoupled_weight_decay"]
    shrink = 1 - lr * wd if decoupled and not after else 1.0
    decay = -lr * wd if after else 0.0
    l2 = 0.0 if decoupled else wd
    rows = []
    for t in steps:
        correction2 = math.sqrt(1 - beta2**t)
        size = lr * correction2 / (1 - beta1**t) if hf else lr / (1 - beta1**t)
        rows.append([-size * scale, correction2, shrink, decay, l2] + [0.0] * (ROW - 5))
    return rows


def adam_layers(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    Ps: Sequence[Tensor],
    states: Sequence[dict[str, Tensor]],
    steps: Sequence[int],
    group: Mapping[str, Any],
    backend: bool | str,
) -> None:
    """``dispatch.projected_adam``'s update, one compiled ``adam_layer`` call per layer (``backend``: True for
    torch.compile's default, inductor, or a backend's name)."""
    rows = step_table(steps, group, group["scale"])
    tables: dict[tuple[torch.device, torch.dtype], Tensor] = {}
    for P in Ps:  # one host-to-device copy per device and dtype (non-blocking: the host table is pinned)
        key = (P.device, table_dtype(P.dtype))
        if key not in tables:
            host = torch.tensor(rows, dtype=key[1], pin_memory=P.device.type == "cuda")
            tables[key] = host.to(P.device, non_blocking=True)
    beta1, beta2 = group["betas"]
    hf, l2 = rules.adam_form(group) == "hf", not group["decoupled_weight_decay"]
    update = compiled(backend)
    from torch._dynamo.utils import disable_cache_limit  # the graphs are bounded by the layer shapes, not the steps

    with disable_cache_limit():
        for i, (p, g, P, s) in enumerate(zip(params, grads, Ps, states)):
            left = is_left(p.shape, group["side"])
            row = tables[(P.device, table_dtype(P.dtype))][i]
            update(p, g, P, s["exp_avg"], s["exp_avg_sq"], row, left, beta1, beta2, group["eps"], hf, l2)


def table_dtype(state_dtype: torch.dtype) -> torch.dtype:
    """The step table's dtype for a state dtype: float64 for float64, else float32 (a bf16 step size would be off by
    up to 0.4%; the eager path's are Python floats, which the kernels take in float32 for every narrower dtype)."""
    return torch.float64 if state_dtype == torch.float64 else torch.float32


_COMPILED: dict[str, Callable[..., None]] = {}


def compiled(backend: bool | str) -> Callable[..., None]:
    """``adam_layer`` under ``torch.compile`` with ``backend`` (True: inductor), built once per backend."""
    name = "inductor" if backend is True else str(backend)
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(adam_layer, backend=name, fullgraph=True, dynamic=False)
    return _COMPILED[name]


def eager_step(optimizer: Any, closure: Callable[[], Any] | None) -> Any:
    """``ProjectedOptimizer.step`` under ``torch.compile(optimizer.step)``: dynamo stops at the step (one graph break;
    the step reads host integers, refreshes with SVDs and keeps Python state), which runs eagerly as written, with
    its update compiled as by ``compile=`` (the optimizer's backend, else inductor). torch's step hooks have run in
    the traced wrapper; this calls the step itself."""
    step = inspect.unwrap(type(optimizer).step)
    chosen = optimizer.compile
    optimizer.compile = chosen or True
    try:
        return step(optimizer, closure)
    finally:
        optimizer.compile = chosen
