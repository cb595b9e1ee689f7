"""When a projected layer's subspace is refreshed, and the refresh itself (``RefreshMixin`` of the optimizer).

By default a layer refreshes every ``update_gap`` of its own updates. A scheduler (the ``SubspaceRefresh`` callback)
can take that decision over with ``external_schedule()`` and ``request_refresh(params)``; the refresh itself always
runs inside ``step()``, on the final gradient. Under DDP, and for FSDP2's SVDs, each due layer is computed on one
rank and shared with the others: one collective per refresh step (``collectives.share_refreshes``). After a refresh
the moments are carried into the new basis (``basis_change.py``).

Host reads: a refresh reads the similarity of the old and new subspace (two scalars per layer, for the scheduler and
the report); an ordinary step reads nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_lowrank.optim import rules, sharding
from lightning_lowrank.optim.basis_change import move_moments, rank_axis_keys
from lightning_lowrank.optim.collectives import (
    SEEDED_PROJECTORS,
    Layout,
    check_layout,
    refresh_layout,
    share_refreshes,
)
from lightning_lowrank.optim.costs import projected_rule
from lightning_lowrank.optim.host_ints import read_int
from lightning_lowrank.optim.projection import is_left, subspace_similarity
from lightning_lowrank.optim.projectors import PROJECTOR_KEYS, LayerContext


def has_subspace(state: dict[str, Tensor]) -> bool:
    """Whether a layer holds a subspace: some projector's declared state (``Projector.state_keys``)."""
    return not PROJECTOR_KEYS.isdisjoint(state)


class RefreshTimer:
    """Times one layer's refresh without stopping the device: wall clock on the CPU, a pair of CUDA events on a GPU,
    read (and so waited for) only when ``seconds`` is asked for, after the step."""

    def __init__(self, device: torch.device) -> None:
        self._events = None
        if device.type == "cuda":
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._events[0].record()
        self._start, self._seconds = time.perf_counter(), None

    def stop(self) -> RefreshTimer:
        if self._events is not None:
            self._events[1].record()
        else:
            self._seconds = time.perf_counter() - self._start
        return self

    @property
    def seconds(self) -> float:
        if self._seconds is None:
            self._events[1].synchronize()
            self._seconds = self._events[0].elapsed_time(self._events[1]) / 1e3
        return self._seconds


@dataclass(frozen=True)
class RefreshInfo:
    """What one refresh of one layer did (kept until the next ``step()``)."""

    step: int  # the layer's update count when it refreshed (0 = first subspace)
    timer: RefreshTimer | None  # this layer's refresh on this rank (None where another rank computed it)
    similarity: float | None  # mean squared cosine of principal angles to the previous subspace
    leading_similarity: float | None  # |cos| between the previous and new leading directions
    computed_here: bool  # False when another rank computed it (DDP sharding, an FSDP2 SVD)
    leading_cosine: float | None = None  # the same cosine signed, as Q-GaLore queues it

    @property
    def seconds(self) -> float:
        """Time of this layer's refresh on this rank (0 where another rank computed it); on a GPU, reading it waits
        for the refresh to finish."""
        return 0.0 if self.timer is None else self.timer.seconds


