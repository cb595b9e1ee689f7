"""A step's updates, given what ``ProjectedOptimizer._init_group`` gathered: plain functions, no optimizer object.

As ``torch.optim.adam.adam`` picks ``_single_tensor_adam`` or ``_multi_tensor_adam`` in one place, ``update_layers``
picks, once per group, between the projected layers' multi-tensor pass (``projected_adam`` below) and one layer at a
time (``functional.projected_update``); ``update_dense`` runs a group's dense parameters through torch's own
functional Adam(W)/SGD (their foreach or fused kernels) where the rule is torch's in full precision, else one rule
step each, 8-bit buffers streamed chunk by chunk. Each projected layer's P is built once per step by the caller and
passed in, with its weight and gradient (an FSDP2 shard's own rows, ``sharding.local``).

The multi-tensor pass: ``functional.projected_update`` runs one layer at a time: per layer, a projection, about eight
elementwise kernels for Adam's moments, a back-projection and an add. With many small layers those launches (a GPU) or
per-op overheads (a CPU) dominate, as torch's ``_multi_tensor_adam`` exists to avoid. ``projected_adam`` updates the
moments of all of a group's projected layers with ``torch._foreach_*`` ops (a handful of launches however many
layers), and each layer's projection and back-projection are one matmul each (the back-projection fused with the add:
``addmm_``). Its math is ``rules.direction("adamw", ...)`` in both Adam forms, op for op
(``tests/optim/update/test_batched.py`` checks it against the single-layer path); only for what that path would do
with nothing but the subspace: rule Adam(W), no residual, no Subset-Norm or lazy Hessian, full-precision moments in
the weight's dtype (``can_batch``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.optim.adam import adam
from torch.optim.sgd import sgd

from lightning_lowrank.optim.distributed.sharding import RowSum, global_norm, is_sharded, local
from lightning_lowrank.optim.distributed.trion_ddp import trion_over_ranks
from lightning_lowrank.optim.projection.bases import effective_rank, is_left, projected_shape
from lightning_lowrank.optim.projection.projectors import LayerContext
from lightning_lowrank.optim.state.host_ints import advance, advance_all
from lightning_lowrank.optim.state.storage import (
    init_rule_state,
    moment_chunks,
    moment_view,
    state_dtype,
    stateless,
    streams,
)
from lightning_lowrank.optim.update import compiled, functional, protect, rules
from lightning_lowrank.optim.update.rules import projected_rule


def _whole(t: Tensor) -> Tensor:
    return t  # where no parameter is sharded: a tensor's rows are all of it


class Layer(NamedTuple):
    """One projected weight at this step: its state, what a projector may know of it, and its P (built once)."""

    param: Tensor
    state: dict[str, Tensor]
    ctx: LayerContext
    P: Tensor | None  # None for Trion's layers


def layers(
    projected: Sequence[tuple[Tensor, dict[str, Tensor], LayerContext]],
    Ps: Mapping[Tensor, Tensor],
    projector: Any,
    group: Mapping[str, Any],
) -> list[Layer]:
    """A group's projected layers at this step, each with its P: the one a refresh just built (``Ps``), else its
    projector's; none for Trion's, which choose their columns in the update."""
    if group["projected_rule"] == "trion":
        return [Layer(p, state, ctx, None) for p, state, ctx in projected]
    return [Layer(p, state, ctx, Ps[p] if p in Ps else projector.matrix(p, state, ctx)) for p, state, ctx in projected]


def init_projected_state(
    param: Tensor, state: dict[str, Tensor], group: dict[str, Any], rank: int | None = None
) -> None:
    """A projected layer's first state: the inner rule's buffers for its projected gradient (at ``rank`` when a budget
    chose one, kept in ``state["rank"]``), in the state dtype (``storage.state_dtype``: float32 for bf16/fp16 weights
    unless ``state_dtype`` says otherwise)."""
    shape = projected_shape(param.shape, rank or group["rank"], group["side"])
    if group["projected_rule"] == "trion":  # a whole buffer (``trion.py``)
        shape = tuple(param.shape)
    elif is_sharded(param):  # its local rows: P (n x r) is replicated, the moments are sharded with the weight
        shape = (local(param).shape[0], effective_rank(param.shape, rank or group["rank"]))
    init_rule_state(state, projected_rule(group), shape, state_dtype(group, param.dtype), param.device, group)
    if rank is not None:
        state["rank"] = torch.tensor(rank, dtype=torch.int64)


def update_layers(
    layers: Sequence[Layer],
    group: dict[str, Any],
    sharded: bool = True,
    compile: bool | str = False,
    protected: bool = True,
) -> int:
    """Update a group's projected layers: together where the rule allows (``can_batch``, and P and the
    moments in the weight's dtype), else one at a time; returns the bytes sent (FSDP2-sharded Muon layers).
    ``sharded=False``: no parameter is an FSDP2 DTensor (the optimizer knows), so none is looked into. ``compile``
    (the optimizer's option): those layers, in any state dtype, each through the compiled ``compiled.adam_layer``
    instead. ``protected=False``: no layer has protected bases
    (``protect.py``); those that have update one at a time, their update confined."""
    shard = layers[0].ctx.shard if layers else None
    if projected_rule(group) == "trion" and shard is not None and shard[1] > 1 and group["state_bits"] is None:
        return trion_over_ranks(layers, group, shard)  # the reference's split (``distributed/trion_ddp.py``)
    together = can_batch(group, projected_rule(group))
    guarded = {id(layer.param) for layer in layers if protected and protect.is_protected(layer.state)}
    batch = [
        layer
        for layer in layers
        if together
        and id(layer.param) not in guarded
        and layer.state["exp_avg"].dtype == layer.P.dtype == (layer.P if compile else layer.param).dtype
    ]
    in_batch, sent = {id(layer.param) for layer in batch}, 0
    for layer in layers:
        if id(layer.param) in guarded:
            with protect.confined(layer.param, layer.state):
                sent += update_layer(layer.param, layer.state, layer.P, group, sharded=sharded, ctx=layer.ctx)
        elif id(layer.param) not in in_batch:
            sent += update_layer(layer.param, layer.state, layer.P, group, sharded=sharded, ctx=layer.ctx)
    if batch:
        steps = advance_all([layer.state["step"] for layer in batch])
        rows = local if sharded else _whole
        params, grads = [rows(layer.param) for layer in batch], [rows(layer.param.grad) for layer in batch]
        Ps, states = [layer.P for layer in batch], [layer.state for layer in batch]
        if compile:
            compiled.adam_layers(params, grads, Ps, states, steps, group, compile)
        else:
            projected_adam(params, Ps, states, steps, group, grads)
    return sent


def update_layer(
    p: Tensor,
    state: dict[str, Tensor],
    P: Tensor,
    group: dict[str, Any],
    low_rank: Tensor | None = None,
    sharded: bool = True,
    ctx: LayerContext | None = None,
) -> int:
    """One projected weight from its full gradient, or from ``low_rank`` when it arrives already projected (layer-wise
    accumulation: ``functional.low_rank_update``). P and the moments are in the layer's state dtype. Trion's layers
    have no P (None) and take their rank and DCT basis from ``ctx``. Returns the bytes its Newton-Schulz sent (Muon
    on FSDP2 rows, ``sharding.RowSum``), else 0."""
    rule = projected_rule(group)
    step = advance(state["step"])
    # A weight sharded by FSDP2 steps on its local rows; the residual limiter's norm sums over the ranks.
    sharded = sharded and is_sharded(p)
    norm = (lambda t: global_norm(t, p.grad)) if sharded else None
    rows, reduce = (local, RowSum(p) if rule == "muon" else None) if sharded else (_whole, None)
    if rule == "trion":  # no P: the columns are chosen from the buffer now, the DCT basis is the shared one
        with moment_view(state, rule, group, state_dtype(group, p.dtype)) as moments:
            functional.trion_layer_update(p, p.grad, moments, group, ctx.rank, ctx.basis)
        return 0
    with moment_view(state, rule, group, P.dtype) as moments:
        if low_rank is None:
            functional.projected_update(
                rows(p), rows(p.grad), P, moments, state, group, rule, step, norm, p.shape, reduce
            )
        else:
            functional.low_rank_update(p, low_rank, P, moments, group, rule, step)
    return 0 if reduce is None else reduce.bytes


def update_dense(
    params: Sequence[Tensor],
    states: Sequence[dict[str, Tensor]],
    group: dict[str, Any],
    sharded: bool = True,
    protected: bool = True,
) -> None:
    """A group's dense parameters: torch's own Adam(W) or SGD over the whole list where the rule is torch's in full
    precision, else one ``update_dense_one`` each. Their state is created here at their first step. Those with
    protected bases (none when ``protected=False``) update one at a time, their update confined (``protect.py``)."""
    if protected and any(protect.is_protected(s) for s in states):
        plain = [(p, s) for p, s in zip(params, states) if not protect.is_protected(s)]
        _update_dense([p for p, _ in plain], [s for _, s in plain], group, sharded)
        for p, s in zip(params, states):
            if protect.is_protected(s):
                with protect.confined(p, s):
                    _update_dense([p], [s], group, sharded)
        return
    _update_dense(params, states, group, sharded)


def _update_dense(
    params: Sequence[Tensor], states: Sequence[dict[str, Tensor]], group: dict[str, Any], sharded: bool
) -> None:
    if not params:
        return
    rule = group["rule"]
    rows = local if sharded else _whole
    weights, grads = [rows(p) for p in params], [rows(p.grad) for p in params]
    if stateless(group):
        dense_sgd(weights, grads, [{}] * len(params), [1] * len(params), group)
        return
    via_torch = rule == "sgd" or (rule == "adamw" and rules.adam_form(group) == "torch")
    if not via_torch or group["state_bits"] is not None:
        for p, state in zip(params, states):
            update_dense_one(p, state, group, sharded)
        return
    for w, state in zip(weights, states):
        if "step" not in state:  # torch's kernels read the counters: fused/capturable ones on the device, as torch's
            init_rule_state(state, rule, tuple(w.shape), w.dtype, w.device, group, torch_kernel=rule == "adamw")
    if rule == "sgd":
        dense_sgd(weights, grads, states, advance_all([s["step"] for s in states]), group)
    else:
        dense_adam(weights, grads, states, group)


def update_dense_one(p: Tensor, state: dict[str, Tensor], group: dict[str, Any], sharded: bool = True) -> None:
    """One dense parameter by the group's rule. 8-bit buffers of an elementwise rule stream (``moment_chunks``): a
    chunk of the flattened weight, gradient and buffers at a time, so the full-precision transient of a large dense
    weight (an embedding, an LM head) is one chunk, not the tensor; the numbers are those of one piece."""
    rule = group["rule"]
    w, g = (local(p), local(p.grad)) if sharded else (p, p.grad)  # an FSDP2 shard's own rows
    if stateless(group):
        dense_sgd([w], [g], [{}], [1], group)
        return
    if "step" not in state:  # its first update (a state may hold protected bases before it)
        init_rule_state(state, rule, tuple(w.shape), w.dtype, w.device, group)
    step = advance(state["step"])
    if streams(state, rule) and w.is_contiguous():
        weight, grad = w.view(-1), g.reshape(-1)
        for chunk, moments in moment_chunks(state, rule, group, w.dtype):
            functional.dense_update(weight[chunk], grad[chunk], moments, group, rule, step)
        return
    reduce = RowSum(p) if rule == "muon" and sharded and is_sharded(p) else None  # a tall Muon weight's rows
    with moment_view(state, rule, group, w.dtype) as moments:
        functional.dense_update(w, g, moments, group, rule, step, p.shape, reduce)


def dense_adam(
    params: list[Tensor], grads: list[Tensor], states: list[dict[str, Tensor]], group: Mapping[str, Any]
) -> None:
    """torch's own functional Adam(W) over a list of dense parameters: its foreach or fused kernels, the user's
    ``foreach``/``fused``/``capturable`` choice, and step counters that it advances itself (on the CPU, or on the
    parameters' device for fused/capturable: ``storage.step_counter``)."""
    beta1, beta2 = group["betas"]
    adam(
        params,
        grads,
        [s["exp_avg"] for s in states],
        [s["exp_avg_sq"] for s in states],
        [],
        [s["step"] for s in states],
        foreach=group.get("foreach"),
        fused=group.get("fused"),
        capturable=bool(group.get("capturable", False)),
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


def dense_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Tensor]],
    steps: list[int],
    group: Mapping[str, Any],
) -> None:
    """torch's own functional SGD over a list of dense parameters (``steps``: each update's 1-based count). torch
    starts a momentum buffer as a copy of the first gradient: a buffer is handed over only from the second update."""
    momentum = group["momentum"]
    buffers = [s["momentum_buffer"] if momentum and t > 1 else None for s, t in zip(states, steps)]
    sgd(
        params,
        grads,
        buffers,
        foreach=group.get("foreach"),
        fused=group.get("fused"),
        weight_decay=group["weight_decay"],
        momentum=momentum,
        lr=group["lr"],
        dampening=group["dampening"],
        nesterov=group["nesterov"],
        maximize=False,
    )
    if momentum:
        for s, buffer in zip(states, buffers):
            s["momentum_buffer"] = buffer


# -- the multi-tensor pass ----------------------------------------------------------------------------------------

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
