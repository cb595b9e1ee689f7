"""Group-wise asymmetric (min/max) quantization to 8 or 4 bits.

Used to keep projection matrices compact in optimizer state (as in Q-GaLore), but with real 4-bit
storage: two codes share one uint8 byte, low nibble first. Each group of ``group_size`` consecutive
elements (of the flattened tensor) gets its own float32 ``scale`` and ``zero`` (the group minimum), so
an outlier only costs precision inside its own group.

The result is a plain dict of three tensors, so it can live in ``optimizer.state[p]`` and survive
``torch.save`` / ``torch.load(weights_only=True)``. Neither ``bits`` nor ``group_size`` is stored:
:func:`dequantize` recovers both from the tensor sizes and the target shape. That is unambiguous
because a group never holds more elements than the tensor (a ``group_size`` larger than the tensor
gives one group of exactly ``numel`` elements, which quantizes identically to padding it out).
Everything here is plain torch, without Lightning.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

ALLOWED_BITS = (4, 8)


def _check_args(bits: int, group_size: int) -> None:
    """Reject settings we cannot store, before any work is done."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in ALLOWED_BITS:
        raise ValueError(f"bits must be one of {ALLOWED_BITS}, got {bits!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")


def _pack_nibbles(codes: Tensor) -> Tensor:
    """Two 4-bit codes per byte, low nibble first; an odd count gets a zero high nibble."""
    if codes.numel() % 2:
        codes = torch.cat((codes, codes.new_zeros(1)))
    pairs = codes.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def _unpack_nibbles(packed: Tensor) -> Tensor:
    """Inverse of :func:`_pack_nibbles` (returns an even number of codes)."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=1).reshape(-1)


def quantize(
    x: Tensor,
    bits: int,
    group_size: int = 256,
    *,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Quantize a floating tensor group-wise to ``bits`` (4 or 8) bits per element.

    Per group: ``zero = min``, ``scale = (max - min) / (2**bits - 1)`` and
    ``codes = round((x - zero) / scale)`` clamped to ``[0, 2**bits - 1]``. A constant group has
    ``scale == 0`` and all-zero codes, so it dequantizes to exactly ``zero`` (exact round trip for
    float32/float16/bfloat16 inputs; scale and zero are float32). Inputs are assumed finite.

    With ``stochastic=True`` the rounding is ``floor(v + u)``, ``u ~ U[0, 1)``, which is unbiased
    (``E[dequantize] == x``), so repeated re-quantization does not drift. ``u`` is drawn on ``x``'s
    device from ``generator``, which must be on that device (a meta tensor takes a CPU one;
    ``projection.seeded_generator`` makes either): noise drawn on the CPU and copied to a GPU would
    be a blocking copy at every call. Never from torch's global RNG, so results are reproducible and
    training randomness is left alone. Without a generator a fresh, randomly seeded one is used:
    still unbiased and still leaves the global RNG untouched, but not reproducible.

    Returns ``{"codes": uint8, "scale": float32 (n_groups,), "zero": float32 (n_groups,)}``.
    For 8 bits ``codes`` has one byte per padded element; for 4 bits ``ceil(n_padded / 2)`` bytes.
    """
    _check_args(bits, group_size)
    if not x.is_floating_point():
        raise TypeError(f"quantize needs a floating tensor, got {x.dtype}")
    device = x.device
    n = x.numel()
    if n == 0:
        empty_f = torch.empty(0, dtype=torch.float32, device=device)
        return {"codes": torch.empty(0, dtype=torch.uint8, device=device), "scale": empty_f, "zero": empty_f.clone()}

    # Never more than numel per group: keeps dequantize's inference of bits/group size unambiguous.
    gs = min(group_size, n)
    n_groups = math.ceil(n / gs)
    flat = x.detach().reshape(-1).to(torch.float32)
    pad = n_groups * gs - n
    if pad:
        # Repeat the last element: it already belongs to the last group, so min/max are unchanged.
        flat = torch.cat((flat, flat[-1:].expand(pad)))
    groups = flat.view(n_groups, gs)

    qmax = 2**bits - 1
    lo = groups.amin(dim=1)
    hi = groups.amax(dim=1)
    scale = (hi - lo) / qmax
    # Constant groups: divide by 1 instead of 0, so every code is 0 and dequantizes to exactly lo.
    safe_scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    v = (groups - lo[:, None]) / safe_scale[:, None]
    if stochastic:
        if generator is None:
            generator = torch.Generator(device="cpu" if device.type == "meta" else device)
            generator.seed()
        if generator.device.type != device.type and device.type != "meta":
            raise ValueError(f"quantize: the generator is on {generator.device}, the tensor on {device}")
        u = torch.rand(v.shape, generator=generator, device=device, dtype=torch.float32)
        v = torch.floor(v + u)
    else:
        v = torch.round(v)
    codes = v.clamp_(0, qmax).to(torch.uint8).reshape(-1)
    if bits == 4:
        codes = _pack_nibbles(codes)
    return {"codes": codes, "scale": scale, "zero": lo}


def dequantize(q: dict[str, Tensor], shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Rebuild a tensor of ``shape`` and ``dtype`` from :func:`quantize`'s output.

    ``bits`` and the group size are inferred from the sizes: 8-bit codes hold at least ``numel``
    bytes, packed 4-bit codes fewer (for ``numel >= 2``; a single element is one constant group,
    which decodes the same either way). A ``q`` that cannot come from a tensor of ``shape`` raises
    ValueError rather than silently decoding garbage.
    """
    codes, scale, zero = q["codes"], q["scale"], q["zero"]
    n = math.prod(shape)
    n_groups = scale.numel()
    n_codes = codes.numel()
    if n == 0:
        if n_codes or n_groups:
            raise ValueError("quantized data is not empty but the target shape has no elements")
        return torch.empty(shape, dtype=dtype, device=codes.device)
    if n_groups < 1 or zero.numel() != n_groups:
        raise ValueError(f"scale/zero must both have one entry per group, got {n_groups} and {zero.numel()}")

    if n_codes >= n:  # 8-bit: one byte per padded element
        gs, unpacked = n_codes // n_groups, codes.reshape(-1)
        valid = n_codes == n_groups * gs
    else:  # 4-bit: two codes per byte
        gs, unpacked = (2 * n_codes) // n_groups, _unpack_nibbles(codes.reshape(-1))
        valid = n_codes == math.ceil(n_groups * gs / 2)
    if not valid or math.ceil(n / gs) != n_groups:
        raise ValueError(f"quantized data ({n_codes} code bytes, {n_groups} groups) does not fit shape {tuple(shape)}")

    group_of = torch.arange(n, device=codes.device) // gs
    values = unpacked[:n].to(torch.float32) * scale[group_of] + zero[group_of]
    return values.reshape(shape).to(dtype)


def quantized_bytes(q: dict[str, Tensor]) -> int:
    """Storage of a quantized tensor in bytes (codes + scale + zero), for memory accounting."""
    return sum(q[k].numel() * q[k].element_size() for k in ("codes", "scale", "zero"))
