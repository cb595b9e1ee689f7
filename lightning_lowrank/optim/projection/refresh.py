"""When a projected layer's subspace is refreshed, and the refresh itself (``Refresher``, held by the optimizer).

By default a layer refreshes every ``update_gap`` of its own updates. A scheduler (the ``SubspaceRefresh`` callback)
can take that decision over with ``external_schedule()`` and ``request_refresh(params)``; the refresh itself always
runs inside ``step()``, on the final gradient. Under DDP, and for FSDP2's SVDs, each due layer is computed on one
rank and shared with the others: one collective per refresh step (``collectives.share_refreshes``). After a refresh
the moments are carried into the new basis (``change_basis``, ``move_moments``: also what a resume under another rank
or projector uses).

Host reads: a refresh reads the similarity of the old and new subspace (two scalars per layer, for the scheduler and
the report); an ordinary step reads nothing.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_lowrank.optim.budget.rank_budget import Placement, RankBudget
from lightning_lowrank.optim.distributed import sharding
from lightning_lowrank.optim.distributed.collectives import (
    SEEDED_PROJECTORS,
    Layout,
    check_layout,
    refresh_layout,
    share_refreshes,
)
from lightning_lowrank.optim.projection.bases import is_left, subspace_similarity
from lightning_lowrank.optim.projection.projectors import PROJECTOR_KEYS, LayerContext, Projector, projector_keys
from lightning_lowrank.optim.state.host_ints import read_int
from lightning_lowrank.optim.state.storage import moment_view
from lightning_lowrank.optim.update import protect, rules
from lightning_lowrank.optim.update.dispatch import init_projected_state
from lightning_lowrank.optim.update.rules import projected_rule


def has_subspace(state: dict[str, Tensor]) -> bool:
    """Whether a layer holds a subspace: some projector's declared state (``Projector.STATE_KEYS``)."""
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


