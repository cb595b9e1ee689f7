"""A steady step on a GPU neither waits for the device nor copies from the host: checked on the meta device.

On a CPU machine every tensor is on the CPU, so a draw made on the host and copied to "the device", or a read of a
device value, looks like any other op. With the model on the ``meta`` device standing in for ``cuda``, the two show
up in a ``TorchDispatchMode``:

* a read: ``aten._local_scalar_dense`` of a non-CPU tensor, a copy of one to the host, or an op whose output shape
  depends on the values (a boolean index). On a GPU each is a ``cudaStreamSynchronize``; on meta it would raise, so
  the mode answers it with a harmless value (a finite flag, zeros).
* a copy from the host: ``aten._to_copy`` or ``aten.copy_`` from a CPU tensor to a non-CPU one (on a GPU a blocking
  copy for pageable memory).
* host work: an op on CPU tensors of more than one element (a draw or a QR the GPU should make).

Counted for one steady step (no refresh, no first step) of every projector, rule, residual, 8-bit state, the
budget, layer-wise mode and the DDP comm hook's code path. Reads as documented: the non-finite check's one flag per
step (``nonfinite="skip"``/``"raise"``), none with ``"ignore"``; copies and host work: none. CPU values (torch's own
step counters, ours kept by ``host_ints``) cost no sync and are not counted.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_lowrank.optim import ProjectedOptimizer
from lightning_lowrank.optim.layerwise import LayerwiseProjectedOptimizer
from lightning_lowrank.optim.state.storage import step_counter
from lightning_lowrank.optim.update import dispatch
from lightning_lowrank.strategies import comm

aten = torch.ops.aten
META = torch.device("meta")


def _where() -> str:
    """The innermost frame of this package, to say where a read or copy came from."""
    frames = [f for f in traceback.extract_stack() if "lightning_lowrank" in f.filename and "tests" not in f.filename]
    return f"{frames[-1].filename.split('lightning_lowrank/')[-1]}:{frames[-1].lineno}" if frames else "torch"


# Ops whose output shape depends on the values (CUDA reads a count back: a sync), which meta runs without a read.
_SHAPE_FROM_VALUES = {aten.nonzero.default, aten.masked_select.default, aten._unique2.default, aten.unique_dim.default}


def _data_dependent(func, args) -> bool:
    """An op that syncs on a GPU to learn its output's shape: those above, and indexing by a boolean mask
    (``x[mask] = v`` is ``index_put_`` with the mask's ``nonzero()``)."""
    if func in _SHAPE_FROM_VALUES:
        return True
    if func in (aten.index_put_.default, aten.index_put.default, aten.index.Tensor):
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] or ())
    return False


class DeviceTraffic(TorchDispatchMode):
    """Reads of device values and copies from the CPU to a device, made while active."""

    def __init__(self) -> None:
        super().__init__()
        self.reset()

    def reset(self) -> None:
        """Forget what was seen so far (the mode stays active: meta values can only be read through it)."""
        self.reads: list[str] = []
        self.copies: list[str] = []
        self.host_work: list[str] = []  # ops on CPU tensors of more than one element: work the GPU should do
        self.device_ops: set[str] = set()  # names of the ops that ran on the device

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        target = kwargs.get("device")
        if any(t.device.type != "cpu" for t in tensors) or (target is not None and torch.device(target).type != "cpu"):
            self.device_ops.add(func._overloadpacket.__name__)
        elif any(t.numel() > 1 for t in tensors) or (target is not None and func is not aten.scalar_tensor.default):
            self.host_work.append(f"{_where()} {func._overloadpacket.__name__}")
        if _data_dependent(func, args) and any(t.device.type != "cpu" for t in tensors):
            self.reads.append(f"{_where()} {func._overloadpacket.__name__}")  # meta runs it without the count
        if func is aten._local_scalar_dense.default and args[0].device.type != "cpu":
            self.reads.append(_where())
            t = args[0]  # meta holds no value: answer as a finite flag / a zero would read
            return True if t.dtype == torch.bool else (0.0 if t.is_floating_point() else 0)
        if func is aten._to_copy.default:
            target = kwargs.get("device")
            if target is not None and args[0].device.type == "cpu" and torch.device(target).type != "cpu":
                self.copies.append(f"{_where()} {tuple(args[0].shape)}")
            if target is not None and args[0].device.type != "cpu" and torch.device(target).type == "cpu":
                self.reads.append(f"{_where()} to the host")  # a copy to the host waits for the device too
                if args[0].device.type == "meta":  # which holds no data: zeros stand in
                    return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
        # (a 0-d CPU tensor is a scalar operand, as torch's CPU step counters are: not a copy)
        if func is aten.copy_.default and args[1].device.type == "cpu" != args[0].device.type and args[1].dim() > 0:
            self.copies.append(f"{_where()} {tuple(args[1].shape)}")
        return func(*args, **kwargs)


