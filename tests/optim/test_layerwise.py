"""Layer-wise updates (``LowRankStrategy(layerwise=True)``): each weight steps in its gradient hook during backward."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision

from lightning_lowrank import LowRankStrategy
from lightning_lowrank.optim.layerwise import LOWRANK_GRAD, LayerwiseProjectedOptimizer
from tests.models import QUIET, ManualNet, TinyNet


class GradProbe(Callback):
    """After setup, a post-accumulate-grad hook on every parameter (registered after the strategy's, so it runs after
    them) samples which gradients are alive: the most at once, their bytes, and the most projected ones per step."""

    def __init__(self):
        self.max_live, self.max_bytes, self.handles = 0, 0, []
        self.projected_per_step, self.bytes_per_step = [], []  # per optimizer step (accumulation window)

    def on_train_start(self, trainer, pl_module):
        params = list(pl_module.parameters())
        projected = [p for p in params if trainer.optimizers[0].is_projected(p)]

        def sample(_):
            live = [p for p in params if p.grad is not None]
            self.max_live = max(self.max_live, len(live))
            nbytes = sum(p.grad.numel() * p.grad.element_size() for p in live)
            self.max_bytes = max(self.max_bytes, nbytes)
            self.bytes_per_step[-1] = max(self.bytes_per_step[-1], nbytes)
            count = sum(p.grad is not None for p in projected)
            self.projected_per_step[-1] = max(self.projected_per_step[-1], count)

        self.handles = [p.register_post_accumulate_grad_hook(sample) for p in params]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx % trainer.accumulate_grad_batches == 0:
            self.projected_per_step.append(0)
            self.bytes_per_step.append(0)

    def on_train_end(self, trainer, pl_module):
        for handle in self.handles:
            handle.remove()


def fit(layerwise, accumulate=1, max_steps=8, callbacks=(), make=TinyNet, ckpt_path=None, root=None, **options):
    torch.manual_seed(0)
    model = make(scheduler="step", batch_size=8)  # 8 micro-batches per epoch
    options = {"rank": 4, "update_gap": 2, **options}
    trainer = L.Trainer(
        strategy=LowRankStrategy(layerwise=layerwise, **options),
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        callbacks=list(callbacks),
        **{**QUIET, "enable_checkpointing": root is not None},
        **({"default_root_dir": root} if root is not None else {}),
    )
    trainer.fit(model, ckpt_path=ckpt_path)
    return model, trainer


@pytest.mark.parametrize(
    "accumulate,options",
    [
        (1, {}),
        (4, {}),
        (4, {"moments": "rotate"}),
        (4, {"projector": "dct"}),
        (3, {"projector": "rsvd", "residual": "fira"}),  # needs the full gradient: accumulates it in full
    ],
)
def test_layerwise_matches_the_step_at_the_end(accumulate, options):
    reference, _ = fit(False, accumulate, **options)
    model, trainer = fit(True, accumulate, **options)
    opt = trainer.optimizers[0]
    assert isinstance(opt, LayerwiseProjectedOptimizer)
    # update_gap=2 over 8 steps: the projected layers refreshed inside the run (steps 0, 2, 4, 6).
    assert int(opt.state[model.attn.weight]["step"]) == 8
    assert all(LOWRANK_GRAD not in s for s in opt.state.values())  # nothing left over at the step boundary
    for (name, a), b in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5, msg=name)
    assert all(p.grad is None for p in model.parameters())
    assert not any(p._post_accumulate_grad_hooks for p in model.parameters())  # hooks removed at teardown


def test_layerwise_differs_from_a_wrong_reference():
    """The comparison above can fail: a different rank gives different parameters."""
    reference, _ = fit(False, 4)
    model, _ = fit(True, 4, rank=3)
    assert not torch.allclose(reference.attn.weight, model.attn.weight, atol=1e-6)


def test_full_gradients_never_all_exist_at_once():
    dense, layerwise = GradProbe(), GradProbe()
    fit(False, 1, callbacks=[dense])
    model, _ = fit(True, 1, callbacks=[layerwise])
    total = len(list(model.parameters()))
    assert dense.max_live == total
    assert layerwise.max_live < total
    assert max(layerwise.projected_per_step) == 0  # each projected gradient freed in its own hook
    assert layerwise.max_bytes < dense.max_bytes


def test_accumulation_keeps_projected_gradients_in_low_rank_between_refreshes():
    """update_gap=100: only the first window refreshes (and keeps full gradients); later windows buffer in low rank."""
    dense, layerwise = GradProbe(), GradProbe()
    reference, _ = fit(False, 4, max_steps=4, callbacks=[dense], update_gap=100)
    model, trainer = fit(True, 4, max_steps=4, callbacks=[layerwise], update_gap=100)
    assert dense.projected_per_step == [2, 2, 2, 2]
    assert layerwise.projected_per_step == [2, 0, 0, 0]
    assert layerwise.bytes_per_step[0] == dense.bytes_per_step[0]  # the refresh window holds full gradients
    assert all(a < b for a, b in zip(layerwise.bytes_per_step[1:], dense.bytes_per_step[1:]))
    for a, b in zip(reference.parameters(), model.parameters()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


def test_adam_l2_penalty_and_sgd_match():
    class AdamNet(TinyNet):
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2, weight_decay=0.05)

    class SGDNet(TinyNet):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=5e-2, momentum=0.9, weight_decay=0.01)

    for cls in (AdamNet, SGDNet):
        reference, _ = fit(False, 2, make=cls)
        model, _ = fit(True, 2, make=cls)
        for a, b in zip(reference.parameters(), model.parameters()):
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


def test_resume_from_step_boundary_checkpoint_is_bit_identical(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1, filename="{step}")
    full, _ = fit(True, 2, callbacks=[ckpt], root=tmp_path)
    resumed, _ = fit(True, 2, ckpt_path=str(tmp_path / "step=4.ckpt"), root=tmp_path / "resumed")
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    state = torch.load(tmp_path / "step=4.ckpt", weights_only=True)["optimizer_states"][0]["state"]
    assert {"proj", "exp_avg", "exp_avg_sq", "step"} <= set(state[1]) and LOWRANK_GRAD not in state[1]


def test_refusals_say_why():
    with pytest.raises(ValueError, match="cannot clip gradients.*global norm"):
        _fit_with(gradient_clip_val=1.0)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(ValueError, match="GradScaler.*16-mixed"):
        _fit_with(plugins=[plugin])
    with pytest.raises(ValueError, match="manual optimization"):
        _fit_with(model=ManualNet())
    with pytest.raises(ValueError, match="layerwise=True does not support memory_budget"):
        _fit_with(strategy_options={"memory_budget": 10**6})


def _fit_with(model=None, strategy_options=None, **trainer_kwargs):
    trainer = L.Trainer(
        strategy=LowRankStrategy(rank=4, layerwise=True, **(strategy_options or {})),
        max_steps=1,
        **QUIET,
        **trainer_kwargs,
    )
    trainer.fit(model or TinyNet())
