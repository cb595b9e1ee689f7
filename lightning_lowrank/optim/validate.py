"""Checking one param group when it is added to a ``ProjectedOptimizer``: torch's own hyperparameters, every section
of the options tree (``options.py``), and what a rule cannot combine with (Muon's and Trion's limits)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from lightning_lowrank.optim.checks import check_choice
from lightning_lowrank.optim.options import GROUP_SECTIONS, OptimizerOptions, check_cross_options, rule_option_names
from lightning_lowrank.optim.update.rules import BASE_RULES

# Options whose update Muon's rule has no place for, with why (refused for a Muon group).
NOT_FOR_MUON = {
    ("residual", "apollo"): "APOLLO scales the raw gradient by Adam-moment norms, which Muon does not keep",
    ("projected_rule", "subset_norm"): "Subset-Norm replaces the projected rule's step size, Muon's is its own",
    ("preconditioner", "lazy_hessian"): "Sophia's clipped Newton step would replace Muon's orthogonalized one",
}


def validate_group(group: dict[str, Any], options: OptimizerOptions | None = None) -> None:
    """Check one param group: torch's own hyperparameters, every section's options, the lowrank mask. A group takes
    the torch options of its own rule only (``rule_option_names``); those it lacks come from ``options`` (the
    optimizer's), so a group whose rule differs from the optimizer's default gets its own, not the default's."""
    if options is not None:
        for name in rule_option_names(group["rule"]) if group.get("rule") in BASE_RULES else ():
            group.setdefault(name, getattr(options, name))
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
    check_choice("rule", group["rule"], BASE_RULES)
    mask = group["lowrank_mask"]
    projects = group["rank"] is not None and any(mask if mask is not None else (p.ndim == 2 for p in group["params"]))
    if group["projected_rule"] == "trion" and projects:  # the strategy's options reach every optimizer's groups
        _check_trion(group)
    if group["rule"] == "muon" and any(p.is_complex() for p in group["params"]):
        raise ValueError("torch.optim.Muon does not support complex parameters (nor does its projected form)")
    if group["rule"] == "muon" and projects:
        for (key, value), why in NOT_FOR_MUON.items():
            if group[key] == value:
                raise ValueError(f"{key}={value!r} does not apply to torch.optim.Muon: {why}")
    for section in GROUP_SECTIONS:
        section(**{f.name: group[f.name] for f in fields(section) if f.name in group})  # absent: another rule's
    check_cross_options(_Attrs(group))
    mask = group["lowrank_mask"]
    if mask is not None:
        if len(mask) != len(group["params"]):
            raise ValueError(f"lowrank_mask has {len(mask)} entries for {len(group['params'])} params")
        for p, projected in zip(group["params"], mask):
            if projected and p.ndim != 2:
                raise ValueError(f"lowrank_mask selects shape {tuple(p.shape)}; only 2-D weights project")


def _check_trion(group: Mapping[str, Any]) -> None:
    """Trion is Muon's update on DCT columns chosen each step: a Muon group, the DCT, no residual, either side."""
    if group["rule"] != "muon":
        raise ValueError(
            f"inner='trion' (projected_rule) is Trion, a Muon update: it needs torch.optim.Muon from "
            f"configure_optimizers, not the {group['rule']!r} rule"
        )
    problems = [
        f"{key}={group[key]!r} ({why})"
        for key, ok, why in (
            ("projector", ("dct",), "Trion chooses DCT columns"),
            ("residual", ("none",), "its error feedback keeps the rest"),
            ("side", ("auto",), "it works on the smaller side"),
            ("state_dtype", (None,), "its buffer is the weight's, as Muon's"),
        )
        if group[key] not in ok
    ]
    if problems:
        raise ValueError("inner='trion' does not take " + "; ".join(problems))


class _Attrs:
    """A group dict read as attributes (for ``check_cross_options``)."""

    def __init__(self, group: Mapping[str, Any]) -> None:
        self._group = group

    def __getattr__(self, name: str) -> Any:
        return self._group[name]


# Options of the whole optimizer (the budget, the non-finite policy), not of a group.
