"""``ProjectedOptimizer``: an optimizer whose 2-D weights keep their state in a rank-r subspace.

A thin shell: the per-layer math is ``functional.py`` (over ``rules.py``, ``residuals.py``, ``projection.py``), the
options ``options.py``, the refresh schedule ``refresh.py``, per-layer ranks under a budget ``budget.py``, moment
storage ``storage.py``. This class owns the param groups and ``state``, creates state lazily, runs ``step()`` and
answers questions about its layers. ``ProjectedAdamW`` is the same class with the Adam(W) rule.

Which parameters are projected is decided per parameter by the group key ``lowrank_mask`` (a list of bools parallel
to ``group["params"]``; when absent, every 2-D parameter of a group whose ``rank`` is not None). Everything lives in
``self.state`` and ``self.param_groups`` as tensors and primitives, so ``state_dict()`` round-trips and loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import fields
from itertools import chain
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_lowrank.optim.budget import BudgetMixin
from lightning_lowrank.optim.costs import projected_rule
from lightning_lowrank.optim.host_ints import forget_all, read_int
from lightning_lowrank.optim.lazy_hessian import LazyHessianMixin
from lightning_lowrank.optim.nonfinite import pop_count, with_count
from lightning_lowrank.optim.options import (
    SUPPORTED_OPTIMIZERS,
    WHOLE_OPTIMIZER_SECTIONS,
    OptimizerOptions,
    state_dtype,
    supported_names,
    validate_group,
)
from lightning_lowrank.optim.projection import dct_basis, effective_rank
from lightning_lowrank.optim.projectors import PROJECTOR_CLASSES, LayerContext
from lightning_lowrank.optim.refresh import RefreshInfo, RefreshMixin, RefreshTimer
from lightning_lowrank.optim.resume import load_state
from lightning_lowrank.optim.sharding import check as check_sharded
from lightning_lowrank.optim.sharding import distributed_state_dict, is_sharded, local_state_dict
from lightning_lowrank.optim.state_layout import state_kinds
from lightning_lowrank.optim.stepping import StepMixin

__all__ = ["ProjectedAdamW", "ProjectedOptimizer", "RefreshInfo", "RefreshTimer"]

# Options of the whole optimizer (the budget, the non-finite policy), not of a group.
WHOLE_OPTIMIZER_OPTIONS = tuple(f.name for section in WHOLE_OPTIMIZER_SECTIONS for f in fields(section))


class ProjectedOptimizer(StepMixin, RefreshMixin, BudgetMixin, LazyHessianMixin, Optimizer):
    """Low-rank optimizer state (GaLore and its successors) for selected 2-D weights; the rest is dense.

    Args:
        params: parameters or param-group dicts (groups may override every option but the budget's).
        lr, betas, eps, weight_decay: as in ``torch.optim.AdamW``.
        decoupled_weight_decay: True for AdamW's decay, False for Adam's L2 penalty.
        rule: the inner update, ``adamw`` (Adam with ``decoupled_weight_decay=False``), ``sgd`` (``momentum``,
            ``dampening``, ``nesterov`` as torch.optim.SGD) or ``adafactor`` (``beta2_decay``, ``d``, ``eps`` as
            torch.optim.Adafactor); it runs on the projected gradient of projected weights and on the full gradient
            of the others.
        layer_names: names of the weights, for messages only (``from_optimizer`` takes them from a dict).
        **options: the low-rank options, each defined and documented once in ``OptimizerOptions``
            (``lightning_lowrank.optim.options``): ``rank``, ``projector``, ``update_gap``, ``scale``, ``residual``,
            ``state_bits``, ``memory_budget``, ...

    With the Adafactor rule, a weight is projected only where that holds fewer optimizer-state bytes than dense
    Adafactor, whose factored second moment is already O(m + n): an SVD P of d x r alone is more than that, a seed
    (``random``) or a DCT index set (``dct`` with ``dct_scorer="fft"``) at a small rank is not. The other weights are
    trained densely (listed in ``kept_dense``), with one warning that names them.
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
            **checked.group_options(),
            lowrank_mask=None,
        )
        self._dct_bases: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}
        self._slots: dict[Tensor, tuple[int, int, int]] = {}  # param -> (index, group, place in group); _locate
        self._projectors = {name: cls() for name, cls in PROJECTOR_CLASSES.items()}
        self._refresh_requests = None
        self._shard = None
        self.last_refreshes: dict[Tensor, RefreshInfo] = {}
        self.memory_budget, self.rank_by = checked.memory_budget, checked.rank_by
        self.nonfinite = checked.nonfinite
        self.nonfinite_steps = 0  # steps skipped (nonfinite="skip") because a gradient held an inf or NaN
        # Names of weights for messages (a strategy adds every parameter's module name).
        self.param_names: dict[Tensor, str] = dict(layer_names or {})
        super().__init__(params, defaults)
        self.kept_dense: list[Tensor] = self._keep_dense_where_projection_costs(layer_names)
        self.sharded_refresh_bytes = 0
        for group in self.param_groups:  # FSDP2-sharded weights: refuse what would need other ranks' rows, now
            for p, on in zip(group["params"], self._mask(group)):
                if is_sharded(p):
                    check_sharded(p, group, on, projected_rule(group), self.memory_budget is not None)
        if self.memory_budget is not None:
            self._check_budget_fits()

    @classmethod
    def from_optimizer(
        cls,
        optimizer: Optimizer,
        projected: set[Tensor] | Mapping[Tensor, str] | Callable[[Tensor], bool],
        **options: Any,
    ) -> ProjectedOptimizer:
        """Build on the *same* param-group dicts as a torch AdamW, Adam, SGD or Adafactor, with its rule.

        ``options`` are this class's keyword arguments (rank, projector, residual, ...). Sharing the dicts keeps
        the user's hyperparameters and what LR schedulers and Lightning wrote into them (``initial_lr``).
        """
        if type(optimizer) not in SUPPORTED_OPTIMIZERS:
            raise TypeError(
                f"lightning_lowrank can project {supported_names()}, but configure_optimizers returned "
                f"{type(optimizer).__module__}.{type(optimizer).__name__}. Return one of the supported optimizers, "
                "or pass fallback='dense' to the strategy to keep this optimizer as it is."
            )
        rule, decoupled = SUPPORTED_OPTIMIZERS[type(optimizer)]
        is_selected = projected if callable(projected) else (lambda p: p in projected)
        per_group = {k: v for k, v in options.items() if k not in WHOLE_OPTIMIZER_OPTIONS}
        for group in optimizer.param_groups:
            for flag in ("amsgrad", "maximize"):
                if group.get(flag):
                    raise ValueError(
                        f"lightning_lowrank does not support {flag}=True; set {flag}=False in the optimizer."
                    )
            for key, value in per_group.items():
                group.setdefault(key, value)
            group["rule"] = rule
            group["decoupled_weight_decay"] = (
                bool(group.get("decoupled_weight_decay", False)) if decoupled is None else decoupled
            )
            group["lowrank_mask"] = [bool(is_selected(p)) for p in group["params"]]
        names = projected if isinstance(projected, Mapping) else None  # {weight: name}: names in messages
        return cls(optimizer.param_groups, lr=optimizer.defaults["lr"], layer_names=names, **options)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["projector"] is None:  # APOLLO's own projection for APOLLO, GaLore's SVD otherwise
            group["projector"] = "gaussian" if group["residual"] == "apollo" else "svd"
        validate_group(group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, but this optimizer's current low-rank options win over the saved ones (torch's own
        hyperparameters come from the checkpoint), and each layer's state is loaded in the form they give it
        (``resume.py``): as saved when they agree (dtypes kept: no cast of integer state or of float32 moments of a
        bf16 weight to the param's dtype), else converted (a changed rank or projector, a dense checkpoint, ...)
        with one warning that says what changed."""
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        count, state_dict = pop_count(state_dict)
        load_state(self, local_state_dict(params, state_dict), super().load_state_dict)
        forget_all(self.state.values())  # DCP writes counters into the live tensors: read them again
        self.nonfinite_steps = count

    def __getstate__(self) -> dict[str, Any]:
        """torch pickles only the defaults, the state and the groups; this optimizer's own attributes (the budget, the
        non-finite policy and count, names, refresh requests) go too, so a copy (``copy.deepcopy``, multiprocessing)
        steps like this one. As torch's, without the hooks; the DCT bases and the slot map are caches."""
        hooks = [k for k in self.__dict__ if k.startswith("_optimizer_") and k.endswith("_hooks")]
        return {**{k: v for k, v in self.__dict__.items() if k not in hooks}, "_dct_bases": {}, "_slots": {}}

    def state_dict(self) -> dict[str, Any]:
        """As torch's, with the count of steps skipped for a non-finite gradient (``nonfinite=``), which a resumed run
        goes on counting from (torch's optimizers ignore the extra key). The count is also in the first param group,
        the only place a distributed checkpoint keeps it."""
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        return distributed_state_dict(params, with_count(super().state_dict(), self.nonfinite_steps))

    # -- what a scheduler, a strategy or a report may ask of it ------------------------------------------------

    def projection_mask(self, group: dict[str, Any]) -> list[bool]:
        """Which of ``group["params"]`` are projected (in order)."""
        return self._mask(group)

    def completed_steps(self, param: Tensor) -> int:
        """Updates ``param`` has taken (0 before its first, and always for a parameter that keeps no state: dense SGD
        without momentum, as torch's); for a projected weight without a host read after the first time (a dense
        parameter's counter is advanced by torch's own Adam, so it is read each time)."""
        state = self.state[param]
        if "step" not in state:
            return 0
        return read_int(state["step"]) if self.is_projected(param) else int(state["step"])

    def layer_rank(self, param: Tensor) -> int:
        """The rank ``param`` is updated in now (its own under ``memory_budget``, else the group's, clamped)."""
        state = self.state[param]
        if "rank" in state:
            return read_int(state["rank"])
        return effective_rank(param.shape, self._locate(param)[1]["rank"])

    def state_kinds(self, param: Tensor) -> dict[str, str]:
        """The kind (``state_layout.STATE_KINDS``) of every key of ``param``'s state, from what the components that
        keep it declare: the memory report's split. Raises ``UndeclaredStateError`` on a key none declares."""
        _, group = self._locate(param)
        return state_kinds(self.state[param], group, self.is_projected(param))

    def projected_params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p, on in zip(g["params"], self._mask(g)) if on]

    def is_projected(self, param: Tensor) -> bool:
        """Whether ``param`` is updated in a low-rank subspace."""
        _, group = self._locate(param)
        return self._mask(group)[self._slots[param][2]]

    def dct_bases(self) -> dict[tuple[int, torch.dtype, torch.device], Tensor]:
        """The shared DCT bases built so far (one per size, dtype and device); rebuilt on demand, not saved."""
        return self._dct_bases

    def projection_side(self, param: Tensor) -> str:
        """Which side ``param``'s P multiplies its gradient from: its group's ``side`` (``"auto"``: the smaller)."""
        return self._locate(param)[1]["side"]

    def projection_matrix(self, param: Tensor) -> Tensor:
        """The current P (d x r) of a projected parameter."""
        index, group = self._locate(param)
        return self._projectors[group["projector"]].matrix(param, self.state[param], self._context(index, param, group))

    # -- internals ----------------------------------------------------------------------------------------------

    def _mask(self, group: dict[str, Any]) -> list[bool]:
        if group["rank"] is None:
            return [False] * len(group["params"])
        mask = group["lowrank_mask"]
        if mask is None:
            return [p.ndim == 2 for p in group["params"]]
        return mask

    def _locate(self, param: Tensor) -> tuple[int, dict[str, Any]]:
        """(position among all parameters, its group) in O(1): a map rebuilt when the groups changed under it
        (a new group, or ``load_state_dict``, which installs new group dicts)."""
        for attempt in range(2):
            slot = self._slots.get(param)
            if slot is not None:
                index, g, i = slot
                if g < len(self.param_groups) and i < len(self.param_groups[g]["params"]):
                    group = self.param_groups[g]
                    if group["params"][i] is param:
                        return index, group
            if attempt == 0:
                self._slots = {
                    p: (index, g, i)
                    for index, (p, g, i) in enumerate(
                        (p, g, i) for g, group in enumerate(self.param_groups) for i, p in enumerate(group["params"])
                    )
                }
        raise KeyError("parameter is not managed by this optimizer")

    def _basis(self, size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        key = (size, dtype, device)
        if key not in self._dct_bases:
            self._dct_bases[key] = dct_basis(size, dtype=dtype, device=device)
        return self._dct_bases[key]

    def _context(
        self, index: int, param: Tensor, group: dict[str, Any], state: dict[str, Tensor] | None = None
    ) -> LayerContext:
        state = self.state[param] if state is None else state
        step = read_int(state["step"]) if "step" in state else 0
        rank = read_int(state["rank"]) if "rank" in state else effective_rank(param.shape, group["rank"])
        return LayerContext(index, step, rank, group, self._basis, state_dtype(group, param.dtype))

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Run ``closure`` first when given (Lightning runs forward/backward/clipping in it), then update.

        Called without a closure by ``GradScaler.step``; a step the scaler skips never reaches here,
        so the per-layer step counters (and the refresh schedule) only count real updates.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # What torch's LR-scheduler step wrapper records; see the attribute set below.
        self._opt_called = True
        self._update()
        return loss

    # LR schedulers wrap ``optimizer.step`` to detect a scheduler step before the first optimizer step.
    # This class records that itself (``_opt_called`` above), so schedulers rebound to it need no re-wrapping.
    step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]


class ProjectedAdamW(ProjectedOptimizer):
    """``ProjectedOptimizer`` with the Adam(W) rule: the foundation's optimizer, and the default."""
