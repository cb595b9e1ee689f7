"""CurvatureProbe through the Trainer: accurate against an exact Hessian, and invisible to training."""

import lightning as L
import pytest
import torch
from torch.func import functional_call

from lightning_lowrank import CurvatureProbe, LowRankStrategy
from tests.models import ManualNet, NoisyNet, SmallMLP
from tests.test_strategy import QUIET, RecordingLogger


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


def test_probe_figures_match_the_exact_hessian_and_are_logged():
    torch.manual_seed(0)
    model, logger = SmallMLP(), RecordingLogger()
    probe = CurvatureProbe(every=1, samples=4000, top_k=1, max_iter=200, tol=1e-6)
    _fit(model, [probe], max_steps=1, logger=logger)
    names = [n for n, _ in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    shapes = [p.shape for p in model.parameters()]

    def inner(chunks):  # "net.0.weight" -> "0.weight": parameters of model.net
        return {n.removeprefix("net."): t for n, t in chunks.items()}

    def loss_of(v):
        chunks, i = {}, 0
        for n, s in zip(names, shapes):
            chunks[n] = v[i : i + s.numel()].reshape(s)
            i += s.numel()
        return torch.nn.functional.cross_entropy(functional_call(model.net, inner(chunks), (model.x,)), model.y)

    H = torch.autograd.functional.hessian(loss_of, flat)
    exact_trace = torch.trace(H).item()
    exact_top = torch.linalg.eigvalsh(H).abs().max().item()
    last = probe.history[-1]
    assert last["eigenvalue_0"] == pytest.approx(exact_top, rel=0.01)
    assert last["trace"] == pytest.approx(exact_trace, rel=0.1)  # 4000 Rademacher samples on a 51-parameter Hessian
    assert logger.metrics["curvature/trace"] == last["trace"]
    assert logger.metrics["curvature/probe_seconds"] > 0
    assert sum(last[f"trace/{n}"] for n in names) == pytest.approx(last["trace"], rel=1e-6)


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