def _model() -> torch.nn.Module:
    """Large enough that 8-bit state quantizes (``storage.MIN_QUANTIZED_NUMEL``): on meta, size costs nothing."""
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256), torch.nn.Linear(256, 384)
    )
    return model.to(META)


def _backward(model: torch.nn.Module) -> None:
    model(torch.randn(8, 256, device=META)).pow(2).mean().backward()


TORCH: dict[str, Callable[[torch.nn.Module], torch.optim.Optimizer]] = {
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3),
    "adamw fused": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True),
    "adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-3, weight_decay=0.01),
    "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9),
    "adafactor": lambda m: torch.optim.Adafactor(m.parameters(), lr=1e-3),
    "muon": lambda m: torch.optim.Muon([p for p in m.parameters() if p.ndim == 2], lr=1e-3),
}

CASES = {
    "svd": ("adamw", dict()),
    "svd, fused dense AdamW": ("adamw fused", dict()),
    "rsvd": ("adamw", dict(projector="rsvd")),
    "dct": ("adamw", dict(projector="dct")),
    "dct fft": ("adamw", dict(projector="dct", dct_scorer="fft")),
    "random": ("adamw", dict(projector="random")),
    "gaussian": ("adamw", dict(projector="gaussian")),
    "online_pca": ("adamw", dict(projector="online_pca")),
    "online_pca, projector_bits 8": ("adamw", dict(projector="online_pca", projector_bits=8)),
    "svd, projector_bits 4": ("adamw", dict(projector_bits=4)),
    "fira": ("adamw", dict(residual="fira")),
    "frugal": ("adamw", dict(residual="frugal")),
    "apollo": ("adamw", dict(residual="apollo")),
    "apollo-mini": ("adamw", dict(residual="apollo", rank=1, apollo_scale_type="tensor")),
    "8-bit state": ("adamw", dict(state_bits=8)),
    "subset_norm": ("adamw", dict(projected_rule="subset_norm")),
    "lazy_hessian (Sophia)": ("adamw", dict(preconditioner="lazy_hessian")),
    "memory_budget": ("adamw", dict(memory_budget=1_500_000, rank_by="residual")),
    "adam (L2)": ("adam", dict()),
    "sgd momentum": ("sgd", dict()),
    "adafactor, random": ("adafactor", dict(projector="random")),
    "adafactor 8-bit": ("adafactor", dict(projector="random", state_bits=8)),
    "muon svd": ("muon", dict()),
    "muon dct": ("muon", dict(projector="dct")),
    "muon 8-bit": ("muon", dict(state_bits=8)),
    "trion": ("muon", dict(projected_rule="trion")),
    "trion fft": ("muon", dict(projected_rule="trion", dct_scorer="fft")),
}


def _steady_step(opt: torch.optim.Optimizer, model: torch.nn.Module, steps: int = 3) -> DeviceTraffic:
    """What the last of ``steps`` steps read and copied (the first ones create state and refresh)."""
    with DeviceTraffic() as traffic:
        for _ in range(steps):
            opt.zero_grad()
            _backward(model)
            traffic.reset()
            opt.step()
    return traffic


