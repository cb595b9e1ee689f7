"""What a CurvatureProbe costs, measured by the callback and shown in the memory report."""

import io

import lightning as L
import pytest
import torch
from rich.console import Console

from lightning_lowrank import CurvatureProbe, LowRankStrategy
from lightning_lowrank.callbacks.probe_rerun import ExtraMemory
from lightning_lowrank.memory import format_bytes, render_memory_report
from tests.models import QUIET, RecordingLogger, SmallMLP, TinyNet


def _fit(model, callbacks, max_steps, strategy="auto", **kwargs):
    trainer = L.Trainer(strategy=strategy, max_steps=max_steps, callbacks=callbacks, **{**QUIET, **kwargs})
    trainer.fit(model)
    return trainer


def _param_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def test_probe_stats_count_every_probe_and_agree_with_the_history():
    torch.manual_seed(0)
    probe, logger = CurvatureProbe(every=2, samples=2, top_k=1, max_iter=5), RecordingLogger()
    trainer = _fit(TinyNet(scheduler=None), [probe], max_steps=6, logger=logger)
    stats = probe.probe_stats(trainer)
    assert stats["calls"] == 3 == len(probe.history)
    seconds = [h["probe_seconds"] for h in probe.history]
    extra = [h["probe_extra_bytes"] for h in probe.history]
    assert min(seconds) > 0 and min(extra) > 0
    assert stats["seconds"] == pytest.approx(sum(seconds) / 3)
    assert stats["extra_bytes"] == max(extra)
    assert stats["step_seconds"] > 0
    assert stats["ratio"] == pytest.approx(stats["seconds"] / stats["step_seconds"])
    assert logger.metrics["curvature/probe_extra_bytes"] == extra[-1]
    assert logger.metrics["curvature/probe_seconds"] == seconds[-1]


def test_cpu_extra_bytes_count_what_the_probe_keeps():
    """Same run, same batch, same saved tensors: the estimators' results are what differs, and their size is known.

    The first-order gradients and the Hutchinson diagonal are each the size of the trainable params; every
    eigenvector the power iteration keeps adds that size once more.
    """
    extra = {}
    for top_k in (None, 1, 3):
        torch.manual_seed(0)
        model = SmallMLP()
        estimators = ("trace",) if top_k is None else ("trace", "top_eigenvalues")
        probe = CurvatureProbe(every=1, estimators=estimators, samples=2, top_k=top_k or 1, max_iter=5)
        _fit(model, [probe], max_steps=1)
        extra[top_k] = probe.history[-1]["probe_extra_bytes"]
    size = _param_bytes(model)
    assert extra[None] >= 2 * size  # gradients + diagonal, plus what autograd saved
    assert extra[1] - extra[None] == size
    assert extra[3] - extra[None] == 3 * size


def test_memory_report_carries_the_probe_cost():
    torch.manual_seed(0)
    probe, logger = CurvatureProbe(every=2, samples=2, top_k=1, max_iter=5), RecordingLogger()
    strategy = LowRankStrategy(rank=4, memory_report=False)
    trainer = _fit(TinyNet(scheduler=None), [probe], max_steps=6, strategy=strategy, logger=logger)
    report = trainer.strategy.memory_report()
    stats = probe.probe_stats(trainer)
    assert report.probe == stats and stats["calls"] == 3
    metrics = report.as_metrics()
    for key in ("calls", "seconds", "extra_bytes", "step_seconds", "ratio"):
        assert metrics[f"lowrank/probe_{key}"] == stats[key]
    assert logger.metrics["lowrank/probe_calls"] == 3  # logged at the end of training
    console = Console(file=io.StringIO(), width=200)
    render_memory_report(report, console)
    text = console.file.getvalue()
    row = (
        f"Curvature probe: 3 calls, {stats['seconds']:.3f} s each ({stats['ratio']:.1f}x a training step), "
        f"+{format_bytes(stats['extra_bytes'])} extra"
    )
    assert row in text


