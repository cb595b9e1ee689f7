"""Lightning Fabric strategies (issue 28): ``Fabric(strategy="lowrank" | "lowrank_ddp" | "lowrank_fsdp")``.

The Fabric loop (``loop.fit``) is checked against the Trainer running the same module, options, data order and seed
under ``LowRankStrategy`` (measured: bitwise equal; asserted within 1e-6), and the 2-process runs against the
one-device run on the whole batch (measured: at most 1.8e-7 apart; asserted within 1e-5).
"""

from __future__ import annotations

import io
import subprocess
import sys
import warnings
from datetime import timedelta

import lightning as L
import pytest
import torch
from lightning.fabric import Fabric
from lightning.fabric.strategies import STRATEGY_REGISTRY
from lightning.fabric.wrappers import _FabricOptimizer
from rich.console import Console

from lightning_lowrank import LowRankStrategy, ProjectedOptimizer, render_memory_report
from lightning_lowrank.fabric import LowRankFabricDDPStrategy, LowRankFabricFSDPStrategy, LowRankFabricStrategy
from tests import ROOT
from tests.fabric import loop

HANG = timedelta(seconds=120)  # a collective that one rank never joins fails the test instead of hanging
ONE_DEVICE = dict(accelerator="cpu", devices=1)
QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


def _one_device(**options: object) -> tuple[torch.nn.Module, _FabricOptimizer, Fabric]:
    fabric = Fabric(strategy=LowRankFabricStrategy(**{**loop.OPTIONS, **options}), **ONE_DEVICE)
    model, opt = loop.fit(fabric)
    return model, opt, fabric


def _assert_params_close(saved: dict[str, torch.Tensor], model: torch.nn.Module, atol: float) -> None:
    for name, p in loop.params(model):
        torch.testing.assert_close(saved[name], p.detach(), rtol=0, atol=atol, msg=name)


def test_the_names_are_in_fabrics_registry():
    for name in ("lowrank", "lowrank_ddp", "lowrank_ddp_spawn", "lowrank_ddp_fork", "lowrank_fsdp"):
        assert name in STRATEGY_REGISTRY
    assert type(Fabric(strategy="lowrank", **ONE_DEVICE).strategy) is LowRankFabricStrategy
    ddp = Fabric(strategy="lowrank_ddp_fork", accelerator="cpu", devices=2).strategy
    assert type(ddp) is LowRankFabricDDPStrategy and ddp._start_method == "fork"
    with pytest.raises(ValueError, match="DeepSpeed owns the optimizer"):
        Fabric(strategy="lowrank_deepspeed", **ONE_DEVICE)


@pytest.mark.parametrize(
    "first",
    [
        "import lightning_lowrank\nimport lightning",
        "from lightning.fabric import Fabric\nimport lightning_lowrank",
        "from lightning_lowrank import LowRankFabricStrategy",  # the Fabric classes first: loaded while registering
        "import lightning_lowrank.strategies",  # registers while lightning_lowrank.strategies is still loading
    ],
)
def test_the_names_are_registered_whichever_is_imported_first(first):
    check = "from lightning.fabric import Fabric\nprint(type(Fabric(strategy='lowrank', accelerator='cpu').strategy))"
    out = subprocess.run(
        [sys.executable, "-c", f"{first}\n{check}"], check=True, capture_output=True, text=True, cwd=ROOT
    )
    assert out.stdout.strip() == "<class 'lightning_lowrank.fabric.single.LowRankFabricStrategy'>", first


