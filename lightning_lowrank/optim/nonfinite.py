"""Gradients that hold an inf or a NaN: one check per step, and what ``step()`` does then (``nonfinite=``).

The check is one multi-tensor kernel per (device, dtype) (``_finite``) and one read of the combined flag: the only
host read of an ordinary step, the one a GradScaler makes too.
Only a bad step reads more, to name the first bad parameter. Plain torch: no Lightning here.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor

from lightning_lowrank.optim.distributed.sharding import all_ranks_finite, local
from lightning_lowrank.optim.state.host_ints import on_host

# Where a checkpoint keeps the count of skipped steps: top level, and in the first param group too, because a
# distributed checkpoint (DCP, FSDP2) keeps only "state" and "param_groups".
COUNT_KEY = "nonfinite_steps"


def with_count(state_dict: dict, count: int) -> dict:
    """A torch ``state_dict`` (its groups fresh dicts) with the skipped-step count at top level and in group 0."""
    if state_dict["param_groups"]:
        state_dict["param_groups"][0][COUNT_KEY] = count
    return {**state_dict, COUNT_KEY: count}


def pop_count(state_dict: dict) -> tuple[int, dict]:
    """The count a checkpoint holds (top level, else group 0; 0 if neither), and the checkpoint without it in its
    groups, so that the key never reaches the live param groups."""
    groups = state_dict["param_groups"]
    count = state_dict.get(COUNT_KEY, groups[0].get(COUNT_KEY, 0) if groups else 0)
    return int(count), {**state_dict, "param_groups": [{k: v for k, v in g.items() if k != COUNT_KEY} for g in groups]}


def finite_flag(grads: Iterable[Tensor]) -> Tensor | None:
    """A device bool: every element of every gradient is finite (None for no gradients). Reads nothing."""
    by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for g in grads:
        by_kind.setdefault((g.device, g.dtype), []).append(g)
    flags = [_finite(gs, fused_norm=device.type != "cpu") for (device, _), gs in by_kind.items()]
    if not flags:
        return None
    if len(flags) == 1:
        return flags[0]
    device = flags[0].device
    return torch.stack([f.to(device) for f in flags]).all()


def _finite(tensors: list[Tensor], fused_norm: bool) -> Tensor:
    """One device and dtype. On a GPU the max-norm is one multi-tensor kernel that only reads (NaN propagates into
    it). On the CPU that kernel is a loop of per-tensor norms (about 10 us each); the AMP unscale check is one C++
    loop, 10x faster there, and with a scale of 1 it leaves every gradient as it is."""
    if fused_norm:
        return torch.stack(torch._foreach_norm(tensors, float("inf"))).isfinite().all()
    found = torch.zeros((), device=tensors[0].device)
    torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, torch.ones((), device=found.device))
    return found == 0


def refuse_sparse(grads: Iterable[Tensor | None]) -> None:
    """Raise on a sparse gradient (None: a parameter without one): no update here takes one. Checked before anything
    is updated (``ProjectedOptimizer.step``) or in the layer's own hook (layer-wise mode)."""
    if any(g is not None and g.is_sparse for g in grads):
        raise RuntimeError("lightning_lowrank optimizers do not support sparse gradients.")


def nonfinite_gradient(
    params: list[Tensor], label: Callable[[Tensor], str], sharded: bool = True
) -> tuple[str, str] | None:
    """None when every gradient of ``params`` is finite: one flag over all of them (``finite_flag``; FSDP2 shards
    agreed over the ranks, unless ``sharded=False`` says none is sharded) and one read. Else (``label`` of the first
    bad parameter, what it holds)."""
    grads = [local(p.grad) for p in params] if sharded else [p.grad for p in params]
    flag = finite_flag(grads)
    if flag is None or bool(all_ranks_finite(flag, params) if sharded else flag):  # every rank must decide alike
        return None
    return first_nonfinite(zip([label(p) for p in params], grads))


def first_nonfinite(named: Iterable[tuple[str, Tensor]]) -> tuple[str, str]:
    """(name, what it holds: "nan", "inf" or "nan and inf") of the first gradient that is not finite. Reads one
    flag per gradient: for a bad step only."""
    for name, g in named:
        if not bool(g.isfinite().all()):
            return name, describe(bool(g.isnan().any()), bool(g.isinf().any()))
    return "(none)", "nothing"


