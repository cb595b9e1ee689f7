"""Where a rule's buffers live: in ``state`` as they are, or (``state_bits=8``) as 8-bit codes per block.

With ``state_bits=8`` a buffer ``key`` is kept as ``key_codes``, ``key_absmax`` and ``key_shape``, except a buffer of
fewer than ``MIN_QUANTIZED_NUMEL`` elements (a bias, a norm's weight, Adafactor's row statistics), which stays a
full-precision tensor under ``key``: its absmax and shape would save little or nothing, and it costs a quantization
round trip at every step. This module is the only one that knows that layout: the others ask it (``stored_keys``,
``is_quantized``, ``decoded_buffers``, ``stored_shape``, ``buffer_bytes``, ``host_key``).

Two ways to update them. ``moment_view`` hands over a dict of whole full-precision buffers (for 8-bit storage a
dequantized copy, quantized back afterwards): what rules that are not elementwise (Adafactor's factored statistics,
Subset-Norm's sums) and changes of basis need. ``moment_chunks`` streams the 8-bit buffers of an elementwise rule
(every buffer the gradient's shape) ``STREAM_CHUNK`` elements at a time, so the full-precision transient of a dense
embedding's update is bounded by a chunk, not by the tensor; it gives the same numbers as ``moment_view``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from lightning_lowrank.optim.options import HALF_DTYPES, STATE_DTYPES
from lightning_lowrank.optim.state.moments8bit import (
    chunk_ranges,
    dequantize_moment,
    dequantize_range,
    quantize_moment,
    quantize_range_,
    zeros_moment,
)
from lightning_lowrank.optim.update import rules

QUANTIZED_SUFFIXES = ("_codes", "_absmax", "_shape")  # an 8-bit buffer `key` is kept as key_codes, key_absmax, ...
MIN_QUANTIZED_NUMEL = 4096  # smaller buffers stay in full precision even with state_bits=8
# Elements per chunk of a streamed 8-bit update (rounded down to whole blocks, at least one): 4 MiB of float32, so the
# dequantized moments and the rule's temporaries stay a few tens of MiB however large the tensor.
STREAM_CHUNK = 2**20
# What ``init_rule_state`` keeps for each rule, with its kind (``state_layout``): the step counter, Sophia's probe
# count, and the rule's buffers: "moments" (``projected_moments`` or ``dense_moments``, by where the rule runs), but
# ``curvature`` for ``rules.CURVATURE_KEYS``. Under ``state_bits`` a buffer may be kept as
# ``stored_keys(key, quantized=True)`` instead.
STATE_KEYS = {
    rule: {
        "step": "scalars",
        **({"hessian_updates": "curvature"} if rule == "sophia" else {}),
        **{key: "curvature" if key in rules.CURVATURE_KEYS else "moments" for key in buffers},
    }
    for rule, buffers in rules.MOMENT_KEYS.items()
}
ELEMENTWISE_RULES = frozenset({"adamw", "sgd", "sophia"})  # rules whose buffers are all the gradient's shape
_META = torch.device("meta")


def state_dtype(group: Mapping[str, Any], param_dtype: torch.dtype) -> torch.dtype:
    """The dtype of a projected weight's moments and P: the group's ``state_dtype``, else float32 for a half-precision
    weight and the weight's own dtype otherwise (so float32 and float64 runs are unchanged)."""
    name = group.get("state_dtype")
    if name is not None:
        return STATE_DTYPES[name]
    return torch.float32 if param_dtype in HALF_DTYPES else param_dtype


def quantizes(numel: int, group: Mapping[str, Any]) -> bool:
    """Whether a buffer of ``numel`` elements is stored in 8 bits under ``group``'s options."""
    return group["state_bits"] is not None and numel >= MIN_QUANTIZED_NUMEL


