"""Group-wise quantization checked against references computed independently here.

The references slice the flattened tensor into groups with plain Python (no padding), so they also
check that the padding inside ``quantize`` does not leak into any group's min/max.
"""

import io
import math

import pytest
import torch

from lightning_lowrank.optim.state.quantize import dequantize, quantize, quantized_bytes

EPS32 = torch.finfo(torch.float32).eps


def _ref_groups(x: torch.Tensor, group_size: int) -> list[torch.Tensor]:
    """Consecutive groups of the flattened tensor; the last one may be short (never padded)."""
    flat = x.reshape(-1).double()
    return [flat[i : i + group_size] for i in range(0, flat.numel(), group_size)]


def _ref_scale_zero(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    groups = _ref_groups(x, group_size)
    lo = torch.stack([g.min() for g in groups])
    hi = torch.stack([g.max() for g in groups])
    return (hi - lo) / (2**bits - 1), lo


def _per_element(values: torch.Tensor, n: int, group_size: int) -> torch.Tensor:
    """Spread one value per group over the group's elements."""
    return torch.cat([values[i].expand(min(group_size, n - i * group_size)) for i in range(values.numel())])


def _assert_within_half_step(x: torch.Tensor, bits: int, group_size: int) -> None:
    q = quantize(x, bits, group_size)
    out = dequantize(q, x.shape, x.dtype)
    assert out.shape == x.shape and out.dtype == x.dtype

    scale_ref, zero_ref = _ref_scale_zero(x, bits, group_size)
    n_groups = math.ceil(x.numel() / group_size)
    assert q["scale"].shape == (n_groups,) and q["zero"].shape == (n_groups,)
    assert q["scale"].dtype == torch.float32 and q["zero"].dtype == torch.float32
    assert q["codes"].dtype == torch.uint8
    torch.testing.assert_close(q["zero"].double(), zero_ref, rtol=0, atol=0)
    torch.testing.assert_close(q["scale"].double(), scale_ref, rtol=4 * EPS32, atol=0)

    # Rounding to the nearest of 2**bits evenly spaced levels errs by at most half a step; the small
    # slack only covers float32 arithmetic (a few ulps of the largest magnitude involved).
    err = (out.double() - x.double()).reshape(-1)
    slack = 8 * EPS32 * (x.abs().max().item() + 1.0)
    bound = _per_element(scale_ref, x.numel(), group_size) / 2 + slack
    assert torch.all(err.abs() <= bound), (err.abs() - bound).max()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(
    "shape, group_size",
    [
        ((37, 23), 64),  # 851 elements: last group short
        ((1000,), 256),  # 1000 = 3 * 256 + 232
        ((5, 7, 3), 16),
        ((10,), 256),  # group larger than the tensor
        ((3, 3), 1000),
        ((33,), 1),  # every element its own (constant) group
        ((64, 32), 256),  # exact multiple
    ],
)
def test_round_trip_error_within_half_step(bits, shape, group_size):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen) * 3 + 1
    _assert_within_half_step(x, bits, group_size)


@pytest.mark.parametrize("bits", [4, 8])
def test_round_trip_sweep_of_sizes(bits):
    """Every small (numel, group_size) pair decodes, incl. odd packed lengths and group_size > numel."""
    gen = torch.Generator().manual_seed(1)
    for n in range(1, 41):
        x = torch.randn(n, generator=gen)
        for group_size in range(1, 46):
            _assert_within_half_step(x, bits, group_size)


def test_padding_does_not_change_last_group():
    """A short last group far from the others must keep its own min/max (pad values must not enter)."""
    x = torch.tensor([-100.0, 100.0, 0.0, 1.0, 5.0, 6.0])  # groups of 4: [-100, 100, 0, 1], [5, 6]
    q = quantize(x, 8, group_size=4)
    assert q["zero"].tolist() == [-100.0, 5.0]
    torch.testing.assert_close(q["scale"], torch.tensor([200.0 / 255, 1.0 / 255]))
    out = dequantize(q, x.shape, x.dtype)
    assert out[4].item() == 5.0
    assert abs(out[5].item() - 6.0) < 1e-6


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("stochastic", [False, True])
def test_constant_tensor_round_trips_exactly(bits, stochastic):
    x = torch.full((7, 9), -0.3141592)
    q = quantize(x, bits, 16, stochastic=stochastic, generator=torch.Generator().manual_seed(0))
    assert torch.all(q["scale"] == 0)
    assert torch.equal(dequantize(q, x.shape, x.dtype), x)


