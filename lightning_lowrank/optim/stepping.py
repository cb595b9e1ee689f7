"""How ``ProjectedOptimizer.step()`` turns gradients into updates (``StepMixin``).

Dense parameters go through torch's own functional Adam(W) (foreach/fused) or one rule step each; projected layers
refresh when due (``refresh.py``), then step one at a time (``functional.py``) or, a group's plain Adam(W) layers,
together (``batched.py``). Per-layer state is created here, lazily, at a layer's first step. Before any of it, a step
whose gradients are not all finite is skipped or refused as ``nonfinite=`` says (``nonfinite.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from lightning_lowrank.optim import batched, functional, rules
from lightning_lowrank.optim.costs import projected_rule
from lightning_lowrank.optim.host_ints import advance, advance_all
from lightning_lowrank.optim.nonfinite import (
    finite_flag,
    first_nonfinite,
    parameter_label,
    raise_nonfinite,
    skipped_message,
    warn_once,
)
from lightning_lowrank.optim.options import state_dtype
from lightning_lowrank.optim.projection import effective_rank, projected_shape
from lightning_lowrank.optim.projectors import LayerContext
from lightning_lowrank.optim.sharding import all_ranks_finite, global_norm, is_sharded, local
from lightning_lowrank.optim.storage import init_rule_state, moment_chunks, moment_view, stateless, streams


class StepMixin:
    """The step of ``ProjectedOptimizer`` (which owns ``state``, the groups, the projectors and the refresh)."""

    @torch.no_grad()
    def _update(self) -> None:
        self.last_refreshes = {}
        if self.nonfinite != "ignore" and not self._gradients_finite():
            return
        projected: list[tuple[Tensor, dict[str, Any], LayerContext]] = []
        states: list[dict[str, Tensor]] = []
        index = -1
        for group in self.param_groups:
            dense = []
            for p, on in zip(group["params"], self._mask(group)):
                index += 1
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("lightning_lowrank optimizers do not support sparse gradients.")
                if on:
                    state = self.state[p]
                    if not state and self.memory_budget is None:
                        self._init_projected_state(p, group)
                    projected.append((p, group, self._context(index, p, group, state)))
                    states.append(state)
                else:
                    dense.append(p)
            self._dense_steps(dense, group)
        self._refresh([(p, g, ctx) for (p, g, ctx), s in zip(projected, states) if self._is_due(p, s, g, ctx.step)])
        # A group's layers step together where its rule allows (batched.py), the others one at a time.
        batches: dict[int, tuple[dict[str, Any], list[tuple[Tensor, LayerContext, dict[str, Tensor]]]]] = {}
        batchable: dict[int, bool] = {}
        for (p, group, ctx), state in zip(projected, states):
            key = id(group)
            if key not in batchable:
                batchable[key] = batched.can_batch(group, projected_rule(group))
            if batchable[key] and state["exp_avg"].dtype == p.dtype:
                batches.setdefault(key, (group, []))[1].append((p, ctx, state))
            else:
                self._projected_step(p, group, ctx)
        for group, layers in batches.values():
            self._projected_steps(group, layers)
        for (p, group, ctx), state in zip(projected, states):
            self._projectors[group["projector"]].after_update(p, p.grad, state, ctx)

    def _gradients_finite(self) -> bool:
        """Whether every gradient is finite: one flag over all of them and one read (``nonfinite.py``). When one is
        not, nothing is touched yet: ``nonfinite="raise"`` raises naming the first such parameter, ``"skip"`` counts
        the step (``nonfinite_steps``) and warns the first time. Pending refresh requests stay pending."""
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if any(p.grad.is_sparse for p in params):
            raise RuntimeError("lightning_lowrank optimizers do not support sparse gradients.")
        flag = finite_flag(local(p.grad) for p in params)
        if flag is None or bool(all_ranks_finite(flag, params)):  # FSDP2 shards: every rank must decide alike
            return True
        index = {p: i for i, p in enumerate(p for group in self.param_groups for p in group["params"])}
        labels = {p: parameter_label(p, index[p], self.param_names) for p in params}
        where, kind = first_nonfinite((labels[p], local(p.grad)) for p in params)
        if self.nonfinite == "raise":
            first = next(p for p in params if labels[p] == where)
            raise_nonfinite(where, kind, self.completed_steps(first) + 1)
        self.nonfinite_steps += 1
        warn_once(self, skipped_message(self.nonfinite_steps, where, kind))
        return False

    def _projected_steps(
        self, group: dict[str, Any], layers: list[tuple[Tensor, LayerContext, dict[str, Tensor]]]
    ) -> None:
        """Many projected layers of one group in one multi-tensor pass (``batched.py``)."""
        projector = self._projectors[group["projector"]]
        params = [p for p, _, _ in layers]
        states = [state for _, _, state in layers]
        Ps = [projector.matrix(p, state, ctx) for p, ctx, state in layers]
        if any(P.dtype != p.dtype for P, p in zip(Ps, params)):  # mixed precision: the single-layer path casts
            for p, ctx, _ in layers:
                self._projected_step(p, group, ctx)
            return
        steps = advance_all([s["step"] for s in states])
        grads = [local(p.grad) for p in params]
        batched.projected_adam([local(p) for p in params], Ps, states, steps, group, grads)

    def _projected_step(
        self, p: Tensor, group: dict[str, Any], ctx: LayerContext, low_rank: Tensor | None = None
    ) -> None:
        """Update a projected weight from its full gradient, or from ``low_rank`` when it arrives already projected
        (layer-wise accumulation, see ``functional.low_rank_update``). P and the moments are in the state dtype
        (``ctx.dtype``), which may be wider than the weight's (bf16 weights: float32)."""
        state, rule = self.state[p], projected_rule(group)
        P = self._projectors[group["projector"]].matrix(p, state, ctx)
        step = advance(state["step"])
        # A weight sharded by FSDP2 steps on its local rows; the residual limiter's norm sums over the ranks.
        norm = (lambda t: global_norm(t, p.grad)) if is_sharded(p) else None
        with self._moments(p, rule, group) as moments:
            if low_rank is None:
                functional.projected_update(local(p), local(p.grad), P, moments, state, group, rule, step, norm)
            else:
                functional.low_rank_update(p, low_rank, P, moments, group, rule, step)

    def _init_projected_state(self, param: Tensor, group: dict[str, Any], rank: int | None = None) -> None:
        """The inner rule's state for the projected gradient (at ``rank`` when the budget chose one), in the state
        dtype (``options.state_dtype``: float32 for bf16/fp16 weights unless ``state_dtype`` says otherwise)."""
        shape = projected_shape(param.shape, rank or group["rank"], group["side"])
        if is_sharded(param):  # its local rows: P (n x r) is replicated, the moments are sharded with the weight
            shape = (local(param).shape[0], effective_rank(param.shape, rank or group["rank"]))
        dtype = state_dtype(group, param.dtype)
        init_rule_state(self.state[param], projected_rule(group), shape, dtype, param.device, group)
        if rank is not None:
            self.state[param]["rank"] = torch.tensor(rank, dtype=torch.int64)

    def _projected_shape(self, param: Tensor, group: dict[str, Any]) -> tuple[int, int]:
        rank = self.layer_rank(param) if self.state[param] else group["rank"]
        return projected_shape(param.shape, rank, group["side"])

    def _dense_steps(self, params: list[Tensor], group: dict[str, Any]) -> None:
        """A group's dense parameters: torch's own Adam(W) or SGD over the whole list (its foreach or fused kernels)
        where the rule is torch's in full precision, else one ``_dense_step`` each."""
        if not params:
            return
        rule = group["rule"]
        # FSDP2's shards update their own rows (``local``: a view of the shard); state is keyed by the parameter.
        weights, grads = [local(p) for p in params], [local(p.grad) for p in params]
        if stateless(group):
            functional.dense_sgd(weights, grads, [{}] * len(params), [1] * len(params), group)
            return
        via_torch = rule == "sgd" or (rule == "adamw" and rules.adam_form(group) == "torch")
        if not via_torch or group["state_bits"] is not None:
            for p in params:
                self._dense_step(p, group)
            return
        states = [self.state[p] for p in params]
        for w, state in zip(weights, states):
            if not state:  # torch's kernels read the counters: fused/capturable ones on the device, as torch's
                init_rule_state(state, rule, tuple(w.shape), w.dtype, w.device, group, torch_kernel=rule == "adamw")
        if rule == "sgd":
            functional.dense_sgd(weights, grads, states, advance_all([s["step"] for s in states]), group)
        else:
            functional.dense_adam(weights, grads, states, group)

    def _dense_step(self, p: Tensor, group: dict[str, Any]) -> None:
        """One dense parameter by the group's rule. 8-bit buffers of an elementwise rule stream (``moment_chunks``): a
        chunk of the flattened weight, gradient and buffers at a time, so the full-precision transient of a large
        dense weight (an embedding, an LM head) is one chunk, not the tensor; the numbers are those of one piece."""
        state, rule = self.state[p], group["rule"]
        w, g = local(p), local(p.grad)  # an FSDP2 shard's own rows
        if stateless(group):
            functional.dense_sgd([w], [g], [{}], [1], group)
            return
        if not state:
            init_rule_state(state, rule, tuple(w.shape), w.dtype, w.device, group)
        step = advance(state["step"])
        if streams(state, rule) and w.is_contiguous():
            weight, grad = w.view(-1), g.reshape(-1)
            for chunk, moments in moment_chunks(state, rule, group, w.dtype):
                functional.dense_update(weight[chunk], grad[chunk], moments, group, rule, step)
            return
        with self._moments(p, rule, group) as moments:
            functional.dense_update(w, g, moments, group, rule, step)

    @contextmanager
    def _moments(self, param: Tensor, rule: str, group: dict[str, Any]) -> Iterator[dict[str, Tensor]]:
        """The whole buffers of ``param`` (``storage.moment_view``); 8-bit ones decoded into the dtype its moments
        are computed in: the state dtype for a projected weight, the weight's own for a dense one."""
        dtype = state_dtype(group, param.dtype) if self.is_projected(param) else param.dtype
        with moment_view(self.state[param], rule, group, dtype) as moments:
            yield moments
