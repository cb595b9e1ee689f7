"""The planner: the memory report before training must equal the one training measures, and its CLI."""

import time
from dataclasses import fields

import lightning as L
import pytest
import torch

from lightning_lowrank import LowRankStrategy, plan
from lightning_lowrank.__main__ import main
from lightning_lowrank.memory import PRESETS, MemoryReport, llama_preset
from tests.models import QUIET, AdafactorNet, SGDNet, TinyNet


def _measured(model, **options):
    trainer = L.Trainer(strategy=LowRankStrategy(memory_report=False, **options), max_steps=1, **QUIET)
    trainer.fit(model)
    return trainer.strategy.memory_report()


@pytest.mark.parametrize(
    "net,options",
    [
        (TinyNet, dict(rank=4)),
        (TinyNet, dict(rank=4, projector="dct")),
        (TinyNet, dict(rank=4, projector="random")),
        (TinyNet, dict(rank=4, state_bits=8)),
        (TinyNet, dict(rank=4, projector_bits=8)),
        (TinyNet, dict(rank=4, projector_bits=4, projector="online_pca")),
        (TinyNet, dict(rank=4, residual="fira")),
        (TinyNet, dict(rank=30)),  # 24x40 and 40x24 weights: full rank, both stay dense
        (SGDNet, dict(rank=4)),
        (AdafactorNet, dict(rank=4, projector="random")),  # an SVD P costs more than Adafactor: see the next one
        (AdafactorNet, dict(rank=4, state_bits=8, projector="random")),
        (AdafactorNet, dict(rank=4)),  # kept dense: both layers
    ],
)
def test_plan_equals_what_training_measures(net, options):
    torch.manual_seed(0)
    model = net(scheduler=None) if net is TinyNet else net()
    planned = plan(model, **options).report
    assert all(not p.is_meta and p.grad is None for p in model.parameters())  # the user's model is left alone
    measured = _measured(model, **options)
    for key in (
        "optimizer_state_bytes",
        "projected_state_bytes",
        "projector_bytes",
        "dense_state_bytes",
        "baseline_state_bytes",
        "param_bytes",
        "grad_bytes",
        "shared_basis_bytes",
        "quantization_saving_bytes",
    ):
        assert getattr(planned, key) == getattr(measured, key), key
    assert planned.layers == measured.layers  # names, shapes, ranks, projectors and per-layer bytes
    # Every other figure too, except what only a running process has (peaks, RSS, probe and phase timings).
    runtime = {"peak_allocated_bytes", "cpu_max_rss_bytes", "probe", "phases"}
    for f in fields(MemoryReport):
        if f.name not in runtime:
            assert getattr(planned, f.name) == getattr(measured, f.name), f.name
    dense = options["rank"] == 30 or (net is AdafactorNet and "projector" not in options)
    assert len(planned.layers) == (0 if dense else 2)


def test_tinynet_by_hand():
    """attn 40x24 and mlp 24x40, rank 4, fp32 AdamW: P (24x4) acts on the 24 side; moments are 4x40 or 40x4."""
    report = plan(TinyNet(scheduler=None), rank=4).report
    step = 4
    layer = 2 * 4 * 40 * 4 + 24 * 4 * 4 + step
    assert [(x.name, x.state_bytes, x.projector_bytes) for x in report.layers] == [
        ("attn", layer, 24 * 4 * 4),
        ("mlp", layer, 24 * 4 * 4),
    ]
    dense_numels = [32 * 24, 40, 24, 24, 24, 32 * 24, 32]  # embed, attn.bias, mlp.bias, norm (2), head (2)
    assert report.dense_state_bytes == sum(2 * 4 * n + step for n in dense_numels)
    assert report.param_bytes == 4 * (sum(dense_numels) + 2 * 40 * 24)


def test_options_are_validated_as_by_the_strategy():
    with pytest.raises(ValueError, match="Unknown projector"):
        plan(TinyNet(), rank=4, projector="bogus")
    with pytest.raises(ValueError, match="rank must be a positive int"):
        plan(TinyNet(), rank=0)
    with pytest.raises(TypeError, match="unknown low-rank option"):
        plan(TinyNet(), rnak=4)
    with pytest.raises(ValueError, match="Unknown preset"):
        plan("13B")


def test_presets_match_their_nominal_size():
    nominal = {"60M": 60e6, "130M": 130e6, "350M": 350e6, "7B": 7e9}
    for name, size in nominal.items():
        count = sum(p.numel() for p in llama_preset(name).parameters())
        assert abs(count - size) / size < 0.15, (name, count)
    assert sum(p.numel() for p in llama_preset("60M").parameters()) == 58_073_600
    # GaLore's "1B" config (hidden 2048, intermediate 5461, 24 layers) has 1.34B parameters.
    assert sum(p.numel() for p in llama_preset("1B").parameters()) == pytest.approx(1.339e9, rel=1e-3)
    assert all(p.is_meta for p in llama_preset("7B").parameters())
    assert set(PRESETS) == {"60M", "130M", "350M", "1B", "7B"}


