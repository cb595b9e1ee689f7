"""The memory report: every figure from the tensors, by kind, per layer and per group; JSON; 80 columns; phases."""

import io
import json
from collections import defaultdict
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from rich.console import Console
from torch import nn

from lightning_lowrank import CurvatureProbe, LowRankStrategy, MemoryPhases
from lightning_lowrank.callbacks import memory_phases
from lightning_lowrank.memory import LayerMemory, MemoryReport, render_memory_report
from lightning_lowrank.memory.figures import format_bytes
from lightning_lowrank.memory.report import PHASE_LABELS
from lightning_lowrank.optim.state import storage
from tests.callbacks.test_probe_cost import FakeAllocator
from tests.models import QUIET, RecordingLogger, TinyNet

# The state keys the optimizer writes, by kind, written out here independently of the package's own table.
MOMENTS = {"exp_avg", "exp_avg_sq", "momentum_buffer", "row_var", "col_var", "variance", "sum_sq"}
MOMENTS |= {f"{k}{s}" for k in set(MOMENTS) for s in ("_codes", "_absmax", "_shape")}
CURVATURE = {"hessian", "hessian_codes", "hessian_absmax", "hessian_shape", "hessian_updates"}
CURVATURE |= {"curvature_trace", "residual_energy"}
RESIDUAL = {"residual_norm"}
SCALARS = {"step", "rank"}
# TinyNet's modules and the group each belongs to.
TINY_GROUPS = {"embed": "embeddings", "attn": "attention", "mlp": "mlp", "norm": "other", "lm_head": "other"}


def _kind(key, projected):
    if key.startswith("proj"):
        return "projection"
    if key in CURVATURE:
        return "curvature"
    if key in RESIDUAL:
        return "residual"
    if key in SCALARS:
        return "scalars"
    assert key in MOMENTS, f"a state key this test does not know: {key}"
    return "projected_moments" if projected else "dense_moments"


def _nbytes(t):
    return t.numel() * t.element_size()


def _expected(model, opt):
    """Bytes by kind, per projected weight, per module and per group, counted from opt.state here."""
    owner = {id(p): name for name, m in model.named_modules() for p in m.parameters(recurse=False)}
    totals, per_weight = defaultdict(int), {}
    per_module = defaultdict(lambda: defaultdict(int))
    baseline, params = defaultdict(int), defaultdict(int)
    for p in model.parameters():
        params[owner[id(p)]] += _nbytes(p)
    for p, state in opt.state.items():
        kinds = defaultdict(int)
        for key, t in state.items():
            kinds[_kind(key, opt.is_projected(p))] += _nbytes(t)
        for kind, n in kinds.items():
            totals[kind] += n
            per_module[owner[id(p)]][kind] += n
        baseline[owner[id(p)]] += 2 * _nbytes(p) + 4  # AdamW: two moments and a float32 step
        if opt.is_projected(p):
            per_weight[owner[id(p)]] = dict(kinds)
    totals["projection"] += sum(_nbytes(b) for b in opt.dct_bases().values())
    per_group = defaultdict(lambda: defaultdict(int))
    for name, kinds in per_module.items():
        for kind, n in kinds.items():
            per_group[TINY_GROUPS[name]][kind] += n
    return totals, per_weight, per_module, per_group, baseline, params


def _nonzero(kinds):
    return {k: n for k, n in kinds.items() if n}


RUNS = {
    "fira_dct": (dict(residual="fira", projector="dct"), []),
    "lazy_hessian": (
        dict(preconditioner="lazy_hessian"),
        [lambda: CurvatureProbe(every=1, estimators=("subspace_diagonal",), samples=1)],
    ),
    "8bit": (dict(state_bits=8), []),
    "budget": (dict(memory_budget=20000, rank_by="residual"), []),
    "8bit_lazy_hessian": (
        dict(state_bits=8, preconditioner="lazy_hessian"),
        [lambda: CurvatureProbe(every=1, estimators=("subspace_diagonal",), samples=1)],
    ),
}


