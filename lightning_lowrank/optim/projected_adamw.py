"""``ProjectedAdamW``: AdamW whose 2-D weights keep their moments in a rank-r subspace.

The class is a thin shell around ``functional.py``: it validates hyperparameters, creates state
lazily, decides when a layer's subspace is refreshed, and calls the update functions.

Which parameters are projected is decided per parameter by the group key ``lowrank_mask``
(a list of bools parallel to ``group["params"]``; when absent, every 2-D parameter of a group whose
``rank`` is not None). Everything lives in ``self.state`` and ``self.param_groups`` as tensors and
primitives, so ``state_dict()`` round-trips and loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_lowrank.optim.functional import adamw_step_, projected_adamw_step_
from lightning_lowrank.optim.projection import (
    PROJECTORS,
    dct_basis,
    dct_select,
    effective_rank,
    is_left,
    svd_projection,
)

SUPPORTED_OPTIMIZERS = (torch.optim.AdamW, torch.optim.Adam)


class ProjectedAdamW(Optimizer):
    """AdamW with GaLore-style low-rank moments for selected 2-D weights.

    Args:
        params: parameters or param-group dicts (groups may override every keyword below).
        lr, betas, eps, weight_decay: as in ``torch.optim.AdamW``.
        rank: subspace rank r; ``None`` makes a group dense. Clamped per layer to min(m, n).
        projector: ``"svd"`` (top-r singular vectors) or ``"dct"`` (r DCT-II columns, indices only).
        update_gap: refresh the subspace every this many optimizer steps of that layer.
        scale: multiplies the projected-back update (GaLore's alpha).
        decoupled_weight_decay: True for AdamW's decay, False for Adam's L2 penalty.
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
        projector: str = "svd",
        update_gap: int = 200,
        scale: float = 1.0,
        decoupled_weight_decay: bool = True,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            rank=rank,
            projector=projector,
            update_gap=update_gap,
            scale=scale,
            decoupled_weight_decay=decoupled_weight_decay,
            lowrank_mask=None,
        )
        self._dct_bases: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}
        super().__init__(params, defaults)

    @classmethod
    def from_optimizer(
        cls,
        optimizer: Optimizer,
        projected: set[Tensor] | Callable[[Tensor], bool],
        *,
        rank: int,
        projector: str = "svd",
        update_gap: int = 200,
        scale: float = 1.0,
    ) -> ProjectedAdamW:
        """Build on the *same* param-group dicts as a torch Adam/AdamW (keeps lr, betas, user keys).

        Sharing the dicts keeps values that LR schedulers and Lightning wrote into them (``initial_lr``).
        """
        if type(optimizer) not in SUPPORTED_OPTIMIZERS:
            names = ", ".join(f"torch.optim.{c.__name__}" for c in SUPPORTED_OPTIMIZERS)
            raise TypeError(
                f"lightning_lowrank can project {names}, but configure_optimizers returned "
                f"{type(optimizer).__module__}.{type(optimizer).__name__}. Return one of the supported optimizers "
                "or exclude this optimizer from the low-rank strategy."
            )
        is_selected = projected if callable(projected) else (lambda p: p in projected)
        decoupled = isinstance(optimizer, torch.optim.AdamW)
        for group in optimizer.param_groups:
            for flag in ("amsgrad", "maximize"):
                if group.get(flag):
                    raise ValueError(f"ProjectedAdamW does not support {flag}=True; set {flag}=False in the optimizer.")
            group.setdefault("rank", rank)
            group.setdefault("projector", projector)
            group.setdefault("update_gap", update_gap)
            group.setdefault("scale", scale)
            group["decoupled_weight_decay"] = decoupled or bool(group.get("decoupled_weight_decay", False))
            group["lowrank_mask"] = [bool(is_selected(p)) for p in group["params"]]
        return cls(optimizer.param_groups, lr=optimizer.defaults["lr"], rank=rank, projector=projector)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        _validate_group(self.param_groups[-1])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, but subspace indices stay int64 (torch casts every state tensor to the param's dtype)."""
        indices = {k: v["proj_idx"] for k, v in state_dict["state"].items() if "proj_idx" in v}
        state = {k: {n: t for n, t in v.items() if n != "proj_idx"} for k, v in state_dict["state"].items()}
        super().load_state_dict({**state_dict, "state": state})
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = dict(zip(saved_ids, chain.from_iterable(g["params"] for g in self.param_groups)))
        for key, idx in indices.items():
            self.state[params[key]]["proj_idx"] = idx.to(device=params[key].device, dtype=torch.int64)

    def _mask(self, group: dict[str, Any]) -> list[bool]:
        if group["rank"] is None:
            return [False] * len(group["params"])
        mask = group["lowrank_mask"]
        if mask is None:
            return [p.ndim == 2 for p in group["params"]]
        return mask

    def is_projected(self, param: Tensor) -> bool:
        """Whether ``param`` is updated in a low-rank subspace."""
        for group in self.param_groups:
            for p, projected in zip(group["params"], self._mask(group)):
                if p is param:
                    return projected
        raise KeyError("parameter is not managed by this optimizer")

    def dct_bases(self) -> dict[tuple[int, torch.dtype, torch.device], Tensor]:
        """The shared DCT bases built so far (one per size, dtype and device); rebuilt on demand, not saved."""
        return self._dct_bases

    def _dct_basis(self, size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        key = (size, dtype, device)
        if key not in self._dct_bases:
            self._dct_bases[key] = dct_basis(size, dtype=dtype, device=device)
        return self._dct_bases[key]

    def projection_matrix(self, param: Tensor) -> Tensor:
        """The current P (d x r, orthonormal columns) of a projected parameter."""
        state = self.state[param]
        if "proj" in state:
            return state["proj"]
        basis = self._dct_basis(min(param.shape), param.dtype, param.device)
        return basis.index_select(1, state["proj_idx"])

    def _refresh(self, param: Tensor, grad: Tensor, group: dict[str, Any]) -> None:
        """Choose a new subspace from the current (finite, unscaled, clipped) gradient."""
        state = self.state[param]
        rank = effective_rank(param.shape, group["rank"])
        if group["projector"] == "svd":
            state["proj"] = svd_projection(grad, rank)
        else:
            basis = self._dct_basis(min(param.shape), param.dtype, param.device)
            state["proj_idx"] = dct_select(grad, rank, basis)

    def _init_projected_state(self, param: Tensor, group: dict[str, Any]) -> None:
        rank = effective_rank(param.shape, group["rank"])
        m, n = param.shape
        shape = (rank, n) if is_left(param.shape) else (m, rank)
        state = self.state[param]
        state["step"] = torch.tensor(0.0)
        state["exp_avg"] = torch.zeros(shape, dtype=param.dtype, device=param.device)
        state["exp_avg_sq"] = torch.zeros(shape, dtype=param.dtype, device=param.device)

    @torch.no_grad()
    def _update(self) -> None:
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            hyper = dict(
                lr=float(group["lr"]),
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                decoupled=group["decoupled_weight_decay"],
            )
            for p, projected in zip(group["params"], self._mask(group)):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("ProjectedAdamW does not support sparse gradients.")
                state = self.state[p]
                if projected:
                    if not state:
                        self._init_projected_state(p, group)
                    if int(state["step"]) % group["update_gap"] == 0:
                        self._refresh(p, p.grad, group)
                    state["step"] += 1
                    projected_adamw_step_(
                        p,
                        p.grad,
                        self.projection_matrix(p),
                        state["exp_avg"],
                        state["exp_avg_sq"],
                        int(state["step"]),
                        scale=group["scale"],
                        **hyper,
                    )
                else:
                    if not state:
                        state["step"] = torch.tensor(0.0)
                        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["step"] += 1
                    adamw_step_(p, p.grad, state["exp_avg"], state["exp_avg_sq"], int(state["step"]), **hyper)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Run ``closure`` first when given (Lightning runs forward/backward/clipping in it), then update.

        Called without a closure by ``GradScaler.step``; a step the scaler skips never reaches here,
        so the per-layer step counters (and the refresh schedule) only count real updates.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # What torch's LR-scheduler step wrapper records; see the attribute set below the class.
        self._opt_called = True
        self._update()
        return loss

    # LR schedulers wrap ``optimizer.step`` to detect a scheduler step before the first optimizer step.
    # This class records that itself (``_opt_called`` above), so schedulers rebound to it need no re-wrapping.
    step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]


def _validate_group(group: dict[str, Any]) -> None:
    lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
    if not 0.0 <= float(lr):
        raise ValueError(f"Invalid learning rate: {lr} (must be >= 0)")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps} (must be >= 0)")
    for i, beta in enumerate(group["betas"]):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta} (must be in [0, 1))")
    if not 0.0 <= wd:
        raise ValueError(f"Invalid weight_decay value: {wd} (must be >= 0)")
    rank = group["rank"]
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ValueError(f"Invalid rank: {rank!r} (must be a positive int, or None for a dense group)")
    if group["projector"] not in PROJECTORS:
        raise ValueError(f"Unknown projector {group['projector']!r}; choose one of {', '.join(PROJECTORS)}")
    gap = group["update_gap"]
    if isinstance(gap, bool) or not isinstance(gap, int) or gap < 1:
        raise ValueError(f"Invalid update_gap: {gap!r} (must be an int >= 1)")
    if not group["scale"] > 0:
        raise ValueError(f"Invalid scale: {group['scale']!r} (must be > 0)")
    mask = group["lowrank_mask"]
    if mask is not None:
        if len(mask) != len(group["params"]):
            raise ValueError(f"lowrank_mask has {len(mask)} entries for {len(group['params'])} params")
        for p, projected in zip(group["params"], mask):
            if projected and p.ndim != 2:
                raise ValueError(f"lowrank_mask selects shape {tuple(p.shape)}; only 2-D weights project")