def init_rule_state(
    state: dict[str, Tensor],
    rule: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    group: Mapping[str, Any],
    *,
    torch_kernel: bool = False,
) -> None:
    """A fresh step counter and the rule's buffers for a gradient of ``shape``; 8-bit buffers are made as zero codes
    directly, never as a full-precision tensor.

    ``torch_kernel``: the parameter is stepped by torch's own functional optimizer (``dispatch.dense_adam``), so
    its counter goes where torch's would (``step_counter``); otherwise it is a CPU float read through ``host_ints``.
    """
    state["step"] = step_counter(group, device) if torch_kernel else torch.tensor(0.0)
    if rule == "sophia":
        state["hessian_updates"] = torch.tensor(0.0)  # probes folded into the curvature diagonal so far
    if rule == "sgd" and group["momentum"] == 0:
        return  # as torch.optim.SGD: without momentum there is nothing to keep
    for key, meta in rules.init_state(rule, shape, dtype, _META).items():
        if quantizes(meta.numel(), group):
            q = zeros_moment(
                meta.numel(), signed=rules.MOMENT_KEYS[rule][key], block_size=group["state_block_size"], device=device
            )
            _put(state, key, q, meta.shape)
        else:
            state[key] = torch.zeros(meta.shape, dtype=dtype, device=device)


def step_counter(group: Mapping[str, Any], device: torch.device) -> Tensor:
    """A zero step counter where torch's Adam(W) keeps it: on the CPU (read there without a device sync), but on the
    parameter's device for ``fused=True`` or ``capturable=True``, whose kernels take it as a device tensor (torch's
    grouping lets a CPU counter through, and the CUDA fused kernel would then read a host pointer). Its dtype is
    torch's ``_get_scalar_dtype``: float32, or float64 under a float64 default dtype (not with ``fused``)."""
    fused = bool(group.get("fused"))
    wide = torch.get_default_dtype() == torch.float64 and not fused
    dtype = torch.float64 if wide else torch.float32
    if fused or group.get("capturable"):
        return torch.zeros((), dtype=dtype, device=device)
    return torch.tensor(0.0, dtype=dtype)


def stateless(group: Mapping[str, Any]) -> bool:
    """Whether a dense parameter of this group keeps no state at all, not even a step counter: SGD without momentum,
    as torch.optim.SGD (its update reads no step), so its memory is exactly torch's."""
    return group["rule"] == "sgd" and not group["momentum"]


def stored_keys(key: str, quantized: bool) -> tuple[str, ...]:
    """The state keys buffer ``key`` is kept under: itself, or (``quantized``) its 8-bit codes, absmax and shape."""
    return tuple(f"{key}{suffix}" for suffix in QUANTIZED_SUFFIXES) if quantized else (key,)


def is_quantized(state: Mapping[str, Any], key: str) -> bool:
    """Whether ``state`` holds buffer ``key`` in 8 bits."""
    return f"{key}_codes" in state


def holds_quantized(state: Mapping[str, Any], rule: str) -> bool:
    """Whether ``state`` holds some buffer of ``rule`` in 8 bits."""
    return any(is_quantized(state, key) for key in rules.MOMENT_KEYS[rule])


def host_key(key: str) -> bool:
    """Whether state ``key`` is one the host reads at every step, so kept on the CPU: an 8-bit buffer's shape."""
    return key.endswith("_shape")


def stored_shape(state: Mapping[str, Tensor], key: str) -> tuple[int, ...] | None:
    """The shape of buffer ``key`` as ``state`` holds it, full precision or 8-bit (None: it holds none)."""
    if key in state:
        return tuple(state[key].shape)
    if f"{key}_shape" in state:
        return tuple(state[f"{key}_shape"].tolist())  # a CPU tensor: no device read
    return None


def decoded_buffers(state: Mapping[str, Tensor], rule: str, dtype: torch.dtype, block_size: int) -> dict[str, Tensor]:
    """The rule's buffers ``state`` holds: the full-precision ones as they are (the same tensors), the 8-bit ones
    decoded to ``dtype`` where their codes are (``block_size``: the group's ``state_block_size``)."""
    out = {}
    for key in rules.MOMENT_KEYS[rule]:
        if key in state:
            out[key] = state[key]
        elif is_quantized(state, key):
            out[key] = dequantize_moment(_codes(state, key), stored_shape(state, key), dtype, block_size=block_size)
    return out


