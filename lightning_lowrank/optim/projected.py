"""``ProjectedOptimizer``: an optimizer whose 2-D weights keep their state in a rank-r subspace.

The class is a thin shell around ``rules.py`` (the inner update: Adam(W), momentum SGD, Adafactor,
Subset-Norm), ``residuals.py`` (what happens outside the subspace) and ``projectors.py`` (how the subspace is
chosen): it validates hyperparameters, creates state lazily, refreshes each layer's subspace when it is due,
and applies the updates. ``ProjectedAdamW`` is the same class with the Adam(W) rule.

Which parameters are projected is decided per parameter by the group key ``lowrank_mask`` (a list of
bools parallel to ``group["params"]``; when absent, every 2-D parameter of a group whose ``rank`` is not
None). Everything lives in ``self.state`` and ``self.param_groups`` as tensors and primitives, so
``state_dict()`` round-trips and loads with ``torch.load(weights_only=True)``.

When a refresh is due: by default every ``update_gap`` steps of the layer's own counter. A scheduler
(the ``SubspaceRefresh`` callback) can take that decision over with ``external_schedule()`` and
``request_refresh(params)``; the refresh itself always runs here, inside ``step()``, on the final gradient.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.adam import adam

from lightning_lowrank.optim import rules
from lightning_lowrank.optim.host_ints import advance, read_int
from lightning_lowrank.optim.moments8bit import dequantize_moment, quantize_moment
from lightning_lowrank.optim.projection import (
    PROJECTORS,
    dct_basis,
    effective_rank,
    is_left,
    project,
    project_back,
    projected_shape,
    subspace_similarity,
)
from lightning_lowrank.optim.projectors import PROJECTOR_CLASSES, LayerContext
from lightning_lowrank.optim.rank_zero import warn_rank_zero
from lightning_lowrank.optim.ranks import LayerCost, allocate_ranks, min_budget
from lightning_lowrank.optim.residuals import (
    APOLLO_SCALE_TYPES,
    FIRA_COMPLEMENTS,
    FRUGAL_RULES,
    RESIDUALS,
    residual_update,
)

# The torch optimizer each rule reproduces, with whether its weight decay is decoupled (None: read the group).
SUPPORTED_OPTIMIZERS: dict[type[Optimizer], tuple[str, bool | None]] = {
    torch.optim.AdamW: ("adamw", True),
    torch.optim.Adam: ("adamw", None),
    torch.optim.SGD: ("sgd", False),
    torch.optim.Adafactor: ("adafactor", True),
}
MOMENT_POLICIES = ("keep", "reset", "rotate")
RANK_BY = ("curvature", "residual")
OPTIMIZER_LEVEL = ("memory_budget", "rank_by")  # options of the whole optimizer, not of a param group
RANK_FLOOR = 0.5  # under memory_budget, the share of an even split's rank that every layer keeps
SCALAR_BYTES = 64  # bound on a projected layer's scalar state (step, rank, counters, weights) for the budget
DCT_SCORERS = ("matmul", "fft")
DCT_NORMS = ("l2", "l1")
HOST_KEYS = frozenset({"proj_seed"})  # state read on the host at every step: kept on the CPU


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
    computed_here: bool  # False when DDP sharding gave the work to another rank
    leading_cosine: float | None = None  # the same cosine signed, as Q-GaLore queues it

    @property
    def seconds(self) -> float:
        """Time of this layer's refresh on this rank (0 where another rank computed it); on a GPU, reading it waits
        for the refresh to finish."""
        return 0.0 if self.timer is None else self.timer.seconds


class ProjectedOptimizer(Optimizer):
    """Low-rank optimizer state (GaLore and its successors) for selected 2-D weights; the rest is dense.

    Args:
        params: parameters or param-group dicts (groups may override every keyword below).
        lr, betas, eps, weight_decay: as in ``torch.optim.AdamW``.
        rule: the inner update, ``adamw`` (Adam with ``decoupled_weight_decay=False``), ``sgd`` (``momentum``,
            ``dampening``, ``nesterov`` as torch.optim.SGD) or ``adafactor`` (``beta2_decay``, ``d``, ``eps`` as
            torch.optim.Adafactor); it runs on the projected gradient of projected weights and on the full
            gradient of the others.
        projected_rule: a different rule for projected weights only: ``subset_norm`` (Subspace-Momentum with
            Subset-Norm step sizes: momentum in the subspace, SGD on the complement, AdaGrad-Norm step per
            channel). None: ``rule``.
        residual: ``none``, ``frugal``, ``fira`` or ``apollo`` (see ``residuals.py``), with ``frugal_rule``,
            ``residual_lr_scale``, ``limiter_gamma``, ``fira_complement``, ``apollo_scale_type``.
        adam_form: ``torch`` (torch.optim.AdamW) or ``hf`` (transformers' AdamW, which the GaLore, Fira and APOLLO
            code use: eps on sqrt(v), bias corrections in the step size, decay after the update); None: ``hf`` with
            ``residual="fira"``/``"apollo"`` (so they match their reference code), else ``torch``.
        preconditioner: ``"lazy_hessian"`` replaces the projected rule by Sophia's clipped Newton step in the subspace,
            clip(m / max(rho * h, eps), 1), with h the curvature diagonal in P's coordinates that a probe folds in
            through ``update_curvature`` (an EMA with factor ``hessian_beta`` over probes, bias-corrected unless
            ``hessian_bias_correction=False``, Sophia's own plain EMA from zero) and that is reused between probes;
            ``betas[0]`` is m's factor. Dense parameters keep ``rule``.
        state_bits: 8 stores the rule's moments blockwise in 8 bits (``state_block_size`` elements per block).
        rank: subspace rank r; ``None`` makes a group dense. Clamped per layer to min(m, n).
        projector: ``svd``, ``rsvd``, ``dct``, ``random``, ``gaussian`` (APOLLO's) or ``online_pca`` (see
            ``projectors.py``); None: ``gaussian`` with ``residual="apollo"``, else ``svd``.
        update_gap: refresh every this many updates of a layer (unless a scheduler owns the schedule).
        scale: multiplies the projected-back update (GaLore's alpha).
        decoupled_weight_decay: True for AdamW's decay, False for Adam's L2 penalty.
        moments: at a refresh ``keep`` the moments (GaLore), ``reset`` them, or ``rotate`` them into the new basis.
        projector_bits: store P quantized to 8 or 4 bits (group-wise, Q-GaLore); None keeps it in the weight dtype.
        proj_group_size: elements per quantization group.
        seed: base seed for random sketches and stochastic rounding (mixed with layer index and step).
        rsvd_oversample, rsvd_niter: randomized SVD's extra sketch columns and power iterations.
        dct_scorer: ``matmul`` (shared d x d basis) or ``fft`` (Makhoul's FFT, no basis kept).
        dct_norm: ``l2`` ranks DCT columns by the energy they capture; ``l1`` as DCT-AdamW's code (``projectors.py``).
        pca_lr: online PCA's step size on P.
        memory_budget: bytes for this optimizer's whole state (dense part, projected moments, projectors). Each
            projected layer then gets its own rank, at most ``rank``, chosen at its refreshes (see ``ranks.py``):
            proportional to its curvature trace (``rank_by="curvature"``, fed by ``set_layer_curvature``; until the
            first one arrives, as for ``"residual"``) or to its gradient energy outside the current subspace
            (``rank_by="residual"``, measured at each refresh). A layer grows only into bytes that are free at
            that moment, so the state never exceeds the budget. Needs full-precision state and P.
        layer_names: names of the weights, for messages only (``from_optimizer`` takes them from a dict).

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
        rank: int | None = 128,
        projector: str | None = None,
        update_gap: int = 200,
        scale: float = 1.0,
        decoupled_weight_decay: bool = True,
        moments: str = "keep",
        projector_bits: int | None = None,
        proj_group_size: int = 256,
        seed: int = 0,
        rsvd_oversample: int = 8,
        rsvd_niter: int = 2,
        dct_scorer: str = "matmul",
        dct_norm: str = "l2",
        dct_type: int = 2,
        pca_lr: float = 0.1,
        rule: str = "adamw",
        adam_form: str | None = None,
        projected_rule: str | None = None,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        beta2_decay: float = -0.8,
        d: float = 1.0,
        residual: str = "none",
        frugal_rule: str = "signsgd",
        residual_lr_scale: float = 1.0,
        limiter_gamma: float = 1.01,
        fira_complement: str = "scaled",
        apollo_scale_type: str = "channel",
        state_bits: int | None = None,
        state_block_size: int = 256,
        preconditioner: str | None = None,
        rho: float = 0.04,
        hessian_beta: float = 0.99,
        hessian_bias_correction: bool = True,
        memory_budget: int | None = None,
        rank_by: str = "curvature",
        layer_names: Mapping[Tensor, str] | None = None,
    ) -> None:
        defaults = dict(
            rule=rule,
            adam_form=adam_form,
            projected_rule=projected_rule,
            preconditioner=preconditioner,
            rho=rho,
            hessian_beta=hessian_beta,
            hessian_bias_correction=hessian_bias_correction,
            momentum=momentum,
            dampening=dampening,
            nesterov=nesterov,
            beta2_decay=beta2_decay,
            d=d,
            residual=residual,
            frugal_rule=frugal_rule,
            residual_lr_scale=residual_lr_scale,
            limiter_gamma=limiter_gamma,
            fira_complement=fira_complement,
            apollo_scale_type=apollo_scale_type,
            state_bits=state_bits,
            state_block_size=state_block_size,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            rank=rank,
            projector=projector,
            update_gap=update_gap,
            scale=scale,
            decoupled_weight_decay=decoupled_weight_decay,
            moments=moments,
            projector_bits=projector_bits,
            proj_group_size=proj_group_size,
            seed=seed,
            rsvd_oversample=rsvd_oversample,
            rsvd_niter=rsvd_niter,
            dct_scorer=dct_scorer,
            dct_norm=dct_norm,
            dct_type=dct_type,
            pca_lr=pca_lr,
            lowrank_mask=None,
        )
        self._dct_bases: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}
        self._slots: dict[Tensor, tuple[int, int, int]] = {}  # param -> (index, group, place in group); _locate
        self._projectors = {name: cls() for name, cls in PROJECTOR_CLASSES.items()}
        self._refresh_requests: set[Tensor] | None = None  # None: fixed update_gap
        self._shard: tuple[int, int, Any] | None = None  # (rank, world_size, process group)
        self.last_refreshes: dict[Tensor, RefreshInfo] = {}
        _check_budget_options(memory_budget, rank_by)
        self.memory_budget, self.rank_by = memory_budget, rank_by
        super().__init__(params, defaults)
        self.kept_dense: list[Tensor] = self._keep_dense_where_projection_costs(layer_names)
        if memory_budget is not None:
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
        per_group = {k: v for k, v in options.items() if k not in OPTIMIZER_LEVEL}
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
        _validate_group(group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, but integer state (projector indices, seeds, 8-bit codes) stays integer: torch casts every
        state tensor to the param's dtype, and bf16 would round DCT indices above 256. Groups saved before an option
        existed get its default (torch installs the saved group dicts as they are)."""
        ints = {
            k: {n: t for n, t in v.items() if not t.is_floating_point() and n != "step"}
            for k, v in state_dict["state"].items()
        }
        state = {k: {n: t for n, t in v.items() if n not in ints[k]} for k, v in state_dict["state"].items()}
        super().load_state_dict({**state_dict, "state": state})
        for group in self.param_groups:  # options added since the checkpoint was written take their defaults
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = dict(zip(saved_ids, chain.from_iterable(g["params"] for g in self.param_groups)))
        for key, tensors in ints.items():
            for name, t in tensors.items():
                # A seed stays on the CPU: P is rebuilt from it at every step, and reading it there costs no sync.
                device = "cpu" if name in HOST_KEYS else params[key].device
                self.state[params[key]][name] = t.to(device=device)

    # -- what a scheduler or a strategy may ask of it ---------------------------------------------------------

    def external_schedule(self) -> None:
        """Refresh only layers passed to ``request_refresh`` (and layers without a subspace yet)."""
        self._refresh_requests = set()

    def request_refresh(self, params: Iterable[Tensor]) -> None:
        """Refresh these layers at their next update (a skipped AMP step leaves the request pending)."""
        if self._refresh_requests is None:
            self.external_schedule()
        self._refresh_requests.update(params)

    def shard_refreshes(self, group: Any = None) -> None:
        """Under torch.distributed: compute each due refresh on one rank (layer i on rank i % world), broadcast it."""
        self._shard = (dist.get_rank(group), dist.get_world_size(group), group)

    def wants_curvature(self) -> bool:
        """Whether some group uses ``preconditioner="lazy_hessian"`` and so waits for ``update_curvature``."""
        return any(g["preconditioner"] == "lazy_hessian" and any(self._mask(g)) for g in self.param_groups)

    def curvature_params(self) -> list[Tensor]:
        """The projected weights whose lazy Hessian ``update_curvature`` refreshes (those that have stepped)."""
        return [
            p
            for g in self.param_groups
            if g["preconditioner"] == "lazy_hessian"
            for p, on in zip(g["params"], self._mask(g))
            if on and "hessian_updates" in self.state[p]
        ]

    @torch.no_grad()
    def update_curvature(self, diagonals: Mapping[Tensor, Tensor]) -> None:
        """Fold fresh curvature diagonals into the lazy Hessians, reused until the next call.

        Each diagonal is in the layer's current subspace coordinates, shaped like its projected gradient: what
        ``lightning_lowrank.curvature.subspace_diagonal`` returns for ``projection_matrix(param)``.
        """
        for p, estimate in diagonals.items():
            index, group = self._locate(p)
            state = self.state[p]
            if "hessian_updates" not in state:
                raise ValueError(
                    "update_curvature got a parameter without a lazy Hessian: it must be projected, in a group "
                    "with preconditioner='lazy_hessian', and have taken a step (see curvature_params())"
                )
            expected = self._projected_shape(p, group)
            if tuple(estimate.shape) != expected:
                raise ValueError(
                    f"curvature diagonal for {tuple(p.shape)} must have shape {expected} (P's coordinates), "
                    f"got {tuple(estimate.shape)}"
                )
            state["hessian_updates"] += 1
            with self._moments(p, "sophia", group) as moments:
                rules.fold_curvature_(
                    moments["hessian"],
                    estimate,
                    int(state["hessian_updates"]),
                    group["hessian_beta"],
                    group["hessian_bias_correction"],
                )

    def set_layer_curvature(self, traces: Mapping[Tensor, float]) -> None:
        """Record each projected layer's Hessian trace; with ``memory_budget`` and ``rank_by="curvature"`` the next
        refreshes give rank in proportion to it. Layers that have not stepped yet are skipped."""
        for p, trace in traces.items():
            if not self.is_projected(p):
                raise ValueError(f"set_layer_curvature got a parameter of shape {tuple(p.shape)} that is not projected")
            if self.state[p]:
                self.state[p]["curvature_trace"] = torch.tensor(float(trace))

    def projection_mask(self, group: dict[str, Any]) -> list[bool]:
        """Which of ``group["params"]`` are projected (in order)."""
        return self._mask(group)

    def refreshes_at_next_step(self, param: Tensor) -> bool:
        """Whether the next ``step()`` refreshes ``param``'s subspace (read before the step: the counter has not moved,
        and a scheduler's requests for this step are in)."""
        _, group = self._locate(param)
        return self.is_projected(param) and self._is_due(param, self.state[param], group)

    def completed_steps(self, param: Tensor) -> int:
        """Updates ``param`` has taken (0 before its first); for a projected weight without a host read after the
        first time (a dense parameter's counter is advanced by torch's own Adam, so it is read each time)."""
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

    def budget_bytes(self) -> tuple[int, dict[Tensor, LayerCost]]:
        """What the budget must hold besides the projected layers, and each projected layer's cost model."""
        costs = {p: _layer_cost(p, g) for g in self.param_groups for p, on in zip(g["params"], self._mask(g)) if on}
        other = 0
        for group in self.param_groups:
            for p, on in zip(group["params"], self._mask(group)):
                if not on and p.requires_grad:
                    other += _meta_bytes(rules.init_state(group["rule"], tuple(p.shape), p.dtype, _META)) + 4
        dct = {
            (min(p.shape), p.dtype)
            for g in self.param_groups
            if g["projector"] == "dct" and g["dct_scorer"] == "matmul"
            for p, on in zip(g["params"], self._mask(g))
            if on
        }
        other += sum(d * d * dtype.itemsize for d, dtype in dct)  # the shared DCT bases
        return other, costs

    def projected_params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p, on in zip(g["params"], self._mask(g)) if on]

    def is_projected(self, param: Tensor) -> bool:
        """Whether ``param`` is updated in a low-rank subspace."""
        _, group = self._locate(param)
        return self._mask(group)[self._slots[param][2]]

    def dct_bases(self) -> dict[tuple[int, torch.dtype, torch.device], Tensor]:
        """The shared DCT bases built so far (one per size, dtype and device); rebuilt on demand, not saved."""
        return self._dct_bases

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

    def _keep_dense_where_projection_costs(self, names: Mapping[Tensor, str] | None) -> list[Tensor]:
        """Turn off the projection of Adafactor weights where it would hold more state than dense Adafactor.

        Adafactor's second moment is factored (m + n numbers): projected, a weight holds the rule's state for R plus
        its projector, which for an SVD-like P (d x r) is already more. Checked at the group's rank (at rank 1 under
        ``memory_budget``, which then caps each layer at the rank that still saves); a DCT basis shared by
        ``dct_scorer="matmul"`` counts once against the savings of the layers that would need it. One warning names
        the weights kept dense; returns them.
        """
        candidates: list[tuple[int, Tensor, dict[str, Any], int]] = []  # (index, weight, group, saving)
        bases_in_use: set[tuple[int, torch.dtype]] = set()  # DCT bases that projected non-Adafactor weights hold
        index = -1
        for group in self.param_groups:
            for p, on in zip(group["params"], self._mask(group)):
                index += 1
                shared = group["projector"] == "dct" and group["dct_scorer"] == "matmul"
                if on and _projected_rule(group) == "adafactor":
                    rank = 1 if self.memory_budget is not None else effective_rank(p.shape, group["rank"])
                    candidates.append((index, p, group, _projection_saving(p, group, rank, self.memory_budget)))
                elif on and shared:
                    bases_in_use.add((min(p.shape), p.dtype))
        kept = [c for c in candidates if c[3] <= 0]
        per_basis: dict[tuple[int, torch.dtype], list] = {}
        for c in candidates:
            if c[3] > 0 and c[2]["projector"] == "dct" and c[2]["dct_scorer"] == "matmul":
                per_basis.setdefault((min(c[1].shape), c[1].dtype), []).append(c)
        for (d, dtype), members in per_basis.items():
            if (d, dtype) not in bases_in_use and sum(c[3] for c in members) <= d * d * dtype.itemsize:
                kept += members
        if not kept:
            return []
        kept.sort(key=lambda c: c[0])
        dense_ids = {id(c[1]) for c in kept}
        for group in self.param_groups:
            mask = self._mask(group)
            if any(id(p) in dense_ids for p in group["params"]):
                group["lowrank_mask"] = [on and id(p) not in dense_ids for p, on in zip(group["params"], mask)]
        names = names or {}
        labels = [f"{names[p]} {tuple(p.shape)}" if p in names else f"#{i} {tuple(p.shape)}" for i, p, _, _ in kept]
        shown = ", ".join(labels[:8]) + (f" and {len(labels) - 8} more" if len(labels) > 8 else "")
        projectors = ", ".join(sorted({repr(c[2]["projector"]) for c in kept}))
        warn_rank_zero(
            f"Adafactor's factored second moment holds only m + n numbers per weight, and projecting "
            f"{len(kept)} of {len(candidates)} Adafactor weight(s) with projector={projectors} would hold more "
            f"optimizer state than that (the projected state plus P, its indices or a shared d x d DCT basis): "
            f"{shown}. They are trained with dense Adafactor instead. An SVD P (d x r) always costs more; a seed "
            "(projector='random') or a DCT index set (projector='dct', dct_scorer='fft') at a small rank can save.",
            stacklevel=3,
        )
        return [c[1] for c in kept]

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

    def _context(self, index: int, param: Tensor, group: dict[str, Any]) -> LayerContext:
        state = self.state[param]
        step = read_int(state["step"]) if "step" in state else 0
        rank = read_int(state["rank"]) if "rank" in state else effective_rank(param.shape, group["rank"])
        return LayerContext(index, step, rank, group, self._basis)

    def _is_due(self, param: Tensor, state: dict[str, Tensor], group: dict[str, Any], step: int | None = None) -> bool:
        """Whether ``param`` refreshes before its next update; ``step`` is its completed updates when the caller has
        already read them (one read of the counter per layer and step)."""
        if not any(k.startswith("proj") for k in state):
            return True
        if self._refresh_requests is None:
            return (read_int(state["step"]) if step is None else step) % group["update_gap"] == 0
        return param in self._refresh_requests

    def _refresh(self, due: list[tuple[Tensor, dict[str, Any], LayerContext]], slots: list[int] | None = None) -> None:
        """Refresh the due layers: all computed here, or sharded over ranks and broadcast; then fix the moments.

        Sharded, the layer in slot i (by default its place in ``due``) is computed on rank i % world."""
        if not due:  # an ordinary step: nothing to refresh, no ranks to reallocate
            return
        rank, world = (self._shard[0], self._shard[1]) if self._shard else (0, 1)
        owners = [i % world for i in (slots if slots is not None else range(len(due)))]
        old = {
            p: self._projectors[group["projector"]].matrix(p, self.state[p], ctx)
            for p, group, ctx in due
            if any(k.startswith("proj") for k in self.state[p])
        }
        if self.memory_budget is not None:
            self._reallocate(due, old)
        timers = {}
        for owner, (p, group, ctx) in zip(owners, due):
            state = self.state[p]
            projector = self._projectors[group["projector"]]
            if owner == rank:
                timer = RefreshTimer(p.device)
                projector.refresh(p, p.grad, state, ctx)
                timers[p] = timer.stop()
        if self._shard:
            for owner, (p, _, _) in zip(owners, due):
                self._broadcast_projector_state(p, src_index=owner)
        for p, group, ctx in due:
            state = self.state[p]
            P_new = self._projectors[group["projector"]].matrix(p, state, ctx)
            similarity = cosine = None
            if p in old:
                # Dequantized and online-PCA matrices are only nearly orthonormal: those get orthonormalized.
                exact = group["projector"] not in ("online_pca", "gaussian") and group["projector_bits"] is None
                similarity, cosine = subspace_similarity(old[p], P_new, orthonormal=exact)
                rule = _projected_rule(group)
                with self._moments(p, rule, group) as moments:
                    left = is_left(p.shape)
                    keys, rank_keys = rules.MOMENT_KEYS[rule], _rank_axis_keys(rule, left)
                    _move_moments(moments, keys, rank_keys, old[p], P_new, group["moments"], left)
                if group["moments"] == "reset" and "hessian_updates" in state:
                    # h restarts: the next probe's diagonal is taken whole (bias-corrected) or as (1 - beta) of it
                    state["hessian_updates"].zero_()
            leading = None if cosine is None else abs(cosine)
            self.last_refreshes[p] = RefreshInfo(
                ctx.step, timers.get(p), similarity, leading, p in timers, leading_cosine=cosine
            )
            if self._refresh_requests is not None:
                self._refresh_requests.discard(p)

    def _reallocate(self, due: list[tuple[Tensor, dict[str, Any], LayerContext]], old: dict[Tensor, Tensor]) -> None:
        """Give the due layers their ranks under the budget (layers first seen get their state here).

        Weights: curvature traces when every stepped layer has one (``rank_by="curvature"``), else the gradient energy
        outside the current subspace, measured now for due layers (all of it for a layer without a subspace yet).
        Layers shrink before others grow, and a layer grows only into bytes free at that moment: the layers that are
        not due keep their rank, and layers not seen yet keep rank 1 reserved.
        """
        for p, _, _ in due:
            grad = p.grad.float()
            energy = grad.square().sum()
            if p in old:
                energy = energy - project(grad, old[p].float()).square().sum()
            self.state[p]["residual_energy"] = energy.clamp(min=0).cpu()
        other, costs = self.budget_bytes()
        layers = list(costs)
        stepped = [p for p in layers if "rank" in self.state[p]]
        key = "residual_energy"
        if self.rank_by == "curvature" and stepped and all("curvature_trace" in self.state[p] for p in stepped):
            key = "curvature_trace"
        weights = [float(self.state[p].get(key, 0.0)) for p in layers]
        room, cost_list = self.memory_budget - other, list(costs.values())
        # Each layer keeps at least RANK_FLOOR of the rank an even split of the budget gives it: curvature and
        # gradient energy move the rest. Without a floor, layers with a small trace (attention queries and keys)
        # fall to rank 1 and training suffers (examples/README.md, budget table).
        even = allocate_ranks([1.0] * len(layers), cost_list, room)
        floors = [max(1, int(RANK_FLOOR * r)) for r in even]
        targets = dict(zip(layers, allocate_ranks(weights, cost_list, room, floors)))
        current = {p: read_int(self.state[p]["rank"]) if "rank" in self.state[p] else 1 for p in layers}
        free = self.memory_budget - other - sum(costs[p].bytes(current[p]) for p in layers)
        for p, group, ctx in sorted(due, key=lambda item: targets[item[0]] - current[item[0]]):
            cost = costs[p]
            affordable = current[p] + free // cost.per_rank if cost.per_rank else cost.max_rank
            new = max(1, min(targets[p], affordable))
            free -= cost.per_rank * (new - current[p])
            current[p] = new
            if "rank" not in self.state[p]:
                self._init_projected_state(p, group, new)
            self.state[p]["rank"] = torch.tensor(new, dtype=torch.int64)
            ctx.rank = new

    def _check_budget_fits(self) -> None:
        for group in self.param_groups:
            for key in ("state_bits", "projector_bits"):
                if group[key] is not None and any(self._mask(group)):
                    raise ValueError(
                        f"memory_budget allocates ranks for full-precision state; it does not support {key}="
                        f"{group[key]!r} yet. Use one or the other."
                    )
        other, costs = self.budget_bytes()
        needed = min_budget(list(costs.values()), other)
        if needed > self.memory_budget:
            raise ValueError(
                f"memory_budget={self.memory_budget} bytes cannot hold this optimizer's state: the dense part and "
                f"shared bases take {other} bytes and {len(costs)} projected layers at rank 1 take "
                f"{needed - other} more, so it needs at least {needed} bytes. Raise the budget or project fewer layers."
            )

    def _broadcast_projector_state(self, param: Tensor, src_index: int) -> None:
        state = self.state[param]
        group = self._shard[2]
        src = dist.get_global_rank(group, src_index) if group is not None else src_index
        keys = [k for k in state if k.startswith("proj")]
        meta = [[(k, tuple(state[k].shape), state[k].dtype) for k in sorted(keys)]]
        dist.broadcast_object_list(meta, src=src, group=group)
        device = param.device
        is_src = dist.get_rank() == src
        for key, shape, dtype in meta[0]:
            # Receivers fill a fresh tensor: the old one may still be referenced (the previous P, kept to compare).
            tensor = state[key].to(device) if is_src else torch.empty(shape, dtype=dtype, device=device)
            dist.broadcast(tensor, src=src, group=group)
            state[key] = tensor.cpu() if key in HOST_KEYS else tensor
        for key in [k for k in state if k.startswith("proj") and k not in {m[0] for m in meta[0]}]:
            del state[key]

    @torch.no_grad()
    def _update(self) -> None:
        self.last_refreshes = {}
        projected: list[tuple[Tensor, dict[str, Any], LayerContext]] = []
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
                    if not self.state[p] and self.memory_budget is None:
                        self._init_projected_state(p, group)
                    projected.append((p, group, self._context(index, p, group)))
                else:
                    dense.append(p)
            self._dense_steps(dense, group)
        self._refresh([(p, g, ctx) for p, g, ctx in projected if self._is_due(p, self.state[p], g, ctx.step)])
        for p, group, ctx in projected:
            self._projected_step(p, group, ctx)
            self._projectors[group["projector"]].after_update(p, p.grad, self.state[p], ctx)

    def _projected_step(self, p: Tensor, group: dict[str, Any], ctx: LayerContext) -> None:
        state = self.state[p]
        rule = _projected_rule(group)
        lr, scale = float(group["lr"]), group["scale"]
        param_rms = _rms(p) if rule == "adafactor" else 0.0
        grad = _decay_before(p, p.grad, rule, group)
        P = self._projectors[group["projector"]].matrix(p, state, ctx)
        low_rank = project(grad, P)
        advance(state["step"])
        with self._moments(p, rule, group) as moments:
            direction, step_size = rules.direction(
                rule, low_rank, moments, ctx.step + 1, group, param_rms, full_grad=grad
            )
            if rule == "subset_norm":  # Subspace-Momentum: the complement takes an SGD step at the subset's rate
                back = project_back(low_rank, P, p.shape)
                complement = (grad - back) * rules.subset_norm_scale(moments, group["eps"])
                _add_scaled(p, project_back(direction, P, p.shape) + complement, step_size, -scale)
                return
        kind = group["residual"]
        back = project_back(low_rank, P, p.shape) if kind in ("frugal", "fira") else None  # apollo never reads it
        extra, factor = residual_update(kind, grad, low_rank, direction, back, state, group)
        if kind == "apollo":  # the scaled raw gradient replaces the projected update
            _add_scaled(p, extra, step_size, -math.sqrt(scale))
        else:
            _add_scaled(p, project_back(direction, P, p.shape), step_size, -scale)
        if kind == "frugal":  # state-free: plain lr, no bias correction
            p.add_(extra, alpha=-lr * factor)
        elif kind == "fira":  # as in Fira's code: the bias-corrected step size, and scale only on the projected part
            _add_scaled(p, extra, step_size, -1.0)
        _decay_after(p, rule, group)

    def _projected_step_low_rank(self, p: Tensor, group: dict[str, Any], ctx: LayerContext, low_rank: Tensor) -> None:
        """``_projected_step`` for a gradient that arrives already projected (layer-wise accumulation).

        ``low_rank`` is the sum of the micro-batches' projected gradients: the projection of their sum, as projection
        is linear. Only for rules that need nothing of the full gradient at the update (``residual="none"``, no
        Subset-Norm); Adam's L2 penalty is projected on its own (P^T (G + wd W) = P^T G + wd P^T W).
        """
        state = self.state[p]
        rule = _projected_rule(group)
        scale, wd = group["scale"], group["weight_decay"]
        param_rms = _rms(p) if rule == "adafactor" else 0.0
        P = self._projectors[group["projector"]].matrix(p, state, ctx)
        if wd != 0 and not group["decoupled_weight_decay"]:
            low_rank = low_rank.add(project(p, P), alpha=wd)
        else:
            _decay_before(p, low_rank, rule, group)  # decoupled: shrinks p (unless it decays after the update)
        advance(state["step"])
        with self._moments(p, rule, group) as moments:
            direction, step_size = rules.direction(rule, low_rank, moments, ctx.step + 1, group, param_rms)
        _add_scaled(p, project_back(direction, P, p.shape), step_size, -scale)
        _decay_after(p, rule, group)

    def _init_projected_state(self, param: Tensor, group: dict[str, Any], rank: int | None = None) -> None:
        """The inner rule's state for the projected gradient (at ``rank`` when the budget chose one)."""
        self._init_rule_state(param, _projected_rule(group), projected_shape(param.shape, rank or group["rank"]), group)
        if rank is not None:
            self.state[param]["rank"] = torch.tensor(rank, dtype=torch.int64)

    def _projected_shape(self, param: Tensor, group: dict[str, Any]) -> tuple[int, int]:
        return projected_shape(param.shape, self.layer_rank(param) if self.state[param] else group["rank"])

    def _init_rule_state(self, param: Tensor, rule: str, shape: tuple[int, ...], group: dict[str, Any]) -> None:
        state = self.state[param]
        state["step"] = torch.tensor(0.0)
        if rule == "sophia":
            state["hessian_updates"] = torch.tensor(0.0)  # probes folded into the curvature diagonal so far
        buffers = rules.init_state(rule, shape, param.dtype, param.device)
        if rule == "sgd" and group["momentum"] == 0:
            buffers = {}  # as torch.optim.SGD: without momentum there is nothing to keep
        if group["state_bits"] is None:
            state.update(buffers)
        else:
            for key, tensor in buffers.items():
                self._store_moment(state, key, tensor, rules.MOMENT_KEYS[rule][key], group)

    def _dense_steps(self, params: list[Tensor], group: dict[str, Any]) -> None:
        """A group's dense parameters: torch's own Adam(W) over the whole list (its foreach kernels on CUDA) where the
        rule is torch's AdamW/Adam in full precision, else one ``_dense_step`` each."""
        if not (group["rule"] == "adamw" and rules.adam_form(group) == "torch" and group["state_bits"] is None):
            for p in params:
                self._dense_step(p, group)
            return
        for p in params:
            if not self.state[p]:
                self._init_rule_state(p, "adamw", tuple(p.shape), group)
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adam(
            params,
            [p.grad for p in params],
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [],
            [s["step"] for s in states],  # float CPU tensors, advanced in place by torch
            foreach=group.get("foreach"),  # the user's AdamW/Adam choices (None: torch's default for the device)
            fused=group.get("fused"),
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

    def _dense_step(self, p: Tensor, group: dict[str, Any]) -> None:
        state, rule = self.state[p], group["rule"]
        if not state:
            self._init_rule_state(p, rule, tuple(p.shape), group)
        param_rms = _rms(p) if rule == "adafactor" else 0.0
        grad = _decay_before(p, p.grad, rule, group)
        step = advance(state["step"])
        with self._moments(p, rule, group) as moments:
            direction, step_size = rules.direction(rule, grad, moments, step, group, param_rms)
        _add_scaled(p, direction, step_size, -1.0)
        _decay_after(p, rule, group)

    @contextmanager
    def _moments(self, param: Tensor, rule: str, group: dict[str, Any]) -> Iterator[dict[str, Tensor]]:
        """The rule's buffers to update in place: the state itself, or (8-bit) a dequantized copy that is
        quantized back afterwards, one layer at a time so only one layer's full-precision moments exist at once."""
        state = self.state[param]
        if group["state_bits"] is None:
            yield state
            return
        keys = [k for k in rules.MOMENT_KEYS[rule] if f"{k}_codes" in state]
        moments = {
            k: dequantize_moment(
                _q(state, k), state[f"{k}_shape"].tolist(), param.dtype, block_size=group["state_block_size"]
            )
            for k in keys
        }
        yield moments
        for key, tensor in moments.items():
            self._store_moment(state, key, tensor, rules.MOMENT_KEYS[rule][key], group)

    @staticmethod
    def _store_moment(state: dict[str, Tensor], key: str, tensor: Tensor, signed: bool, group: dict[str, Any]) -> None:
        q = quantize_moment(tensor, signed=signed, block_size=group["state_block_size"])
        state[f"{key}_codes"], state[f"{key}_absmax"] = q["codes"], q["absmax"]
        state[f"{key}_shape"] = torch.tensor(tuple(tensor.shape), dtype=torch.int64)

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


def _move_moments(
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
                moments[key] = buffer.new_zeros(_with_size(buffer.shape, axis, P_new.shape[1]))
            else:
                buffer.zero_()
        return
    R = None
    for key in [k for k in keys if k in rank_keys]:
        buffer = moments[key]
        axis = 0 if left else buffer.dim() - 1
        if policy == "keep":
            moments[key] = _resized(buffer, axis, P_new.shape[1])
            continue
        if R is None:
            work = torch.promote_types(P_old.dtype, torch.float32)  # half precision in float32, float64 kept
            R = P_old.T.to(work) @ P_new.to(work)
        M = (R if key in rules.FIRST_MOMENTS else R.pow(2)).to(buffer.dtype)
        moments[key] = M.T @ buffer if left else buffer @ M


def _with_size(shape: torch.Size, axis: int, size: int) -> tuple[int, ...]:
    return tuple(size if i == axis else s for i, s in enumerate(shape))


def _resized(buffer: Tensor, axis: int, size: int) -> Tensor:
    """The first ``size`` entries along ``axis``, zero-padded when growing; the buffer itself if unchanged."""
    if buffer.shape[axis] == size:
        return buffer
    if buffer.shape[axis] > size:
        return buffer.narrow(axis, 0, size).clone()
    out = buffer.new_zeros(_with_size(buffer.shape, axis, size))
    out.narrow(axis, 0, buffer.shape[axis]).copy_(buffer)
    return out


_META = torch.device("meta")


def _meta_bytes(buffers: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in buffers.values())


@functools.cache  # asked at every refresh of every layer; the answer depends on the rule and the side only
def _rank_axis_keys(rule: str, left: bool) -> frozenset[str]:
    """The rule's buffers that have an extent along the rank axis (the others are per channel).

    The rank axis is the first of R = P^T G (r, n) when P acts on the left and the last of R = G P (m, r) on the
    right, so the answer depends on the side: Adafactor's ``row_var`` carries the rank on the left, ``col_var`` on
    the right. Probed with two projected shapes of that side whose rank differs."""
    shapes = [(2, 7), (3, 7)] if left else [(7, 2), (7, 3)]
    a, b = (rules.init_state(rule, shape, torch.float32, _META) for shape in shapes)
    return frozenset(k for k in a if a[k].shape != b[k].shape)


# Bytes per unit of rank of each projector's storage, for a weight of smaller side d and element size es.
_PROJECTOR_BYTES_PER_RANK = {
    "svd": lambda d, es: d * es,
    "rsvd": lambda d, es: d * es,
    "online_pca": lambda d, es: d * es,
    "dct": lambda d, es: 8,  # int64 indices
    "random": lambda d, es: 0,  # a seed
    "gaussian": lambda d, es: 0,  # a seed
}


def _layer_cost(param: Tensor, group: dict[str, Any]) -> LayerCost:
    """A projected layer's state bytes as a function of its rank (moments, P or its indices, scalars)."""
    rule = _projected_rule(group)

    def moments(rank: int) -> int:
        return _meta_bytes(rules.init_state(rule, projected_shape(param.shape, rank), param.dtype, _META))

    d, es = min(param.shape), param.element_size()
    fixed = moments(0) + SCALAR_BYTES
    per_rank = moments(1) - moments(0) + _PROJECTOR_BYTES_PER_RANK[group["projector"]](d, es)
    dense = _meta_bytes(rules.init_state(group["rule"], tuple(param.shape), param.dtype, _META))
    worth = (dense - fixed) // per_rank if per_rank else d  # above this the layer would hold more than dense state
    return LayerCost(fixed, per_rank, max(1, min(group["rank"], d, worth)))


def _state_bytes(rule: str, shape: tuple[int, ...], dtype: torch.dtype, group: dict[str, Any]) -> int:
    """Bytes of the rule's buffers for a gradient of ``shape``: as is, or (``state_bits=8``) one byte per element
    with a float32 absmax per block and the int64 shape."""
    buffers = rules.init_state(rule, shape, dtype, _META)
    if group["state_bits"] is None:
        return _meta_bytes(buffers)
    block = group["state_block_size"]
    sizes = [t for t in buffers.values() if t.numel()]
    return sum(t.numel() + 4 * -(-t.numel() // min(block, t.numel())) + 8 * t.dim() for t in sizes)


def _projector_bytes(param: Tensor, group: dict[str, Any], rank: int) -> int:
    """Bytes of one layer's projector at ``rank``: P (d x r, or its 8/4-bit codes with a float32 scale and zero per
    group), DCT indices, or a seed. A DCT basis shared by ``dct_scorer="matmul"`` is not in it."""
    d, es, kind, bits = min(param.shape), param.element_size(), group["projector"], group["projector_bits"]
    if kind in ("random", "gaussian"):
        return 8  # an int64 seed
    if bits is None or kind == "dct":
        return _PROJECTOR_BYTES_PER_RANK[kind](d, es) * rank
    n = d * rank
    return -(-n * bits // 8) + 8 * -(-n // min(group["proj_group_size"], n))


def _projection_saving(param: Tensor, group: dict[str, Any], rank: int, memory_budget: int | None = None) -> int:
    """Optimizer-state bytes that projecting ``param`` at ``rank`` saves against training it densely in the same
    optimizer (same rule, same ``state_bits``); negative where the projection costs. The step counter is on both
    sides; a projected layer's own scalars (Fira's and APOLLO's last norm, the budget's rank and energy) count."""
    dense = _state_bytes(group["rule"], tuple(param.shape), param.dtype, group)
    rule, shape = _projected_rule(group), projected_shape(param.shape, rank)
    projected = _state_bytes(rule, shape, param.dtype, group) + _projector_bytes(param, group, rank)
    projected += (4 if group["residual"] in ("fira", "apollo") else 0) + (12 if memory_budget is not None else 0)
    return dense - projected


def _check_budget_options(memory_budget: Any, rank_by: Any) -> None:
    if memory_budget is not None and (
        isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget <= 0
    ):
        raise ValueError(f"Invalid memory_budget: {memory_budget!r} (must be a positive int of bytes, or None)")
    _check_choice("rank_by", rank_by, RANK_BY)


def _projected_rule(group: dict[str, Any]) -> str:
    """The inner rule of a group's projected weights."""
    if group["preconditioner"] == "lazy_hessian":
        return "sophia"
    return group["projected_rule"] or group["rule"]


def validate_options(**options: Any) -> None:
    """Check ProjectedOptimizer keyword arguments without building an optimizer (raises ValueError)."""
    ProjectedOptimizer([torch.zeros(1, 1, requires_grad=True)], **{**options, "memory_budget": None})
    _check_budget_options(options.get("memory_budget"), options.get("rank_by", "curvature"))


def supported_names() -> str:
    return ", ".join(f"torch.optim.{c.__name__}" for c in SUPPORTED_OPTIMIZERS)


class ProjectedAdamW(ProjectedOptimizer):
    """``ProjectedOptimizer`` with the Adam(W) rule: the foundation's optimizer, and the default."""


def _decay_before(p: Tensor, grad: Tensor, rule: str, group: dict[str, Any]) -> Tensor:
    """Weight decay applied before the update: L2 into the gradient, or torch's decoupled shrink of the weight."""
    if rules.decays_after_update(rule, group):
        return grad
    return rules.weight_decay_(p, grad, float(group["lr"]), group["weight_decay"], group["decoupled_weight_decay"])


def _decay_after(p: Tensor, rule: str, group: dict[str, Any]) -> None:
    """transformers' AdamW (``adam_form="hf"``: GaLore, Fira, APOLLO) decays the weight after the update."""
    if rules.decays_after_update(rule, group) and group["weight_decay"] != 0:
        p.add_(p, alpha=-float(group["lr"]) * group["weight_decay"])


def _rms(t: Tensor) -> Tensor:
    """RMS of a weight as a 0-d tensor on its device (Adafactor's relative step; no host read)."""
    return t.norm(2) / math.sqrt(t.numel())


def _add_scaled(p: Tensor, update: Tensor, step_size: float | Tensor, factor: float) -> None:
    """p += factor * step_size * update, with a step size that is a Python number or a 0-d device tensor
    (Adafactor's, computed without reading the device)."""
    if isinstance(step_size, Tensor):
        p.addcmul_(update, (step_size * factor).to(update.dtype))
    else:
        p.add_(update, alpha=step_size * factor)


def _q(state: dict[str, Tensor], key: str) -> dict[str, Tensor]:
    return {"codes": state[f"{key}_codes"], "absmax": state[f"{key}_absmax"]}


def _validate_group(group: dict[str, Any]) -> None:
    lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
    if not 0.0 <= float(lr):
        raise ValueError(f"Invalid learning rate: {lr} (must be >= 0)")
    for value in eps if isinstance(eps, (tuple, list)) else (eps,):  # Adafactor's eps is a pair
        if value is not None and not 0.0 <= value:
            raise ValueError(f"Invalid epsilon value: {eps} (must be >= 0)")
    for i, beta in enumerate(group["betas"]):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta} (must be in [0, 1))")
    if not 0.0 <= wd:
        raise ValueError(f"Invalid weight_decay value: {wd} (must be >= 0)")
    rank = group["rank"]
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ValueError(f"Invalid rank: {rank!r} (must be a positive int, or None for a dense group)")
    _check_choice("projector", group["projector"], PROJECTORS)
    _check_choice("moments", group["moments"], MOMENT_POLICIES)
    if group["moments"] == "rotate" and group["projector"] == "gaussian":
        raise ValueError(
            "moments='rotate' maps moments through P_old^T P_new, which needs orthonormal bases, and "
            "projector='gaussian' (APOLLO's) is not orthonormal; use moments='keep' (APOLLO's) or 'reset'"
        )
    _check_choice("dct_scorer", group["dct_scorer"], DCT_SCORERS)
    _check_choice("dct_norm", group["dct_norm"], DCT_NORMS)
    _check_choice("dct_type", group["dct_type"], (2, 3))
    if group["dct_type"] == 3 and group["dct_scorer"] != "matmul":
        raise ValueError("dct_type=3 (DCT-AdamW's matmul basis) scores with the shared basis: use dct_scorer='matmul'")
    _check_choice("adam_form", group["adam_form"], (None, *rules.ADAM_FORMS))
    _check_choice("hessian_bias_correction", group["hessian_bias_correction"], (True, False))
    _check_choice("projector_bits", group["projector_bits"], (None, 4, 8))
    _check_choice("rule", group["rule"], rules.RULES[:3])
    _check_choice("projected_rule", group["projected_rule"], (None, "subset_norm"))
    _check_choice("preconditioner", group["preconditioner"], (None, "lazy_hessian"))
    if group["preconditioner"] and group["projected_rule"]:
        raise ValueError(
            f"preconditioner={group['preconditioner']!r} is itself the projected rule; drop "
            f"projected_rule={group['projected_rule']!r} (the strategy's `inner`) or the preconditioner"
        )
    if not group["rho"] > 0:
        raise ValueError(f"Invalid rho: {group['rho']!r} (must be > 0)")
    if not 0.0 <= group["hessian_beta"] < 1.0:
        raise ValueError(f"Invalid hessian_beta: {group['hessian_beta']!r} (must be in [0, 1))")
    _check_choice("residual", group["residual"], RESIDUALS)
    _check_choice("frugal_rule", group["frugal_rule"], FRUGAL_RULES)
    _check_choice("apollo_scale_type", group["apollo_scale_type"], APOLLO_SCALE_TYPES)
    _check_choice("fira_complement", group["fira_complement"], FIRA_COMPLEMENTS)
    _check_choice("state_bits", group["state_bits"], (None, 8))
    if group["projected_rule"] == "subset_norm" and group["residual"] != "none":
        raise ValueError("projected_rule='subset_norm' updates the complement itself; use residual='none' with it")
    if not 0.0 <= group["momentum"] < 1.0:
        raise ValueError(f"Invalid momentum: {group['momentum']!r} (must be in [0, 1))")
    for key in ("residual_lr_scale", "limiter_gamma", "d"):
        if not group[key] > 0:
            raise ValueError(f"Invalid {key}: {group[key]!r} (must be > 0)")
    for key, low in (
        ("update_gap", 1),
        ("proj_group_size", 1),
        ("rsvd_oversample", 0),
        ("rsvd_niter", 0),
        ("state_block_size", 1),
    ):
        value = group[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"Invalid {key}: {value!r} (must be an int >= {low})")
    if not group["scale"] > 0:
        raise ValueError(f"Invalid scale: {group['scale']!r} (must be > 0)")
    if not group["pca_lr"] > 0:
        raise ValueError(f"Invalid pca_lr: {group['pca_lr']!r} (must be > 0)")
    mask = group["lowrank_mask"]
    if mask is not None:
        if len(mask) != len(group["params"]):
            raise ValueError(f"lowrank_mask has {len(mask)} entries for {len(group['params'])} params")
        for p, projected in zip(group["params"], mask):
            if projected and p.ndim != 2:
                raise ValueError(f"lowrank_mask selects shape {tuple(p.shape)}; only 2-D weights project")


def _check_choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"Unknown {key} {value!r}; choose one of {', '.join(map(repr, allowed))}")
