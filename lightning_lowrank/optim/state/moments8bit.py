"""Blockwise 8-bit storage for Adam-style optimizer moments (like bitsandbytes' 8-bit Adam, plain torch).

The flattened tensor is cut into consecutive blocks of ``block_size`` elements (the last one may be
short; codes are never padded), each with its own float32 ``absmax``, so an outlier only costs
precision inside its own block.

Codes use a power (companding) map instead of a linear one. Adam's second moment spans many orders of
magnitude inside one block; a linear 8-bit map rounds every entry below ``absmax / 510`` to zero, and
``m / (sqrt(v) + eps)`` then explodes for those entries. Spacing the levels on a power curve gives small
values fine steps and large values coarse ones:

* signed (first moment): ``value = absmax * sign(c) * (|c| / 127)**2``, int8 codes in ``[-127, 127]``;
* unsigned (second moment, ``x >= 0``): ``value = absmax * (c / 255)**4``, uint8 codes in ``[0, 255]``,
  so entries down to about ``1e-10 * absmax`` survive.

Rounding is to nearest in the companded domain (``sqrt(|x| / absmax)`` resp. ``(x / absmax)**0.25``).
The extremes are exact: ``0`` and ``±absmax`` decode to themselves, and an all-zero block decodes to
exact zeros. The result is a plain dict of tensors on ``x``'s device, so it can live in
``optimizer.state[p]`` and survive ``torch.save`` / ``torch.load(weights_only=True)``. Signedness is
recovered from the code dtype; the block size is not stored (see :func:`dequantize_moment`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SIGNED_LEVELS = 127
UNSIGNED_LEVELS = 255


def _check_block_size(block_size: int) -> None:
    """Reject block sizes we cannot use, before any work is done."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")


def quantize_moment(x: Tensor, *, signed: bool, block_size: int = 256) -> dict[str, Tensor]:
    """Encode a moment tensor blockwise to 8 bits with the power map (see the module docstring).

    Returns ``{"codes": int8 (signed) or uint8 (unsigned), flat with x.numel() elements,
    "absmax": float32 (n_blocks,)}``, both on ``x``'s device. ``signed=False`` is for non-negative
    tensors (the second moment): a negative entry, which only rounding could produce, is stored as zero. Inputs are
    assumed finite.
    """
    _check_block_size(block_size)
    if not x.is_floating_point():
        raise TypeError(f"quantize_moment needs a floating tensor, got {x.dtype}")
    device = x.device
    code_dtype = torch.int8 if signed else torch.uint8
    n = x.numel()
    if n == 0:
        return {
            "codes": torch.empty(0, dtype=code_dtype, device=device),
            "absmax": torch.empty(0, dtype=torch.float32, device=device),
        }

    flat = x.detach().reshape(-1).to(torch.float32)
    if not signed:  # a variance is >= 0 by construction; checking that would read the device at every step
        flat = flat.clamp(min=0)

    # A block never exceeds the tensor, so tiny tensors are not padded up to block_size internally.
    bs = min(block_size, n)
    n_blocks = math.ceil(n / bs)
    pad = n_blocks * bs - n
    mag = flat.abs()
    if pad:
        mag = torch.cat((mag, mag.new_zeros(pad)))  # zeros never raise a block's absmax
    blocks = mag.view(n_blocks, bs)
    absmax = blocks.amax(dim=1)
    # All-zero blocks: divide by 1 instead of 0, so every code is 0 and decodes to exactly 0 (no NaN).
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    r = blocks / safe[:, None]  # in [0, 1]; exactly 1 at the block's absmax

    if signed:
        c = torch.round(r.sqrt_().mul_(SIGNED_LEVELS)).clamp_(0, SIGNED_LEVELS)
        c = c.reshape(-1)[:n].mul_(torch.sign(flat))
    else:
        c = torch.round(r.sqrt_().sqrt_().mul_(UNSIGNED_LEVELS)).clamp_(0, UNSIGNED_LEVELS)
        c = c.reshape(-1)[:n]
    # .to() copies, so the codes own exactly n bytes (a view would drag the padded storage into torch.save).
    return {"codes": c.to(code_dtype), "absmax": absmax}


