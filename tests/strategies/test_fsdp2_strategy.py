"""``strategy="lowrank_fsdp"`` through a Trainer on 2 CPU processes (``tests/fsdp2_trainer.py``, one launch).

Checked against the single-device ``LowRankStrategy`` with the same options and ``side="right"`` on the whole batch,
and against itself across a distributed checkpoint.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_lowrank import LowRankStrategy
from tests import ROOT
from tests import fsdp2_trainer as script
from tests.models import TinyNet

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="gloo workers")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    subprocess.run([sys.executable, str(ROOT / "tests" / "fsdp2_trainer.py"), str(out)], check=True, cwd=ROOT)
    return out


def _single_device(
    steps: int, ckpt_path: str | None = None, with_report: bool = False, **options: object
) -> TinyNet | tuple[TinyNet, object]:
    torch.manual_seed(0)
    model = TinyNet(scheduler=None, batch_size=script.BATCH, n=script.N)
    options = {**script.OPTIONS, "side": "right", "memory_report": False, "memory_json": False, **options}
    trainer = L.Trainer(
        accelerator="cpu",
        strategy=LowRankStrategy(**options),
        max_epochs=steps // 2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, ckpt_path=ckpt_path)
    return (model, trainer.strategy.memory_report()) if with_report else model


def _load(runs: Path, name: str) -> dict:
    return torch.load(runs / f"{name}.pt", weights_only=True)


def test_an_unchanged_module_trains_sharded_as_on_one_device(runs):
    plain = _load(runs, "plain")
    reference, report = _single_device(4, with_report=True)
    for n, p in reference.named_parameters():
        torch.testing.assert_close(plain["params"][n], p.detach(), rtol=0, atol=5e-5, msg=n)
    assert plain["optimizer"] == "AdamW"  # the user's optimizer's name (LearningRateMonitor)
    assert plain["exp_avg_rows"] == 40 // script.WORLD  # attn (40 x 24): moments sharded with the weight's rows
    assert plain["steps"] == 4
    # DCT refreshes at steps 0 and 2: one n-vector of float32 scores per projected layer (attn n=24, mlp n=40)
    assert plain["refresh_bytes"] == 2 * (24 + 40) * 4
    # Per rank: half the rows of every moment; the DCT indices and the step counters are replicated.
    one_device = report.optimizer_state_bytes
    assert plain["state_bytes"] == (one_device - plain["replicated_bytes"]) / script.WORLD + plain["replicated_bytes"]
    assert plain["state_bytes"] < 0.55 * one_device
    assert plain["total_state_bytes"] == one_device + (script.WORLD - 1) * plain["replicated_bytes"]


@pytest.mark.parametrize("name", list(script.VARIANTS))
def test_svd_and_rsvd_with_fira_through_the_trainer_equal_one_device(runs, name):
    sharded = _load(runs, name)
    reference = _single_device(4, **script.VARIANTS[name])
    for n, p in reference.named_parameters():
        torch.testing.assert_close(sharded["params"][n], p.detach(), rtol=0, atol=5e-5, msg=n)


def test_muon_sharded_by_rows_equals_one_device_and_counts_its_gram_all_reduces(runs):
    """Projected Muon under FSDP2: each rank holds rows of the projected momentum (m / 2 x r) and Newton-Schulz sums
    the norm and the r x r Gram matrix over the ranks; equal to one device within 5e-5 (float32 Newton-Schulz)."""
    sharded = _load(runs, "muon")
    model = _muon_single_device()
    for n, p in model.named_parameters():
        torch.testing.assert_close(sharded["params"][n], p.detach(), rtol=0, atol=5e-5, msg=n)
    torch.manual_seed(0)
    assert not torch.equal(sharded["params"]["attn.weight"], TinyNet().attn.weight)  # it trained
    assert sharded["exp_avg_rows"] == 40 // script.WORLD  # attn's momentum (40 x 4): half the rows per rank
    # Per layer and step: the squared norm (one float32) and 5 Gram matrices of 4 x 4 float32; 2 layers, 4 steps.
    assert sharded["step_bytes"] == 4 * 2 * (1 + 5 * 4 * 4) * 4


def test_the_muon_and_adamw_module_with_manual_optimization_equals_one_device(runs):
    """The issue's module (manual optimization, Muon on the hidden weights, AdamW on the rest) under lowrank_fsdp."""
    sharded = _load(runs, "muon_adamw")
    model = _muon_single_device(script.MuonAdamHalves)
    for n, p in model.named_parameters():
        torch.testing.assert_close(sharded["params"][n], p.detach(), rtol=0, atol=5e-5, msg=n)


def _muon_single_device(base: type = script.MuonHalves) -> TinyNet:
    class MuonNet(base):  # the same module, its data on one device: every batch of 16 whole
        def train_dataloader(self):
            return TinyNet.train_dataloader(self)

    torch.manual_seed(0)
    model = MuonNet()
    options = {**script.OPTIONS, **script.MUON, "side": "right", "memory_report": False, "memory_json": False}
    trainer = L.Trainer(
        accelerator="cpu",
        strategy=LowRankStrategy(**options),
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model)
    return model


def test_a_distributed_checkpoint_resumes_bit_for_bit(runs):
    plain, first, resumed = _load(runs, "plain"), _load(runs, "first_half"), _load(runs, "resumed")
    assert first["steps"] == 2 and resumed["steps"] == 4  # the counters were read again after the in-place load
    for n, p in plain["params"].items():
        assert torch.equal(resumed["params"][n], p), n


def test_a_module_with_its_own_configure_model_trains(runs):
    own = _load(runs, "own_configure_model")
    torch.manual_seed(0)
    initial = dict(TinyNet(scheduler=None).named_parameters())
    assert own["steps"] == 2 and own["exp_avg_rows"] == 20
    assert all(torch.isfinite(p).all() for p in own["params"].values())
    assert not torch.equal(own["params"]["attn.weight"], initial["attn.weight"].detach())


def test_a_full_checkpoint_resumes_on_one_device(runs):
    """``save_distributed_checkpoint=False`` gathers everything on rank 0: LowRankStrategy(side="right") resumes it
    on one device and lands where the sharded run did."""
    resumed = _single_device(4, ckpt_path=str(runs / "full.ckpt"))
    plain = _load(runs, "plain")
    for n, p in resumed.named_parameters():
        torch.testing.assert_close(p.detach(), plain["params"][n], rtol=0, atol=5e-5, msg=n)


def test_lowrank_fsdp_by_name_projects_on_the_right():
    from lightning_lowrank import LowRankFSDPStrategy

    trainer = L.Trainer(strategy="lowrank_fsdp", accelerator="cpu", devices=2, logger=False)
    assert isinstance(trainer.strategy, LowRankFSDPStrategy)
    assert trainer.strategy.lowrank_config.side == "right"  # rows are sharded: P on the right


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (dict(side="left"), "side='left'.*use side='right'"),
        (dict(state_bits=8), "does not support state_bits=8 yet"),
        (dict(memory_budget=10**6), "does not support memory_budget=1000000 yet"),
        (dict(tensor_parallel_size=2), "tensor parallelism is not supported yet.*tensor_parallel_size"),
        (dict(layerwise=True), "layerwise=True is not supported with LowRankFSDPStrategy"),
    ],
)
def test_what_fsdp2_cannot_do_is_refused_when_the_strategy_is_built(options, match):
    from lightning_lowrank import LowRankFSDPStrategy

    with pytest.raises(ValueError, match=match):
        LowRankFSDPStrategy(**options)
