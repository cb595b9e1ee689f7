"""Update rules chosen from the Trainer: the module's optimizer decides the inner rule; flags add the rest."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_lowrank import LowRankStrategy
from lightning_lowrank.optim.state import storage
from tests.models import QUIET, AdafactorNet, SGDNet, TinyNet
from tests.strategies.test_strategy import LossHistory


def _fit(strategy, model, max_steps=16, callbacks=(), **kwargs):
    history = LossHistory()
    trainer = L.Trainer(strategy=strategy, max_steps=max_steps, callbacks=[history, *callbacks], **{**QUIET, **kwargs})
    trainer.fit(model)
    return trainer, history


@pytest.mark.parametrize("net,rule", [(SGDNet, "sgd"), (AdafactorNet, "adafactor"), (TinyNet, "adamw")])
def test_the_modules_optimizer_picks_the_inner_rule(net, rule):
    torch.manual_seed(0)
    model = net() if net is not TinyNet else TinyNet(scheduler=None)
    # Adafactor with an SVD P would hold more than dense Adafactor and stay dense: a seed (random) saves
    options = dict(projector="random") if rule == "adafactor" else {}
    trainer, history = _fit(LowRankStrategy(rank=4, memory_report=False, **options), model)
    opt = trainer.optimizers[0]
    group = opt.param_groups[0]
    assert group["rule"] == rule and opt.is_projected(model.attn.weight)
    if rule == "sgd":
        assert group["momentum"] == 0.9 and "momentum_buffer" in opt.state[model.attn.weight]
    if rule == "adafactor":
        assert opt.state[model.attn.weight]["row_var"].shape == (40, 1)  # 40x24 weight: moments (40, 4)
    assert sum(history.losses[-4:]) < sum(history.losses[:4])


@pytest.mark.parametrize(
    "options",
    [
        dict(residual="frugal"),
        dict(residual="frugal", frugal_rule="sgd", residual_lr_scale=0.1),
        dict(residual="fira"),
        dict(residual="apollo", projector="random"),
        dict(residual="apollo", rank=1, apollo_scale_type="tensor"),
        dict(inner="subset_norm"),
        dict(state_bits=8),
        dict(state_bits=8, residual="fira", projector="dct"),
    ],
)
def test_residuals_inner_and_8bit_from_the_trainer(options):
    torch.manual_seed(0)
    options = {"rank": 4, **options}
    trainer, history = _fit(LowRankStrategy(memory_report=False, **options), TinyNet(scheduler=None))
    assert sum(history.losses[-4:]) < sum(history.losses[:4])
    group = trainer.optimizers[0].param_groups[0]
    assert group["residual"] == options.get("residual", "none")
    assert group["projected_rule"] == options.get("inner")


@pytest.mark.parametrize("net,baseline", [(SGDNet, "SGD"), (AdafactorNet, "Adafactor")])
def test_report_compares_with_the_modules_own_optimizer(net, baseline):
    torch.manual_seed(0)
    trainer, _ = _fit(LowRankStrategy(rank=4, memory_report=False), net(), max_steps=2)
    report = trainer.strategy.memory_report()
    assert report.baseline == baseline
    sizes = [p.shape for p in trainer.lightning_module.parameters()]
    if baseline == "SGD":  # torch.optim.SGD with momentum: one buffer per parameter
        expected = sum(s.numel() * 4 for s in sizes)
    else:  # torch.optim.Adafactor: row + column statistics for matrices, a variance for vectors, a step each
        expected = sum(((s[0] + s[1]) if len(s) == 2 else s.numel()) * 4 + 4 for s in sizes)
    assert report.baseline_state_bytes == expected


def test_8bit_moments_show_in_the_report(monkeypatch):
    monkeypatch.setattr(storage, "MIN_QUANTIZED_NUMEL", 0)  # tiny tensors: quantize them anyway (see storage.py)
    reports = {}
    for bits in (None, 8):
        torch.manual_seed(0)
        trainer, _ = _fit(LowRankStrategy(rank=4, state_bits=bits, memory_report=False), TinyNet(scheduler=None), 2)
        reports[bits] = trainer.strategy.memory_report()
    # attn 40x24 -> (40, 4) moments; mlp 24x40 -> (4, 40): 160 elements each, 2 moments, 2 layers.
    assert reports[None].projected_state_bytes == 2 * 2 * 160 * 4 + 2 * 4
    # 8-bit: 1 byte per element + a float32 absmax per block (one block) + the int64 shape (2 entries) per moment.
    assert reports[8].projected_state_bytes == 2 * 2 * (160 + 4 + 16) + 2 * 4


def test_fira_with_8bit_moments_resumes_bit_for_bit(tmp_path):
    def run(max_steps, ckpt_path=None, callbacks=()):
        torch.manual_seed(0)
        model = TinyNet(scheduler="step", batch_size=32)
        trainer = L.Trainer(
            strategy=LowRankStrategy(rank=4, update_gap=3, residual="fira", state_bits=8, memory_report=False),
            max_steps=max_steps,
            callbacks=list(callbacks),
            **{**QUIET, "enable_checkpointing": bool(callbacks), "default_root_dir": tmp_path},
        )
        trainer.fit(model, ckpt_path=ckpt_path)
        return model

    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1, filename="{step}")
    full = run(8, callbacks=[ckpt])
    resumed = run(8, ckpt_path=str(tmp_path / "step=4.ckpt"))
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_bad_fallback_value():
    with pytest.raises(ValueError, match="fallback must be 'error' or 'dense'"):
        LowRankStrategy(fallback="keep")