def test_no_probe_no_probe_figures():
    torch.manual_seed(0)
    trainer = _fit(TinyNet(scheduler=None), [], max_steps=1, strategy=LowRankStrategy(rank=4, memory_report=False))
    report = trainer.strategy.memory_report()
    assert report.probe is None
    assert not any("probe" in key for key in report.as_metrics())
    console = Console(file=io.StringIO(), width=200)
    render_memory_report(report, console)
    assert "Curvature probe" not in console.file.getvalue()


def test_an_old_state_dict_still_loads():
    history = [{"step": 2, "trace": 1.0, "probe_seconds": 0.5}, {"step": 4, "trace": 2.0, "probe_seconds": 0.25}]
    probe = CurvatureProbe(every=2)
    probe.load_state_dict({"history": history, "last_step": 4})
    assert probe.probe_stats(None) == {"calls": 2.0, "seconds": 0.375, "extra_bytes": 0.0}
    restored = CurvatureProbe(every=2)
    restored.load_state_dict(probe.state_dict())
    assert restored.probe_stats(None) == probe.probe_stats(None)


class FakeAllocator:
    """Stands in for the CUDA caching allocator's counters (allocated now, peak since the last reset)."""

    def __init__(self, allocated, peak):
        self.allocated, self.peak = allocated, peak

    def allocate(self, n):
        self.allocated += n
        self.peak = max(self.peak, self.allocated)

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: self.allocated)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: self.peak)
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: setattr(self, "peak", 0))
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)


def test_cuda_extra_is_the_peak_rise_and_the_run_peak_survives_the_reset(monkeypatch):
    allocator = FakeAllocator(allocated=500, peak=1000)  # training already peaked at 1000 before the probe
    allocator.install(monkeypatch)
    with ExtraMemory(torch.device("cuda", 0), []) as cost:
        allocator.allocate(300)
        allocator.allocate(-200)
    assert cost.bytes == 300 and cost.run_peak == 1000
    assert allocator.peak == 800  # the allocator alone now under-reports the run's peak


def test_memory_report_peak_is_the_whole_runs(monkeypatch):
    torch.manual_seed(0)
    probe = CurvatureProbe(every=1, samples=2, top_k=1, max_iter=5)
    trainer = _fit(SmallMLP(), [probe], max_steps=2, strategy=LowRankStrategy(rank=2, memory_report=False))
    allocator = FakeAllocator(allocated=0, peak=1200)
    allocator.install(monkeypatch)
    monkeypatch.setattr(LowRankStrategy, "root_device", property(lambda self: torch.device("cuda", 0)))
    probe._run_peak = 5000  # what the probe read before a reset
    assert trainer.strategy.memory_report().peak_allocated_bytes == 5000
    allocator.peak = 9000  # a later peak, after the last probe
    assert trainer.strategy.memory_report().peak_allocated_bytes == 9000
    probe._run_peak = None
    assert trainer.strategy.memory_report().peak_allocated_bytes == 9000


class WideLinear(L.LightningModule):
    """A 256 -> 1 regression: the weight and the batch are big, every activation is a handful of floats."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(256, 1)
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(4, 256, generator=g), torch.randn(4, 1, generator=g)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.head(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.x, self.y), batch_size=4)


def test_cpu_extra_bytes_leave_out_what_training_holds_anyway():
    """The weight and the batch are saved for backward too, but they exist without the probe: not counted."""
    torch.manual_seed(0)
    model = WideLinear()
    probe = CurvatureProbe(every=1, estimators=("trace",), samples=2)
    _fit(model, [probe], max_steps=1)
    size = _param_bytes(model)  # 257 floats; the batch is 4 x 257 floats
    extra = probe.history[-1]["probe_extra_bytes"]
    assert 2 * size <= extra < 2 * size + 256  # gradients + diagonal + a few activation-sized tensors