def buffer_bytes(buffer: Tensor, group: Mapping[str, Any]) -> int:
    """Bytes a buffer like ``buffer`` (a meta tensor will do) takes in state under ``group``'s options: as it is, or
    (8-bit) one byte per element with a float32 absmax per block and its int64 shape."""
    n = buffer.numel()
    if not quantizes(n, group):
        return n * buffer.element_size()
    return n + 4 * -(-n // min(group["state_block_size"], n)) + 8 * buffer.dim()


@contextmanager
def moment_view(
    state: dict[str, Tensor], rule: str, group: Mapping[str, Any], dtype: torch.dtype
) -> Iterator[dict[str, Tensor]]:
    """The rule's whole buffers to update (in place, or by assigning a new tensor to a key): the state itself, or
    (8-bit) the full-precision ones as they are and a dequantized copy in ``dtype`` of the others, stored back
    afterwards."""
    if group["state_bits"] is None:
        yield state
        return
    moments = decoded_buffers(state, rule, dtype, group["state_block_size"])
    yield moments
    for key, tensor in moments.items():
        store_moment(state, key, tensor, rules.MOMENT_KEYS[rule][key], group)


def streams(state: Mapping[str, Tensor], rule: str) -> bool:
    """Whether ``moment_chunks`` can update these buffers: an elementwise rule with some buffer in 8 bits."""
    return rule in ELEMENTWISE_RULES and holds_quantized(state, rule)


def moment_chunks(
    state: dict[str, Tensor], rule: str, group: Mapping[str, Any], dtype: torch.dtype
) -> Iterator[tuple[slice, dict[str, Tensor]]]:
    """An elementwise rule's buffers, flattened, one chunk at a time: ``(chunk, buffers)`` where ``chunk`` slices the
    flattened gradient and ``buffers`` are that chunk's 1-D buffers in ``dtype``, to update in place.

    A chunk is a whole number of quantization blocks, about ``STREAM_CHUNK`` elements. Each chunk's 8-bit buffers are
    quantized back into their codes in place when the next chunk is asked for (so run the loop to its end); as a
    block's codes depend on that block alone, the result is what ``moment_view`` gives over the whole tensor.
    """
    block = group["state_block_size"]
    keys = [k for k in rules.MOMENT_KEYS[rule] if k in state or is_quantized(state, k)]
    first = keys[0]
    n = state[first].numel() if first in state else state[f"{first}_codes"].numel()
    for start, stop in chunk_ranges(n, block, STREAM_CHUNK):
        chunk = {
            k: state[k].view(-1)[start:stop]
            if k in state
            else dequantize_range(_codes(state, k), start, stop, dtype, block_size=block)
            for k in keys
        }
        yield slice(start, stop), chunk
        for k in keys:
            if k not in state:
                quantize_range_(chunk[k], _codes(state, k), start, block_size=block)


def store_moment(state: dict[str, Tensor], key: str, tensor: Tensor, signed: bool, group: Mapping[str, Any]) -> None:
    """Keep ``tensor`` as buffer ``key``: in 8 bits, or as it is when it is too small to be worth quantizing."""
    if not quantizes(tensor.numel(), group):
        for stored in stored_keys(key, quantized=True):
            state.pop(stored, None)
        state[key] = tensor
        return
    state.pop(key, None)
    _put(state, key, quantize_moment(tensor, signed=signed, block_size=group["state_block_size"]), tensor.shape)


def _put(state: dict[str, Tensor], key: str, q: Mapping[str, Tensor], shape: torch.Size) -> None:
    state[f"{key}_codes"], state[f"{key}_absmax"] = q["codes"], q["absmax"]
    kept = state.get(f"{key}_shape")  # a CPU tensor: reading it costs no sync; a new one would be made every step
    if kept is None or kept.tolist() != list(shape):
        state[f"{key}_shape"] = torch.tensor(tuple(shape), dtype=torch.int64)


def _codes(state: Mapping[str, Tensor], key: str) -> dict[str, Tensor]:
    return {"codes": state[f"{key}_codes"], "absmax": state[f"{key}_absmax"]}
