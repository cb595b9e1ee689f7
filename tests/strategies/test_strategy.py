"""The Lightning side: an unchanged module trained through the low-rank strategies."""

import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import StrategyRegistry

import lightning_lowrank  # noqa: F401  (registers the names)
from lightning_lowrank import LowRankDDPStrategy, LowRankStrategy, ProjectedOptimizer
from lightning_lowrank.memory import render_memory_report
from tests.models import QUIET, ManualNet, RecordingLogger, RMSpropNet, TinyNet


def _trainer(strategy, **kwargs):
    return L.Trainer(strategy=strategy, **{**QUIET, **kwargs})


class LossHistory(Callback):
    def __init__(self):
        self.losses, self.lrs = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item() if isinstance(outputs, dict) else float(outputs))
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_names_are_registered():
    for name in ("lowrank", "lowrank_ddp", "lowrank_ddp_spawn", "lowrank_ddp_fork"):
        assert name in StrategyRegistry
    assert isinstance(_trainer("lowrank").strategy, LowRankStrategy)
    assert isinstance(_trainer("LowRank_DDP_Spawn", devices=2).strategy, LowRankDDPStrategy)


def test_single_device_strategy_takes_the_trainers_device():
    """A registry name is built without arguments; the Trainer's device list must still reach it."""
    assert _trainer("lowrank").strategy.root_device == torch.device("cpu")
    strategy = LowRankStrategy()
    strategy.parallel_devices = [torch.device("cuda", 1)]  # what the connector does for accelerator="gpu"
    assert strategy.root_device == torch.device("cuda", 1)
    assert LowRankStrategy(device="cuda:0").root_device == torch.device("cuda", 0)


def test_registry_name_trains_unchanged_module_and_swaps_optimizer():
    torch.manual_seed(0)
    model, history = TinyNet(width=160, hidden=192), LossHistory()  # smaller sides above the default rank 128
    trainer = _trainer("lowrank", max_epochs=6, callbacks=[history])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*lr_scheduler.step.*")
        warnings.filterwarnings("error", message=".*optimizer.step.*overridden.*")
        trainer.fit(model)
    opt = trainer.optimizers[0]
    assert isinstance(opt, ProjectedOptimizer)
    assert trainer.lr_scheduler_configs[0].scheduler.optimizer is opt
    projected = {name for name, p in model.named_parameters() if opt.is_projected(p)}
    assert projected == {"attn.weight", "mlp.weight"}  # not the head, the embedding, biases or norms
    assert trainer.strategy.lowrank_config.rank == 128
    assert opt.state[model.attn.weight]["exp_avg"].shape == (192, 128)
    assert sum(history.losses[-4:]) < 0.5 * sum(history.losses[:4])
    # StepLR(step_size=2, gamma=0.8) stepped every batch, read after the scheduler step of each batch.
    assert history.lrs[:6] == pytest.approx([1e-2, 8e-3, 8e-3, 6.4e-3, 6.4e-3, 5.12e-3])


@pytest.mark.parametrize("projector", ["svd", "dct"])
def test_instance_with_options_trains(projector):
    torch.manual_seed(0)
    model, history = TinyNet(scheduler="nested"), LossHistory()
    strategy = LowRankStrategy(rank=4, projector=projector, update_gap=3, exclude=["mlp"])
    trainer = _trainer(strategy, max_epochs=6, callbacks=[history])
    trainer.fit(model)
    opt = trainer.optimizers[0]
    assert [n for n, p in model.named_parameters() if opt.is_projected(p)] == ["attn.weight"]
    assert opt.state[model.attn.weight]["exp_avg"].shape == (40, 4)  # 40x24 weight: project the 24 side
    assert sum(history.losses[-4:]) < sum(history.losses[:4])
    # SequentialLR(LinearLR(0.1, 2 iters), Cosine) keeps working through the nested schedulers.
    assert trainer.lr_scheduler_configs[0].scheduler._schedulers[1].optimizer is opt
    assert history.lrs[0] == pytest.approx(1e-2 * 0.55)


def test_precision_clipping_and_accumulation_bf16():
    torch.manual_seed(0)
    model = TinyNet(scheduler=None)
    trainer = _trainer(
        LowRankStrategy(rank=4, update_gap=2),
        max_epochs=3,
        precision="bf16-mixed",
        gradient_clip_val=0.05,
        accumulate_grad_batches=2,
    )
    trainer.fit(model)
    opt = trainer.optimizers[0]
    assert trainer.global_step == 6  # 4 batches per epoch, 2 per step
    assert opt.state[model.attn.weight]["step"].item() == 6
    assert opt.state[model.attn.weight]["exp_avg"].dtype == torch.float32