class Refresher:
    """The refresh schedule (``update_gap``, or a scheduler's requests) and the refresh of the due layers.

    It keeps what a step's refreshes did (``last``), the requests, the process group refreshes are shared over and
    the bytes FSDP2 refreshes sent; everything else it is handed: the layers, their state, their projectors."""

    def __init__(self) -> None:
        self.requests: set[Tensor] | None = None  # None: fixed update_gap
        self.shard: tuple[int, int, Any] | None = None  # (rank, world_size, process group)
        self.last: dict[Tensor, RefreshInfo] = {}
        self.sharded_bytes = 0  # payload of the collectives of FSDP2-sharded layers' refreshes (``sharding.refresh``)

    def external_schedule(self) -> None:
        self.requests = set()

    def request(self, params: Iterable[Tensor]) -> None:
        if self.requests is None:
            self.external_schedule()
        self.requests.update(params)

    def shard_over(self, group: Any = None) -> None:
        self.shard = (dist.get_rank(group), dist.get_world_size(group), group)

    def is_due(self, param: Tensor, state: dict[str, Tensor], group: dict[str, Any], step: int | None = None) -> bool:
        """Whether ``param`` refreshes before its next update; ``step`` is its completed updates when the caller has
        already read them (one read of the counter per layer and step)."""
        if group["projected_rule"] == "trion":
            return False  # Trion chooses its columns at every update, in the step itself
        if not has_subspace(state):
            return True
        if self.requests is None:
            return (read_int(state["step"]) if step is None else step) % group["update_gap"] == 0
        return param in self.requests

    def refresh(
        self,
        due: list[tuple[Tensor, dict[str, Any], dict[str, Tensor], LayerContext]],
        projectors: dict[str, Projector],
        budget: tuple[RankBudget, Mapping[Tensor, dict[str, Tensor]], list[Placement]] | None = None,
        slots: list[int] | None = None,
        sharded: bool = True,
    ) -> dict[Tensor, Tensor]:
        """Refresh the due layers (param, group, state, ctx), carry their moments from their previous P (where they
        had one) into the new subspace, and return the new P of each, built once.

        ``budget``: (the ``RankBudget``, every layer's state, the optimizer's placements) under ``memory_budget``,
        which gives each due layer its rank first (and a layer first seen its state at that rank). Each layer is
        computed by every rank (seeded projectors, one process) or by one rank of its process group (``_owner``: the
        layer in slot i, by default its place in ``due``, on rank i % world), whose result the others receive in one
        collective per group (``collectives.share_refreshes``)."""
        if not due:  # an ordinary step
            return {}
        old = {}  # each layer's previous P (a loop: one call shallower than a comprehension)
        for p, g, s, ctx in due:
            if has_subspace(s):
                old[p] = projectors[g["projector"]].matrix(p, s, ctx)
        if budget is not None:
            rank_budget, states, placements = budget
            ranks = rank_budget.reallocate([(p, g, s) for p, g, s, _ in due], old, states, placements)
            for p, g, s, ctx in due:
                if "rank" not in s:
                    init_projected_state(p, s, g, ranks[p])
                s["rank"] = torch.tensor(ranks[p], dtype=torch.int64)
                ctx.rank = ranks[p]
        timers: dict[Tensor, RefreshTimer] = {}
        shared: dict[int, tuple[Any, int, Tensor, list[tuple[dict[str, Tensor], Layout, int]]]] = {}
        for slot, (p, group, state, ctx) in zip(slots if slots is not None else range(len(due)), due):
            projector = projectors[group["projector"]]
            on_shards = sharded and sharding.is_sharded(p)  # ``sharded=False``: the optimizer knows none is
            process_group, owner, rank = self._owner(p, projector.name, slot, on_shards)
            here = owner is None or owner == rank
            timer = RefreshTimer(p.device) if here else None
            if on_shards:  # FSDP2: every rank takes part in the collectives on the gradient
                self.sharded_bytes += sharding.refresh(projector, p, state, ctx, decompose=here)
            elif here:
                projector.refresh(p, refresh_gradient(p, group, state), state, ctx)
            if here:
                timers[p] = timer.stop()
            if owner is None:
                continue
            layout = refresh_layout(tuple(projector_keys(group)), ctx.dim(p), ctx.rank, ctx.dtype_for(p), group)
            if here:
                check_layout(state, layout, f"projector {projector.name!r}, layer {ctx.index}")
            else:  # keys of another storage (loaded from a checkpoint with other options) go, as the owner's do
                for key in PROJECTOR_KEYS.difference(k for k, _, _ in layout):
                    state.pop(key, None)
            shared.setdefault(id(process_group), (process_group, rank, p, []))[3].append((state, layout, owner))
        for process_group, rank, p, layers in shared.values():
            sent = share_refreshes(layers, rank, process_group, p.device)
            if sharded and sharding.is_sharded(p):
                self.sharded_bytes += sent
        new = {}
        for p, group, state, ctx in due:
            new[p] = projectors[group["projector"]].matrix(p, state, ctx)
            similarity, cosine = change_basis(p, group, state, old.get(p), new[p])
            leading = None if cosine is None else abs(cosine)
            self.last[p] = RefreshInfo(ctx.step, timers.get(p), similarity, leading, p in timers, leading_cosine=cosine)
            if self.requests is not None:
                self.requests.discard(p)
        return new

    def _owner(self, param: Tensor, projector: str, slot: int, on_shards: bool) -> tuple[Any, int | None, int]:
        """(process group, the group rank that computes this refresh or None for every rank, this rank in it).

        A refresh that reads the gradient is computed on one rank and received by the others: a decomposition
        (cuSOLVER's SVD, a QR) is not documented as bitwise reproducible between processes, and ranks with different
        P would update their rows (FSDP2) or their replicas (DDP) in different subspaces; sharing also splits the work.
        Every rank computes what is derived from a seed (``SEEDED_PROJECTORS``), and an FSDP2 DCT refresh, whose
        scores are all-reduced first."""
        if projector in SEEDED_PROJECTORS:
            return None, None, 0
        if on_shards:
            if projector not in sharding.DECOMPOSED:
                return None, None, 0
            group = sharding.process_group(param)
            return group, slot % dist.get_world_size(group), dist.get_rank(group)
        if self.shard is None or self.shard[1] == 1:
            return None, None, 0
        rank, world, group = self.shard
        return group, slot % world, rank


PROTECTED_KEYS = frozenset(protect.STATE_KEYS)


def refresh_gradient(p: Tensor, group: dict[str, Any], state: dict[str, Tensor]) -> Tensor:
    """The gradient a refresh chooses P from: ``p.grad``, or for a protected weight under
    ``protected_refresh="complement"`` its part in the protected complement (``protect.confine``)."""
    if group["protected_refresh"] == "complement" and not PROTECTED_KEYS.isdisjoint(state):  # no call: a plain test
        return protect.confine(p.grad, state).to(p.grad.dtype)
    return p.grad


