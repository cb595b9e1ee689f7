"""CurvatureProbe through the Trainer: accurate against an exact Hessian, and invisible to training."""

import re
import warnings

import lightning as L
import pytest
import torch
from torch.func import functional_call

from lightning_lowrank import CurvatureProbe, LowRankStrategy
from lightning_lowrank.callbacks.curvature_probe import ESTIMATORS
from tests.models import QUIET, ManualNet, NoisyNet, RecordingLogger, SmallMLP


def _fit(model, callbacks, max_steps, strategy="auto", **kwargs):
    trainer = L.Trainer(strategy=strategy, max_steps=max_steps, callbacks=callbacks, **{**QUIET, **kwargs})
    trainer.fit(model)
    return trainer


def test_a_probe_leaves_training_bit_identical():
    runs = []
    for probe in (False, True):
        torch.manual_seed(0)
        model = NoisyNet()
        callbacks = [CurvatureProbe(every=2, samples=2, top_k=1, max_iter=5)] if probe else []
        _fit(model, callbacks, max_steps=6, strategy=LowRankStrategy(rank=4, memory_report=False))
        runs.append(({n: p.detach().clone() for n, p in model.named_parameters()}, model.bn.running_mean.clone()))
        if probe:
            assert [h["step"] for h in callbacks[0].history] == [2, 4, 6]
    (params_a, bn_a), (params_b, bn_b) = runs
    assert torch.equal(bn_a, bn_b)
    for name in params_a:
        assert torch.equal(params_a[name], params_b[name]), name


def exact_hessian(model):
    """The full Hessian of SmallMLP's loss on its one batch, over all parameters in ``parameters()`` order."""
    names = [n for n, _ in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    shapes = [p.shape for p in model.parameters()]

    def loss_of(v):
        chunks, i = {}, 0
        for n, s in zip(names, shapes):
            chunks[n.removeprefix("net.")] = v[i : i + s.numel()].reshape(s)  # "net.0.weight" -> "0.weight"
            i += s.numel()
        return torch.nn.functional.cross_entropy(functional_call(model.net, chunks, (model.x,)), model.y)

    return torch.autograd.functional.hessian(loss_of, flat)


def test_probe_figures_match_the_exact_hessian_and_are_logged():
    torch.manual_seed(0)
    model, logger = SmallMLP(), RecordingLogger()
    probe = CurvatureProbe(every=1, samples=4000, top_k=1, max_iter=200, tol=1e-6)
    _fit(model, [probe], max_steps=1, logger=logger)
    names = [n for n, _ in model.named_parameters()]
    H = exact_hessian(model)
    exact_trace = torch.trace(H).item()
    exact_top = torch.linalg.eigvalsh(H).abs().max().item()
    last = probe.history[-1]
    assert last["eigenvalue_0"] == pytest.approx(exact_top, rel=0.01)
    assert last["trace"] == pytest.approx(exact_trace, rel=0.1)  # 4000 Rademacher samples on a 51-parameter Hessian
    assert logger.metrics["curvature/trace"] == last["trace"]
    assert logger.metrics["curvature/probe_seconds"] > 0
    assert sum(last[f"trace/{n}"] for n in names) == pytest.approx(last["trace"], rel=1e-6)


class FrozenMLP(SmallMLP):
    """SmallMLP under SGD that never moves: every probe sees the Hessian at init, which the test forms exactly.

    ``lrs`` has one learning rate (one param group) or two (group 0: first layer, group 1: second layer); the test
    sets it once it knows the Hessian.
    """

    lrs = (0.0,)

    def configure_optimizers(self):
        if len(self.lrs) == 1:
            return torch.optim.SGD(self.parameters(), lr=self.lrs[0])
        first, second = self.net[0].parameters(), self.net[2].parameters()
        return torch.optim.SGD([{"params": first, "lr": self.lrs[0]}, {"params": second, "lr": self.lrs[1]}])

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        optimizer_closure()  # forward and backward run as in a real step; the update is never applied


EOS = re.compile(
    r"lr \* top eigenvalue = (\S+) > 2 for param group (\d+) \(lr=(\S+), top Hessian eigenvalue=(\S+), "
    r"(\d+) param tensors, (\d+) elements\): plain gradient descent at this lr is past the edge of stability"
)


def _fit_recording_eos_warnings(model, probe, max_steps=3, ckpt_path=None, **kwargs):
    trainer = L.Trainer(max_steps=max_steps, callbacks=[probe], **{**QUIET, **kwargs})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, ckpt_path=ckpt_path)
    return [EOS.search(str(w.message)) for w in caught if "edge of stability" in str(w.message)]


def _top(H):
    """The largest-magnitude eigenvalue, with its sign: what power iteration converges to."""
    values = torch.linalg.eigvalsh(H)
    return values[values.abs().argmax()].item()


def _eos_probe():
    return CurvatureProbe(every=1, estimators=("top_eigenvalues",), top_k=1, max_iter=300, tol=1e-7)


def _frozen_mlp():
    torch.manual_seed(0)
    model = FrozenMLP()
    return model, exact_hessian(model)


