"""What kind of optimizer state each key of a parameter's state holds, read from what the components declare.

Every component that writes into ``state[p]`` declares the keys it writes, next to the code that writes them, under
one name: ``STATE_KEYS``, a dict from each key to its kind (one per variant where the component has variants). This
module only reads those declarations (the memory report's split by kind comes from here, never from key names):

* the rule's storage (``storage.STATE_KEYS[rule]``): the step counter, Sophia's probe count, and the rule's buffers,
  declared as ``"moments"`` (``MOMENTS``: ``projected_moments`` or ``dense_moments`` by where the rule runs) or as
  ``curvature`` (Sophia's diagonal); under ``state_bits`` a buffer may be kept in 8 bits instead, under the keys
  ``storage.stored_keys`` gives, same kind;
* the projector (``Projector.STATE_KEYS``; a stored P is kept quantized under ``projector_bits``:
  ``projectors.projector_keys``);
* the residual (``residuals.STATE_KEYS[residual]``);
* the budget (``rank_budget.STATE_KEYS``): a projected layer's rank, gradient energy and Hessian trace;
* an optimizer subclass, for what it keeps itself (``layerwise.STATE_KEYS``, passed as ``extra``).

A key that none declares raises: a component forgot its declaration, and a guessed kind would misreport memory.
Plain torch, no Lightning.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from lightning_lowrank.optim.budget import rank_budget
from lightning_lowrank.optim.projection.projectors import projector_keys
from lightning_lowrank.optim.state import storage
from lightning_lowrank.optim.update import protect, residuals, rules
from lightning_lowrank.optim.update.rules import projected_rule

# Optimizer state by kind. Every state tensor falls in exactly one, so the kinds add up to the optimizer state.
STATE_KINDS = (
    "dense_moments",
    "projected_moments",
    "projection",
    "residual",
    "curvature",
    "scalars",
    "protected_bases",
)
MOMENTS = "moments"  # a rule buffer's declared kind: projected_moments or dense_moments by where the rule runs


class UndeclaredStateError(LookupError):
    """A state key that no component declares (a bug in the component that wrote it)."""


def declared_kinds(group: Mapping[str, Any], projected: bool) -> dict[str, str]:
    """Every key a parameter of ``group`` may hold, projected or dense, with its kind: what the components declare."""
    rule = projected_rule(group) if projected else group["rule"]
    moments = "projected_moments" if projected else "dense_moments"
    kept = {key: moments if kind == MOMENTS else kind for key, kind in storage.STATE_KEYS[rule].items()}
    if group["state_bits"] is not None:
        kept |= {k: kept[key] for key in rules.MOMENT_KEYS[rule] for k in storage.stored_keys(key, quantized=True)}
    parts: list[tuple[str, Mapping[str, str]]] = [(f"rule {rule!r}", kept), ("protection", protect.STATE_KEYS)]
    if projected:
        parts += [
            (f"projector {group['projector']!r}", projector_keys(group)),
            (f"residual {group['residual']!r}", residuals.STATE_KEYS[group["residual"]]),
            ("budget", rank_budget.STATE_KEYS),
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