@pytest.mark.parametrize("run", list(RUNS))
def test_every_figure_is_the_bytes_of_the_tensors(run, tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "MIN_QUANTIZED_NUMEL", 0)  # tiny tensors: quantize them anyway (see storage.py)
    options, callbacks = RUNS[run]
    torch.manual_seed(0)
    model = TinyNet(scheduler=None)
    strategy = LowRankStrategy(rank=4, update_gap=2, memory_report=False, **options)
    trainer = L.Trainer(
        strategy=strategy, max_steps=3, callbacks=[c() for c in callbacks], **{**QUIET, "default_root_dir": tmp_path}
    )
    trainer.fit(model)
    opt = trainer.optimizers[0]
    report = trainer.strategy.memory_report()
    totals, per_weight, per_module, per_group, baseline, params = _expected(model, opt)

    assert _nonzero(report.state_by_kind) == _nonzero(totals)
    assert sum(report.state_by_kind.values()) == report.optimizer_state_bytes == sum(totals.values())
    if run == "fira_dct":
        assert totals["residual"] == 2 * 4 and report.shared_basis_bytes == 24 * 24 * 4
    if "lazy_hessian" in run:
        assert totals["curvature"] > 0
    if run == "budget":
        assert all("rank" in opt.state[p] and "residual_energy" in opt.state[p] for p in opt.projected_params())
    if "8bit" in run:
        assert any("_codes" in k for s in opt.state.values() for k in s)
    # Per projected weight.
    assert {layer.name: _nonzero(layer.state_by_kind) for layer in report.layers} == {
        n: _nonzero(k) for n, k in per_weight.items()
    }
    for layer in report.layers:
        assert sum(layer.state_by_kind.values()) == layer.state_bytes
    # Per module (layer), in the model's order.
    assert [m.name for m in report.modules] == list(TINY_GROUPS)
    for m in report.modules:
        assert _nonzero(m.state_by_kind) == _nonzero(per_module[m.name]), m.name
        assert m.baseline_bytes == baseline[m.name] and m.param_bytes == params[m.name], m.name
        assert m.group == TINY_GROUPS[m.name] and m.projected == (m.name in ("attn", "mlp"))
    # Per group.
    groups = {g.name: g for g in report.groups}
    assert set(groups) == set(per_group)
    for name, g in groups.items():
        assert _nonzero(g.state_by_kind) == _nonzero(per_group[name]), name
        members = [m for m, group in TINY_GROUPS.items() if group == name]
        assert g.baseline_bytes == sum(baseline[m] for m in members)
        assert g.param_bytes == sum(params[m] for m in members)
    # Totals.
    assert report.baseline_state_bytes == sum(baseline.values())
    assert report.param_bytes == sum(params.values())
    assert report.cpu_max_rss_bytes > 0
    metrics = report.as_metrics()
    for kind, n in report.state_by_kind.items():
        assert metrics[f"lowrank/state/{kind}_bytes"] == n
    for name, g in groups.items():
        assert metrics[f"lowrank/group/{name}/state_bytes"] == g.state_bytes
    assert "lowrank/module/attn/state_bytes" not in metrics  # per module only with log_layers (as_metrics(layers=))
    assert report.as_metrics(layers=True)["lowrank/module/attn/state_bytes"] == report.modules[1].state_bytes


def test_json_file_holds_the_reports_numbers(tmp_path):
    torch.manual_seed(0)
    logger = RecordingLogger()  # a logger without a directory of its own: the file goes to default_root_dir
    trainer = L.Trainer(
        strategy=LowRankStrategy(rank=4, memory_report=False),
        max_steps=2,
        **{**QUIET, "default_root_dir": tmp_path, "logger": logger},
    )
    trainer.fit(TinyNet(scheduler=None))
    written = json.loads((tmp_path / "lowrank_memory.json").read_text())
    now = json.loads(json.dumps(trainer.strategy.memory_report().as_dict()))
    assert written.pop("cpu_max_rss_bytes") > 0
    now.pop("cpu_max_rss_bytes")  # the process may have grown since
    assert written == now
    assert written["optimizer_state_bytes"] == sum(written["state_by_kind"].values())
    assert [m["name"] for m in written["modules"]] == list(TINY_GROUPS)
    assert {g["name"] for g in written["groups"]} == {"attention", "mlp", "embeddings", "other"}
    assert [layer["name"] for layer in written["layers"]] == ["attn", "mlp"]
    # The logger got the same numbers.
    assert logger.metrics["lowrank/optimizer_state_bytes"] == written["optimizer_state_bytes"]
    for g in written["groups"]:
        assert logger.metrics[f"lowrank/group/{g['name']}/state_bytes"] == g["state_bytes"]
    for kind, n in written["state_by_kind"].items():
        assert logger.metrics[f"lowrank/state/{kind}_bytes"] == n