def dequantize_moment(
    q: dict[str, Tensor], shape: torch.Size | tuple[int, ...], dtype: torch.dtype, *, block_size: int = 256
) -> Tensor:
    """Decode :func:`quantize_moment`'s output to a tensor of ``shape`` and ``dtype``.

    Signedness comes from the code dtype (int8 / uint8). The block size cannot be recovered from the
    sizes alone (without padding, several block sizes give the same block count), so a non-default
    ``block_size`` used to quantize must be passed here again. Sizes that cannot fit ``shape`` with
    ``block_size`` raise ValueError rather than silently decoding garbage.
    """
    _check_block_size(block_size)
    codes, absmax = q["codes"], q["absmax"]
    if codes.dtype == torch.int8:
        levels, power = SIGNED_LEVELS, 2
    elif codes.dtype == torch.uint8:
        levels, power = UNSIGNED_LEVELS, 4
    else:
        raise ValueError(f"codes must be int8 (signed) or uint8 (unsigned), got {codes.dtype}")
    n = math.prod(shape)
    n_blocks = math.ceil(n / min(block_size, n)) if n else 0
    if codes.numel() != n or absmax.numel() != n_blocks:
        raise ValueError(
            f"quantized moment ({codes.numel()} codes, {absmax.numel()} blocks) does not fit shape "
            f"{tuple(shape)} with block_size={block_size}"
        )
    if n == 0:
        return torch.empty(shape, dtype=dtype, device=codes.device)

    bs = min(block_size, n)
    scale = absmax.to(torch.float32).repeat_interleave(bs)[:n]
    c = codes.reshape(-1).to(torch.float32)
    t = c.abs().div_(levels)
    values = t.pow_(power).mul_(scale)
    if power == 2:
        values.mul_(torch.sign(c))
    return values.reshape(shape).to(dtype)


def zeros_moment(
    n: int, *, signed: bool, block_size: int = 256, device: torch.device | None = None
) -> dict[str, Tensor]:
    """What :func:`quantize_moment` returns for ``n`` zeros, without building them in full precision first."""
    _check_block_size(block_size)
    n_blocks = math.ceil(n / min(block_size, n)) if n else 0
    return {
        "codes": torch.zeros(n, dtype=torch.int8 if signed else torch.uint8, device=device),
        "absmax": torch.zeros(n_blocks, dtype=torch.float32, device=device),
    }


def chunk_ranges(n: int, block_size: int, chunk: int) -> list[tuple[int, int]]:
    """Consecutive ``[start, stop)`` ranges covering ``n`` elements, each a whole number of blocks (the last may end
    in the short block) and at most ``max(chunk, block)`` long: the pieces :func:`dequantize_range` and
    :func:`quantize_range_` work on."""
    _check_block_size(block_size)
    if n == 0:
        return []
    block = min(block_size, n)
    step = max(1, chunk // block) * block
    return [(start, min(start + step, n)) for start in range(0, n, step)]


def _block_range(q: dict[str, Tensor], start: int, stop: int, block_size: int) -> tuple[int, int]:
    """The blocks that elements ``[start, stop)`` of ``q`` fill exactly; ValueError unless both ends are boundaries."""
    n = q["codes"].numel()
    block = min(block_size, n) if n else 1
    if not 0 <= start <= stop <= n or start % block or (stop % block and stop != n):
        raise ValueError(f"[{start}, {stop}) is not a whole number of {block}-element blocks of {n} codes")
    return start // block, -(-stop // block)


def dequantize_range(
    q: dict[str, Tensor], start: int, stop: int, dtype: torch.dtype, *, block_size: int = 256
) -> Tensor:
    """Elements ``[start, stop)`` of a flattened quantized moment, decoded to a 1-D tensor of ``dtype``: exactly what
    the same elements of :func:`dequantize_moment` are, with a transient the size of the range, not the tensor."""
    first, last = _block_range(q, start, stop, block_size)
    part = {"codes": q["codes"][start:stop], "absmax": q["absmax"][first:last]}
    return dequantize_moment(part, (stop - start,), dtype, block_size=block_size)


def quantize_range_(x: Tensor, q: dict[str, Tensor], start: int, *, block_size: int = 256) -> None:
    """Encode ``x`` (flattened) as elements ``[start, start + x.numel())`` of ``q`` in place, signed as its codes:
    the codes and absmax :func:`quantize_moment` gives the whole tensor there, as a block's codes depend on it alone."""
    first, last = _block_range(q, start, start + x.numel(), block_size)
    part = quantize_moment(x, signed=q["codes"].dtype == torch.int8, block_size=block_size)
    q["codes"][start : start + x.numel()].copy_(part["codes"])
    q["absmax"][first:last].copy_(part["absmax"])


def moment_bytes(q: dict[str, Tensor]) -> int:
    """Storage of a quantized moment in bytes (codes + absmax), for memory accounting."""
    return sum(q[k].numel() * q[k].element_size() for k in ("codes", "absmax"))