def _build(base: str, options: dict, model: torch.nn.Module, cls=ProjectedOptimizer) -> ProjectedOptimizer:
    options = {"rank": 16, "update_gap": 1000, **options}
    return cls.from_optimizer(TORCH[base](model), lambda p: p.ndim == 2, **options)


@pytest.mark.parametrize("nonfinite", ["skip", "ignore"])
@pytest.mark.parametrize("name", list(CASES))
def test_a_steady_step_makes_no_copies_and_reads_only_the_nonfinite_flag(name, nonfinite):
    base, options = CASES[name]
    model = _model()
    opt = _build(base, {"nonfinite": nonfinite, **options}, model)
    traffic = _steady_step(opt, model)
    assert opt.projected_params() and not opt.last_refreshes
    assert traffic.copies == []
    assert len(traffic.reads) == (nonfinite != "ignore"), traffic.reads


LAYERWISE = {
    "svd": dict(),
    "random": dict(projector="random"),
    "dct": dict(projector="dct"),
    "online_pca, projector_bits 8": dict(projector="online_pca", projector_bits=8),
    "fira": dict(residual="fira"),
    "8-bit state": dict(state_bits=8),
}


@pytest.mark.parametrize("nonfinite", ["skip", "raise", "ignore"])
@pytest.mark.parametrize("name", list(LAYERWISE))
def test_a_steady_layerwise_step_reads_once_per_step_not_once_per_layer(name, nonfinite):
    model = _model()
    opt = _build("adamw", {"nonfinite": nonfinite, **LAYERWISE[name]}, model, LayerwiseProjectedOptimizer)
    opt.attach()

    def closure():
        _backward(model)

    with DeviceTraffic() as traffic:
        for _ in range(3):
            traffic.reset()
            opt.step(closure)
    opt.detach()
    assert traffic.copies == []
    assert len(traffic.reads) == (nonfinite != "ignore"), traffic.reads  # 6 parameters, one read


class _Bucket:
    """What DDP hands a comm hook: a flat buffer and views of it as the parameters' gradients."""

    def __init__(self, params):
        self.params = params
        self.flat = torch.cat([p.grad.reshape(-1) for p in params])
        offsets = [0]
        for p in params:
            offsets.append(offsets[-1] + p.numel())
        self.views = [self.flat[a:b].view(p.shape) for p, a, b in zip(params, offsets, offsets[1:])]

    def index(self):
        return 0

    def is_last(self):
        return True

    def buffer(self):
        return self.flat

    def parameters(self):
        return self.params

    def gradients(self):
        return self.views


@pytest.mark.parametrize("projector", ["svd", "random", "dct", "rsvd"])
def test_the_ddp_comm_hook_makes_no_copies_and_no_reads(projector, monkeypatch):
    """The hook's code path (P for each weight, project, one flat tensor, project back) on meta; the collective
    itself is replaced by one that returns its input (one process)."""
    model = _model()
    opt = _build("adamw", dict(projector=projector), model)
    traffic = _steady_step(opt, model)
    with traffic:
        opt.zero_grad()
        _backward(model)

    def all_reduce(tensor, group=None, async_op=False):
        future = torch.futures.Future()
        future.set_result([tensor])
        return type("Work", (), {"get_future": lambda self: future})()

    monkeypatch.setattr(comm.dist, "get_world_size", lambda group=None: 1)
    monkeypatch.setattr(comm.dist, "all_reduce", all_reduce)
    state = comm.LowRankCommState(optimizers=lambda: [opt], process_group=object())
    with traffic:
        bucket = _Bucket(list(model.parameters()))
        traffic.reset()
        comm.low_rank_allreduce_hook(state, bucket).wait()
    assert state.history[-1].sent < state.history[-1].full  # the projected weights went in their subspace
    assert traffic.copies == [] and traffic.reads == []


def test_the_traffic_counter_sees_a_host_draw_and_a_read():
    """The mode itself: the two things it exists to catch are caught (a check that can fail)."""
    with DeviceTraffic() as traffic:
        torch.randn(4, 3).to(META)
        torch.empty(2, device=META).copy_(torch.ones(2))
        bool(torch.zeros((), device=META).isfinite())
        torch.ones(3, device=META).add_(torch.tensor(2.0))  # a 0-d CPU operand: a scalar, not a copy
    assert len(traffic.copies) == 2 and len(traffic.reads) == 1