class RefreshMixin:
    """The refresh schedule and the refresh, for ``ProjectedOptimizer`` (which owns ``state`` and the projectors)."""

    _refresh_requests: set[Tensor] | None  # None: fixed update_gap
    _shard: tuple[int, int, Any] | None  # (rank, world_size, process group)
    sharded_refresh_bytes: int  # payload of the collectives of FSDP2-sharded layers' refreshes (``sharding.refresh``)
    last_refreshes: dict[Tensor, RefreshInfo]

    def external_schedule(self) -> None:
        """Refresh only layers passed to ``request_refresh`` (and layers without a subspace yet)."""
        self._refresh_requests = set()

    def request_refresh(self, params: Iterable[Tensor]) -> None:
        """Refresh these layers at their next update (a skipped AMP step leaves the request pending)."""
        if self._refresh_requests is None:
            self.external_schedule()
        self._refresh_requests.update(params)

    def shard_refreshes(self, group: Any = None) -> None:
        """Under torch.distributed: compute each due refresh on one rank (layer i on rank i % world), share it."""
        self._shard = (dist.get_rank(group), dist.get_world_size(group), group)

    def refreshes_at_next_step(self, param: Tensor) -> bool:
        """Whether the next ``step()`` refreshes ``param``'s subspace (read before the step: the counter has not moved,
        and a scheduler's requests for this step are in)."""
        _, group = self._locate(param)
        return self.is_projected(param) and self._is_due(param, self.state[param], group)

    def _is_due(self, param: Tensor, state: dict[str, Tensor], group: dict[str, Any], step: int | None = None) -> bool:
        """Whether ``param`` refreshes before its next update; ``step`` is its completed updates when the caller has
        already read them (one read of the counter per layer and step)."""
        if not has_subspace(state):
            return True
        if self._refresh_requests is None:
            return (read_int(state["step"]) if step is None else step) % group["update_gap"] == 0
        return param in self._refresh_requests

    def _refresh(self, due: list[tuple[Tensor, dict[str, Any], LayerContext]], slots: list[int] | None = None) -> None:
        """Refresh the due layers, then fix the moments.

        Each layer is computed by every rank (seeded projectors, one process) or by one rank of its process group
        (``_refresh_owner``: the layer in slot i, by default its place in ``due``, on rank i % world), whose result
        the others receive in one collective per group (``collectives.share_refreshes``)."""
        if not due:  # an ordinary step: nothing to refresh, no ranks to reallocate
            return
        old = {
            p: self._projectors[group["projector"]].matrix(p, self.state[p], ctx)
            for p, group, ctx in due
            if has_subspace(self.state[p])
        }
        if self.memory_budget is not None:
            self._reallocate(due, old)
        timers: dict[Tensor, RefreshTimer] = {}
        shared: dict[int, tuple[Any, int, Tensor, list[tuple[dict[str, Tensor], Layout, int]]]] = {}
        for slot, (p, group, ctx) in zip(slots if slots is not None else range(len(due)), due):
            projector, state = self._projectors[group["projector"]], self.state[p]
            process_group, owner, rank = self._refresh_owner(p, projector.name, slot)
            here = owner is None or owner == rank
            timer = RefreshTimer(p.device) if here else None
            if sharding.is_sharded(p):  # FSDP2: every rank takes part in the collectives on the gradient
                self.sharded_refresh_bytes += sharding.refresh(projector, p, state, ctx, decompose=here)
            elif here:
                projector.refresh(p, p.grad, state, ctx)
            if here:
                timers[p] = timer.stop()
            if owner is None:
                continue
            bits = group["projector_bits"] is not None and projector.quantized_keys is not None
            keys = projector.quantized_keys if bits else projector.state_keys
            layout = refresh_layout(keys, ctx.dim(p), ctx.rank, ctx.dtype_for(p), group)
            if here:
                check_layout(state, layout, f"projector {projector.name!r}, layer {ctx.index}")
            else:  # keys of another storage (loaded from a checkpoint with other options) go, as the owner's do
                for key in PROJECTOR_KEYS.difference(k for k, _, _ in layout):
                    state.pop(key, None)
            shared.setdefault(id(process_group), (process_group, rank, p, []))[3].append((state, layout, owner))
        for process_group, rank, p, layers in shared.values():
            sent = share_refreshes(layers, rank, process_group, p.device)
            if sharding.is_sharded(p):
                self.sharded_refresh_bytes += sent
        for p, group, ctx in due:
            similarity, cosine = self._change_basis(p, group, ctx, old.get(p))
            leading = None if cosine is None else abs(cosine)
            self.last_refreshes[p] = RefreshInfo(
                ctx.step, timers.get(p), similarity, leading, p in timers, leading_cosine=cosine
            )
            if self._refresh_requests is not None:
                self._refresh_requests.discard(p)

    def _refresh_owner(self, param: Tensor, projector: str, slot: int) -> tuple[Any, int | None, int]:
        """(process group, the group rank that computes this refresh or None for every rank, this rank in it).

        A refresh that reads the gradient is computed on one rank and received by the others: a decomposition
        (cuSOLVER's SVD, a QR) is not documented as bitwise reproducible between processes, and ranks with different
        P would update their rows (FSDP2) or their replicas (DDP) in different subspaces; sharing also splits the work.
        Every rank computes what is derived from a seed (``SEEDED_PROJECTORS``), and an FSDP2 DCT refresh, whose
        scores are all-reduced first."""
        if projector in SEEDED_PROJECTORS:
            return None, None, 0
        if sharding.is_sharded(param):
            if projector not in sharding.DECOMPOSED:
                return None, None, 0
            group = sharding.process_group(param)
            return group, slot % dist.get_world_size(group), dist.get_rank(group)
        if self._shard is None or self._shard[1] == 1:
            return None, None, 0
        rank, world, group = self._shard
        return group, slot % world, rank

    def _change_basis(
        self, p: Tensor, group: dict[str, Any], ctx: LayerContext, P_old: Tensor | None
    ) -> tuple[float | None, float | None]:
        """Carry the moments into the new subspace; the subspace's similarity to the old one (None: first one)."""
        if P_old is None:
            return None, None
        state = self.state[p]
        P_new = self._projectors[group["projector"]].matrix(p, state, ctx)
        # Dequantized and online-PCA matrices are only nearly orthonormal: those get orthonormalized.
        exact = group["projector"] not in ("online_pca", "gaussian") and group["projector_bits"] is None
        similarity, cosine = subspace_similarity(P_old, P_new, orthonormal=exact)
        rule = projected_rule(group)
        with self._moments(p, rule, group) as moments:
            left = is_left(p.shape, group["side"])
            keys, rank_keys = rules.MOMENT_KEYS[rule], rank_axis_keys(rule, left)
            move_moments(moments, keys, rank_keys, P_old, P_new, group["moments"], left)
        if group["moments"] == "reset" and "hessian_updates" in state:
            # h restarts: the next probe's diagonal is taken whole (bias-corrected) or as (1 - beta) of it
            state["hessian_updates"].zero_()
        return similarity, cosine
