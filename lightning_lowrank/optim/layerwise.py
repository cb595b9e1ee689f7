"""Layer-wise updates (GaLore's per-layer weight update): each weight steps during backward, in its own
post-accumulate-grad hook, and its full gradient is freed right away, so full gradients never all exist at once.

``LayerwiseProjectedOptimizer`` is a ``ProjectedOptimizer`` whose work happens in hooks (``attach()`` registers them).
The contract with the caller (Lightning's automatic optimization follows it):

* A backward run inside ``step(closure)`` is the *final* micro-batch of an accumulation window: every parameter
  updates in its hook as soon as its gradient is complete, then ``p.grad = None``. ``step`` itself only does
  bookkeeping afterwards (it updates any parameter that got a gradient in this window but none in the final
  backward), so Lightning's and the LR scheduler's calls to ``step`` never update twice.
* A backward run outside ``step`` (Lightning's non-final micro-batches under ``accumulate_grad_batches``)
  accumulates. A projected weight projects its gradient into its current subspace and adds it to an (r, n) or
  (m, r) buffer, ``state["lowrank_grad"]``, then frees the full gradient; the final update uses buffer + projected
  last gradient (projection is linear: the sum of projections is the projection of the sum). The buffer exists
  only inside a window (it is gone at every step boundary, where checkpoints are taken).

Exceptions, which keep their full gradient accumulated over the window (in ``.grad``, as without layer-wise mode)
and update from it in their final hook:

* a layer due to refresh at the end of this window (and a layer without a subspace yet): a new subspace is chosen
  from the full accumulated gradient, exactly as without layer-wise mode. The decision is taken when the layer's
  first gradient of the window arrives. Under a fixed ``update_gap`` it cannot change within a window; a refresh
  that a scheduler (``request_refresh``) asks for in the middle of a window for a layer that is already
  accumulating in low rank stays pending until the next window.
* groups with ``residual`` other than ``"none"``, ``projected_rule="subset_norm"`` or ``"trion"``, or the ``online_pca``
  projector, which need the full gradient at every update: they get no memory benefit from accumulation (they
  still free their gradient right after their update).
* dense (not projected) parameters hold their full gradient anyway: it accumulates in ``.grad`` and they update in
  their final hook.

Under DDP (``all_reduce_in_hooks()``; the strategy calls it and does not wrap the module in
``DistributedDataParallel``, whose buckets would hold every full gradient for the whole run) each parameter's
final hook all-reduces what its update reads, then frees the full gradient: a projected weight sends its
projected window gradient (r x n: the average of projections is the projection of the average), a layer that
needs its full gradient (see above) and a dense parameter send it in full. The update waits for its all-reduce,
which overlaps the backward of the next layer: parameter k is updated in parameter k+1's hook (and the last ones in
``step``), so at most two layers' all-reduces are in flight. Every rank must give the same parameters a gradient in
a window, as DDP without ``find_unused_parameters`` requires; ``step`` checks it.

Non-finite gradients (``nonfinite=``): ``"skip"`` skips the update of each layer whose window gradient is not
finite (its weight, moments, subspace and counter stay) and counts the step once; the layers with finite gradients
update (those done earlier in the same backward cannot be taken back). Deciding in the hook would read a device
value per layer, each a stall of the autograd thread on a GPU; so a layer's update is taken back on the device
instead: its weight and device state are copied before the update and restored by ``torch.where`` on the gradient's
flags after it (one transient copy of one layer at a time), and the flags of every layer are read once, at the end
of ``step`` (then, on a bad step only, the skipped layers' counters go back and they are named). ``"raise"`` does the
same and raises there, naming the first bad layer. A layer that refreshes or takes its first update checks its
gradient in its hook (one read: a decomposition must not see a non-finite gradient, and no earlier state exists
to restore); that happens every ``update_gap`` steps. ``"ignore"`` neither copies nor reads.

Not supported (the strategy refuses them at setup): ``memory_budget`` (ranks are allocated jointly over all layers
due at a step), clipping by global norm, GradScaler and manual optimization.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_lowrank.optim.distributed.collectives import all_reduce_async
from lightning_lowrank.optim.nonfinite import (
    TakeBack,
    first_nonfinite,
    parameter_label,
    raise_nonfinite,
    refuse_sparse,
    skipped_message,
    warn_once,
)
from lightning_lowrank.optim.projected import ProjectedOptimizer
from lightning_lowrank.optim.state.host_ints import retreat
from lightning_lowrank.optim.state.layout import state_kinds
from lightning_lowrank.optim.state.storage import stateless
from lightning_lowrank.optim.update import dispatch
from lightning_lowrank.optim.update.functional import project_gradient
from lightning_lowrank.optim.update.rules import projected_rule

LOWRANK_GRAD = "lowrank_grad"  # the state key of a projected layer's accumulated projected gradient
# What this class keeps in a projected layer's state itself, by the memory report's kind (``state_layout``): the
# window's gradient is an (r, n) or (m, r) buffer like the projected moments.
STATE_KEYS = {LOWRANK_GRAD: "projected_moments"}
LAYERWISE_COMPILE = (
    "layerwise=True does not support compile: layer-wise updates run one layer at a time in backward hooks, not "
    "through the step's compiled update. Drop one of them."
)


class LayerwiseProjectedOptimizer(ProjectedOptimizer):
    """``ProjectedOptimizer`` that updates each parameter in its post-accumulate-grad hook (see the module doc)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.memory_budget is not None:
            raise ValueError(
                "layerwise=True does not support memory_budget: the budget allocates ranks jointly over all the "
                "layers due to refresh at a step, and layer-wise updates refresh one layer at a time. Drop one of them."
            )
        if self.compile:
            raise ValueError(LAYERWISE_COMPILE)
        self._handles: list[Any] = []
        # param -> (index over all params, group index, projected); group *indices*: load_state_dict replaces the dicts
        self._where: dict[Tensor, tuple[int, int, bool]] = {}
        self._slot: dict[Tensor, int] = {}  # projected param -> its place among the projected ones (refresh owner)
        self._final = False  # True while step() runs the closure: this backward is the window's last
        self._full: dict[Tensor, bool] = {}  # per layer touched in this window: accumulating the full gradient?
        self._pending: dict[Tensor, None] = {}  # touched in this window, not yet updated (insertion-ordered)
        self._skipped: list[tuple[str, str]] = []  # (layer, what it held): updates skipped in this step (nonfinite)
        self._take_back = TakeBack()  # steady updates with a non-finite gradient, undone on the device
        # Under DDP (all_reduce_in_hooks): the process group, what is being all-reduced, and the bytes counted.
        self._dist_group: Any = None
        self._distributed = False
        self._in_flight: deque[tuple[Tensor, Tensor | None, Any]] = deque()  # (param, low-rank gradient, work)
        self._sent = 0  # gradients all-reduced in this window
        self._bytes = [0, 0]  # sent, and what sending every window gradient in full would have
        self.comm_history: list[tuple[int, int]] = []  # per step: (bytes sent, bytes in full), this rank's payload

    def __getstate__(self) -> dict[str, Any]:
        """A copy is detached (no hooks: ``attach()`` it) and outside any process group."""
        detached = dict(_handles=[], _where={}, _slot={}, _dist_group=None, _distributed=False, _in_flight=deque())
        return {**super().__getstate__(), **detached}

    def state_kinds(self, param: Tensor) -> dict[str, str]:
        """As ``ProjectedOptimizer.state_kinds``, with the window's projected gradient (``STATE_KEYS``)."""
        _, group = self.locate(param)
        projected = self.is_projected(param)
        return state_kinds(self.state[param], group, projected, STATE_KEYS if projected else None)

    # -- hooks ----------------------------------------------------------------------------------------------------

    def attach(self) -> None:
        """Register the update hooks on every trainable parameter (idempotent)."""
        self.detach()
        groups = enumerate(self.param_groups)
        walk = ((gi, p, on) for gi, group in groups for p, on in zip(group["params"], self._mask(group)))
        for index, (gi, p, on) in enumerate(walk):
            self._where[p] = (index, gi, on)
            if on:
                self._slot[p] = len(self._slot)
            if p.requires_grad:
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook))

    def all_reduce_in_hooks(self, group: Any = None) -> None:
        """Average every parameter's window gradient over the ranks of ``group`` in its final hook (see the module
        doc); projected weights send their projected gradient. Refreshes are sharded as well."""
        self._dist_group = group
        self._distributed = True
        self.shard_refreshes(group)

    def protect(self, bases: Any) -> None:
        raise NotImplementedError(
            "layerwise=True does not support protected subspaces yet: its updates run in gradient hooks, where the "
            "confinement of each update is not applied. Use layerwise=False with ProtectedSubspaces."
        )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As torch's; once attached, the new group's parameters get their hooks too (Lightning's ``BaseFinetuning``
        unfreezes layers this way)."""
        super().add_param_group(param_group)
        if getattr(self, "_handles", None):  # None while the constructor adds the first groups
            self.attach()

    def detach(self) -> None:
        """Remove the hooks (the strategy does so at teardown, so a later fit on the same module is unaffected)."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._where, self._slot = [], {}, {}

    @torch.no_grad()
    def _hook(self, p: Tensor) -> None:
        refuse_sparse([p.grad])
        if self._final:
            self._finish(p)
        else:
            self._accumulate(p)

    def _needs_full_gradient(self, p: Tensor, group: dict[str, Any]) -> bool:
        state = self.state[p]
        rule = projected_rule(group)
        if group["residual"] != "none" or rule in ("subset_norm", "trion") or group["projector"] == "online_pca":
            return True
        return "step" not in state or self.refresher.is_due(p, state, group)

    def _accumulate(self, p: Tensor) -> None:
        index, gi, on = self._where[p]
        group = self.param_groups[gi]
        self._pending[p] = None
        if not on:
            return
        if p not in self._full:
            self._full[p] = self._needs_full_gradient(p, group)
        if self._full[p]:
            return
        state = self.state[p]
        P = self._projectors[group["projector"]].matrix(p, state, self._context(index, p, group))
        low_rank = project_gradient(p.grad, P, group["side"])  # in the state dtype: the window sums in it
        if LOWRANK_GRAD in state:
            state[LOWRANK_GRAD].add_(low_rank)
        else:
            state[LOWRANK_GRAD] = low_rank
        p.grad = None

    def _finish(self, p: Tensor) -> None:
        """The window's last gradient of one parameter: reduce it to what the update reads, then update (under DDP:
        all-reduce it first)."""
        index, gi, on = self._where[p]
        group = self.param_groups[gi]
        self._pending.pop(p, None)
        self._full.pop(p, None)
        state = self.state[p]
        low_rank = state.pop(LOWRANK_GRAD, None)
        if p.grad is None and low_rank is None:
            return
        # Under DDP a projected weight that updates from its projected gradient sends only that, also without
        # accumulation (on one device the full-gradient update is the same, and needs no projection here).
        in_subspace = low_rank is not None or (self._distributed and on and not self._needs_full_gradient(p, group))
        if in_subspace and p.grad is not None:
            P = self._projectors[group["projector"]].matrix(p, state, self._context(index, p, group))
            last = project_gradient(p.grad, P, group["side"])
            low_rank = last if low_rank is None else low_rank.add_(last)
            p.grad = None  # the full gradient is not needed any more
        if self._distributed:
            self._send(p, low_rank)
        else:
            self._apply(p, low_rank)

    def _apply(self, p: Tensor, low_rank: Tensor | None) -> None:
        """Update ``p`` from its window gradient: ``low_rank`` (projected) if given, else ``p.grad`` (full)."""
        index, gi, on = self._where[p]
        group = self.param_groups[gi]
        state = self.state[p]
        gradient = p.grad if low_rank is None else low_rank
        first = "step" not in state and (on or not stateless(group))  # dense SGD without momentum never keeps state
        refreshes = on and low_rank is None and not first and self.refresher.is_due(p, state, group)
        if self.nonfinite == "ignore":
            self._update_layer(p, group, index, on, low_rank)
        elif first or refreshes:  # checked here: see the module doc
            if self._window_gradient_finite(p, index, low_rank):
                self._update_layer(p, group, index, on, low_rank)
        else:
            with self._take_back.guard(p, index, state, gradient):
                self._update_layer(p, group, index, on, low_rank)
        p.grad = None

    def _update_layer(self, p: Tensor, group: dict[str, Any], index: int, on: bool, low_rank: Tensor | None) -> None:
        """One layer's update from its window gradient (``low_rank``, or ``p.grad`` in full)."""
        state = self.state[p]
        if not on:
            dispatch.update_dense_one(p, state, group)
            return
        if "step" not in state:
            dispatch.init_projected_state(p, state, group)
        ctx = self._context(index, p, group)
        projector = self._projectors[group["projector"]]
        if low_rank is None:  # the full gradient of the whole window: exactly what step() would see
            P = None
            if self.refresher.is_due(p, state, group, ctx.step):  # refresh work spread over ranks
                P = self.refresher.refresh([(p, group, state, ctx)], self._projectors, None, [self._slot[p]])[p]
            layer = dispatch.layers([(p, state, ctx)], {} if P is None else {p: P}, projector, group)[0]
            dispatch.update_layer(p, state, layer.P, group, ctx=ctx)  # Trion's: no P
            projector.after_update(p, p.grad, state, ctx)
        else:
            dispatch.update_layer(p, state, projector.matrix(p, state, ctx), group, low_rank)

    def _take_back_nonfinite(self) -> None:
        """The end of a step: the layers whose updates were taken back (``TakeBack.settle``, one read) get their
        counters back and are named; ``"raise"`` raises, naming the first."""
        bad = self._take_back.settle()
        for p, index, kind in bad:
            if "step" in self.state[p]:
                retreat(self.state[p]["step"])
            self._skipped.append((parameter_label(p, index, self.param_names), kind))
        if bad and self.nonfinite == "raise":
            p, index, kind = bad[0]
            applied = (
                "the layers with finite gradients were updated in their hooks (layer-wise mode), the layers "
                "holding non-finite ones were not"
            )
            raise_nonfinite(parameter_label(p, index, self.param_names), kind, self.completed_steps(p) + 1, applied)

    def _window_gradient_finite(self, p: Tensor, index: int, low_rank: Tensor | None) -> bool:
        """One layer's check (one read); a bad gradient raises or is recorded for ``step`` to count."""
        gradient = p.grad if low_rank is None else low_rank
        if bool(gradient.isfinite().all()):
            return True
        where, kind = first_nonfinite([(parameter_label(p, index, self.param_names), gradient)])
        if self.nonfinite == "raise":
            earlier = "layers whose gradients arrived earlier in this backward were already updated (layer-wise mode"
            raise_nonfinite(where, kind, self.completed_steps(p) + 1, f"{earlier} updates each layer in its hook)")
        self._skipped.append((where, kind))
        return False

    # -- DDP: all-reduce in the hooks ---------------------------------------------------------------------------

    def _send(self, p: Tensor, low_rank: Tensor | None) -> None:
        """Start averaging ``p``'s window gradient over the ranks, then finish the update before this one: its
        all-reduce had this layer's backward to complete in. Every rank runs the hooks in the same order, so the
        collectives (refresh broadcasts included) match."""
        if not self.comm_history and not self._agree(self._where[p][0] + 1):  # the first window: check each hook
            self._mismatch(f"this rank's next gradient is parameter {self._where[p][0]}")
        tensor = p.grad if low_rank is None else low_rank
        tensor.div_(dist.get_world_size(self._dist_group))  # as DDP: divide first, so the sum cannot overflow
        work = all_reduce_async(tensor, self._dist_group)  # a non-contiguous gradient goes through a copy (NCCL)
        self._in_flight.append((p, low_rank, work))
        self._sent += 1
        self._bytes[0] += tensor.numel() * tensor.element_size()
        self._bytes[1] += p.numel() * tensor.element_size()
        while len(self._in_flight) > 1:
            self._receive()

    def _receive(self) -> None:
        p, low_rank, work = self._in_flight.popleft()
        work.wait()
        self._apply(p, low_rank)

    def _end_window(self) -> None:
        """Finish the updates still in flight; check that every rank updated as many parameters."""
        while self._in_flight:
            self._receive()
        if not self._agree(-(self._sent + 1)):
            self._mismatch(f"this rank sent {self._sent} gradients in this step")
        self.comm_history.append((self._bytes[0], self._bytes[1]))
        self._sent, self._bytes = 0, [0, 0]

    def _agree(self, code: int) -> bool:
        """Whether every rank passed the same ``code`` (one small all-reduce; each check has the same size, so a
        rank that is at another check disagrees instead of mismatching collectives)."""
        device = next(iter(self._where)).device
        codes = torch.tensor([code, -code], dtype=torch.int64, device=device)
        dist.all_reduce(codes, op=dist.ReduceOp.MAX, group=self._dist_group)
        return bool(codes[0] == -codes[1])

    def _mismatch(self, detail: str) -> None:
        raise RuntimeError(
            f"layerwise=True under DDP: the ranks gave gradients to different parameters ({detail}). Every rank must "
            "give every trainable parameter a gradient in each step, as DistributedDataParallel without "
            "find_unused_parameters requires; freeze the parameters some ranks do not use (requires_grad=False), "
            "or use layerwise=False with find_unused_parameters=True. Checked in every hook of the first step and "
            "by count after each step."
        )

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch's, and also drop what this window accumulated in low rank (it is part of the gradient)."""
        super().zero_grad(set_to_none)
        self._in_flight.clear()  # only left over after an exception inside backward
        self._sent, self._bytes = 0, [0, 0]
        for p in self._pending:
            self.state[p].pop(LOWRANK_GRAD, None)
        self._pending.clear()
        self._full.clear()

    # -- step: run the closure (its backward updates), then bookkeeping ----------------------------------------

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Run ``closure`` (forward and backward: each parameter updates in its hook); then update the parameters
        that got a gradient earlier in the window but none in this backward (or all, for a backward run outside
        ``step`` without a closure)."""
        if not self._handles:
            raise RuntimeError("LayerwiseProjectedOptimizer.step() before attach(): no hooks would update anything")
        loss = None
        self.last_refreshes = {}
        self._final = True
        try:
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            with torch.no_grad():
                for p in list(self._pending):
                    self._finish(p)
                if self._distributed:
                    self._end_window()
                self._take_back_nonfinite()
            if self._skipped:
                self.nonfinite_steps += 1
                warn_once(self, skipped_message(self.nonfinite_steps, *self._skipped[0], layerwise=True))
        finally:
            self._skipped = []
            self._take_back.clear()
            self._final = False
            self._pending.clear()
            self._full.clear()
        self._opt_called = True
        return loss

    step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
