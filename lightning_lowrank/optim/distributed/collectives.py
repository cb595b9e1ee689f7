"""The package's tensor collectives, written for NCCL's rules on a CPU-tested code base.

* NCCL refuses a non-contiguous tensor (gloo, which the tests run on, accepts one): ``broadcast_`` and
  ``all_reduce_async`` send a contiguous copy when, and only when, the tensor is not contiguous, and write the result
  back into it (a module buffer, a gradient laid out as its transposed parameter).
* A refresh computed on one rank reaches the others without pickling (``share_refreshes``). What a projector stores
  at a refresh has shapes and dtypes that every rank knows from the layer alone (``refresh_layout``: the projector,
  the rank, the side, ``projector_bits`` and the group size), so receivers allocate it themselves, and the tensors of
  all the layers of a refresh step travel as one flat byte buffer per process group: one ``broadcast`` from the rank
  that computed them all, or one all-gather when several ranks computed some (each rank's part padded to the largest).
  One buffer of bytes rather than one per dtype, because a refresh stores up to four dtypes (P, or uint8 codes with
  float32 scales and zeros, int64 indices) and each collective of a few KiB costs mostly its latency; and no
  ``broadcast_object_list`` per layer (two broadcasts and a device-to-host read each, only to learn shapes every
  rank can compute).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_lowrank.optim.state.host_ints import on_host

# Projectors whose P is rebuilt from a seed that every rank derives alike (from the group's seed, the layer and the
# step, or the previous seed): every rank refreshes them itself, without reading the gradient or sending anything.
SEEDED_PROJECTORS = frozenset({"random", "gaussian"})
_ALIGN = 8  # each tensor starts at a multiple of 8 bytes in the buffer, so that any dtype can view its bytes

Layout = list[tuple[str, tuple[int, ...], torch.dtype]]  # (state key, shape, dtype) of each tensor a refresh stores


# -- contiguous copies for NCCL --------------------------------------------------------------------------------------


def broadcast_(tensor: Tensor, src: int, group: Any = None) -> None:
    """``dist.broadcast`` of ``tensor`` in place, through a contiguous copy if it is not contiguous."""
    staging = tensor if tensor.is_contiguous() else tensor.contiguous()
    dist.broadcast(staging, src=src, group=group)
    if staging is not tensor:
        tensor.copy_(staging)


class _CopyBack:
    """The work handle of a collective run on a contiguous copy: ``wait`` also writes the result back."""

    def __init__(self, work: Any, staging: Tensor, original: Tensor) -> None:
        self._work, self._staging, self._original = work, staging, original

    def wait(self) -> bool:
        done = self._work.wait()
        self._original.copy_(self._staging)
        return done


def all_reduce_async(tensor: Tensor, group: Any = None) -> Any:
    """An async in-place ``dist.all_reduce`` (sum) of ``tensor``; its result is in ``tensor`` after ``wait()``."""
    if tensor.is_contiguous():
        return dist.all_reduce(tensor, group=group, async_op=True)
    staging = tensor.contiguous()
    return _CopyBack(dist.all_reduce(staging, group=group, async_op=True), staging, tensor)


# -- sharing refreshes -----------------------------------------------------------------------------------------------


def refresh_layout(keys: tuple[str, ...], dim: int, rank: int, dtype: torch.dtype, group: dict[str, Any]) -> Layout:
    """Shape and dtype of each state tensor a refresh stores under ``keys``: P (``dim`` x ``rank``, in ``dtype``), its
    quantized codes, scales and zeros (``quantize.quantize``'s sizes for ``projector_bits`` and
    ``proj_group_size``), DCT indices, or a seed. The rank that computes a refresh checks its tensors against this
    (``check_layout``), so a projector that stores something else fails there, not in a receiver."""
    numel = dim * rank
    bits = group.get("projector_bits")
    if bits is not None:
        size = min(group["proj_group_size"], numel)
        groups = math.ceil(numel / size)
        codes = groups * size if bits == 8 else math.ceil(groups * size / 2)
    sizes = {
        "proj": ((dim, rank), dtype),
        "proj_idx": ((rank,), torch.int64),
        "proj_seed": ((), torch.int64),
    }
    if bits is not None:
        sizes.update(proj_codes=((codes,), torch.uint8), proj_scale=((groups,), torch.float32))
        sizes["proj_zero"] = sizes["proj_scale"]
    unknown = [k for k in keys if k not in sizes]
    if unknown:
        raise KeyError(f"no known layout for refreshed state {unknown}: add it to collectives.refresh_layout")
    return [(k, *sizes[k]) for k in keys]


def check_layout(state: dict[str, Tensor], layout: Layout, where: str) -> None:
    """Raise if what a refresh stored differs from ``layout`` (the receivers would read garbage)."""
    found = [(k, tuple(state[k].shape), state[k].dtype) if k in state else (k, None, None) for k, _, _ in layout]
    if found != layout:
        raise RuntimeError(f"{where}: the refresh stored {found}, but the other ranks expect {layout}")


def _nbytes(layout: Layout) -> int:
    return sum(_padded(math.prod(shape) * dtype.itemsize) for _, shape, dtype in layout)


def _padded(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def _pack(out: Tensor, parts: list[tuple[dict[str, Tensor], Layout]]) -> None:
    offset = 0
    for state, layout in parts:
        for key, shape, dtype in layout:
            nbytes = math.prod(shape) * dtype.itemsize
            out[offset : offset + nbytes].copy_(state[key].to(out.device).reshape(-1).view(torch.uint8))
            offset += _padded(nbytes)


def _unpack(data: Tensor, parts: list[tuple[dict[str, Tensor], Layout]]) -> None:
    """Fill each state from its bytes in ``data``, in fresh tensors: a caller may still hold the previous P."""
    offset = 0
    for state, layout in parts:
        for key, shape, dtype in layout:
            nbytes = math.prod(shape) * dtype.itemsize
            tensor = data[offset : offset + nbytes].view(dtype).view(shape).clone()
            state[key] = tensor.cpu() if on_host(key) else tensor  # a seed the host reads: kept on the CPU
            offset += _padded(nbytes)


def share_refreshes(
    layers: list[tuple[dict[str, Tensor], Layout, int]], rank: int, group: Any, device: torch.device
) -> int:
    """Give every rank of ``group`` the refreshed state of ``layers``: (state, layout, owner), the owner being the
    group rank that computed the layer, ``rank`` this one. In one collective (see the module doc); returns the bytes
    of the refreshes it carried."""
    world = dist.get_world_size(group)
    mine: list[list[tuple[dict[str, Tensor], Layout]]] = [[] for _ in range(world)]
    for state, layout, owner in layers:
        mine[owner].append((state, layout))
    sizes = [sum(_nbytes(layout) for _, layout in parts) for parts in mine]
    owners = [r for r in range(world) if mine[r]]
    if len(owners) == 1:
        (src,) = owners
        data = torch.empty(sizes[src], dtype=torch.uint8, device=device)
        if src == rank:
            _pack(data, mine[src])
        dist.broadcast(data, src=dist.get_global_rank(group, src) if group is not None else src, group=group)
        chunks = {src: data}
    else:
        chunk = max(sizes)
        send = torch.empty(chunk, dtype=torch.uint8, device=device)
        _pack(send, mine[rank])
        data = torch.empty(world * chunk, dtype=torch.uint8, device=device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
        gather(data, send, group=group)
        chunks = {r: data[r * chunk : (r + 1) * chunk] for r in owners}
    for r, data in chunks.items():
        if r != rank:
            _unpack(data, mine[r])
    return sum(sizes)
