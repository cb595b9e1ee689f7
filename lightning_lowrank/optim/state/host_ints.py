"""Integers the optimizer keeps in state tensors (step counters, seeds, ranks), read on the host once per tensor.

State holds them as tensors so that ``state_dict()`` round-trips and loads with ``weights_only=True``. Reading such a
tensor (``int(t)``) dispatches ``aten._local_scalar_dense``: a device sync when it lives on a GPU, and a read per
layer and step even on the CPU, where torch keeps its own step counters. Here each tensor is read once and its value
kept by the tensor's identity; a step counter is advanced in place through ``advance`` so the kept value follows.
A tensor changed in place by anything else would go stale: only this module changes them in place.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_lowrank.optim.state.storage import host_key

# State kept on the CPU whatever the parameter's device, because the host reads it: seeds (P is rebuilt from one at
# every step), a layer's rank under a budget, Sophia's probe count, the k of quantized protected bases
# (``protect.RANK``: it gives their shape), and the shapes of 8-bit buffers (``storage.host_key``). Step counters too,
# except a dense parameter's under torch's fused/capturable Adam (``storage.step_counter``).
HOST_KEYS = frozenset({"proj_seed", "rank", "hessian_updates", "protect_rank"})


def on_host(key: str) -> bool:
    """Whether state ``key`` (not ``step``: see ``HOST_KEYS``) lives on the CPU."""
    return key in HOST_KEYS or host_key(key)


# id(tensor) -> [weak reference to it, its value]; an entry leaves when its tensor dies, and is checked for identity
# on every read (a plain dict: this is read for every layer at every step, and torch's WeakIdKeyDictionary costs
# several Python calls per lookup).
_VALUES: dict[int, list] = {}


def _entry(t: Tensor) -> list | None:
    entry = _VALUES.get(id(t))
    return entry if entry is not None and entry[0]() is t else None


def _store(t: Tensor, value: int) -> None:
    entry = _entry(t)
    if entry is not None:
        entry[1] = value
        return
    key = id(t)
    _VALUES[key] = [weakref.ref(t, lambda _, key=key: _VALUES.pop(key, None)), value]


def read_int(t: Tensor) -> int:
    """The integer ``t`` holds, read from the tensor only the first time it is asked for."""
    entry = _entry(t)
    if entry is not None:
        return entry[1]
    value = int(t)
    _store(t, value)
    return value


def advance(t: Tensor) -> int:
    """``t += 1`` in place (the same tensor, as torch's step counters) and the new value, without a read."""
    value = read_int(t) + 1
    t += 1
    _store(t, value)
    return value


def retreat(t: Tensor) -> int:
    """Undo one ``advance`` (``t -= 1`` in place): an update taken back after the fact (layer-wise mode)."""
    value = read_int(t) - 1
    t -= 1
    _store(t, value)
    return value


def advance_all(tensors: list[Tensor]) -> list[int]:
    """``advance`` for many counters: one in-place add over the list (``torch._foreach_add_``)."""
    values = [read_int(t) + 1 for t in tensors]
    torch._foreach_add_(tensors, 1.0)
    for t, value in zip(tensors, values):
        _store(t, value)
    return values


def forget_all(states: Iterable[Any]) -> None:
    """Drop the kept values of every tensor in ``states``: they may have been written in place by something else (a
    distributed checkpoint loads the saved counters into the live tensors), so ``read_int`` reads them again."""
    for state in states:
        if not isinstance(state, dict):  # a load hook may keep other values in ``optimizer.state`` (torch's tests do)
            continue
        for t in state.values():
            if _entry(t) is not None:
                _VALUES.pop(id(t), None)