def test_7b_plans_fast_and_saves_most_of_adamws_state():
    start = time.perf_counter()
    result = plan("7B", rank=128, gpu_gib=80)
    assert time.perf_counter() - start < 10
    report = result.report
    q = next(layer for layer in report.layers if layer.name == "layers.0.self_attn.q_proj")
    assert q.state_bytes == 2 * 128 * 4096 * 4 + 4096 * 128 * 4 + 4  # moments + P + step, fp32
    assert q.baseline_bytes == 2 * 4096 * 4096 * 4 + 4
    down = next(layer for layer in report.layers if layer.name == "layers.0.mlp.down_proj")
    assert down.shape == (4096, 11008) and down.state_bytes == 2 * 128 * 11008 * 4 + 4096 * 128 * 4 + 4
    assert len(report.layers) == 32 * 7  # lm_head and embeddings stay dense
    n_params = sum(p.numel() for p in llama_preset("7B").parameters())
    assert report.param_bytes == report.grad_bytes == 4 * n_params
    projected = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert report.baseline_state_bytes == 8 * n_params + 4 * (32 * 9 + 3)  # 2 moments + a step per tensor
    assert report.dense_state_bytes == 8 * (n_params - projected) + 4 * (32 * 2 + 3)
    assert report.optimizer_state_bytes < 0.1 * report.baseline_state_bytes
    assert result.fits and not result.fits_dense  # 54 GiB vs 100 GiB
    assert result.lowrank_bytes == 2 * report.param_bytes + report.optimizer_state_bytes


def test_bf16_and_8bit_shrink_the_plan():
    fp32 = plan("60M", rank=128).report
    small = plan("60M", rank=128, dtype="bf16", state_bits=8).report
    assert small.param_bytes * 2 == fp32.param_bytes
    assert small.optimizer_state_bytes < 0.3 * fp32.optimizer_state_bytes


def test_sgd_momentum_and_adafactor_by_name():
    sgd = plan("60M", "sgd", rank=128, optimizer_options={"momentum": 0.9}).report
    assert sgd.baseline == "SGD" and sgd.baseline_state_bytes == sgd.param_bytes  # one buffer per param
    assert plan("60M", "sgd", rank=128).report.baseline_state_bytes == 0  # torch SGD without momentum keeps nothing
    assert plan("60M", "adafactor", rank=128).report.baseline == "Adafactor"


def test_fit_verdict_reads_plainly():
    result = plan("1B", rank=512, projector="dct", state_bits=8, dtype="bf16", gpu_gib=8)
    text = "\n".join(result.verdict())
    assert result.fits and not result.fits_dense
    assert "FITS" in text and "DOES NOT FIT" in text and "Activations" in text
    assert plan("7B", rank=128, gpu_gib=8).fits is False


def test_cli_prints_report_and_verdict(capsys):
    argv = ["plan", "--preset", "60M", "--rank", "128", "--projector", "dct", "--state-bits", "8", "--gpu", "8"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Low-rank optimizer memory" in out and "Optimizer state" in out
    assert "with low-rank state" in out and "FITS" in out and "not planned" in out


def test_cli_plans_a_users_model(capsys):
    assert main(["plan", "--model", "tests.models:TinyNet", "--rank", "4", "--all-layers"]) == 0
    out = capsys.readouterr().out
    assert "attn" in out and "40x24" in out and "with low-rank state" in out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["plan", "--preset", "60M", "--residual", "bogus"], "Unknown residual 'bogus'"),
        (["plan", "--preset", "60M", "--rank", "0"], "rank must be a positive int"),
        (["plan", "--preset", "13B"], "invalid choice"),
        (["plan", "--model", "tests.models"], "package.module:factory"),
        (["plan", "--model", "tests.models:Nope"], "Nope"),
    ],
)
def test_cli_bad_options_give_a_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_strategy_prints_the_plan_at_fit_start_and_the_first_step_measures_it(capsys):
    import lightning as L

    from lightning_lowrank import LowRankStrategy
    from tests.models import QUIET, TinyNet

    strategy = LowRankStrategy(rank=4, projector="dct", memory_plan=True, memory_json=False)
    L.Trainer(strategy=strategy, max_steps=1, **QUIET).fit(TinyNet())
    measured = strategy.memory_report()
    assert strategy.planned is not None
    assert strategy.planned.report.optimizer_state_bytes == measured.optimizer_state_bytes
    assert strategy.planned.report.layers == measured.layers
    assert "Planned parameters + gradients + optimizer state" in capsys.readouterr().out