def change_basis(
    p: Tensor, group: dict[str, Any], state: dict[str, Tensor], P_old: Tensor | None, P_new: Tensor
) -> tuple[float | None, float | None]:
    """Carry the moments into the new subspace; the subspace's similarity to the old one (None: first one)."""
    if P_old is None:
        return None, None
    # Dequantized and online-PCA matrices are only nearly orthonormal: those get orthonormalized.
    exact = group["projector"] not in ("online_pca", "gaussian") and group["projector_bits"] is None
    similarity, cosine = subspace_similarity(P_old, P_new, orthonormal=exact)
    rule = projected_rule(group)
    with moment_view(state, rule, group, P_new.dtype) as moments:
        left = is_left(p.shape, group["side"])
        keys, rank_keys = rules.MOMENT_KEYS[rule], rank_axis_keys(rule, left)
        move_moments(moments, keys, rank_keys, P_old, P_new, group["moments"], left)
    if group["moments"] == "reset" and "hessian_updates" in state:
        # h restarts: the next probe's diagonal is taken whole (bias-corrected) or as (1 - beta) of it
        state["hessian_updates"].zero_()
    return similarity, cosine


# -- moments across a change of subspace (a refresh) or of rank (``memory_budget``, a resume) --------------------

_META = torch.device("meta")


def move_moments(
    moments: dict[str, Tensor],
    keys: Iterable[str],
    rank_keys: Iterable[str],
    P_old: Tensor,
    P_new: Tensor,
    policy: str,
    left: bool,
) -> None:
    """Carry the rule's buffers ``keys`` across a change of basis (``rank_keys``: those with a rank axis).

    ``rotate`` maps first moments exactly into the new coordinates with R = P_old^T P_new (r_old x r_new). Second
    moments (and curvature diagonals) are per-coordinate, which no linear map carries exactly; they are mapped with
    R's elementwise square (v_new[j] = sum_i R_ij^2 v_old[i]), which keeps variances non-negative and is exact for
    (signed) permutations. ``keep`` leaves the coordinates alone (truncated, or padded with zeros, when the rank
    changed); ``reset`` zeroes every buffer. Per-channel buffers have no rank axis and are otherwise unaffected.
    """
    keys = [k for k in keys if k in moments]
    if policy == "reset":
        for key in keys:
            buffer = moments[key]
            if key in rank_keys:
                axis = 0 if left else buffer.dim() - 1
                moments[key] = buffer.new_zeros(with_size(buffer.shape, axis, P_new.shape[1]))
            else:
                buffer.zero_()
        return
    R = None
    for key in [k for k in keys if k in rank_keys]:
        buffer = moments[key]
        axis = 0 if left else buffer.dim() - 1
        if policy == "keep":
            moments[key] = resized(buffer, axis, P_new.shape[1])
            continue
        if R is None:
            work = torch.promote_types(P_old.dtype, torch.float32)  # half precision in float32, float64 kept
            R = P_old.T.to(work) @ P_new.to(work)
        M = (R if key in rules.FIRST_MOMENTS else R.pow(2)).to(buffer.dtype)
        moments[key] = M.T @ buffer if left else buffer @ M


def with_size(shape: torch.Size, axis: int, size: int) -> tuple[int, ...]:
    return tuple(size if i == axis else s for i, s in enumerate(shape))


def resized(buffer: Tensor, axis: int, size: int) -> Tensor:
    """The first ``size`` entries along ``axis``, zero-padded when growing; the buffer itself if unchanged."""
    if buffer.shape[axis] == size:
        return buffer
    if buffer.shape[axis] > size:
        return buffer.narrow(axis, 0, size).clone()
    out = buffer.new_zeros(with_size(buffer.shape, axis, size))
    out.narrow(axis, 0, buffer.shape[axis]).copy_(buffer)
    return out


@functools.cache  # asked at every refresh of every layer; the answer depends on the rule and the side only
def rank_axis_keys(rule: str, left: bool) -> frozenset[str]:
    """The rule's buffers that have an extent along the rank axis (the others are per channel).

    The rank axis is the first of R = P^T G (r, n) when P acts on the left and the last of R = G P (m, r) on the
    right, so the answer depends on the side: Adafactor's ``row_var`` carries the rank on the left, ``col_var`` on
    the right. Probed with two projected shapes of that side whose rank differs."""
    one, two = ((2, 7), (3, 7)) if left else ((7, 2), (7, 3))
    a, b = rules.init_state(rule, one, torch.float32, _META), rules.init_state(rule, two, torch.float32, _META)
    return frozenset(k for k in a if a[k].shape != b[k].shape)