@pytest.mark.parametrize("bits", [4, 8])
def test_constant_group_round_trips_exactly(bits):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 8, generator=gen)
    x[1] = 2.718281  # the middle group of 8 is constant
    q = quantize(x, bits, group_size=8)
    assert q["scale"][1] == 0 and q["scale"][0] > 0 and q["scale"][2] > 0
    out = dequantize(q, x.shape, x.dtype)
    assert torch.equal(out[1], x[1])


@pytest.mark.parametrize("n, group_size", [(851, 64), (10, 256), (15, 5), (9, 3), (1000, 256), (1, 4)])
def test_four_bit_codes_are_packed_two_per_byte(n, group_size):
    x = torch.randn(n, generator=torch.Generator().manual_seed(3))
    q4, q8 = quantize(x, 4, group_size), quantize(x, 8, group_size)
    # Literal padding rule: pad to a multiple of group_size, but a group never exceeds the tensor.
    g = min(group_size, n)
    n_padded = math.ceil(n / g) * g
    assert q8["codes"].numel() == n_padded
    assert q4["codes"].numel() == math.ceil(n_padded / 2)
    assert q4["codes"].numel() == math.ceil(q8["codes"].numel() / 2)


def test_four_bit_hand_worked_packing():
    x = torch.arange(16, dtype=torch.float32)  # min 0, max 15 -> scale exactly 1, codes exactly 0..15
    q = quantize(x, 4, group_size=16)
    assert q["scale"].tolist() == [1.0] and q["zero"].tolist() == [0.0]
    assert q["codes"].tolist() == [0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE]
    assert torch.equal(dequantize(q, x.shape, torch.float32), x)


def test_four_bit_hand_worked_odd_length():
    x = torch.tensor([0.0, 15.0, 7.0])  # codes 0, 15, 7 -> bytes 0xF0, then 0x07 with an empty high nibble
    q = quantize(x, 4, group_size=3)
    assert q["codes"].tolist() == [0xF0, 0x07]
    assert torch.equal(dequantize(q, x.shape, torch.float32), x)


def test_eight_bit_hand_worked_codes():
    x = torch.arange(16, dtype=torch.float32)  # scale 15/255 = 1/17: value k sits exactly on level 17k
    q = quantize(x, 8, group_size=16)
    assert q["codes"].tolist() == [17 * k for k in range(16)]


def _x_between_levels() -> torch.Tensor:
    """4-bit groups with min 0 and max 15 (scale exactly 1) and interior values off the levels."""
    fracs = [0.1, 0.25, 0.5, 0.75, 0.9, 0.3, 0.6]
    vals = [0.0, 15.0] + [k + fracs[k % len(fracs)] for k in range(14)]
    return torch.tensor(vals * 2)  # two groups of 16


def test_stochastic_rounding_is_unbiased():
    x = _x_between_levels()
    n_seeds = 4000
    total = torch.zeros_like(x, dtype=torch.float64)
    for seed in range(n_seeds):
        q = quantize(x, 4, 16, stochastic=True, generator=torch.Generator().manual_seed(seed))
        total += dequantize(q, x.shape, torch.float64)
    mean = total / n_seeds
    # Each dequantized value is lo + scale * (floor(v) + Bernoulli(frac(v))): variance <= scale**2 / 4.
    # Scale is 1, so the mean's std is <= 1 / (2 sqrt(n_seeds)) ~= 0.0079; allow 5 std ~= 0.04.
    tol = 5 / (2 * math.sqrt(n_seeds))
    assert torch.all((mean - x.double()).abs() <= tol), (mean - x.double()).abs().max()
    # Round-to-nearest is biased here by the distance to the nearest level (>= 0.1 > tol), so this
    # tolerance really separates unbiased from nearest rounding.
    rtn = dequantize(quantize(x, 4, 16), x.shape, torch.float64)
    assert (rtn - x.double()).abs().max() > 2 * tol


