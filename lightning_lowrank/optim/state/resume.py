"""``ProjectedOptimizer.load_state_dict``: a checkpoint resumed under the optimizer's current options. Plain torch.

torch's ``Optimizer.load_state_dict`` installs the saved param-group dicts whole, so a checkpoint's rank and projector
would silently win over the strategy's, and a checkpoint of a dense torch optimizer would have no low-rank keys at
all. Here the optimizer's current low-rank options (``LOWRANK_GROUP_KEYS``) win, torch's own hyperparameters (lr,
betas, initial_lr, momentum, ...) come from the checkpoint as torch's, and each layer's saved state is brought into
the form the current options give it:

* unchanged (the usual resume): loaded as saved, bit for bit; only dtypes follow the options (``_place``);
* a changed rank or projector: the layer gets its new subspace at load, chosen by the new projector from the saved
  momentum (P_old m_low: the best stand-in for a gradient a checkpoint holds; ``state_convert.gradient_estimate``),
  and its moments are carried from the saved P into it as ``moments=`` says, by ``refresh.move_moments``, the
  function a refresh uses: ``keep`` truncates or zero-pads the coordinates, ``rotate`` maps them through
  P_old^T P_new, ``reset`` zeroes them. The next scheduled refresh then picks the subspace from a real gradient;
* dense state (a torch optimizer's checkpoint, or a layer that was not projected) of a layer projected now: the same
  choice of subspace from its first moment, and the moments projected into it (P^T m, (P∘P)^T v; ``reset`` zeroes
  them), see ``state_convert``; a low-rank layer that is dense now: mapped back (P m, (P∘P) v);
* 8-bit moments, a quantized P, a changed inner rule or residual: decoded and stored again as the options say;
  buffers the new rule keeps that the checkpoint lacks start at zero, and the warning names them.

One warning lists what changed (which option, old -> new, how many layers, which) and what happened to the moments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from lightning_lowrank.optim.options import GROUP_SECTIONS, TorchRuleOptions
from lightning_lowrank.optim.projection.bases import effective_rank, is_left, projected_shape
from lightning_lowrank.optim.projection.projectors import PROJECTOR_KEYS, LayerContext, store_matrix, stores_matrix
from lightning_lowrank.optim.projection.refresh import has_subspace, move_moments, rank_axis_keys
from lightning_lowrank.optim.rank_zero import warn_rank_zero
from lightning_lowrank.optim.state.convert import (
    decode_moments,
    gradient_estimate,
    into_subspace,
    out_of_subspace,
    resolved_group,
    saved_matrix,
    saved_rank,
)
from lightning_lowrank.optim.state.host_ints import on_host
from lightning_lowrank.optim.state.storage import init_rule_state, state_dtype, store_moment
from lightning_lowrank.optim.update import protect, rules
from lightning_lowrank.optim.update.residuals import STATE_KEYS as RESIDUAL_KEYS
from lightning_lowrank.optim.update.rules import projected_rule

# The group keys the optimizer's current options decide on resume: every low-rank option, the rule and the mask.
LOWRANK_GROUP_KEYS = frozenset(
    {"rule", "lowrank_mask"}
    | {f.name for section in GROUP_SECTIONS if section is not TorchRuleOptions for f in fields(section)}
)
# The counters a layer's state keeps as tensors (``storage.STATE_KEYS``); a checkpoint may hold them as numbers.
COUNTER_KEYS = ("step", "hessian_updates")
# Per-layer state besides the moments and P that a conversion keeps where the new options still use it.
PROTECTED_KEYS = frozenset(protect.STATE_KEYS)  # a weight's protected bases: kept as saved through any change
BOOKKEEPING_KEYS = frozenset({"residual_energy", "curvature_trace", "hessian_updates"}).union(*RESIDUAL_KEYS.values())
_POLICY_TEXT = {
    "keep": "kept coordinate by coordinate (moments='keep')",
    "rotate": "rotated from the saved subspace into the new one (moments='rotate')",
    "reset": "reset to zero (moments='reset')",
}


@dataclass(frozen=True)
class Layout:
    """What decides the form of one layer's state: equal layouts load as saved, different ones are converted."""

    projected: bool
    rule: str
    state_bits: int | None
    rank: int | None = None
    projector: str | None = None
    dct_type: int | None = None
    projector_bits: int | None = None
    residual: str | None = None  # only a residual that keeps state: the others leave the state alone
    budget: bool = False  # the layer's own rank in its state (memory_budget)
    side: str | None = None  # "left" or "right": which side P multiplies G from (the ``side`` option, resolved)
    residual_name: str | None = field(default=None, compare=False)  # for the warning

    def describe(self) -> str:
        return f"rank {self.rank}, projector {self.projector!r}" if self.projected else "dense"