class StepCounter(Callback):
    def __init__(self):
        self.closure_none = 0

    def on_train_start(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        original = opt.step

        def step(closure=None):
            self.closure_none += closure is None
            return original(closure)

        opt.step = step


def test_16_mixed_grad_scaler_path_calls_step_without_closure():
    torch.manual_seed(0)
    model, counter = TinyNet(scheduler=None), StepCounter()
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=16.0))
    trainer = _trainer(LowRankStrategy(rank=4, update_gap=2), max_steps=4, plugins=[plugin], callbacks=[counter])
    trainer.fit(model)
    opt = trainer.optimizers[0]
    assert counter.closure_none == opt.state[model.attn.weight]["step"].item() > 0


def test_manual_optimization():
    torch.manual_seed(0)
    model = ManualNet()
    trainer = _trainer(LowRankStrategy(rank=4), max_epochs=2)
    trainer.fit(model)
    assert isinstance(model.optimizers().optimizer, ProjectedOptimizer)
    assert trainer.optimizers[0].state[model.attn.weight]["step"].item() == 8


def test_memory_report_equals_tensor_bytes_and_is_logged():
    torch.manual_seed(0)
    model, logger = TinyNet(scheduler=None), RecordingLogger()
    trainer = _trainer(LowRankStrategy(rank=4, projector="dct", memory_report=False), max_steps=3, logger=logger)
    trainer.fit(model)
    report = trainer.strategy.memory_report()
    # Hand count (fp32 = 4 bytes, int64 = 8, step scalar = 4):
    # attn.weight 40x24 -> right side (40 x 4) moments + 4 indices; mlp.weight 24x40 -> left side (4 x 40) moments.
    projected_moments = 2 * (40 * 4 * 4) + 2 * (4 * 40 * 4)
    projected_steps = 2 * 4
    indices = 2 * 4 * 8
    shared_basis = 24 * 24 * 4  # one DCT basis for size 24, shared by both layers
    dense_numels = [32 * 24, 40, 24, 24, 24, 32 * 24, 32]  # embed, attn.b, mlp.b, norm w/b, head w/b
    dense = sum(2 * n * 4 + 4 for n in dense_numels)
    n_params = sum(p.numel() for p in model.parameters())
    assert report.param_bytes == n_params * 4 == report.grad_bytes
    model.embed.weight.requires_grad_(False)  # a frozen weight has no gradient buffer
    assert trainer.strategy.memory_report().grad_bytes == (n_params - 32 * 24) * 4
    assert report.projected_state_bytes == projected_moments + projected_steps
    assert report.projector_bytes == indices + shared_basis
    assert report.dense_state_bytes == dense
    assert report.baseline_state_bytes == 2 * n_params * 4 + 4 * 9
    assert report.saving_bytes == report.baseline_state_bytes - (dense + projected_moments + 8 + indices + shared_basis)
    assert [layer.name for layer in report.layers] == ["attn", "mlp"]
    assert report.layers[0].state_bytes == 2 * 40 * 4 * 4 + 4 + 4 * 8
    assert report.peak_allocated_bytes is None  # CPU: no allocator peak
    assert logger.metrics["lowrank/optimizer_state_bytes"] == report.optimizer_state_bytes
    assert logger.metrics["lowrank/saving_percent"] == pytest.approx(report.saving_percent)


def test_memory_report_prints_at_train_end(capsys):
    torch.manual_seed(0)
    trainer = _trainer(LowRankStrategy(rank=4), max_steps=2)
    trainer.fit(TinyNet(scheduler=None))
    out = capsys.readouterr().out
    assert "Low-rank optimizer memory" in out and "attn" in out and "Saving vs AdamW" in out


def test_rendered_report_shows_every_layer():
    from rich.console import Console

    torch.manual_seed(0)
    trainer = _trainer(LowRankStrategy(rank=4, memory_report=False), max_steps=1)
    trainer.fit(TinyNet(scheduler=None))
    console = Console(record=True, width=140)
    render_memory_report(trainer.strategy.memory_report(), console)
    text = console.export_text()
    assert "40x24" in text and "24x40" in text and "svd" in text


def test_resume_from_mid_run_checkpoint_is_bit_identical(tmp_path):
    def run(max_steps, ckpt_path=None, callbacks=()):
        torch.manual_seed(0)
        model = TinyNet(scheduler="step", batch_size=32)  # 2 batches per epoch
        trainer = _trainer(
            LowRankStrategy(rank=4, projector="svd", update_gap=3),
            max_steps=max_steps,
            callbacks=list(callbacks),
            enable_checkpointing=bool(callbacks),
            default_root_dir=tmp_path,
        )
        trainer.fit(model, ckpt_path=ckpt_path)
        return model, trainer

    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1, filename="{step}")
    full, full_trainer = run(8, callbacks=[ckpt])
    resumed, resumed_trainer = run(8, ckpt_path=str(tmp_path / "step=4.ckpt"))
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    lr_full = full_trainer.optimizers[0].param_groups[0]["lr"]
    assert resumed_trainer.optimizers[0].param_groups[0]["lr"] == lr_full == pytest.approx(1e-2 * 0.8**4)
    state = torch.load(tmp_path / "step=4.ckpt", weights_only=True)["optimizer_states"][0]
    assert {"proj", "exp_avg", "exp_avg_sq", "step"} <= set(state["state"][1])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(rank=0), "rank must be a positive int"),
        (dict(projector="fft"), "'svd', 'rsvd', 'dct'"),
        (dict(projector_bits=3), "projector_bits"),
        (dict(moments="zero"), "moments"),
        (dict(update_gap=0), "update_gap"),
        (dict(scale=-1), "scale"),
        (dict(target_modules=[]), "target_modules"),
    ],
)
def test_bad_options_raise_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LowRankStrategy(**kwargs)


