"""LearningRateMonitor keeps the user's optimizer's name under the strategy: its keys equal a dense run's."""

import pickle

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor

from lightning_lowrank import LowRankStrategy, ProjectedOptimizer
from lightning_lowrank.optim.layerwise import LayerwiseProjectedOptimizer
from tests.models import QUIET, RecordingLogger, RMSpropNet, SGDNet, TinyNet


class AdamNet(TinyNet):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class GroupsNet(TinyNet):
    """Two param groups, the second one named: ``lr-AdamW/pg1`` and ``lr-AdamW/head``."""

    def configure_optimizers(self):
        head = list(self.lm_head.parameters())
        rest = [p for p in self.parameters() if all(p is not h for h in head)]
        return torch.optim.AdamW([{"params": rest}, {"params": head, "lr": 1e-3, "name": "head"}], lr=1e-2)


class ThreeOptimizersNet(TinyNet):
    """Manual optimization with AdamW, AdamW, SGD: Lightning numbers a second optimizer of one class."""

    def __init__(self):
        super().__init__(scheduler=None)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y)
        for opt in self.optimizers():
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in self.optimizers():
            opt.step()
        return loss

    def configure_optimizers(self):
        return [
            torch.optim.AdamW([*self.attn.parameters(), *self.embed.parameters()], lr=1e-2),
            torch.optim.AdamW([*self.mlp.parameters(), *self.norm.parameters()], lr=2e-2),
            torch.optim.SGD(self.lm_head.parameters(), lr=0.1),
        ]


def _lr_keys(model, strategy="auto"):
    monitor, logger = LearningRateMonitor(logging_interval="step"), RecordingLogger()
    trainer = L.Trainer(
        strategy=strategy, max_steps=2, callbacks=[monitor], log_every_n_steps=1, **{**QUIET, "logger": logger}
    )
    trainer.fit(model)
    logged = {k for k in logger.metrics if k.startswith("lr-")}
    assert logged == set(monitor.lrs)
    return sorted(monitor.lrs), trainer


@pytest.mark.parametrize(
    "make,expected",
    [
        (lambda: TinyNet(scheduler=None), ["lr-AdamW"]),
        (lambda: TinyNet(scheduler="step"), ["lr-AdamW"]),  # named from the scheduler's (rebound) optimizer
        (lambda: SGDNet(scheduler=None), ["lr-SGD"]),
        (lambda: AdamNet(scheduler=None), ["lr-Adam"]),
        (lambda: GroupsNet(scheduler=None), ["lr-AdamW/head", "lr-AdamW/pg1"]),
        (ThreeOptimizersNet, ["lr-AdamW", "lr-AdamW-1", "lr-SGD"]),
    ],
)
def test_keys_are_those_of_the_dense_run(make, expected):
    dense, _ = _lr_keys(make())
    assert dense == expected  # Lightning's own naming, the reference
    lowrank, trainer = _lr_keys(make(), LowRankStrategy(rank=4, memory_report=False))
    assert lowrank == expected
    assert all(isinstance(opt, ProjectedOptimizer) for opt in trainer.optimizers)


def test_layerwise_and_fallback_dense_keep_their_names():
    keys, trainer = _lr_keys(TinyNet(scheduler=None), LowRankStrategy(rank=4, layerwise=True, memory_report=False))
    assert keys == ["lr-AdamW"]
    assert isinstance(trainer.optimizers[0], LayerwiseProjectedOptimizer)
    with pytest.warns(UserWarning, match="RMSprop cannot be projected"):
        keys, trainer = _lr_keys(RMSpropNet(scheduler=None), LowRankStrategy(rank=4, fallback="dense"))
    assert keys == ["lr-RMSprop"] and type(trainer.optimizers[0]) is torch.optim.RMSprop


def test_the_named_optimizer_is_a_projected_optimizer_and_nothing_else():
    trainer = L.Trainer(strategy=LowRankStrategy(rank=4, memory_report=False), max_steps=2, **QUIET)
    trainer.fit(SGDNet(scheduler=None))
    opt = trainer.optimizers[0]
    assert type(opt).__name__ == "SGD" and repr(opt).startswith("SGD (")
    assert isinstance(opt, ProjectedOptimizer) and not isinstance(opt, torch.optim.SGD)
    assert opt.is_projected(trainer.lightning_module.attn.weight)
    # A checkpoint does not record the class: it loads into a plain ProjectedOptimizer, and back.
    saved = opt.state_dict()
    params = list(trainer.lightning_module.parameters())
    plain = ProjectedOptimizer.from_optimizer(
        torch.optim.SGD(params, lr=0.1, momentum=0.9), set(opt.projected_params()), rank=4
    )
    plain.load_state_dict(saved)
    for a, b in zip(plain.state_dict()["state"].values(), saved["state"].values()):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Pickle finds the class by its qualified name.
    copy = pickle.loads(pickle.dumps(opt))
    assert type(copy) is type(opt)
    assert copy.state_dict()["param_groups"][0]["lr"] == saved["param_groups"][0]["lr"]
    # and the copy steps like the original (its own attributes travel too, not only torch's three)
    params = [p for g in copy.param_groups for p in g["params"]]  # pickled: the copy holds its own tensors
    for p in params:
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in params]
    copy.step()
    assert copy.nonfinite_steps == 0 and len(copy.projected_params()) == len(opt.projected_params())
    assert all(not torch.equal(p, q) for p, q in zip(params, before))
