"""8-bit power-map moment storage checked against bounds and references derived independently here.

Error bounds (h = half a code step in the companded domain, a = block absmax):

* signed: s = sqrt(|x| / a) is rounded to the nearest c / 127, so |s - c/127| <= h = 0.5 / 127 and the
  decoded magnitude is a * t**2 with t in [s - h, s + h]. t**2 is convex and increasing on t >= 0, so
  |x - x_hat| <= a * max((s + h)**2 - s**2, s**2 - (s - h)**2) = a * ((s + h)**2 - s**2).
* unsigned: s = (x / a)**0.25, h = 0.5 / 255, same argument with t**4: |x - x_hat| <= a * ((s + h)**4 - s**4).

References are computed in float64 from plain Python block slices (no padding), so they also check that
the short last block keeps its own absmax.
"""

import io
import math

import pytest
import torch

from lightning_lowrank.optim.state.moments8bit import dequantize_moment, moment_bytes, quantize_moment

EPS32 = torch.finfo(torch.float32).eps


def _ref_blocks(x: torch.Tensor, block_size: int) -> list[torch.Tensor]:
    """Consecutive blocks of the flattened tensor in float64; the last one may be short."""
    flat = x.reshape(-1).double()
    return [flat[i : i + block_size] for i in range(0, flat.numel(), block_size)]


def _ref_absmax_per_element(x: torch.Tensor, block_size: int) -> torch.Tensor:
    return torch.cat([b.abs().max().expand(b.numel()) for b in _ref_blocks(x, block_size)])


def _ref_companded(x: torch.Tensor, block_size: int, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, a) per element in float64: s = (|x| / a)**(1/2 or 1/4), with s = 0 in all-zero blocks."""
    a = _ref_absmax_per_element(x, block_size)
    ratio = torch.where(a > 0, x.reshape(-1).double().abs() / torch.where(a > 0, a, 1.0), 0.0)
    return ratio ** (0.5 if signed else 0.25), a


def _ref_bound(x: torch.Tensor, block_size: int, signed: bool) -> torch.Tensor:
    s, a = _ref_companded(x, block_size, signed)
    h, p = (0.5 / 127, 2) if signed else (0.5 / 255, 4)
    # Slack for float32 arithmetic only: a few ulps of s (times d(t**p)/dt <= p (1 + h)**(p-1)) and of a.
    return a * ((s + h) ** p - s**p) + a * 16 * EPS32


def _assert_within_bound(x: torch.Tensor, signed: bool, block_size: int) -> None:
    q = quantize_moment(x, signed=signed, block_size=block_size)
    n_blocks = math.ceil(x.numel() / block_size)
    assert q["codes"].dtype == (torch.int8 if signed else torch.uint8)
    assert q["codes"].shape == (x.numel(),)
    assert q["absmax"].dtype == torch.float32 and q["absmax"].shape == (n_blocks,)
    ref_absmax = torch.stack([b.abs().max() for b in _ref_blocks(x, block_size)])
    assert torch.equal(q["absmax"].double(), ref_absmax)  # max of float32/bf16 values is exact

    out = dequantize_moment(q, x.shape, torch.float32, block_size=block_size)
    assert out.shape == x.shape and out.dtype == torch.float32
    err = (out.double() - x.double()).reshape(-1).abs()
    bound = _ref_bound(x, block_size, signed)
    assert torch.all(err <= bound), (err - bound).max()
    if signed:  # never flips a sign (zero is allowed for tiny entries)
        assert torch.all(out.reshape(-1) * x.reshape(-1) >= 0)

    # Codes match a float64 round-to-nearest reference, except possibly off by one right at a tie.
    s, _ = _ref_companded(x, block_size, signed)
    levels = 127 if signed else 255
    v = s * levels
    ref_codes = torch.round(v)
    if signed:
        ref_codes = ref_codes * torch.sign(x.reshape(-1).double())
    diff = (q["codes"].double() - ref_codes).abs()
    near_tie = ((v - v.floor()) - 0.5).abs() < 1e-4
    assert torch.all(diff <= 1) and torch.all((diff == 0) | near_tie)


def _second_moment_like(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Non-negative data spanning ~10 orders of magnitude, like Adam's v."""
    return torch.exp(torch.randn(shape, generator=gen) * 4) * 1e-6


