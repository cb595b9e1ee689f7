"""Where a rule's buffers live: in ``state`` as they are, or (``state_bits=8``) as 8-bit codes per block.

``moment_view`` hands the update a dict of full-precision buffers to change in place; for 8-bit storage that is a
dequantized copy, quantized back when the update is done, one layer at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from lightning_lowrank.optim import rules
from lightning_lowrank.optim.moments8bit import dequantize_moment, quantize_moment

QUANTIZED_SUFFIXES = ("_codes", "_absmax", "_shape")  # an 8-bit buffer `key` is kept as key_codes, key_absmax, ...


def init_rule_state(
    state: dict[str, Tensor],
    rule: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    group: Mapping[str, Any],
) -> None:
    """A fresh step counter (a CPU float, as torch's) and the rule's buffers for a gradient of ``shape``."""
    state["step"] = torch.tensor(0.0)
    if rule == "sophia":
        state["hessian_updates"] = torch.tensor(0.0)  # probes folded into the curvature diagonal so far
    buffers = rules.init_state(rule, shape, dtype, device)
    if rule == "sgd" and group["momentum"] == 0:
        buffers = {}  # as torch.optim.SGD: without momentum there is nothing to keep
    if group["state_bits"] is None:
        state.update(buffers)
    else:
        for key, tensor in buffers.items():
            store_moment(state, key, tensor, rules.MOMENT_KEYS[rule][key], group)


@contextmanager
def moment_view(
    state: dict[str, Tensor], rule: str, group: Mapping[str, Any], dtype: torch.dtype
) -> Iterator[dict[str, Tensor]]:
    """The rule's buffers to update in place: the state itself, or (8-bit) a dequantized copy in ``dtype`` that is
    quantized back afterwards."""
    if group["state_bits"] is None:
        yield state
        return
    keys = [k for k in rules.MOMENT_KEYS[rule] if f"{k}_codes" in state]
    moments = {
        k: dequantize_moment(
            _codes(state, k), state[f"{k}_shape"].tolist(), dtype, block_size=group["state_block_size"]
        )
        for k in keys
    }
    yield moments
    for key, tensor in moments.items():
        store_moment(state, key, tensor, rules.MOMENT_KEYS[rule][key], group)


def store_moment(state: dict[str, Tensor], key: str, tensor: Tensor, signed: bool, group: Mapping[str, Any]) -> None:
    q = quantize_moment(tensor, signed=signed, block_size=group["state_block_size"])
    state[f"{key}_codes"], state[f"{key}_absmax"] = q["codes"], q["absmax"]
    state[f"{key}_shape"] = torch.tensor(tuple(tensor.shape), dtype=torch.int64)


def _codes(state: Mapping[str, Tensor], key: str) -> dict[str, Tensor]:
    return {"codes": state[f"{key}_codes"], "absmax": state[f"{key}_absmax"]}
