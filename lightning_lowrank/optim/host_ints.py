"""Integers the optimizer keeps in state tensors (step counters, seeds, ranks), read on the host once per tensor.

State holds them as tensors so that ``state_dict()`` round-trips and loads with ``weights_only=True``. Reading such a
tensor (``int(t)``) dispatches ``aten._local_scalar_dense``: a device sync when it lives on a GPU, and a read per
layer and step even on the CPU, where torch keeps its own step counters. Here each tensor is read once and its value
kept by the tensor's identity; a step counter is advanced in place through ``advance`` so the kept value follows.
A tensor changed in place by anything else would go stale: only this module changes them in place.
"""

from __future__ import annotations

from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

_VALUES: WeakIdKeyDictionary = WeakIdKeyDictionary()


def read_int(t: Tensor) -> int:
    """The integer ``t`` holds, read from the tensor only the first time it is asked for."""
    value = _VALUES.get(t)
    if value is None:
        value = _VALUES[t] = int(t)
    return value


def advance(t: Tensor) -> int:
    """``t += 1`` in place (the same tensor, as torch's step counters) and the new value, without a read."""
    value = read_int(t) + 1
    t += 1
    _VALUES[t] = value
    return value