SHAPES_AND_BLOCKS = [
    ((1000,), 256),  # 3 * 256 + 232: short last block
    ((37, 23), 64),  # 851 elements: short last block, 2-D
    ((64, 32), 256),  # exact multiple
    ((10,), 256),  # block larger than the tensor
    ((33,), 1),  # every element its own block
    ((5, 7, 3), 16),
]


@pytest.mark.parametrize("shape, block_size", SHAPES_AND_BLOCKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_signed_error_bound(shape, block_size, dtype):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen) * torch.exp(torch.randn(shape, generator=gen) * 2)).to(dtype)
    _assert_within_bound(x, signed=True, block_size=block_size)


@pytest.mark.parametrize("shape, block_size", SHAPES_AND_BLOCKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unsigned_error_bound(shape, block_size, dtype):
    x = _second_moment_like(shape, torch.Generator().manual_seed(1)).to(dtype)
    _assert_within_bound(x, signed=False, block_size=block_size)


@pytest.mark.parametrize("signed", [True, False])
def test_sweep_of_small_sizes(signed):
    """Every small (numel, block_size) pair, incl. block_size > numel and 1-element last blocks."""
    gen = torch.Generator().manual_seed(2)
    for n in range(1, 30):
        x = torch.randn(n, generator=gen)
        x = x if signed else x.abs()
        for block_size in range(1, 35):
            _assert_within_bound(x, signed=signed, block_size=block_size)


def test_bound_is_tight_enough_to_reject_floor():
    """The hand bound separates round-to-nearest from truncation: floor's worst error exceeds it."""
    x = _second_moment_like((4096,), torch.Generator().manual_seed(3))
    s, a = _ref_companded(x, 256, signed=False)
    floor_out = a * (torch.floor(s * 255) / 255) ** 4
    assert torch.any((floor_out - x.double()).abs() > _ref_bound(x, 256, signed=False))


def test_small_second_moment_survives_unlike_linear():
    """Entries at 1e-6 * absmax stay nonzero with the 4th-power map; a linear uint8 map zeroes them."""
    absmax = 3.0
    x = torch.full((256,), 1e-6 * absmax)
    x[17] = absmax
    q = quantize_moment(x, signed=False)
    out = dequantize_moment(q, x.shape, torch.float32)
    small = torch.ones(256, dtype=torch.bool)
    small[17] = False
    assert torch.all(out[small] > 0)
    # c = round(255 * 1e-6**0.25) = round(8.06) = 8 -> (8/255)**4 * absmax ~= 0.969e-6 * absmax: ~3% off.
    assert q["codes"][small].unique().tolist() == [8]
    torch.testing.assert_close(out[small], torch.full((255,), absmax * (8 / 255) ** 4), rtol=1e-6, atol=0)
    assert torch.all((out[small] - x[small]).abs() / x[small] < 0.05)
    # Linear uint8 reference: round(255 * x / absmax) = round(2.55e-4) = 0 -> decodes to exactly 0.
    linear = torch.round(255 * x.double() / absmax) / 255 * absmax
    assert torch.all(linear[small] == 0)
    # ... which is what makes Adam's update explode: m / sqrt(v) with m ~ sqrt(v) stays ~1 here.
    m = x.sqrt()
    assert torch.all(m[small] / (out[small].sqrt() + 1e-12) < 1.1)


def test_small_first_moment_resolution():
    """Signed map: entries at 1e-3 * absmax survive (a linear int8 map with step absmax/127 would zero them)."""
    x = torch.full((300,), -1e-3)
    x[0] = 1.0
    out = dequantize_moment(quantize_moment(x, signed=True), x.shape, torch.float32)
    assert torch.all(out[1:] < 0)
    assert torch.all(torch.round(127 * x[1:].double()) == 0)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_blocks_round_trip_exactly(signed, dtype):
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(4)).to(dtype)
    x = x if signed else x.abs()
    x[1] = 0.0  # middle block of 64 is all zero
    q = quantize_moment(x, signed=signed, block_size=64)
    assert q["absmax"][1] == 0 and torch.all(q["codes"][64:128] == 0)
    out = dequantize_moment(q, x.shape, dtype, block_size=64)
    assert not torch.isnan(out).any()
    assert torch.all(out[1] == 0)
    # An entirely zero tensor, too.
    z = torch.zeros(5, 7, dtype=dtype)
    out_z = dequantize_moment(quantize_moment(z, signed=signed, block_size=8), z.shape, dtype, block_size=8)
    assert torch.equal(out_z, z) and not torch.isnan(out_z).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_absmax_values_exact(dtype):
    # Blocks of 4: [0.3, -2.5, 2.5, 1], [-7, 1e-3, 7, 0], [5] (short)
    x = torch.tensor([0.3, -2.5, 2.5, 1.0, -7.0, 1e-3, 7.0, 0.0, 5.0], dtype=dtype)
    qs = quantize_moment(x, signed=True, block_size=4)
    assert qs["codes"][[1, 2, 4, 6, 8]].tolist() == [-127, 127, -127, 127, 127]
    out = dequantize_moment(qs, x.shape, dtype, block_size=4)
    for i in (1, 2, 4, 6, 8):
        assert out[i] == x[i]
    assert out[7] == 0

    xu = x.abs()
    qu = quantize_moment(xu, signed=False, block_size=4)
    assert qu["codes"][[1, 2, 4, 6, 8]].tolist() == [255] * 5
    assert qu["codes"][7] == 0
    out_u = dequantize_moment(qu, xu.shape, dtype, block_size=4)
    for i in (1, 2, 4, 6, 8):
        assert out_u[i] == xu[i]