def nonfinite_flags(t: Tensor) -> Tensor:
    """(holds a nan, holds an inf) as a device bool pair; reads nothing (layer-wise mode keeps each layer's pair
    and reads them all once, at the end of the step)."""
    return torch.stack((t.isnan().any(), t.isinf().any()))


def describe(nan: bool, inf: bool) -> str:
    return " and ".join(k for k, has in (("nan", nan), ("inf", inf)) if has)


class NonFiniteGradientError(FloatingPointError):
    """``nonfinite="raise"``: a gradient held an inf or NaN; the step applied nothing."""


def skipped_message(count: int, where: str, kind: str, layerwise: bool = False) -> str:
    what = (
        "Its update was skipped (layer-wise mode: the layers whose gradients were finite were updated)"
        if layerwise
        else "Nothing was updated (weights, moments, subspaces and step counters keep their values)"
    )
    return (
        f"lightning_lowrank skipped an optimizer step: the gradient of {where} holds {kind}. {what}; {count} "
        "step(s) skipped so far. "
        "nonfinite='raise' stops at the first one instead, nonfinite='ignore' applies such steps. Warned once; the "
        "count is in the memory report and logged as lowrank/nonfinite_steps."
    )


def raise_nonfinite(where: str, kind: str, step: int, applied: str = "nothing was updated") -> None:
    raise NonFiniteGradientError(
        f"The gradient of {where} holds {kind} at its update {step} (nonfinite='raise'); {applied}. Look for an "
        "overflow in the loss or the forward (a larger eps, gradient clipping, bf16-mixed), or pass "
        "nonfinite='skip' to skip such steps and go on."
    )


def warn_once(optimizer: object, message: str) -> None:
    """The first skipped step of ``optimizer`` warns; later ones only count."""
    if not getattr(optimizer, "nonfinite_warned", False):
        optimizer.nonfinite_warned = True  # type: ignore[attr-defined]
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def parameter_label(param: Tensor, index: int, names: Mapping[Tensor, str]) -> str:
    """How a message names a parameter: its module name where known, else its place and shape."""
    name = names.get(param)
    return repr(name) if name else f"parameter #{index} (shape {tuple(param.shape)})"


class TakeBack:
    """Layer-wise mode's skip of a non-finite layer update without a read per layer (a stall of the backward on a
    GPU each): an update run in ``guard`` is taken back on the device when its gradient held an inf or a NaN, and
    ``settle`` reads the flags of all of a step's guarded updates once. The host-side state (``host_ints``: the step
    counter) is the caller's to put back, for the layers ``settle`` returns."""

    def __init__(self) -> None:
        self._flags: list[tuple[Tensor, int, Tensor]] = []  # (param, its index, (nan, inf) device flags)

    @contextmanager
    def guard(self, param: Tensor, index: int, state: dict[str, Tensor], gradient: Tensor) -> Iterator[None]:
        """Run one layer's update; where ``gradient`` is not finite, restore its weight and device state by
        ``torch.where`` against a copy made before (one layer's transient). A steady update changes the values of
        the state, not which keys it holds."""
        flags = nonfinite_flags(gradient)
        self._flags.append((param, index, flags))
        kept = {k: t.clone() for k, t in state.items() if k != "step" and not on_host(k)}
        weight = param.detach().clone()
        yield
        finite = ~flags.any()
        for key, old in kept.items():
            state[key] = torch.where(finite, state[key], old)
        param.copy_(torch.where(finite, param, weight))

    def settle(self) -> list[tuple[Tensor, int, str]]:
        """(param, index, what it held) of each update taken back since the last call: one read of the flags of all
        of them; a bad step reads each layer's to name them."""
        flags, self._flags = self._flags, []
        if not flags or bool(~torch.stack([f for _, _, f in flags]).any()):  # the one read: all finite?
            return []
        bad = []
        for param, index, pair in flags:
            nan, inf = (bool(x) for x in pair)
            if nan or inf:
                bad.append((param, index, describe(nan, inf)))
        return bad

    def clear(self) -> None:
        self._flags = []