def load_state(opt: Any, state_dict: dict[str, Any], torch_load: Callable[[dict[str, Any]], None]) -> None:
    """Load ``state_dict`` into ``opt`` (a ``ProjectedOptimizer``; ``torch_load``: torch's own loader)."""
    state_dict = {**state_dict, "state": {k: _counters_as_tensors(v) for k, v in state_dict["state"].items()}}
    current = [{k: g[k] for k in LOWRANK_GROUP_KEYS if k in g} for g in opt.param_groups]
    # Tensors but the step counters are placed here (torch's loader would cast them to the param's dtype).
    # Entries that are not a layer's dict (what a load hook may keep in ``optimizer.state``) go to torch's loader.
    layers = {k: v for k, v in state_dict["state"].items() if isinstance(v, dict)}
    held = {k: {n: t for n, t in v.items() if isinstance(t, Tensor) and n != "step"} for k, v in layers.items()}
    state = {
        k: {n: t for n, t in v.items() if n not in held[k]} if k in layers else v
        for k, v in state_dict["state"].items()
    }
    torch_load({**state_dict, "state": state})
    for group, options in zip(opt.param_groups, current):
        for key, value in opt.defaults.items():  # options added since the checkpoint was written, but not the
            if key != "differentiable":  # 'differentiable' torch's __setstate__ has just put into the defaults
                group.setdefault(key, value)
        group.update(options)
    saved_groups = state_dict["param_groups"]
    saved_of = {i: g for g in saved_groups for i in g["params"]}
    saved_ids = chain.from_iterable(g["params"] for g in saved_groups)
    params = dict(zip(saved_ids, chain.from_iterable(g["params"] for g in opt.param_groups)))
    changed: list[tuple[str, str, str]] = []
    for key, tensors in held.items():
        p = params[key]
        index, group = opt.locate(p)
        if tensors and "step" not in opt.state[p]:  # torch's SGD counts no steps; its buffer means one at least
            opt.state[p]["step"] = torch.tensor(1.0)
        saved_group = resolved_group(saved_of[key], group["rule"])
        old = _saved_layout(p, tensors, saved_group)
        new = _current_layout(p, group, opt.is_projected(p), old, opt.memory_budget is not None)
        if old == new:
            _place(opt, p, group, tensors)
        else:
            what = _convert(opt, p, index, group, saved_group, old, new, tensors)
            changed.append((_label(opt, p, index), _diff(old, new), what))
    for key, p in params.items():  # torch's loader puts every counter of a fused/capturable group on the device
        saved = state_dict["state"].get(key, {}).get("step")
        if saved is not None and opt.is_projected(p) and opt.state[p]["step"].device.type != "cpu":
            opt.state[p]["step"] = saved.to("cpu", copy=True)  # a projected layer's is read on the host (host_ints)
    if changed:
        warn_rank_zero(change_warning(changed), stacklevel=3)


def _counters_as_tensors(state: Any) -> Any:
    """A layer's saved state with its counters as tensors: torch < 1.12 saved Adam's ``step`` as a Python number, and
    torch's ``Adam.__setstate__`` makes it a tensor (default float dtype) at load; torch's loader keeps a number."""
    if not isinstance(state, dict):
        return state
    number = {k for k in COUNTER_KEYS if k in state and not isinstance(state[k], Tensor)}
    return {k: torch.tensor(float(v)) if k in number else v for k, v in state.items()}