def test_the_fabric_loop_equals_the_trainer_run():
    model, opt, fabric = _one_device()
    assert isinstance(opt, _FabricOptimizer) and isinstance(opt.optimizer, ProjectedOptimizer)
    assert type(opt.optimizer).__name__ == "AdamW"  # named after the user's optimizer, as under the Trainer
    assert set(fabric.strategy.lowrank_layer_names().values()) == {"inp", "hidden"}  # head stays dense
    torch.manual_seed(0)
    reference = loop.Stack()
    trainer = L.Trainer(
        accelerator="cpu",
        strategy=LowRankStrategy(**loop.OPTIONS, memory_report=False, memory_json=False),
        max_epochs=loop.EPOCHS,
        **QUIET,
    )
    trainer.fit(reference)
    _assert_params_close(dict(reference.named_parameters()), model, atol=1e-6)  # measured: bitwise equal
    # The StepLR built on the torch optimizer (not passed to fabric.setup) set the projected optimizer's LR.
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.8**4) == trainer.optimizers[0].param_groups[0]["lr"]


def test_the_registered_name_projects_with_the_default_rank():
    fabric = Fabric(strategy="lowrank", **ONE_DEVICE)
    torch.manual_seed(0)
    start = loop.Stack(512).hidden.weight.detach().clone()
    model, opt = loop.fit(fabric, width=512)  # hidden (512 x 512) projected at rank 128; inp (512 x 16) stays dense
    assert fabric.strategy.lowrank_layer_names() == {model.module.hidden.weight: "hidden"}
    assert opt.optimizer.state[model.module.hidden.weight]["proj"].shape == (512, 128)
    assert not torch.equal(model.module.hidden.weight, start)


def test_a_scheduler_passed_to_setup_follows_the_swap_and_torch_does_not_warn():
    torch.manual_seed(0)
    model = loop.Stack()
    torch_opt, sched = loop.optimizer_and_scheduler(model)
    fabric = Fabric(strategy=LowRankFabricStrategy(**loop.OPTIONS), **ONE_DEVICE)
    model, opt, sched = fabric.setup(model, torch_opt, scheduler=sched)
    assert sched.optimizer is opt.optimizer  # rebound: the LR stays right across optimizer.load_state_dict
    assert opt.optimizer.param_groups[0] is torch_opt.param_groups[0]  # the same group dicts
    batch = next(iter(torch.utils.data.DataLoader(loop.data(), batch_size=loop.BATCH)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "Detected call of `lr_scheduler.step()` before `optimizer.step()`"
        for _ in range(4):
            fabric.backward(loop.loss(model, batch))
            opt.step()
            opt.zero_grad()
            sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.8**2)


def test_setup_module_then_setup_optimizers_equals_setup():
    model, _, _ = _one_device()
    fabric = Fabric(strategy=LowRankFabricStrategy(**loop.OPTIONS), **ONE_DEVICE)
    separate, opt = loop.fit(fabric, fsdp=True)  # fabric.setup_module, then the optimizer, then setup_optimizers
    assert isinstance(opt.optimizer, ProjectedOptimizer)
    _assert_params_close(dict(loop.params(model)), separate, atol=0)


@pytest.mark.parametrize(
    ("make", "options"),
    [
        (lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), {}),
        # an SVD P costs more than Adafactor's factored state saves: a seed (random projector) saves
        (lambda m: torch.optim.Adafactor(m.parameters(), lr=0.05), {"projector": "random"}),
        (lambda m: torch.optim.Muon([m.inp.weight, m.hidden.weight], lr=0.02), {}),
    ],
    ids=["SGD", "Adafactor", "Muon"],
)
def test_each_supported_optimizer_is_projected(make, options):
    torch.manual_seed(0)
    model = loop.Stack()
    torch_opt = make(model)
    fabric = Fabric(strategy=LowRankFabricStrategy(rank=4, **options), **ONE_DEVICE)
    model, opt = fabric.setup(model, torch_opt)
    assert isinstance(opt.optimizer, ProjectedOptimizer) and type(opt.optimizer).__name__ == type(torch_opt).__name__
    fabric.backward(loop.loss(model, loop.data(16)[:]))
    opt.step()
    assert opt.optimizer.projected_params()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_memory_report_after_steps():
    _, _, fabric = _one_device()
    report = fabric.strategy.memory_report()
    assert {layer.name for layer in report.layers} == {"inp", "hidden"}
    assert all(layer.rank == 4 for layer in report.layers)
    assert report.baseline_state_bytes - report.optimizer_state_bytes > 0  # a positive saving
    console = Console(file=io.StringIO(), width=100)
    render_memory_report(report, console)
    assert "hidden" in console.file.getvalue()
    assert fabric.strategy.print_memory_report().layers == report.layers  # printed on rank 0, and returned
    with pytest.raises(RuntimeError, match="exists once fabric.setup"):
        LowRankFabricStrategy(rank=4).memory_report()


