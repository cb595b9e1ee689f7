"""8-bit moments as a storage component: small buffers stay in full precision, large dense ones update in chunks.

The streamed update is checked against the whole-tensor 8-bit computation written out here from ``quantize_moment`` /
``dequantize_moment`` and plain Adam math, with the chunk forced down to two blocks so that every tensor is cut.
"""

import math
import sys
from dataclasses import fields

import lightning as L
import pytest
import torch

from lightning_lowrank import LowRankStrategy
from lightning_lowrank.memory import MemoryReport, plan
from lightning_lowrank.optim import ProjectedOptimizer
from lightning_lowrank.optim.budget.costs import state_bytes
from lightning_lowrank.optim.state import moments8bit, storage
from lightning_lowrank.optim.state.moments8bit import (
    chunk_ranges,
    dequantize_moment,
    dequantize_range,
    quantize_moment,
    quantize_range_,
)
from lightning_lowrank.optim.update import rules
from tests import ROOT
from tests.models import QUIET, TinyNet
from tests.optim.test_host_reads import ScalarReads

BLOCK = 64
SHAPES = {"tall": (300, 40), "wide": (40, 300), "vector": (9999,)}  # 9999: the last block is short
LR, BETAS, EPS, WD = 1e-2, (0.9, 0.999), 1e-8, 0.1


@pytest.fixture
def two_block_chunks(monkeypatch):
    monkeypatch.setattr(storage, "STREAM_CHUNK", 2 * BLOCK)


def _grads(shape, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) * (1 + 10 * (i % 2)) for i in range(steps)]


def _optimizer(p, **options):
    """A dense parameter (rank None) with 8-bit moments."""
    options = dict(lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, state_bits=8, state_block_size=BLOCK) | options
    return ProjectedOptimizer([p], rank=None, **options)


def _reference_adamw(w, grads, decoupled):
    """Whole-tensor 8-bit Adam(W): torch.optim.AdamW/Adam on moments decoded before and encoded after each step."""
    w = w.clone()
    m = quantize_moment(torch.zeros_like(w), signed=True, block_size=BLOCK)
    v = quantize_moment(torch.zeros_like(w), signed=False, block_size=BLOCK)
    for t, g in enumerate(grads, start=1):
        exp_avg = dequantize_moment(m, w.shape, w.dtype, block_size=BLOCK)
        exp_avg_sq = dequantize_moment(v, w.shape, w.dtype, block_size=BLOCK)
        if decoupled:
            w = w * (1 - LR * WD)
        else:
            g = g + WD * w
        exp_avg = BETAS[0] * exp_avg + (1 - BETAS[0]) * g
        exp_avg_sq = BETAS[1] * exp_avg_sq + (1 - BETAS[1]) * g * g
        denom = exp_avg_sq.sqrt() / math.sqrt(1 - BETAS[1] ** t) + EPS
        w = w - LR / (1 - BETAS[0] ** t) * exp_avg / denom
        m = quantize_moment(exp_avg, signed=True, block_size=BLOCK)
        v = quantize_moment(exp_avg_sq, signed=False, block_size=BLOCK)
    return w, m, v


