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
* groups with ``residual`` other than ``"none"``, ``projected_rule="subset_norm"`` or the ``online_pca``
  projector, which need the full gradient at every update: they get no memory benefit from accumulation (they
  still free their gradient right after their update).
* dense (not projected) parameters hold their full gradient anyway: it accumulates in ``.grad`` and they update in
  their final hook.

Not supported (the strategy refuses them at setup): ``memory_budget`` (ranks are allocated jointly over all layers
due at a step), clipping by global norm, GradScaler, manual optimization and DDP.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_lowrank.optim.projected import ProjectedOptimizer, _projected_rule
from lightning_lowrank.optim.projection import project

LOWRANK_GRAD = "lowrank_grad"  # the state key of a projected layer's accumulated projected gradient


class LayerwiseProjectedOptimizer(ProjectedOptimizer):
    """``ProjectedOptimizer`` that updates each parameter in its post-accumulate-grad hook (see the module doc)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.memory_budget is not None:
            raise ValueError(
                "layerwise=True does not support memory_budget: the budget allocates ranks jointly over all the "
                "layers due to refresh at a step, and layer-wise updates refresh one layer at a time. Drop one of them."
            )
        self._handles: list[Any] = []
        # param -> (index over all params, group index, projected); group *indices*: load_state_dict replaces the dicts
        self._where: dict[Tensor, tuple[int, int, bool]] = {}
        self._final = False  # True while step() runs the closure: this backward is the window's last
        self._full: dict[Tensor, bool] = {}  # per layer touched in this window: accumulating the full gradient?
        self._pending: dict[Tensor, None] = {}  # touched in this window, not yet updated (insertion-ordered)

    # -- hooks ----------------------------------------------------------------------------------------------------

    def attach(self) -> None:
        """Register the update hooks on every trainable parameter (idempotent)."""
        self.detach()
        index = -1
        for gi, group in enumerate(self.param_groups):
            for p, on in zip(group["params"], self._mask(group)):
                index += 1
                self._where[p] = (index, gi, on)
                if p.requires_grad:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._hook))

    def detach(self) -> None:
        """Remove the hooks (the strategy does so at teardown, so a later fit on the same module is unaffected)."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._where = [], {}

    @torch.no_grad()
    def _hook(self, p: Tensor) -> None:
        if p.grad is not None and p.grad.is_sparse:
            raise RuntimeError("lightning_lowrank optimizers do not support sparse gradients.")
        if self._final:
            self._finish(p)
        else:
            self._accumulate(p)

    def _needs_full_gradient(self, p: Tensor, group: dict[str, Any]) -> bool:
        state = self.state[p]
        if group["residual"] != "none" or _projected_rule(group) == "subset_norm" or group["projector"] == "online_pca":
            return True
        return not state or self._is_due(p, state, group)

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
        low_rank = project(p.grad, P)
        if LOWRANK_GRAD in state:
            state[LOWRANK_GRAD].add_(low_rank)
        else:
            state[LOWRANK_GRAD] = low_rank
        p.grad = None

    def _finish(self, p: Tensor) -> None:
        """The window's update of one parameter, then free its gradient."""
        index, gi, on = self._where[p]
        group = self.param_groups[gi]
        self._pending.pop(p, None)
        self._full.pop(p, None)
        state = self.state[p]
        buffered = state.pop(LOWRANK_GRAD, None)
        if p.grad is None and buffered is None:
            return
        if not on:
            self._dense_step(p, group)
        else:
            if not state:
                self._init_projected_state(p, group)
            ctx = self._context(index, p, group)
            if buffered is None:  # the full gradient of the whole window: exactly what step() would see
                if self._is_due(p, state, group):
                    self._refresh([(p, group, ctx)])
                self._projected_step(p, group, ctx)
                self._projectors[group["projector"]].after_update(p, p.grad, state, ctx)
            else:
                if p.grad is not None:
                    P = self._projectors[group["projector"]].matrix(p, state, ctx)
                    buffered = buffered.add_(project(p.grad, P))
                self._projected_step_low_rank(p, group, ctx, buffered)
        p.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch's, and also drop what this window accumulated in low rank (it is part of the gradient)."""
        super().zero_grad(set_to_none)
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
        finally:
            self._final = False
            self._pending.clear()
            self._full.clear()
        self._opt_called = True
        return loss

    step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