def test_torchs_fused_adam_gets_step_counters_on_the_parameters_device(monkeypatch):
    """torch keeps a fused (or capturable) Adam's counters on the parameter's device: its CUDA kernel reads them
    there. Checked on the tensors handed to torch's functional Adam, for the dense parameters."""
    seen = []
    real = dispatch.adam

    def recording_adam(params, grads, exp_avgs, exp_avg_sqs, max_sqs, state_steps, **kwargs):
        seen.append(([p.device for p in params], [s.device for s in state_steps], kwargs["fused"]))
        return real(params, grads, exp_avgs, exp_avg_sqs, max_sqs, state_steps, **kwargs)

    monkeypatch.setattr(dispatch, "adam", recording_adam)
    model = _model()
    opt = _build("adamw fused", {}, model)
    _steady_step(opt, model)
    assert seen and all(fused for _, _, fused in seen)
    for params, steps, _ in seen:
        assert len(params) == 3 and steps == params  # the three biases, counters beside them
    # A projected layer's counter is read on the host (host_ints): it stays on the CPU.
    assert all(opt.state[p]["step"].device.type == "cpu" for p in opt.projected_params())

    # A resume keeps both where they belong (torch's loader would put every counter of a fused group on the device).
    fresh = _build("adamw fused", {}, model)
    fresh.load_state_dict(opt.state_dict())
    for p in model.parameters():
        assert fresh.state[p]["step"].device == (torch.device("cpu") if fresh.is_projected(p) else META)


@pytest.mark.parametrize(
    ("options", "device"),
    [(dict(fused=True), "cpu"), (dict(capturable=True), "meta"), (dict(), "meta"), (dict(fused=False), "cpu")],
)
def test_step_counter_placement_follows_torchs_adam(options, device):
    """Where torch's own Adam creates a counter (its ``_init_group``; it refuses fused=True on meta, so that case is
    on the CPU, and the meta one is asserted below), and its dtype."""
    model = torch.nn.Linear(3, 2).to(device)
    adam = torch.optim.Adam(model.parameters(), **options)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    adam._init_group(adam.param_groups[0], [], [], [], [], [], [])
    reference = adam.state[model.weight]["step"]
    ours = step_counter(adam.param_groups[0], torch.device(device))
    assert (ours.device, ours.dtype, ours.shape) == (reference.device, reference.dtype, reference.shape)
    fused_on_meta = step_counter({"fused": True}, META)
    assert (fused_on_meta.device, fused_on_meta.dtype) == (META, torch.float32)


@pytest.mark.parametrize("name", list(CASES))
def test_no_host_work_in_a_steady_step(name):
    base, options = CASES[name]
    model = _model()
    traffic = _steady_step(_build(base, options, model), model)
    assert traffic.host_work == []
    if CASES[name][1].get("projector") in ("random", "gaussian"):  # P is drawn (and factored) on the device
        assert {"randn", "linalg_qr" if CASES[name][1]["projector"] == "random" else "div"} <= traffic.device_ops


@pytest.mark.parametrize("name", ["random", "8-bit state", "adafactor 8-bit", "svd, fused dense AdamW"])
def test_the_first_step_after_a_resume_reads_and_copies_nothing_more(name):
    """``load_state_dict`` keeps seeds, counters and 8-bit shapes on the CPU (``host_ints.on_host``): on the device,
    the first step after a resume would read each of them once."""
    base, options = CASES[name]
    model = _model()
    opt = _build(base, options, model)
    with DeviceTraffic() as traffic:
        _steady_step(opt, model)
        fresh = _build(base, options, model)
        fresh.load_state_dict(opt.state_dict())
        opt.zero_grad()
        _backward(model)
        traffic.reset()
        fresh.step()
    assert fresh.projected_params() and not fresh.last_refreshes
    assert traffic.copies == [] and len(traffic.reads) == 1, traffic.reads  # the non-finite flag