def test_stochastic_rounding_reproducible_and_differs_from_nearest():
    x = _x_between_levels()
    a = quantize(x, 4, 16, stochastic=True, generator=torch.Generator().manual_seed(123))
    b = quantize(x, 4, 16, stochastic=True, generator=torch.Generator().manual_seed(123))
    c = quantize(x, 4, 16, stochastic=True, generator=torch.Generator().manual_seed(124))
    nearest = quantize(x, 4, 16)
    assert torch.equal(a["codes"], b["codes"])
    assert not torch.equal(a["codes"], c["codes"])
    assert not torch.equal(a["codes"], nearest["codes"])
    # Stochastic rounding only ever picks one of the two neighbouring levels: error < one step.
    out = dequantize(a, x.shape, torch.float32)
    assert torch.all((out - x).abs() < 1.0)


@pytest.mark.parametrize("use_generator", [True, False])
def test_stochastic_rounding_leaves_global_rng_alone(use_generator):
    torch.manual_seed(0)
    before = torch.get_rng_state()
    gen = torch.Generator().manual_seed(5) if use_generator else None
    quantize(torch.randn(300, generator=torch.Generator().manual_seed(0)), 4, 32, stochastic=True, generator=gen)
    assert torch.equal(torch.get_rng_state(), before)


def test_quantized_bytes_hand_count():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(4))
    # 1000 elements, groups of 64 -> 16 groups, 1024 padded codes; scale + zero: 2 * 16 * 4 bytes.
    assert quantized_bytes(quantize(x, 8, 64)) == 1024 + 128
    assert quantized_bytes(quantize(x, 4, 64)) == 512 + 128
    # 15 elements in 3 groups of 5: 15 nibbles -> 8 bytes; 8-bit: 15 bytes; scale + zero: 24 bytes.
    y = torch.randn(15, generator=torch.Generator().manual_seed(4))
    assert quantized_bytes(quantize(y, 4, 5)) == 8 + 24
    assert quantized_bytes(quantize(y, 8, 5)) == 15 + 24


@pytest.mark.parametrize("bits", [4, 8])
def test_weights_only_save_load_round_trip(bits):
    x = torch.randn(17, 9, generator=torch.Generator().manual_seed(6))
    q = quantize(x, bits, 32)
    state = {"step": torch.tensor(3), "proj": q}  # shaped like an optimizer.state[p] entry
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert set(loaded["proj"]) == {"codes", "scale", "zero"}
    for key in ("codes", "scale", "zero"):
        assert torch.equal(loaded["proj"][key], q[key]) and loaded["proj"][key].dtype == q[key].dtype
    assert torch.equal(dequantize(loaded["proj"], x.shape, x.dtype), dequantize(q, x.shape, x.dtype))


def test_dequantize_returns_requested_dtype_and_shape():
    x = torch.randn(4, 6, 5, generator=torch.Generator().manual_seed(7))
    q = quantize(x.to(torch.bfloat16), 8, 16)
    out = dequantize(q, torch.Size([4, 6, 5]), torch.float16)
    assert out.shape == (4, 6, 5) and out.dtype == torch.float16


def test_dequantize_rejects_wrong_shape():
    q = quantize(torch.randn(100), 8, 16)
    with pytest.raises(ValueError):
        dequantize(q, (10, 50), torch.float32)


def test_empty_tensor():
    q = quantize(torch.empty(0, 3), 4, 8)
    assert quantized_bytes(q) == 0
    assert dequantize(q, (0, 3), torch.float32).shape == (0, 3)


@pytest.mark.parametrize("bits", [0, 1, 2, 3, 5, 16, 32, 4.0, True, "4"])
def test_bad_bits_raise(bits):
    with pytest.raises(ValueError, match=r"\(4, 8\)"):
        quantize(torch.randn(8), bits)


@pytest.mark.parametrize("group_size", [0, -1, 2.5, 16.0, True, "16"])
def test_bad_group_size_raise(group_size):
    with pytest.raises(ValueError, match="group_size"):
        quantize(torch.randn(8), 8, group_size)


def test_integer_input_rejected():
    with pytest.raises(TypeError):
        quantize(torch.arange(8), 8)
