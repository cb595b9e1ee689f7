"""What kind of optimizer state each key of a parameter's state holds, read from what the components declare.

Every component that writes into ``state[p]`` declares the keys it writes, next to the code that writes them; this
module only reads those declarations (the memory report's split by kind comes from here, never from key names):

* the projector (``projectors.py``: ``state_keys``, or ``quantized_keys`` under ``projector_bits``): ``projection``;
* the rule (``rules.MOMENT_KEYS``): its buffers, ``projected_moments`` or ``dense_moments`` by where it runs, but
  ``curvature`` for ``rules.CURVATURE_KEYS`` (Sophia's diagonal);
* the moment storage (``storage.py``): its counters (``COUNTER_KINDS``), and under ``state_bits`` each buffer also as
  ``{key}{suffix}`` for ``QUANTIZED_SUFFIXES`` (a buffer may stay under its own key, e.g. a small one), same kind;
* the residual (``residuals.STATE_KEYS``): ``residual``;
* the budget (``budget.KEY_KINDS``): a projected layer's rank, gradient energy and Hessian trace.

A key that none declares raises: a component forgot its declaration, and a guessed kind would misreport memory.
Plain torch, no Lightning.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from lightning_lowrank.optim import budget, residuals, rules, storage
from lightning_lowrank.optim.projectors import PROJECTOR_CLASSES
from lightning_lowrank.optim.rules import projected_rule

# Optimizer state by kind. Every state tensor falls in exactly one, so the kinds add up to the optimizer state.
STATE_KINDS = ("dense_moments", "projected_moments", "projection", "residual", "curvature", "scalars")


class UndeclaredStateError(LookupError):
    """A state key that no component declares (a bug in the component that wrote it)."""


def projector_keys(group: Mapping[str, Any]) -> tuple[str, ...]:
    """The keys the group's projector keeps for a layer (its quantized form under ``projector_bits``)."""
    cls = PROJECTOR_CLASSES[group["projector"]]
    if group["projector_bits"] is not None and cls.quantized_keys is not None:
        return cls.quantized_keys
    return cls.state_keys


def quantized_projection(group: Mapping[str, Any]) -> bool:
    """Whether the group's projector keeps P quantized (it stores a matrix, and ``projector_bits`` is set)."""
    cls = PROJECTOR_CLASSES[group["projector"]]
    return group["projector_bits"] is not None and cls.quantized_keys is not None


def declared_kinds(group: Mapping[str, Any], projected: bool) -> dict[str, str]:
    """Every key a parameter of ``group`` may hold, projected or dense, with its kind: what the components declare."""
    rule = projected_rule(group) if projected else group["rule"]
    moments = "projected_moments" if projected else "dense_moments"
    buffers = {k: "curvature" if k in rules.CURVATURE_KEYS else moments for k in rules.MOMENT_KEYS[rule]}
    if group["state_bits"] is not None:
        buffers |= {key + suffix: kind for key, kind in buffers.items() for suffix in storage.QUANTIZED_SUFFIXES}
    parts: list[tuple[str, Mapping[str, str]]] = [
        ("storage", storage.COUNTER_KINDS[""]),
        ("storage", storage.COUNTER_KINDS.get(rule, {})),
        (f"rule {rule!r}", buffers),
    ]
    if projected:
        parts += [
            (f"projector {group['projector']!r}", dict.fromkeys(projector_keys(group), "projection")),
            (f"residual {group['residual']!r}", dict.fromkeys(residuals.STATE_KEYS[group["residual"]], "residual")),
            ("budget", budget.KEY_KINDS),
        ]
    return merge_kinds(parts)


def merge_kinds(parts: Iterable[tuple[str, Mapping[str, str]]]) -> dict[str, str]:
    """One key -> kind map from the components' declarations; two that give one key different kinds are a bug."""
    kinds: dict[str, str] = {}
    owner: dict[str, str] = {}
    for component, declared in parts:
        for key, kind in declared.items():
            if kind not in STATE_KINDS:
                raise ValueError(f"{component} declares state {key!r} of kind {kind!r}, not one of {STATE_KINDS}")
            if kinds.get(key, kind) != kind:
                raise ValueError(f"{owner[key]} and {component} declare state {key!r} as {kinds[key]} and {kind}")
            kinds[key], owner[key] = kind, owner.get(key, component)
    return kinds


def state_kinds(
    state: Mapping[str, Any],
    group: Mapping[str, Any],
    projected: bool,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The kind (one of ``STATE_KINDS``) of every key of one parameter's ``state``, from the declarations of the
    components of its ``group`` (and ``extra``, what an optimizer subclass keeps itself). Raises
    ``UndeclaredStateError`` on a key none declares."""
    declared = declared_kinds(group, projected)
    if extra:
        declared = merge_kinds([("the components", declared), ("the optimizer", extra)])
    unknown = [key for key in state if key not in declared]
    if unknown:
        rule = projected_rule(group) if projected else group["rule"]
        raise UndeclaredStateError(
            f"optimizer state {unknown} of a {'projected' if projected else 'dense'} parameter is declared by no "
            f"component (rule {rule!r}, projector {group['projector']!r}, residual {group['residual']!r}, "
            f"state_bits {group['state_bits']!r}): declare it next to the code that writes it "
            "(see lightning_lowrank.optim.state_layout)"
        )
    return {key: declared[key] for key in state}