def _place(opt: Any, p: Tensor, group: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    """Install a layer's saved tensors as they are, in the dtype the optimizer computes in: integer tensors and a
    projected weight's scales, norms and counters keep theirs; the rule's buffers (and a stored P) take the state
    dtype for a projected weight (so bf16 moments resume in float32), the param's for a dense one (as torch)."""
    projected = opt.is_projected(p)
    buffers = set(rules.MOMENT_KEYS[projected_rule(group) if projected else group["rule"]]) | {"proj"}
    dtype = state_dtype(group, p.dtype) if projected else p.dtype
    for name, t in tensors.items():
        # Seeds, ranks, counters and 8-bit shapes stay on the CPU: the host reads them, which there costs no sync.
        device = "cpu" if on_host(name) else p.device
        floating = t.is_floating_point() and (name in buffers or not projected) and name not in PROTECTED_KEYS
        opt.state[p][name] = t.to(device=device, dtype=dtype if floating else t.dtype)


def _saved_layout(p: Tensor, tensors: dict[str, Tensor], group: dict[str, Any]) -> Layout:
    rule = projected_rule(group)
    if rule == "trion" and group["rule"] == "muon" and not has_subspace(tensors):
        return Layout(False, "muon", group["state_bits"])  # a whole buffer: Trion's, or a dense Muon weight's
    rank = saved_rank(tensors, p.shape, group) if p.ndim == 2 else None
    low = projected_shape(p.shape, rank, group["side"]) if p.ndim == 2 else None
    buffers = [t for k, t in tensors.items() if k in rules.MOMENT_KEYS[rule] and t.ndim == 2]
    # A projected layer holds a subspace, or (stopped before its first refresh) buffers of the projected shape.
    if has_subspace(tensors) or (low != tuple(p.shape) and any(tuple(t.shape) == low for t in buffers)):
        return _projected_layout(p, group, rank, "rank" in tensors)
    return Layout(False, group["rule"], group["state_bits"])


def _current_layout(p: Tensor, group: dict[str, Any], projected: bool, old: Layout, budget: bool) -> Layout:
    if not projected:
        return Layout(False, group["rule"], group["state_bits"])
    if projected_rule(group) == "trion":  # no rank, no P: a whole buffer, laid out as a dense Muon weight's
        return Layout(False, "muon", group["state_bits"])
    rank = effective_rank(p.shape, group["rank"])
    if budget and old.projected:  # the layer keeps its own rank, under the new cap; the budget moves it later
        rank = min(rank, old.rank)
    return _projected_layout(p, group, rank, budget)


def _projected_layout(p: Tensor, group: dict[str, Any], rank: int, budget: bool) -> Layout:
    projector = group["projector"]
    return Layout(
        True,
        projected_rule(group),
        group["state_bits"],
        rank,
        projector,
        group["dct_type"] if projector == "dct" else None,
        group["projector_bits"] if stores_matrix(projector) else None,
        group["residual"] if RESIDUAL_KEYS[group["residual"]] else None,
        budget,
        "left" if is_left(p.shape, group["side"]) else "right",
        group["residual"],
    )


def _convert(
    opt: Any,
    p: Tensor,
    index: int,
    group: dict[str, Any],
    saved_group: dict[str, Any],
    old: Layout,
    new: Layout,
    tensors: dict[str, Tensor],
) -> str:
    """Rebuild one layer's state in its new layout; returns what happened to its moments."""
    step = opt.state[p].get("step", torch.tensor(0.0))
    dtype = state_dtype(group, p.dtype) if new.projected else p.dtype
    moments = decode_moments(tensors, old.rule, saved_group, dtype, p.device)
    P_old = None
    if old.projected and has_subspace(tensors):
        P_old = saved_matrix(tuple(p.shape), tensors, saved_group, old.rank, dtype, p.device, opt.shared_basis)
    # Not host_ints.read_int: a dense counter is advanced by torch, which that cache would miss.
    ctx = LayerContext(index, int(step), new.rank or 0, group, opt.shared_basis, dtype)
    fresh: dict[str, Tensor] = {}
    if new.projected and P_old is not None and _same_subspace(old, new) and old.side == new.side:
        if old.projector_bits != new.projector_bits:
            store_matrix(fresh, P_old, ctx)
        else:
            fresh.update({k: t if on_host(k) else t.to(p.device) for k, t in tensors.items() if k in PROJECTOR_KEYS})
        what = "moments kept"
    elif old.projected and P_old is None and moments:
        moments.clear()
        what = "moments reset to zero (the checkpoint holds no subspace to map them from)"
    elif not moments:
        what = "no moments to carry" + ("; its subspace is chosen at its next step" if new.projected else "")
    elif new.projected:
        what = _into_new_subspace(opt, p, moments, tensors, P_old, old, new, ctx, fresh)
    elif P_old is not None:
        out_of_subspace(moments, old.rule, P_old, old.side == "left")
        what = "moments mapped back to full size (first P m, second (P∘P) v)"
    else:
        what = "moments kept"
    shape = projected_shape(p.shape, new.rank, group["side"]) if new.projected else tuple(p.shape)
    init_rule_state(fresh, new.rule, shape, dtype, p.device, group)
    fresh["step"] = step
    expected = rules.init_state(new.rule, shape, dtype, torch.device("meta"))
    started = []
    for key, signed in rules.MOMENT_KEYS[new.rule].items():
        value = moments.get(key)
        if value is not None and value.shape == expected[key].shape:
            store_moment(fresh, key, value, signed, group)
        elif moments:
            started.append(key)
    carried = moments and new.rule == old.rule == "sophia"  # its probe count goes with its curvature diagonal
    kept = (set(RESIDUAL_KEYS[group["residual"]]) | ({"hessian_updates"} if carried else set())) & set(tensors)
    if new.budget:
        kept |= {"residual_energy", "curvature_trace"} & set(tensors)
        fresh["rank"] = torch.tensor(new.rank, dtype=torch.int64)
    fresh.update({k: tensors[k].to(p.device) for k in kept if new.projected})
    # The protected bases, whatever the new form; the k of quantized ones stays on the host.
    fresh.update({k: t if on_host(k) else t.to(p.device) for k, t in tensors.items() if k in PROTECTED_KEYS})
    opt.state[p] = fresh
    dropped = sorted(set(moments) - set(rules.MOMENT_KEYS[new.rule]))
    dropped += sorted(k for k in tensors if k in BOOKKEEPING_KEYS and k not in fresh)  # e.g. Fira's limiter norm
    return what + "".join(
        f"; {label}: {', '.join(keys)}" for label, keys in (("started at zero", started), ("dropped", dropped)) if keys
    )


def _into_new_subspace(
    opt: Any,
    p: Tensor,
    moments: dict[str, Tensor],
    tensors: dict[str, Tensor],
    P_old: Tensor | None,
    old: Layout,
    new: Layout,
    ctx: LayerContext,
    fresh: dict[str, Tensor],
) -> str:
    """Choose the layer's new subspace from its saved moments, carry them into it (in place), keep its keys in
    ``fresh``; returns what happened."""
    left, policy = new.side == "left", ctx.group["moments"]
    full = dict(moments)
    if P_old is not None:
        out_of_subspace(full, old.rule, P_old, old.side == "left")
    scratch = {k: t for k, t in tensors.items() if k in PROJECTOR_KEYS} if old.projector == new.projector else {}
    projector = opt.projector(new.projector)
    projector.refresh(p, gradient_estimate(full, tuple(p.shape), ctx.dtype, p.device), scratch, ctx)
    P_new = projector.matrix(p, scratch, ctx)
    fresh.update({k: t for k, t in scratch.items() if k in PROJECTOR_KEYS})
    source = "first moment" if set(full) & rules.FIRST_MOMENTS else "moments"
    chosen = f"new subspace chosen by projector {new.projector!r} from the saved {source}; moments "
    if policy == "reset":
        moments.clear()
        return chosen + _POLICY_TEXT["reset"]
    if P_old is None or old.side != new.side:  # from full size: a dense state, or mapped out of the other side
        if P_old is not None:
            moments.clear()
            moments.update(full)
        into_subspace(moments, old.rule, P_new, left)
        return chosen + "projected into it (first P^T m, second (P∘P)^T v)"
    move_moments(moments, rules.MOMENT_KEYS[old.rule], rank_axis_keys(old.rule, left), P_old, P_new, policy, left)
    return chosen + _POLICY_TEXT[policy] + _resized(old, new, policy)


def _same_subspace(old: Layout, new: Layout) -> bool:
    return (old.rank, old.projector, old.dct_type) == (new.rank, new.projector, new.dct_type)


def _resized(old: Layout, new: Layout, policy: str) -> str:
    if policy != "keep" or old.rank == new.rank:
        return ""
    return f", truncated to rank {new.rank}" if new.rank < old.rank else f", zero-padded to rank {new.rank}"


def _diff(old: Layout, new: Layout) -> str:
    """Which options changed, old -> new."""
    if old.projected != new.projected:
        return f"{old.describe()} -> {new.describe()}"
    names = {"budget": "memory_budget", "rule": "projected rule" if new.projected else "rule"}
    # A projector's own settings change with it: said once, by the projector's name.
    implied = {"dct_type", "projector_bits"} if old.projector != new.projector else set()
    parts = []
    for f in fields(Layout):
        a, b = getattr(old, f.name), getattr(new, f.name)
        if f.name == "residual":
            a, b = old.residual_name, new.residual_name
        if f.compare and getattr(old, f.name) != getattr(new, f.name) and f.name not in implied:
            a, b = ("set" if a else "None", "set" if b else "None") if f.name == "budget" else (repr(a), repr(b))
            parts.append(f"{names.get(f.name, f.name)} {a} -> {b}")
    return ", ".join(parts)


def _label(opt: Any, p: Tensor, index: int) -> str:
    names = getattr(opt, "param_names", None) or {}
    return names.get(p) or f"#{index} {tuple(p.shape)}"


def change_warning(changed: list[tuple[str, str, str]]) -> str:
    """One message for every converted layer: one line per distinct change (layer, what changed, what happened)."""
    by_change: dict[tuple[str, str], list[str]] = {}
    for label, change, what in changed:
        by_change.setdefault((change, what), []).append(label)
    lines = []
    for (change, what), labels in by_change.items():
        shown = ", ".join(labels[:6]) + (f" and {len(labels) - 6} more" if len(labels) > 6 else "")
        lines.append(f"  - {change} ({len(labels)} layer(s): {shown}): {what}")
    return (
        "The checkpoint's optimizer state was written with other low-rank options than this optimizer's. Its "
        "current options win (torch's own hyperparameters, such as lr, come from the checkpoint), and the state of "
        "the layers they change was converted:\n" + "\n".join(lines)
    )