def test_json_goes_to_the_loggers_log_dir(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    torch.manual_seed(0)
    logger = CSVLogger(tmp_path / "logs")
    trainer = L.Trainer(
        strategy=LowRankStrategy(rank=4, memory_report=False),
        max_steps=1,
        **{**QUIET, "default_root_dir": tmp_path / "root", "logger": logger},
    )
    trainer.fit(TinyNet(scheduler=None))
    assert json.loads((tmp_path / "logs" / "lightning_logs" / "version_0" / "lowrank_memory.json").read_text())
    assert not (tmp_path / "root" / "lowrank_memory.json").exists()


def test_memory_json_false_writes_nothing(tmp_path):
    trainer = L.Trainer(
        strategy=LowRankStrategy(rank=4, memory_report=False, memory_json=False),
        max_steps=1,
        **{**QUIET, "default_root_dir": tmp_path},
    )
    trainer.fit(TinyNet(scheduler=None))
    assert not (tmp_path / "lowrank_memory.json").exists()


class ManyLinear(L.LightningModule):
    def __init__(self, n, width=6):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(n))
        self.x = torch.randn(4, width, generator=torch.Generator().manual_seed(0))

    def training_step(self, batch, batch_idx):
        (x,) = batch
        for layer in self.layers:
            x = layer(x)
        return x.pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.x), batch_size=4)


def _render(report, width=80, **kwargs):
    console = Console(file=io.StringIO(), width=width)
    render_memory_report(report, console, **kwargs)
    text = console.file.getvalue()
    too_long = [line for line in text.splitlines() if len(line) > width]
    assert not too_long, too_long
    return text


def _fit_report(model, tmp_path, rank):
    trainer = L.Trainer(
        strategy=LowRankStrategy(rank=rank, memory_report=False),
        max_steps=1,
        **{**QUIET, "default_root_dir": tmp_path},
    )
    trainer.fit(model)
    return trainer.strategy.memory_report()


def _assert_totals_shown(report, text):
    assert f"Optimizer state: {format_bytes(report.optimizer_state_bytes)}" in text
    assert f"Saving vs AdamW: {format_bytes(report.saving_bytes)} ({report.saving_percent:.1f}%)" in text
    for n in report.state_by_kind.values():
        if n:
            assert format_bytes(n) in text


def test_render_one_layer_fits_80_columns(tmp_path):
    torch.manual_seed(0)
    report = _fit_report(ManyLinear(1, width=12), tmp_path, rank=2)
    text = _render(report)
    assert "layers.0" in text and "12x12" in text and "Other" in text
    _assert_totals_shown(report, text)


def test_render_500_layers_collapses_to_groups(tmp_path):
    torch.manual_seed(0)
    report = _fit_report(ManyLinear(500), tmp_path, rank=2)
    assert len(report.modules) == 500 and len(report.layers) == 500
    text = _render(report)
    assert "layers.499" not in text and "shown by module group" in text and "500" in text
    assert len(text.splitlines()) < 60
    _assert_totals_shown(report, text)
    # Asked for, the full table fits too.
    text = _render(report, collapse=False)
    assert "layers.499" in text and "6x6" in text


def test_render_without_projected_layers(tmp_path):
    torch.manual_seed(0)
    report = _fit_report(TinyNet(scheduler=None), tmp_path, rank=30)  # rank >= every smaller side: all dense
    assert report.layers == () and report.projected_state_bytes == 0
    text = _render(report)
    assert "dense" in text and "Attention" in text and "Embeddings" in text
    _assert_totals_shown(report, text)