def _run(p, opt, grads):
    for g in grads:
        p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("decoupled", [True, False], ids=["adamw", "adam-l2"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_streamed_8bit_adam_equals_the_whole_tensor_computation(shape, decoupled, two_block_chunks, monkeypatch):
    torch.manual_seed(0)
    w0 = torch.randn(shape)
    grads = _grads(shape, 3)
    p = torch.nn.Parameter(w0.clone())
    opt = _optimizer(p, decoupled_weight_decay=decoupled)
    seen = []  # sizes the quantizer works on: the full-precision transient

    def recording(fn):
        def wrapped(x, *args, **kwargs):
            seen.append(x.numel() if isinstance(x, torch.Tensor) else x["codes"].numel())
            return fn(x, *args, **kwargs)

        return wrapped

    for module in (moments8bit, storage):
        for name in ("quantize_moment", "dequantize_moment"):
            monkeypatch.setattr(module, name, recording(getattr(module, name)))
    _run(p, opt, grads)

    w, m, v = _reference_adamw(w0, grads, decoupled)
    state = opt.state[p]
    assert "exp_avg" not in state and "exp_avg_sq" not in state
    assert seen and max(seen) <= 2 * BLOCK  # never the whole tensor at once
    torch.testing.assert_close(p.detach(), w, rtol=1e-5, atol=1e-6)
    for q, key in ((m, "exp_avg"), (v, "exp_avg_sq")):
        torch.testing.assert_close(state[f"{key}_absmax"], q["absmax"], rtol=1e-5, atol=1e-12)
        # Float rounding of the two writings of Adam may move an entry across a code's rounding boundary, no further.
        diff = (state[f"{key}_codes"].int() - q["codes"].int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3, key


@pytest.mark.parametrize(
    "base",
    [
        dict(),
        dict(decoupled_weight_decay=False),
        dict(adam_form="hf"),  # transformers' AdamW: decay after the update
        dict(rule="sgd", momentum=0.9, dampening=0.1),
        dict(rule="sgd", momentum=0.9, nesterov=True),
    ],
    ids=["adamw", "adam-l2", "adamw-hf", "sgd", "sgd-nesterov"],
)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_streamed_step_is_bit_for_bit_the_unstreamed_one(shape, base, monkeypatch):
    grads = _grads(shape, 4, seed=1)
    results = []
    for chunk in (2 * BLOCK, 3 * BLOCK + 5, 10**9):  # 3 * BLOCK + 5 rounds down to 3 blocks; 10**9: one piece
        monkeypatch.setattr(storage, "STREAM_CHUNK", chunk)
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(shape))
        opt = _optimizer(p, **base)
        _run(p, opt, grads)
        results.append((p.detach().clone(), {k: t.clone() for k, t in opt.state[p].items()}))
    (w, state), *others = results
    assert any(k.endswith("_codes") for k in state)
    for w_other, state_other in others:
        assert torch.equal(w, w_other)
        assert state.keys() == state_other.keys()
        assert all(torch.equal(state[k], state_other[k]) for k in state)


def test_sophia_buffers_stream_like_the_whole_view(two_block_chunks):
    """Sophia (a projected rule) streams through the same storage: chunked direction == whole direction."""
    group = dict(state_bits=8, state_block_size=BLOCK, lr=0.1, betas=(0.9, 0.99), rho=0.05, eps=1e-12)
    n = 5000
    gen = torch.Generator().manual_seed(0)
    whole, chunked = {}, {}
    for state in (whole, chunked):
        storage.init_rule_state(state, "sophia", (n,), torch.float32, torch.device("cpu"), group)
        storage.store_moment(state, "hessian", torch.rand(n, generator=gen) - 0.2, True, group)
    chunked.update({k: whole[k].clone() for k in whole})
    grad = torch.randn(n, generator=gen)
    with storage.moment_view(whole, "sophia", group, torch.float32) as moments:
        expected, _ = rules.direction("sophia", grad, moments, 1, group)
    assert storage.streams(chunked, "sophia")
    got = torch.empty(n)
    for chunk, moments in storage.moment_chunks(chunked, "sophia", group, torch.float32):
        got[chunk] = rules.direction("sophia", grad[chunk], moments, 1, group)[0]
    assert torch.equal(got, expected)
    assert all(torch.equal(whole[k], chunked[k]) for k in whole)


@pytest.mark.parametrize("n,block", [(1000, 64), (1024, 64), (50, 64), (5, 1)])
def test_ranges_encode_and_decode_as_the_whole_tensor(n, block):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * torch.logspace(-3, 3, n)
    for signed in (True, False):
        y = x if signed else x.abs()
        whole = quantize_moment(y, signed=signed, block_size=block)
        pieces = moments8bit.zeros_moment(n, signed=signed, block_size=block)
        ranges = chunk_ranges(n, block, 2 * block + 1)
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        for start, stop in ranges:
            quantize_range_(y[start:stop], pieces, start, block_size=block)
        assert torch.equal(pieces["codes"], whole["codes"]) and torch.equal(pieces["absmax"], whole["absmax"])
        decoded = dequantize_moment(whole, (n,), torch.float32, block_size=block)
        for start, stop in ranges:
            assert torch.equal(
                dequantize_range(whole, start, stop, torch.float32, block_size=block), decoded[start:stop]
            )
    if n > block > 1:
        with pytest.raises(ValueError, match="whole number"):
            dequantize_range(whole, 1, block + 1, torch.float32, block_size=block)


def test_zeros_moment_is_quantized_zeros():
    for n, block in ((0, 8), (3, 8), (4096, 256), (4100, 256)):
        for signed in (True, False):
            want = quantize_moment(torch.zeros(n), signed=signed, block_size=block)
            got = moments8bit.zeros_moment(n, signed=signed, block_size=block)
            assert all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)


def _stepped_8bit(shapes):
    """Dense parameters of these shapes, one AdamW step with ``state_bits=8``."""
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = ProjectedOptimizer(params, rank=None, state_bits=8, state_block_size=BLOCK)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    return params, opt


def test_small_buffers_stay_in_full_precision_and_the_byte_model_agrees():
    """Under 4096 elements a buffer keeps its own key in full precision; the byte model counts each as stored."""
    assert storage.MIN_QUANTIZED_NUMEL == 4096
    params, opt = _stepped_8bit([(16,), (4095,), (4096,), (64, 63), (64, 64), (300, 41)])
    group = opt.param_groups[0]
    for p in params:
        state, n = opt.state[p], p.numel()
        buffers = {k: v for k, v in state.items() if k != "step"}
        if n < 4096:
            assert set(buffers) == {"exp_avg", "exp_avg_sq"} and buffers["exp_avg"].dtype == torch.float32
            want = 2 * 4 * n
        else:
            assert set(buffers) == {
                k for b in ("exp_avg", "exp_avg_sq") for k in storage.stored_keys(b, quantized=True)
            }
            want = 2 * (n + 4 * math.ceil(n / BLOCK) + 8 * p.dim())  # codes, float32 absmax per block, int64 shape
        assert sum(t.numel() * t.element_size() for t in buffers.values()) == want
        assert state_bytes("adamw", tuple(p.shape), p.dtype, group) == want


def test_what_the_other_modules_ask_storage():
    """The report, resume, the conversions and the cost model ask storage.py about the 8-bit layout instead of knowing
    it: the keys a buffer is kept under, whether it is 8-bit, its shape, its bytes, its full-precision value, and which
    keys live on the host."""
    params, opt = _stepped_8bit([(300, 41), (8, 9)])  # 8-bit, and too small to quantize
    group = opt.param_groups[0]
    for p, quantized in zip(params, (True, False)):
        state = opt.state[p]
        assert set(state) == {"step"} | {
            k for b in ("exp_avg", "exp_avg_sq") for k in storage.stored_keys(b, quantized)
        }
        assert storage.is_quantized(state, "exp_avg") == storage.holds_quantized(state, "adamw") == quantized
        assert storage.stored_shape(state, "exp_avg_sq") == tuple(p.shape)
        assert storage.stored_shape(state, "momentum_buffer") is None
        held = {k: t.numel() * t.element_size() for k, t in state.items() if k != "step"}
        meta = rules.init_state("adamw", tuple(p.shape), p.dtype, torch.device("meta"))
        assert sum(storage.buffer_bytes(t, group) for t in meta.values()) == sum(held.values())
        assert {k for k in state if storage.host_key(k)} == (
            {"exp_avg_shape", "exp_avg_sq_shape"} if quantized else set()
        )
        decoded = storage.decoded_buffers(state, "adamw", torch.float64, BLOCK)
        for key, value in decoded.items():
            if quantized:
                q = {"codes": state[f"{key}_codes"], "absmax": state[f"{key}_absmax"]}
                assert torch.equal(value, dequantize_moment(q, p.shape, torch.float64, block_size=BLOCK))
            else:
                assert value is state[key]  # full precision: the state's own tensor, to update in place


def test_plan_equals_measured_with_quantized_and_small_buffers():
    """Dense embedding and LM head of 5120 elements (8-bit, streamed, on the plan's meta tensors too), projected
    moments of 6400 elements (8-bit) and small biases and norms (full precision): the plan still matches training."""
    options = dict(rank=40, state_bits=8)
    torch.manual_seed(0)
    model = TinyNet(scheduler=None, width=160, hidden=128)
    planned = plan(model, **options).report
    trainer = L.Trainer(strategy=LowRankStrategy(memory_report=False, **options), max_steps=1, **QUIET)
    trainer.fit(model)
    measured = trainer.strategy.memory_report()
    runtime = {"peak_allocated_bytes", "cpu_max_rss_bytes", "probe", "phases"}
    for f in fields(MemoryReport):
        if f.name not in runtime:
            assert getattr(planned, f.name) == getattr(measured, f.name), f.name
    state = trainer.optimizers[0].state
    for p in (model.embed.weight, model.lm_head.weight, model.attn.weight, model.mlp.weight):
        assert "exp_avg_codes" in state[p] and "exp_avg" not in state[p]
    for p in (model.attn.bias, model.norm.weight, model.lm_head.bias):
        assert "exp_avg" in state[p] and "exp_avg_codes" not in state[p]


def test_a_streamed_step_reads_nothing_on_the_host(two_block_chunks):
    """Streaming the chunks reads nothing (the default non-finite check's one flag is test_host_reads' business)."""
    p = torch.nn.Parameter(torch.randn(SHAPES["tall"]))
    opt = _optimizer(p, nonfinite="ignore")
    for step in range(3):
        p.grad = torch.randn_like(p)
        if step == 2:
            with ScalarReads() as counter:
                opt.step()
        else:
            opt.step()
    assert counter.reads == 0


def test_the_benchmarks_bound_reads_as_stated():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_rss

    mb = 10**6
    rows = {
        "dct": dict(growth_bytes=1000 * mb, state_bytes=600 * mb),
        "dct-8bit": dict(growth_bytes=720 * mb, state_bytes=200 * mb),  # limit 1000 - 0.7 * 400 = 720: holds
        "dct-layerwise": dict(growth_bytes=500 * mb, state_bytes=600 * mb),
        "dct-layerwise-8bit": dict(growth_bytes=221 * mb, state_bytes=200 * mb),  # limit 220: does not
    }
    lines = bench_rss.bound_lines(rows)
    assert len(lines) == 2
    assert lines[0].startswith("dct-8bit:") and "= 720 MB: holds" in lines[0]
    assert lines[1].startswith("dct-layerwise-8bit:") and "= 220 MB: DOES NOT HOLD" in lines[1]