def test_hand_worked_codes():
    """Values chosen to sit exactly on levels: signed (k/127)**2, unsigned (k/255)**4 of absmax 2."""
    ks = [0, 1, 10, 64, 126, 127]
    x = torch.tensor([2 * (k / 127) ** 2 * (-1) ** k for k in ks], dtype=torch.float64).float()
    q = quantize_moment(x, signed=True)
    assert q["codes"].tolist() == [k * (-1) ** k for k in ks]

    ku = [0, 1, 2, 50, 128, 254, 255]
    xu = torch.tensor([2 * (k / 255) ** 4 for k in ku], dtype=torch.float64).float()
    qu = quantize_moment(xu, signed=False)
    assert qu["codes"].tolist() == ku
    assert q["absmax"].tolist() == [2.0] and qu["absmax"].tolist() == [2.0]


@pytest.mark.parametrize("shape", [(1000,), (40, 25), (7, 1)])
def test_shapes_and_dtypes_out(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    q = quantize_moment(x, signed=True, block_size=128)
    assert q["codes"].shape == (x.numel(),)
    out32 = dequantize_moment(q, shape, torch.float32, block_size=128)
    out16 = dequantize_moment(q, torch.Size(shape), torch.bfloat16, block_size=128)
    assert out32.shape == shape and out16.shape == shape and out16.dtype == torch.bfloat16
    assert torch.equal(out16, out32.to(torch.bfloat16))


def test_empty_and_scalar():
    q = quantize_moment(torch.empty(0, 3), signed=False)
    assert moment_bytes(q) == 0
    assert dequantize_moment(q, (0, 3), torch.float32).shape == (0, 3)
    qs = quantize_moment(torch.tensor(-0.5), signed=True)
    assert qs["codes"].tolist() == [-127]
    assert dequantize_moment(qs, (), torch.float32).item() == -0.5


def test_requires_grad_input_is_fine():
    x = torch.randn(20, requires_grad=True)
    q = quantize_moment(x, signed=True, block_size=8)
    assert not q["codes"].requires_grad and not q["absmax"].requires_grad


def test_negative_input_to_unsigned_is_stored_as_zero():
    """A variance is >= 0 by construction; a negative entry (rounding) is stored as 0, not as its magnitude, and
    without a check that would read the device at every step."""
    x = torch.rand(300)
    x[299] = -1e-3
    q = quantize_moment(x, signed=False, block_size=256)
    back = dequantize_moment(q, x.shape, torch.float32, block_size=256)
    assert back[299] == 0
    torch.testing.assert_close(back[:299], x[:299], atol=0.05 * float(x.max()), rtol=0)


@pytest.mark.parametrize("block_size", [0, -1, 2.5, 16.0, True, "16", None])
def test_bad_block_size_raises(block_size):
    with pytest.raises(ValueError, match="block_size"):
        quantize_moment(torch.randn(8), signed=True, block_size=block_size)
    q = quantize_moment(torch.randn(8), signed=True)
    with pytest.raises(ValueError, match="block_size"):
        dequantize_moment(q, (8,), torch.float32, block_size=block_size)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_non_floating_input_raises(dtype):
    with pytest.raises(TypeError):
        quantize_moment(torch.ones(8, dtype=dtype), signed=False)


def test_dequantize_rejects_mismatched_sizes():
    q = quantize_moment(torch.randn(1000), signed=True, block_size=100)  # 10 blocks
    with pytest.raises(ValueError):
        dequantize_moment(q, (10, 50), torch.float32, block_size=100)  # wrong numel
    with pytest.raises(ValueError):
        dequantize_moment(q, (1000,), torch.float32)  # default 256 -> 4 blocks, not 10
    with pytest.raises(ValueError):
        dequantize_moment({"codes": q["codes"].float(), "absmax": q["absmax"]}, (1000,), torch.float32)


@pytest.mark.parametrize("signed", [True, False])
def test_moment_bytes_hand_count(signed):
    x = torch.rand(1000, generator=torch.Generator().manual_seed(6))
    # 1000 one-byte codes (no padding) + 4 blocks of 256 -> 4 float32 absmax = 16 bytes.
    assert moment_bytes(quantize_moment(x, signed=signed)) == 1000 + 16
    # 851 codes, blocks of 64 -> ceil(851 / 64) = 14 blocks.
    y = torch.rand(37, 23, generator=torch.Generator().manual_seed(6))
    assert moment_bytes(quantize_moment(y, signed=signed, block_size=64)) == 851 + 4 * 14
    # Block larger than the tensor: a single block.
    assert moment_bytes(quantize_moment(y[:2], signed=signed)) == 46 + 4


@pytest.mark.parametrize("signed", [True, False])
def test_weights_only_save_load_round_trip(signed):
    x = torch.rand(17, 9, generator=torch.Generator().manual_seed(7))  # 153 elements: last block of 32 short
    x = x - 0.5 if signed else x
    q = quantize_moment(x, signed=signed, block_size=32)
    state = {"step": torch.tensor(3), "exp_avg": q}  # shaped like an optimizer.state[p] entry
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert set(loaded["exp_avg"]) == {"codes", "absmax"}
    for key in ("codes", "absmax"):
        assert torch.equal(loaded["exp_avg"][key], q[key]) and loaded["exp_avg"][key].dtype == q[key].dtype
    # The codes own exactly numel bytes: no padded storage is dragged along into the checkpoint.
    assert loaded["exp_avg"]["codes"].untyped_storage().nbytes() == x.numel()
    out = dequantize_moment(loaded["exp_avg"], x.shape, x.dtype, block_size=32)
    assert torch.equal(out, dequantize_moment(q, x.shape, x.dtype, block_size=32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("signed", [True, False])
def test_cuda_matches_cpu(signed):
    x = _second_moment_like((3000,), torch.Generator().manual_seed(8))
    x = x * torch.sign(torch.randn(3000, generator=torch.Generator().manual_seed(9))) if signed else x
    q_cpu = quantize_moment(x, signed=signed)
    q_gpu = quantize_moment(x.cuda(), signed=signed)
    assert q_gpu["codes"].is_cuda and q_gpu["absmax"].is_cuda
    assert torch.equal(q_gpu["absmax"].cpu(), q_cpu["absmax"])
    assert (q_gpu["codes"].cpu().int() - q_cpu["codes"].int()).abs().max() <= 1  # ties may differ by 1 ulp
    out = dequantize_moment(q_gpu, x.shape, torch.float32)
    assert out.is_cuda
    err = (out.cpu().double() - x.double()).abs()
    assert torch.all(err <= _ref_bound(x, 256, signed))