def test_an_unsupported_optimizer_gives_the_trainers_type_error():
    class RMSpropStack(loop.Stack):
        def configure_optimizers(self):
            return torch.optim.RMSprop(self.parameters(), lr=1e-3)

    trainer = L.Trainer(accelerator="cpu", strategy=LowRankStrategy(rank=4), max_steps=1, **QUIET)
    with pytest.raises(TypeError) as from_trainer:
        trainer.fit(RMSpropStack())
    model = loop.Stack()
    fabric = Fabric(strategy=LowRankFabricStrategy(rank=4), **ONE_DEVICE)
    with pytest.raises(TypeError) as from_fabric:
        fabric.setup(model, torch.optim.RMSprop(model.parameters(), lr=1e-3))
    assert str(from_fabric.value) == str(from_trainer.value)
    assert "lightning_lowrank can project torch.optim.AdamW" in str(from_fabric.value)
    # fallback="dense" keeps it, with a warning
    model = loop.Stack()
    fabric = Fabric(strategy=LowRankFabricStrategy(rank=4, fallback="dense"), **ONE_DEVICE)
    with pytest.warns(UserWarning, match="RMSprop cannot be projected"):
        _, opt = fabric.setup(model, torch.optim.RMSprop(model.parameters(), lr=1e-3))
    assert type(opt.optimizer) is torch.optim.RMSprop


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: LowRankFabricStrategy(rank=0), ValueError, "rank must be a positive int"),
        (lambda: LowRankFabricStrategy(projector="pca"), ValueError, "projector"),
        (lambda: LowRankFabricStrategy(rnak=4), TypeError, "Did you mean 'rank'"),
        (lambda: LowRankFabricStrategy(fallback="skip"), ValueError, "fallback must be"),
        (lambda: LowRankFabricStrategy(layerwise=True), ValueError, "layer-wise updates need to know"),
        (lambda: LowRankFabricStrategy(memory_report=True), ValueError, "no end of training"),
        (lambda: LowRankFabricStrategy(preconditioner="lazy_hessian"), ValueError, "CurvatureProbe"),
        (lambda: LowRankFabricDDPStrategy(find_unused=True), ValueError, "find_unused_parameters"),
        (lambda: LowRankFabricDDPStrategy(low_rank_comm="yes"), ValueError, "must be True or False"),
        (lambda: LowRankFabricDDPStrategy(low_rank_comm=True, residual="fira"), ValueError, "low_rank_comm"),
        (lambda: LowRankFabricFSDPStrategy(side="left"), ValueError, "side='left'"),
        (lambda: LowRankFabricFSDPStrategy(state_bits=8), ValueError, "state_bits"),
        (lambda: LowRankFabricFSDPStrategy(tensor_parallel_size=2), ValueError, "tensor parallelism"),
        (lambda: LowRankFabricFSDPStrategy(rnak=4), TypeError, "Did you mean 'rank'"),
        (lambda: Fabric(strategy="lowrank", accelerator="cpu", devices=2), ValueError, "runs on one device"),
    ],
)
def test_a_bad_option_raises_at_construction(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_an_off_trainer_only_option_is_accepted():
    strategy = LowRankFabricStrategy(rank=4, memory_report=False, memory_json=False, layerwise=False)
    assert strategy.lowrank_config.rank == 4


def test_setup_optimizers_before_a_module_raises():
    fabric = Fabric(strategy=LowRankFabricStrategy(rank=4), **ONE_DEVICE)
    with pytest.raises(RuntimeError, match="set it up first"):
        fabric.setup_optimizers(torch.optim.AdamW(loop.Stack().parameters()))


def test_a_checkpoint_resumes_the_projected_state(tmp_path):
    def steps(fabric, model, opt, n, first):
        for i in range(first, first + n):
            batch = loop.data()[i * 8 : i * 8 + 8]
            fabric.backward(loop.loss(model, batch))
            opt.step()
            opt.zero_grad()

    def setup():
        torch.manual_seed(0)
        fabric = Fabric(strategy=LowRankFabricStrategy(**loop.OPTIONS), **ONE_DEVICE)
        model = loop.Stack()
        return (fabric, *fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=1e-2)))

    fabric, straight, opt = setup()
    steps(fabric, straight, opt, 8, 0)
    fabric, model, opt = setup()
    steps(fabric, model, opt, 4, 0)
    fabric.save(tmp_path / "half.ckpt", {"model": model, "optimizer": opt})
    fabric, resumed, opt = setup()
    fabric.load(tmp_path / "half.ckpt", {"model": resumed, "optimizer": opt})
    steps(fabric, resumed, opt, 4, 4)
    _assert_params_close(dict(loop.params(straight)), resumed, atol=0)  # bit for bit


