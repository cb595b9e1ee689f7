"""CurvatureProbe figures in ``trainer.callback_metrics``: monitored by ModelCheckpoint and EarlyStopping, present
with ``logger=False``, and written to a logger exactly once per probe."""

import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_lowrank import CurvatureProbe, LowRankStrategy
from tests.models import QUIET, SmallMLP, TinyNet


def _probe(every=2):
    return CurvatureProbe(every=every, estimators=("trace",), samples=2)


def _f32(value):
    """What ``self.log`` stores for a Python float: a float32 tensor."""
    return torch.tensor(value, dtype=torch.float32)


class SeenAfterProbe(Callback):
    """Reads ``callback_metrics`` right after the probe (it runs after it: callbacks keep their order)."""

    def __init__(self):
        self.seen = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if "curvature/trace" in trainer.callback_metrics:
            self.seen[trainer.global_step] = trainer.callback_metrics["curvature/trace"].clone()


def test_without_a_logger_each_probe_lands_in_callback_metrics():
    torch.manual_seed(0)
    probe, seen = _probe(), SeenAfterProbe()
    trainer = L.Trainer(
        strategy=LowRankStrategy(rank=4, memory_report=False), max_steps=6, callbacks=[probe, seen], **QUIET
    )
    trainer.fit(TinyNet(scheduler=None))
    assert [h["step"] for h in probe.history] == [2, 4, 6]
    for entry in probe.history:
        assert torch.equal(seen.seen[entry["step"]], _f32(entry["trace"])), entry["step"]
    last = probe.history[-1]
    assert torch.equal(trainer.callback_metrics["curvature/trace"], _f32(last["trace"]))
    assert torch.equal(trainer.callback_metrics["curvature/probe_seconds"], _f32(last["probe_seconds"]))
    layer = "curvature/trace/attn.weight"
    assert torch.equal(trainer.callback_metrics[layer], _f32(last["trace/attn.weight"]))


@pytest.mark.parametrize("mode", ["min", "max"])
def test_model_checkpoint_monitors_the_trace(tmp_path, mode):
    torch.manual_seed(0)
    probe = _probe()
    ckpt = ModelCheckpoint(
        dirpath=tmp_path, monitor="curvature/trace", mode=mode, every_n_train_steps=2, save_top_k=1, filename="{step}"
    )
    trainer = L.Trainer(max_steps=8, callbacks=[probe, ckpt], **{**QUIET, "enable_checkpointing": True})
    trainer.fit(TinyNet(scheduler=None))
    pick = min if mode == "min" else max
    best = pick(probe.history, key=lambda h: h["trace"])
    assert len(probe.history) == 4 and len({h["trace"] for h in probe.history}) == 4
    assert torch.equal(ckpt.best_model_score, _f32(best["trace"]))
    assert ckpt.best_model_path == str(tmp_path / f"step={best['step']}.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"step={best['step']}.ckpt"]


def _early_stop_epoch(traces, mode, patience):
    """Independent reference: the number of epochs EarlyStopping lets run on these per-epoch values."""
    better = (lambda a, b: a < b) if mode == "min" else (lambda a, b: a > b)
    best, waited = traces[0], 0
    for epoch, value in enumerate(traces[1:], start=1):
        if better(value, best):
            best, waited = value, 0
        else:
            waited += 1
            if waited >= patience:
                return epoch + 1
    return len(traces)


@pytest.mark.parametrize("mode", ["min", "max"])
def test_early_stopping_reads_the_trace(mode):
    """One batch per epoch, a probe every step: EarlyStopping checks the trace at each epoch's end."""
    torch.manual_seed(0)
    probe = _probe(every=1)
    stop = EarlyStopping(monitor="curvature/trace", mode=mode, patience=2, check_on_train_epoch_end=True, strict=True)
    trainer = L.Trainer(max_epochs=30, callbacks=[probe, stop], **QUIET)
    trainer.fit(SmallMLP())
    traces = [_f32(h["trace"]).item() for h in probe.history]
    assert len(traces) == trainer.current_epoch
    assert len(traces) < 30 and trainer.should_stop  # it did stop early, on the trace
    full = _traces_without_stopping(len(traces) + 5)
    assert full[: len(traces)] == traces  # the same run, which continues past the stop
    assert _early_stop_epoch(full, mode, patience=2) == len(traces)
    assert stop.best_score.item() == (min if mode == "min" else max)(traces)


def _traces_without_stopping(epochs):
    torch.manual_seed(0)
    probe = _probe(every=1)
    L.Trainer(max_epochs=epochs, callbacks=[probe], **QUIET).fit(SmallMLP())
    return [_f32(h["trace"]).item() for h in probe.history]


@pytest.mark.parametrize("log_every_n_steps", [1, 50])
def test_a_csv_logger_gets_each_probe_exactly_once(tmp_path, log_every_n_steps):
    torch.manual_seed(0)
    probe = _probe(every=3)
    logger = CSVLogger(tmp_path)
    trainer = L.Trainer(
        max_steps=9, callbacks=[probe], **{**QUIET, "logger": logger, "log_every_n_steps": log_every_n_steps}
    )
    trainer.fit(TinyNet(scheduler=None))
    with open(logger.experiment.metrics_file_path) as f:
        rows = [row for row in csv.DictReader(f) if row.get("curvature/trace")]
    assert [int(row["step"]) for row in rows] == [h["step"] for h in probe.history] == [3, 6, 9]
    for row, entry in zip(rows, probe.history):
        assert float(row["curvature/trace"]) == pytest.approx(entry["trace"], rel=1e-12)