def test_render_a_report_built_by_hand_with_everything():
    """Long names keep their tail; phases, budget, refreshes and the probe all fit 80 columns."""
    name = "model.decoder.layers.11.self_attention.query_key_value"
    layer = LayerMemory(name, (12288, 4096), 1024, "online_pca/int8", 123456789, 4567890, 987654321, 12, 3, 4.5, 200)
    report = MemoryReport(
        layers=(layer,),
        param_bytes=10**10,
        grad_bytes=10**10,
        dense_state_bytes=10**9,
        projected_state_bytes=123456789 - 4567890,
        projector_bytes=4567890,
        shared_basis_bytes=0,
        baseline_state_bytes=2 * 10**9,
        peak_allocated_bytes=3 * 10**10,
        memory_budget=2 * 10**9,
        probe={"calls": 12.0, "seconds": 0.21, "extra_bytes": 1.5e6, "step_seconds": 0.07, "ratio": 3.0},
        phases={"forward": 1e10, "backward": 2e10, "optimizer_step": 1.2e10, "batch_end": 2.5e10, "samples": 4.0},
        cpu_max_rss_bytes=5 * 2**30,
    )
    text = _render(report)
    assert "self_attention.query_key_value" in text and "12288x4096" in text and "pca/i8" in text
    for label in ("forward", "backward", "optimizer step + refresh", "batch end (probe, callbacks)"):
        assert label in text
    assert "4 sampled steps" in text and format_bytes(2.5e10) in text
    assert "Subspace refreshes: 12 in 1 layers, 3 skipped, 4.500 s" in text
    assert "Process max RSS: 5.00 GiB" in text and "Peak CUDA allocated" in text
    assert "Curvature probe: 12 calls" in text
    _assert_totals_shown(report, text)


# ---- MemoryPhases -----------------------------------------------------------------------------------------------


class CountingAllocator(FakeAllocator):
    def install(self, monkeypatch):
        super().install(monkeypatch)
        self.resets = 0

        def reset(device=None):
            self.resets += 1
            self.peak = self.allocated

        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)

    def spike(self, n):
        """Allocate n bytes and free them again: the peak rises, what is allocated does not."""
        self.allocate(n)
        self.allocate(-n)


def test_memory_phases_records_each_phase_on_sampled_steps_only(monkeypatch):
    allocator = CountingAllocator(allocated=1000, peak=9000)  # the run peaked at 9000 before the callback
    allocator.install(monkeypatch)
    phases = MemoryPhases(every=2)
    trainer = SimpleNamespace(global_step=0, callbacks=[])
    module = SimpleNamespace(device=torch.device("cuda", 0))
    phases.on_train_start(trainer, module)
    for step in range(4):
        trainer.global_step = step
        phases.on_train_batch_start(trainer, module, None, step)
        allocator.spike(100 * (step + 1))  # forward
        phases.on_before_backward(trainer, module, None)
        allocator.spike(200 * (step + 1))  # backward
        phases.on_before_optimizer_step(trainer, module, None)
        allocator.spike(50 * (step + 1))  # optimizer step
        trainer.global_step = step + 1
        phases.on_train_batch_end(trainer, module, None, None, step)
        allocator.spike(400 * (step + 1))  # the curvature probe
    phases.on_train_end(trainer, module)
    # Sampled: the steps that end on a multiple of 2, i.e. those starting at global_step 1 and 3.
    assert [h["step"] for h in phases.history] == [1.0, 3.0]
    assert phases.history[0] == {
        "step": 1.0,
        "forward": 1200.0,
        "backward": 1400.0,
        "optimizer_step": 1100.0,
        "batch_end": 1800.0,
    }
    assert phases.phase_stats() == {
        "forward": 1400.0,
        "backward": 1800.0,
        "optimizer_step": 1200.0,
        "batch_end": 2600.0,
        "samples": 2.0,
    }
    assert allocator.resets == 8  # four phases on two sampled steps, none on the others
    assert phases.run_peak_allocated_bytes() == 9000  # the peak before the first reset is kept
    assert set(PHASE_LABELS) == set(memory_phases.PHASES)  # the report has a label for every phase it records


