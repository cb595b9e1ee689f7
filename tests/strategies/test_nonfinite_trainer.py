"""Non-finite steps through a Trainer: 32-true, bf16-mixed and 16-mixed (GradScaler) agree on what a bad step is."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision

from lightning_lowrank import LowRankStrategy
from lightning_lowrank.optim.nonfinite import NonFiniteGradientError
from tests.models import TinyNet

BAD_BATCH = 2


class BadAtOneStep(TinyNet):
    """The loss times inf at one batch (an overflow, as the issue measured it)."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("inf") if batch_idx == BAD_BATCH else loss


def _fit(precision="32-true", plugins=None, **options):
    torch.manual_seed(0)
    model = BadAtOneStep(scheduler=None)
    trainer = L.Trainer(
        accelerator="cpu",
        strategy=LowRankStrategy(rank=4, update_gap=2, memory_report=False, **options),
        precision=None if plugins else precision,
        plugins=plugins,
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model)
    return model, trainer.strategy.optimizers[0], trainer


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_the_bad_step_is_skipped_and_training_goes_on(precision):
    with pytest.warns(RuntimeWarning, match=r"gradient of '.*' holds (nan|inf)"):
        model, opt, trainer = _fit(precision)
    assert opt.nonfinite_steps == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.completed_steps(model.attn.weight) == 3  # 4 steps, one skipped: the counters only count updates
    assert trainer.global_step == 4  # Lightning's own count goes on, as with a GradScaler skip


def test_raise_stops_fit_at_the_bad_step_naming_the_layer():
    with pytest.raises(NonFiniteGradientError, match=r"gradient of '.*' holds (nan|inf) at its update 3"):
        _fit(nonfinite="raise")


def test_16_mixed_leaves_the_skip_to_its_grad_scaler():
    """The scaler sees the inf first and never calls the optimizer's step: nothing is counted twice."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    model, opt, _ = _fit(plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert opt.nonfinite_steps == 0
    assert opt.completed_steps(model.attn.weight) == 3
    assert scaler.get_scale() < 2.0**8  # the scaler skipped (and backed off)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_count_goes_to_the_logger_when_it_changes(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    class Recorder(CSVLogger):
        def __init__(self):
            super().__init__(tmp_path)
            self.seen = []

        def log_metrics(self, metrics, step=None):
            self.seen += [(k, v, step) for k, v in metrics.items() if k == "lowrank/nonfinite_steps"]
            super().log_metrics(metrics, step)

    logger = Recorder()
    torch.manual_seed(0)
    trainer = L.Trainer(
        accelerator="cpu",
        strategy=LowRankStrategy(rank=4, memory_report=False, memory_json=False),
        max_steps=4,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.warns(RuntimeWarning, match="skipped an optimizer step"):
        trainer.fit(BadAtOneStep(scheduler=None))
    # when it happened (at the global step of that batch, before Lightning counts it), again in the final report
    assert logger.seen[0] == ("lowrank/nonfinite_steps", 1.0, BAD_BATCH)
    assert {v for _, v, _ in logger.seen} == {1.0}