def test_edge_of_stability_warns_once_with_the_exact_figures():
    model, H = _frozen_mlp()
    top = _top(H)
    assert top > 0
    model.lrs = (lr := 3.0 / top,)
    start = [p.detach().clone() for p in model.parameters()]
    probe = _eos_probe()
    found = _fit_recording_eos_warnings(model, probe)
    assert all(torch.equal(a, b) for a, b in zip(start, model.parameters()))  # every probe saw H
    assert [h["lr_x_eigenvalue/group0"] for h in probe.history] == pytest.approx([3.0] * 3, rel=0.01)
    assert len(found) == 1 and found[0] is not None  # three probes past 2, one warning
    product, group, shown_lr, eigenvalue, tensors, elements = found[0].groups()
    assert float(product) == pytest.approx(lr * top, rel=0.01)
    assert float(eigenvalue) == pytest.approx(top, rel=0.01)
    assert float(shown_lr) == pytest.approx(lr, rel=1e-3)
    assert (group, tensors, elements) == ("0", "4", str(4 * 6 + 6 + 6 * 3 + 3))


def test_a_resumed_run_does_not_warn_again(tmp_path):
    model, H = _frozen_mlp()
    model.lrs = (3.0 / _top(H),)
    first = _fit_recording_eos_warnings(model, _eos_probe(), 2, enable_checkpointing=True, default_root_dir=tmp_path)
    assert len(first) == 1
    (ckpt,) = tmp_path.rglob("*.ckpt")
    resumed = _eos_probe()
    assert _fit_recording_eos_warnings(model, resumed, 4, ckpt_path=str(ckpt)) == []
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4]
    assert all(h["lr_x_eigenvalue/group0"] > 2 for h in resumed.history)  # still past the edge: silence is the state


def test_edge_of_stability_is_silent_below_two():
    model, H = _frozen_mlp()
    model.lrs = (1.5 / _top(H),)
    probe = _eos_probe()
    assert _fit_recording_eos_warnings(model, probe) == []
    assert probe.history[-1]["lr_x_eigenvalue/group0"] == pytest.approx(1.5, rel=0.01)


def test_edge_of_stability_uses_each_groups_own_hessian_block():
    model, H = _frozen_mlp()
    first = 4 * 6 + 6  # net.0 weight and bias come first in parameters() order
    top0, top1 = _top(H[:first, :first]), _top(H[first:, first:])
    assert top0 > 0 and top1 > 0
    # Group 0 is below the edge and group 1 past it on their own blocks, though 1.5 / top0 is past it on H's
    # top eigenvalue: only the block eigenvalue tells the two apart.
    model.lrs = (lr0, lr1) = (1.5 / top0, 2.5 / top1)
    assert lr0 * torch.linalg.eigvalsh(H).max().item() > 2
    probe = _eos_probe()
    found = _fit_recording_eos_warnings(model, probe)
    last = probe.history[-1]
    assert last["lr_x_eigenvalue/group0"] == pytest.approx(1.5, rel=0.01)
    assert last["lr_x_eigenvalue/group1"] == pytest.approx(2.5, rel=0.01)
    assert len(found) == 1 and found[0] is not None
    product, group, shown_lr, eigenvalue, tensors, elements = found[0].groups()
    assert (group, tensors, elements) == ("1", "2", str(6 * 3 + 3))
    assert float(eigenvalue) == pytest.approx(top1, rel=0.01)
    assert float(product) == pytest.approx(lr1 * top1, rel=0.01)


def test_probe_history_survives_a_checkpoint():
    probe = CurvatureProbe(every=1, samples=2, top_k=1, max_iter=5)
    _fit(SmallMLP(), [probe], max_steps=2)
    restored = CurvatureProbe(every=1)
    restored.load_state_dict(probe.state_dict())
    assert restored.history == probe.history and len(restored.history) == 2


def test_manual_optimization_is_refused_at_setup():
    with pytest.raises(ValueError, match="manual optimization"):
        _fit(ManualNet(), [CurvatureProbe(every=1)], max_steps=1, strategy=LowRankStrategy(rank=4))


@pytest.mark.parametrize("kwargs", [dict(every=0), dict(estimators=("hessian",)), dict(samples=0), dict(top_k=0)])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        CurvatureProbe(**kwargs)


class AttentionNet(SmallMLP):
    """scaled_dot_product_attention picks a fused kernel, and fused kernels have no double backward."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(4, 12)

    def training_step(self, batch, batch_idx):
        x, y = batch
        q, k, v = self.qkv(x.view(2, 2, 4, 4)).chunk(3, dim=-1)  # (batch, heads, seq, dim): fused on CPU too
        h = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).reshape(16, 4)
        return torch.nn.functional.cross_entropy(self.net(h), y)


def test_a_module_with_fused_attention_can_be_probed():
    probe = CurvatureProbe(every=1, estimators=ESTIMATORS, samples=2, max_iter=5)
    _fit(AttentionNet(), [probe], max_steps=2)
    assert len(probe.history) == 2 and probe.history[-1]["trace/qkv.weight"] != 0