def test_memory_phases_does_nothing_without_cuda(monkeypatch, tmp_path):
    said = []
    monkeypatch.setattr(memory_phases, "rank_zero_info", said.append)
    phases = MemoryPhases(every=1)
    trainer = L.Trainer(
        strategy=LowRankStrategy(rank=4, memory_report=False),
        max_steps=3,
        callbacks=[phases],
        **{**QUIET, "default_root_dir": tmp_path},
    )
    trainer.fit(TinyNet(scheduler=None))
    assert len(said) == 1 and "not measured" in said[0]
    assert phases.phase_stats() is None and phases.history == [] and phases.run_peak_allocated_bytes() is None
    assert trainer.strategy.memory_report().phases is None


class Allocating(L.Callback):
    """Allocates in each phase (its hooks run after MemoryPhases', which puts itself first)."""

    def __init__(self, allocator):
        self.allocator = allocator

    def on_before_backward(self, trainer, pl_module, loss):
        self.allocator.spike(300)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.allocator.spike(50)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.allocator.spike(700)


def test_memory_phases_in_a_fit_and_the_report_keeps_the_run_peak(monkeypatch, tmp_path):
    allocator = CountingAllocator(allocated=1000, peak=5000)
    allocator.install(monkeypatch)
    phases = MemoryPhases(every=2)
    monkeypatch.setattr(phases, "_cuda_device", lambda pl_module: torch.device("cuda", 0))

    class Net(TinyNet):
        def training_step(self, batch, batch_idx):
            allocator.spike(100)
            return super().training_step(batch, batch_idx)

    trainer = L.Trainer(
        strategy=LowRankStrategy(rank=4, memory_report=False),
        max_steps=5,
        callbacks=[Allocating(allocator), phases],
        **{**QUIET, "default_root_dir": tmp_path},
    )
    trainer.fit(Net(scheduler=None))
    assert trainer.callbacks[0] is phases
    assert [h["step"] for h in phases.history] == [1.0, 3.0]
    assert phases.phase_stats() == {
        "forward": 1100.0,
        "backward": 1300.0,
        "optimizer_step": 1050.0,
        "batch_end": 1700.0,
        "samples": 2.0,
    }
    monkeypatch.setattr(LowRankStrategy, "root_device", property(lambda self: torch.device("cuda", 0)))
    report = trainer.strategy.memory_report()
    assert report.phases == phases.phase_stats()
    assert report.peak_allocated_bytes == 5000  # read before the first reset; the allocator alone says 1700
    assert report.as_metrics()["lowrank/phase/backward_peak_bytes"] == 1300.0
    assert "batch end (probe, callbacks)" in _render(report)


def test_memory_phases_rejects_a_bad_every():
    with pytest.raises(ValueError, match="every must be an int >= 1"):
        MemoryPhases(every=0)


def test_memory_report_before_fit_says_when_it_is_available():
    from lightning_lowrank import LowRankStrategy

    with pytest.raises(RuntimeError, match=r"once trainer.fit has set up the optimizers.*lightning_lowrank.plan"):
        LowRankStrategy(rank=4).memory_report()


def test_without_a_logger_the_json_is_written_only_where_asked(tmp_path, monkeypatch):
    """With logger=False Lightning writes nothing; the report follows (it wrote into the current directory)."""
    monkeypatch.chdir(tmp_path)
    for memory_json, written in (
        (True, None),
        (str(tmp_path / "out" / "report.json"), tmp_path / "out" / "report.json"),
    ):
        trainer = L.Trainer(
            strategy=LowRankStrategy(rank=4, memory_report=False, memory_json=memory_json),
            max_steps=1,
            **{**QUIET, "default_root_dir": tmp_path},
        )
        trainer.fit(TinyNet(scheduler=None))
        assert sorted(p.name for p in tmp_path.rglob("*.json")) == ([] if written is None else ["report.json"])
        if written is not None:
            assert json.loads(written.read_text())["optimizer_state_bytes"] > 0
