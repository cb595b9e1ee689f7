"""Taking over a torch optimizer's param groups (``ProjectedOptimizer.from_optimizer``).

The groups are the *same* dicts, not copies: they keep the user's hyperparameters and what LR schedulers and
Lightning wrote into them (``initial_lr``). Each gets the rule of its optimizer, the low-rank options it does not set
itself, and the mask of the weights to project.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from lightning_lowrank.optim.options import SUPPORTED_OPTIMIZERS, supported_names


def adopt_groups(
    optimizer: Optimizer,
    projected: set[Tensor] | Mapping[Tensor, str] | Callable[[Tensor], bool],
    per_group: Mapping[str, Any],
) -> None:
    """Prepare ``optimizer.param_groups`` in place for a ``ProjectedOptimizer`` (``per_group``: the options a group
    may set); refuse an optimizer or a flag it cannot take over."""
    if type(optimizer) not in SUPPORTED_OPTIMIZERS:
        raise TypeError(
            f"lightning_lowrank can project {supported_names()}, but configure_optimizers returned "
            f"{type(optimizer).__module__}.{type(optimizer).__name__}. Return one of the supported optimizers, "
            "or pass fallback='dense' to the strategy to keep this optimizer as it is."
        )
    rule, decoupled = SUPPORTED_OPTIMIZERS[type(optimizer)]
    is_selected = projected if callable(projected) else (lambda p: p in projected)
    for group in optimizer.param_groups:
        for flag in ("amsgrad", "maximize"):
            if group.get(flag):
                raise ValueError(f"lightning_lowrank does not support {flag}=True; set {flag}=False in the optimizer.")
        for key, value in per_group.items():
            group.setdefault(key, value)
        group["rule"] = rule
        group["decoupled_weight_decay"] = (
            bool(group.get("decoupled_weight_decay", False)) if decoupled is None else decoupled
        )
        group["lowrank_mask"] = [bool(is_selected(p)) for p in group["params"]]
