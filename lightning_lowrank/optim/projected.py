"""``ProjectedOptimizer``: an optimizer whose 2-D weights keep their state in a rank-r subspace.

The step in torch's shape (``torch/optim/adam.py``): check the gradients (``nonfinite.py``), gather each group's
parameters and create state lazily, refresh the due layers (``refresh.Refresher``; ranks from ``budget`` under
``memory_budget``), one update call per group (``update/dispatch.py``). Which parameters are projected: the group key
``lowrank_mask`` (bools parallel to ``group["params"]``; absent: every 2-D parameter of a group whose ``rank`` is not
None). All state is tensors and primitives, so ``state_dict()`` loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from itertools import chain
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_lowrank.optim import nonfinite
from lightning_lowrank.optim.adopt import adopt_groups
from lightning_lowrank.optim.budget import rank_budget
from lightning_lowrank.optim.budget.costs import LayerCost
from lightning_lowrank.optim.distributed import sharding
from lightning_lowrank.optim.options import WHOLE_OPTIMIZER_OPTIONS, OptimizerOptions
from lightning_lowrank.optim.projection.bases import dct_basis, effective_rank, projected_shape
from lightning_lowrank.optim.projection.projectors import PROJECTOR_CLASSES, LayerContext, Projector, resolve_projector
from lightning_lowrank.optim.projection.refresh import Refresher, RefreshInfo, RefreshTimer
from lightning_lowrank.optim.state.host_ints import forget_all, read_int
from lightning_lowrank.optim.state.layout import state_kinds
from lightning_lowrank.optim.state.resume import load_state
from lightning_lowrank.optim.state.storage import state_dtype
from lightning_lowrank.optim.update import compiled, dispatch, lazy_hessian, protect
from lightning_lowrank.optim.update.rules import projected_rule
from lightning_lowrank.optim.validate import validate_group

__all__ = ["ProjectedAdamW", "ProjectedOptimizer", "RefreshInfo", "RefreshTimer"]


class ProjectedOptimizer(Optimizer):
    """Low-rank optimizer state (GaLore and its successors) for selected 2-D weights; the rest is dense.

    Args:
        params: parameters or param-group dicts (groups may override every option but the budget's).
        lr: as in ``torch.optim.AdamW``, and so are ``betas``, ``eps`` and ``weight_decay``.
        decoupled_weight_decay: True for AdamW's decay, False for Adam's L2 penalty.
        rule: the inner update, ``adamw``, ``sgd`` or ``adafactor`` (their options as torch's optimizers'); it runs
            on the projected gradient of projected weights and on the full gradient of the others.
        layer_names: names of the weights, for messages only (``from_optimizer`` takes them from a dict).
        **options: the low-rank options, each defined and documented once in ``OptimizerOptions``
            (``lightning_lowrank.optim.options``): ``rank``, ``projector``, ``update_gap``, ``scale``, ``residual``,
            ``state_bits``, ``memory_budget``, ...

    Weights whose projection would hold more state than their dense rule (Adafactor's with an SVD-like P, SGD's
    without momentum) stay dense, listed in ``kept_dense`` (``rank_budget.keep_dense_where_projection_costs``).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        decoupled_weight_decay: bool = True,
        rule: str = "adamw",
        layer_names: Mapping[Tensor, str] | None = None,
        **options: Any,
    ) -> None:
        checked = OptimizerOptions(**options)  # unknown or invalid options fail here, before any state exists
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            rule=rule,
            **checked.group_options(rule),  # a group of another rule gets its own in ``add_param_group``
            lowrank_mask=None,
        )
        self._options, self._dct_bases = checked, {}  # the bases: {(size, dtype, device): d x d}
        self._slots: dict[Tensor, tuple[int, int, int]] = {}  # param -> (index, group, place in group); locate
        self._projectors = {name: cls() for name, cls in PROJECTOR_CLASSES.items()}
        self.refresher = Refresher()
        self.memory_budget, self.rank_by = checked.memory_budget, checked.rank_by
        self.budget = rank_budget.RankBudget(self.memory_budget, self.rank_by) if self.memory_budget else None
        self.nonfinite, self.compile = checked.nonfinite, checked.compile  # step options (``StepOptions``)
        self._protected = False  # whether some weight has protected bases (``protect``)
        self.nonfinite_steps = 0  # steps skipped (nonfinite="skip") because a gradient held an inf or NaN
        self.sharded_step_bytes = 0  # sent by FSDP2-sharded Muon layers' Newton-Schulz (``sharding.RowSum``)
        # Names of weights for messages (a strategy adds every parameter's module name).
        self.param_names: dict[Tensor, str] = dict(layer_names or {})
        super().__init__(params, defaults)
        self.kept_dense: list[Tensor] = rank_budget.keep_dense_where_projection_costs(
            self.placements(), self.memory_budget, layer_names
        )
        for p, group, on in self.placements():  # FSDP2-sharded weights: refuse what would need other ranks' rows, now
            if sharding.is_sharded(p):
                sharding.check(p, group, on, projected_rule(group), self.memory_budget is not None)
        if self.budget is not None:
            self.budget.check_fits(self.placements())

    @classmethod
    def from_optimizer(
        cls,
        optimizer: Optimizer,
        projected: set[Tensor] | Mapping[Tensor, str] | Callable[[Tensor], bool],
        **options: Any,
    ) -> ProjectedOptimizer:
        """Build on the *same* param-group dicts as a torch AdamW, Adam, SGD or Adafactor, with its rule
        (``adopt.py``); ``options``: this class's keyword arguments (rank, projector, residual, ...)."""
        adopt_groups(optimizer, projected, {k: v for k, v in options.items() if k not in WHOLE_OPTIMIZER_OPTIONS})
        names = projected if isinstance(projected, Mapping) else None  # {weight: name}: names in messages
        return cls(optimizer.param_groups, lr=optimizer.defaults["lr"], layer_names=names, **options)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        # Whether some parameter is an FSDP2 DTensor: only then does a step look into them (``sharding.local``).
        self._sharded = getattr(self, "_sharded", False) or any(sharding.is_sharded(p) for p in group["params"])
        resolve_projector(group)
        validate_group(group, self._options)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, but the current low-rank options win over the saved ones, and each layer's state is loaded as
        saved where they agree, else converted with one warning (``state/resume.py``)."""
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        count, state_dict = nonfinite.pop_count(state_dict)
        load_state(self, sharding.local_state_dict(params, state_dict), super().load_state_dict)
        forget_all(self.state.values())  # DCP writes counters into the live tensors: read them again
        self.nonfinite_steps = count
        self._protected = bool(self.protected_params())  # whether some weight's updates are confined (``protect``)

    def __getstate__(self) -> dict[str, Any]:
        """As torch's, with this optimizer's own attributes too (so a deepcopy steps alike); the DCT bases and the slot
        map are caches."""
        hooks = [k for k in self.__dict__ if k.startswith("_optimizer_") and k.endswith("_hooks")]
        return {**{k: v for k, v in self.__dict__.items() if k not in hooks}, "_dct_bases": {}, "_slots": {}}

    def state_dict(self) -> dict[str, Any]:
        """As torch's, with the count of skipped non-finite steps (also in group 0: a distributed checkpoint keeps
        only state and groups)."""
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        return sharding.distributed_state_dict(params, nonfinite.with_count(super().state_dict(), self.nonfinite_steps))

    # -- what a scheduler, a strategy or a report may ask of it ------------------------------------------------

    @property
    def last_refreshes(self) -> dict[Tensor, RefreshInfo]:
        """What each refresh of the last ``step()`` did, by weight (empty after a step without one)."""
        return self.refresher.last

    @last_refreshes.setter
    def last_refreshes(self, value: dict[Tensor, RefreshInfo]) -> None:
        self.refresher.last = value

    @property
    def sharded_refresh_bytes(self) -> int:
        """Payload of the collectives of FSDP2-sharded layers' refreshes so far (``sharding.refresh``)."""
        return self.refresher.sharded_bytes

    def external_schedule(self) -> None:
        """Refresh only layers passed to ``request_refresh`` (and layers without a subspace yet)."""
        self.refresher.external_schedule()

    def request_refresh(self, params: Iterable[Tensor]) -> None:
        """Refresh these layers at their next update (a skipped AMP step leaves the request pending)."""
        self.refresher.request(params)

    def shard_refreshes(self, group: Any = None) -> None:
        """Under torch.distributed: compute each due refresh on one rank (layer i on rank i % world), share it."""
        self.refresher.shard_over(group)

    def refreshes_at_next_step(self, param: Tensor) -> bool:
        """Whether the next ``step()`` refreshes ``param``'s subspace (asked before the step)."""
        _, group = self.locate(param)
        return self.is_projected(param) and self.refresher.is_due(param, self.state[param], group)

    def budget_bytes(self) -> tuple[int, dict[Tensor, LayerCost]]:
        """What a memory budget must hold besides the projected layers, and each projected layer's cost model."""
        return rank_budget.budget_bytes(self.placements())

    def placements(self) -> list[rank_budget.Placement]:
        """Every parameter, in order, as (param, its group, projected)."""
        return [(p, g, on) for g in self.param_groups for p, on in zip(g["params"], self._mask(g))]

    def wants_curvature(self) -> bool:
        """Whether some group uses ``preconditioner="lazy_hessian"`` and so waits for ``update_curvature``."""
        return any(g["preconditioner"] == "lazy_hessian" and any(self._mask(g)) for g in self.param_groups)

    def curvature_params(self) -> list[Tensor]:
        """The projected weights whose lazy Hessian ``update_curvature`` refreshes (those that have stepped)."""
        return lazy_hessian.curvature_params(self.placements(), self.state)

    @torch.no_grad()
    def update_curvature(self, diagonals: Mapping[Tensor, Tensor]) -> None:
        """Fold fresh curvature diagonals into the lazy Hessians, reused until the next call. Each is in the layer's
        current subspace coordinates: what ``curvature.subspace_diagonal`` returns for ``projection_matrix(param)``."""
        for p, estimate in diagonals.items():
            group, state = self.locate(p)[1], self.state[p]
            shape = projected_shape(p.shape, self.layer_rank(p) if "step" in state else group["rank"], group["side"])
            lazy_hessian.fold_curvature(p, state, estimate, shape, group, state_dtype(group, p.dtype))

    def set_layer_curvature(self, traces: Mapping[Tensor, float]) -> None:
        """Record each projected layer's Hessian trace; with ``memory_budget`` and ``rank_by="curvature"`` the next
        refreshes give rank in proportion to it. Layers that have not stepped yet are skipped."""
        lazy_hessian.set_layer_curvature(traces, self.state, set(self.projected_params()))

    def protect(self, bases: Mapping[Tensor, tuple[Tensor, Tensor]], bits: int | None = None) -> None:
        """Confine every later update of each weight to the orthogonal complement of its protected directions (U: m x
        k, V: n x k, orthonormal; Sculpting Subspaces), the bases kept in float32 or ``bits`` 8 / 4 (``protect.py``)."""
        for p, (U, V) in bases.items():
            self.locate(p)  # a parameter of this optimizer (KeyError otherwise)
            protect.store_bases(self.state[p], p, U, V, bits)
        self._protected = bool(self.protected_params())

    def unprotect(self, params: Iterable[Tensor] | None = None) -> None:
        """Drop the protected bases of ``params`` (None: of every weight): their updates are free again."""
        for p in self.protected_params() if params is None else params:
            protect.drop(self.state[p])
        self._protected = bool(self.protected_params())

    def protected_params(self) -> list[Tensor]:
        """The weights whose updates ``protect`` confines."""
        return [p for p, _, _ in self.placements() if protect.is_protected(self.state[p])]

    def protected_rank(self, param: Tensor) -> int:
        """k, the number of protected directions of ``param`` (0: none)."""
        return protect.protected_rank(self.state[param], param)

    def projection_mask(self, group: dict[str, Any]) -> list[bool]:
        """Which of ``group["params"]`` are projected (in order)."""
        return self._mask(group)

    def completed_steps(self, param: Tensor) -> int:
        """Updates ``param`` has taken (0 before its first, and for dense SGD without momentum, as torch's); a
        projected weight's read once (``host_ints``), a dense one's each time (torch's own Adam advances it)."""
        state = self.state[param]
        if "step" not in state:
            return 0
        return read_int(state["step"]) if self.is_projected(param) else int(state["step"])

    def layer_rank(self, param: Tensor) -> int:
        """The rank ``param`` is updated in now (its own under ``memory_budget``, else the group's, clamped)."""
        state = self.state[param]
        if "rank" in state:
            return read_int(state["rank"])
        return effective_rank(param.shape, self.locate(param)[1]["rank"])

    def state_kinds(self, param: Tensor) -> dict[str, str]:
        """The kind (``state/layout.py``) of each key of ``param``'s state, as the components that keep it declare."""
        _, group = self.locate(param)
        return state_kinds(self.state[param], group, self.is_projected(param))

    def projected_params(self) -> list[Tensor]:
        """The weights updated in a low-rank subspace, in param-group order."""
        return [p for g in self.param_groups for p, on in zip(g["params"], self._mask(g)) if on]

    def is_projected(self, param: Tensor) -> bool:
        """Whether ``param`` is updated in a low-rank subspace."""
        _, group = self.locate(param)
        return self._mask(group)[self._slots[param][2]]

    def dct_bases(self) -> dict[tuple[int, torch.dtype, torch.device], Tensor]:
        """The shared DCT bases built so far (one per size, dtype and device); rebuilt on demand, not saved."""
        return self._dct_bases

    def projection_side(self, param: Tensor) -> str:
        """Which side ``param``'s P multiplies its gradient from: its group's ``side`` (``"auto"``: the smaller)."""
        return self.locate(param)[1]["side"]

    def projection_matrix(self, param: Tensor) -> Tensor:
        """The current P (d x r) of a projected parameter."""
        index, group = self.locate(param)
        return self._projectors[group["projector"]].matrix(param, self.state[param], self._context(index, param, group))

    def _mask(self, group: dict[str, Any]) -> list[bool]:
        if group["rank"] is None:
            return [False] * len(group["params"])
        return [p.ndim == 2 for p in group["params"]] if group["lowrank_mask"] is None else group["lowrank_mask"]

    def locate(self, param: Tensor) -> tuple[int, dict[str, Any]]:
        """(position among all parameters, its group) in O(1): a map, rebuilt when new groups were installed."""
        slot = self._slots.get(param)
        if slot is None or slot[1] >= len(self.param_groups) or not _holds(self.param_groups[slot[1]], slot[2], param):
            walk = ((p, g, i) for g, group in enumerate(self.param_groups) for i, p in enumerate(group["params"]))
            self._slots = {p: (index, g, i) for index, (p, g, i) in enumerate(walk)}
            slot = self._slots.get(param)
            if slot is None:
                raise KeyError("parameter is not managed by this optimizer")
        return slot[0], self.param_groups[slot[1]]

    def shared_basis(self, size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The DCT basis of ``size`` shared by every layer that needs it (built once, kept in ``dct_bases()``)."""
        key = (size, dtype, device)
        if key not in self._dct_bases:
            self._dct_bases[key] = dct_basis(size, dtype=dtype, device=device)
        return self._dct_bases[key]

    def _context(self, index: int, param: Tensor, group: dict[str, Any], state: dict | None = None) -> LayerContext:
        state = self.state[param] if state is None else state
        step = read_int(state["step"]) if "step" in state else 0
        rank = read_int(state["rank"]) if "rank" in state else effective_rank(param.shape, group["rank"])
        dtype = state_dtype(group, param.dtype)
        return LayerContext(index, step, rank, group, self.shared_basis, dtype, self.refresher.shard)

    # -- the step ------------------------------------------------------------------------------------------------

    def _init_group(
        self, group: dict[str, Any], start: int
    ) -> tuple[list[Tensor], list[tuple[Tensor, dict[str, Tensor], LayerContext]]]:
        """A group's parameters with a gradient: the dense ones, and the projected ones with their state (created at
        a layer's first step, unless a budget gives it a rank first) and context; ``start``: its first's index."""
        dense, projected = [], []
        for index, (p, on) in enumerate(zip(group["params"], self._mask(group)), start):
            if p.grad is None:
                continue
            if not on:
                dense.append(p)
                continue
            state = self.state[p]
            if "step" not in state and self.budget is None:
                dispatch.init_projected_state(p, state, group)
            projected.append((p, state, self._context(index, p, group, state)))
        return dense, projected

    def _gradients_finite(self) -> bool:
        """Whether every gradient is finite (one flag, one read); if not, nothing is touched yet: ``"raise"`` raises
        naming the first bad parameter, ``"skip"`` counts the step and warns the first time."""
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        bad = nonfinite.nonfinite_gradient(params, self._label, self._sharded)  # labels only on a bad step
        if bad is None:
            return True
        if self.nonfinite == "raise":
            first = next(p for p in params if self._label(p) == bad[0])
            nonfinite.raise_nonfinite(*bad, self.completed_steps(first) + 1)
        self.nonfinite_steps += 1
        nonfinite.warn_once(self, nonfinite.skipped_message(self.nonfinite_steps, *bad))
        return False

    def _label(self, p: Tensor) -> str:
        return nonfinite.parameter_label(p, self.locate(p)[0], self.param_names)

    def projector(self, name: str) -> Projector:
        """The projector behind ``projector=name`` (they keep nothing per layer: its state is in ``state[p]``)."""
        return self._projectors[name]

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Run ``closure`` first when given (Lightning runs forward/backward/clipping in it), then update: check the
        gradients, gather each group (``_init_group``) and update its dense parameters, refresh the due layers, build
        each layer's P once and update each group's projected layers (``dispatch.update_layers``).

        Called without a closure by ``GradScaler.step``; a step the scaler skips never reaches here,
        so the per-layer step counters (and the refresh schedule) only count real updates.
        """
        if torch.compiler.is_compiling():  # torch.compile(optimizer.step): see ``compiled.eager_step``
            return torch.compiler.disable(compiled.eager_step)(self, closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # What torch's LR-scheduler step wrapper records; see the attribute set below.
        self._opt_called = True
        with torch.no_grad():
            self.last_refreshes = {}
            nonfinite.refuse_sparse(p.grad for group in self.param_groups for p in group["params"])
            if self.nonfinite != "ignore" and not self._gradients_finite():
                return loss
            groups, due, start = [], [], 0
            for group in self.param_groups:
                dense, projected = self._init_group(group, start)
                start += len(group["params"])
                dispatch.update_dense(dense, [self.state[p] for p in dense], group, self._sharded, self._protected)
                groups.append((group, projected))
                for p, state, ctx in projected:
                    if self.refresher.is_due(p, state, group, ctx.step):
                        due.append((p, group, state, ctx))
            budget = None if self.budget is None else (self.budget, self.state, self.placements())
            Ps = self.refresher.refresh(due, self._projectors, budget, None, self._sharded) if due else {}
            for group, projected in groups:
                projector = self._projectors[group["projector"]]
                layers = dispatch.layers(projected, Ps, projector, group)
                sent = dispatch.update_layers(layers, group, self._sharded, self.compile, self._protected)
                self.sharded_step_bytes += sent
                for p, state, ctx in projected:
                    projector.after_update(p, p.grad, state, ctx)
        return loss

    # LR schedulers wrap ``optimizer.step`` to detect a scheduler step before the first optimizer step.
    # This class records that itself (``_opt_called`` above), so schedulers rebound to it need no re-wrapping.
    step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]


def _holds(group: dict[str, Any], i: int, param: Tensor) -> bool:
    return i < len(group["params"]) and group["params"][i] is param


class ProjectedAdamW(ProjectedOptimizer):
    """``ProjectedOptimizer`` with the Adam(W) rule: the foundation's optimizer, and the default."""