@pytest.mark.skipif(sys.platform == "win32", reason="fork start method")
@pytest.mark.parametrize("low_rank_comm", [False, True])
def test_two_fork_processes_agree_and_equal_one_device(tmp_path, low_rank_comm):
    strategy = LowRankFabricDDPStrategy(**loop.OPTIONS, start_method="fork", timeout=HANG, low_rank_comm=low_rank_comm)
    Fabric(strategy=strategy, accelerator="cpu", devices=2).launch(loop.run, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), name
    model, _, _ = _one_device()
    _assert_params_close(r0["params"], model, atol=1e-5)  # measured: <= 1.8e-7
    if low_rank_comm:  # refreshes (steps 0, 3, 6) in full; the other 5 steps send the projected gradients
        sent = [s for s, _ in r0["comm"]]
        assert len(sent) == 8 and sum(s < f for s, f in r0["comm"]) == 5 and min(sent) < max(sent)
    else:
        assert r0["comm"] == []


@pytest.fixture(scope="module")
def popen_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fabric_popen")
    script = ROOT / "tests" / "fabric" / "fabric_two_processes.py"
    subprocess.run([sys.executable, str(script), str(out)], check=True, cwd=ROOT, timeout=300)
    return out


@pytest.mark.skipif(sys.platform == "win32", reason="gloo workers")
def test_lowrank_ddp_by_name_ends_with_identical_parameters(popen_runs):
    r0, r1 = (torch.load(popen_runs / "ddp" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), name
    torch.manual_seed(0)
    assert not torch.equal(r0["params"]["hidden.weight"], loop.Stack(512).hidden.weight)  # it trained
    assert r0["saving"] > 0  # hidden (512 x 512) at the default rank 128


@pytest.mark.skipif(sys.platform == "win32", reason="gloo workers")
def test_lowrank_fsdp_equals_one_device_and_shards_the_state(popen_runs):
    for r in (0, 1):
        assert "holds none of the new ones" in (popen_runs / "fsdp" / f"refused{r}.txt").read_text()
    r0, r1 = (torch.load(popen_runs / "fsdp" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(p, r1["params"][n]) for n, p in r0["params"].items())
    model, _, fabric = _one_device(side="right")
    _assert_params_close(r0["params"], model, atol=1e-5)  # measured: <= 1.8e-7
    one = fabric.strategy.memory_report().optimizer_state_bytes
    assert r0["state_bytes"] < 0.6 * one  # each rank holds about half the rows of every moment
    assert r0["total_state_bytes"] == r0["state_bytes"] + r1["state_bytes"]