def test_misspelt_options_fail_at_construction():
    with pytest.raises(TypeError, match="rnak"):
        LowRankStrategy(rnak=4)
    with pytest.raises(ValueError, match="Unknown option.*rnak.*Low-rank options: .*rank"):
        LowRankDDPStrategy(rnak=4)
    LowRankDDPStrategy(rank=4, find_unused_parameters=True)  # a real DDP keyword still passes through


def test_unknown_pattern_raises_at_setup_naming_candidates():
    trainer = _trainer(LowRankStrategy(rank=4, target_modules=["attention"]), max_steps=1)
    with pytest.raises(ValueError, match="'attention' matches no module.*attn"):
        trainer.fit(TinyNet())


def test_unsupported_optimizer_names_the_supported_ones():
    trainer = _trainer("lowrank", max_steps=1)
    with pytest.raises(TypeError, match="torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD.*RMSprop"):
        trainer.fit(RMSpropNet())


def test_fallback_dense_keeps_an_unsupported_optimizer_with_a_warning():
    trainer = _trainer(LowRankStrategy(rank=4, fallback="dense"), max_steps=2)
    with pytest.warns(UserWarning, match="RMSprop cannot be projected"):
        trainer.fit(RMSpropNet())
    assert type(trainer.optimizers[0]) is torch.optim.RMSprop
    # Nothing is projected, so nothing is saved: the kept optimizer is its own baseline (it said AdamW and 50%).
    report = trainer.strategy.memory_report()
    assert report.baseline == "RMSprop"
    assert report.saving_bytes == 0 and report.optimizer_state_bytes > 0


def test_sharded_and_multi_device_misuse_is_refused_at_trainer_construction():
    with pytest.raises(ValueError, match="lowrank_deepspeed.*not supported"):
        L.Trainer(strategy="lowrank_deepspeed")
    with pytest.raises(ValueError, match="runs on one device.*lowrank_ddp"):
        L.Trainer(strategy="lowrank", accelerator="cpu", devices=2)


def test_rank_not_below_layer_size_keeps_that_layer_dense_with_a_warning():
    model = TinyNet(scheduler=None, width=24, hidden=40)
    trainer = _trainer(LowRankStrategy(rank=30), max_steps=1)
    with pytest.warns(UserWarning, match="mlp.*dense"):
        trainer.fit(model)
    opt = trainer.optimizers[0]
    assert not opt.is_projected(model.mlp.weight) and not opt.is_projected(model.attn.weight)
    trainer = _trainer(LowRankStrategy(rank=23), max_steps=1)
    trainer.fit(model)
    assert trainer.optimizers[0].is_projected(model.attn.weight)


def test_a_resume_through_the_strategy_keeps_host_state_on_the_host(monkeypatch):
    """Lightning's ``load_optimizer_state_dict`` moves every optimizer tensor but ``step`` to the root device; ours
    are placed by the optimizer's own ``load_state_dict``: seeds, ranks, counters and 8-bit shapes on the CPU (read
    on the host every step), the rest with its parameter. A meta root device stands in for a GPU."""
    from lightning_lowrank.optim.state.host_ints import on_host

    torch.manual_seed(0)
    model = TinyNet(width=128, hidden=256, scheduler=None)
    trainer = _trainer(LowRankStrategy(rank=64, projector="random", state_bits=8), max_steps=2)
    trainer.fit(model)
    opt = trainer.optimizers[0]
    checkpoint = {"optimizer_states": [opt.state_dict()]}
    monkeypatch.setattr(type(trainer.strategy), "root_device", property(lambda self: torch.device("meta")))
    trainer.strategy.load_optimizer_state_dict(checkpoint)
    keys = {k for state in opt.state.values() for k in state}
    assert {"proj_seed", "exp_avg_codes", "exp_avg_shape"} <= keys
    for p, state in opt.state.items():
        for key, t in state.items():
            expected = "cpu" if on_host(key) or key == "step" else p.device.type
            assert t.device.type == expected, key
