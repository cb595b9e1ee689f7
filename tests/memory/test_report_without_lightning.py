"""Issue 28: the memory report of a plain PyTorch loop (``lightning_lowrank.memory_report``), frozen layers counted
apart, and the shared DCT bases shown on a line of their own."""

import io
from dataclasses import replace

import lightning as L
import torch
from rich.console import Console
from torch import nn

import lightning_lowrank
from lightning_lowrank import LowRankStrategy, ProjectedAdamW, render_memory_report
from lightning_lowrank.memory.figures import format_bytes
from lightning_lowrank.memory.report import SHARED_LABEL
from tests.models import QUIET, TinyNet


def _text(report, width=100, **options):
    console = Console(file=io.StringIO(), width=width)
    render_memory_report(report, console, **options)
    return console.file.getvalue()


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.LayerNorm(16), nn.Linear(16, 4))


def _step(model, opt, steps=1):
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 16)).square().mean().backward()
        opt.step()


def _projected_adamw(model, **options):
    weights = [model[0].weight, model[2].weight]
    rest = [p for p in model.parameters() if all(p is not w for w in weights)]
    return ProjectedAdamW([{"params": weights, "rank": 4, **options}, {"params": rest, "rank": None}], lr=1e-3)


def test_memory_report_of_a_plain_pytorch_loop_names_layers_by_their_module():
    model = _mlp()
    opt = _projected_adamw(model)
    _step(model, opt)
    report = lightning_lowrank.memory_report(opt, model)
    assert {layer.name: layer.shape for layer in report.layers} == {"0": (32, 16), "2": (16, 32)}
    assert report.cpu_max_rss_bytes is not None
    assert report == lightning_lowrank.memory_report([opt], model)  # one optimizer, or a list of them
    text = _text(report)
    rows = {line.split()[0]: line for line in text.splitlines() if line.split() and line.split()[0] in ("0", "2")}
    assert "32x16" in rows["0"] and "16x32" in rows["2"] and " 4 " in rows["0"]  # shapes and ranks, no blanks
    assert "?" not in text


def test_memory_report_without_lightning_equals_the_strategys():
    torch.manual_seed(0)
    model = TinyNet(scheduler=None)
    trainer = L.Trainer(strategy=LowRankStrategy(rank=4, memory_report=False, memory_json=False), max_steps=2, **QUIET)
    trainer.fit(model)
    ours = lightning_lowrank.memory_report(trainer.optimizers, model)
    strategys = trainer.strategy.memory_report()
    assert replace(ours, cpu_max_rss_bytes=None) == replace(strategys, cpu_max_rss_bytes=None)
    assert ours.optimizer_state_bytes > 0 and [layer.name for layer in ours.layers] == ["attn", "mlp"]


class HalfFrozen(TinyNet):
    """A fine-tuning run: the embedding and the attention block frozen, the MLP, norm and head trained."""

    def __init__(self):
        super().__init__(scheduler=None)
        self.extra = nn.Linear(self.attn.out_features, self.attn.out_features)
        for module in (self.embed, self.attn, self.extra):
            module.requires_grad_(False)


def test_frozen_layers_are_counted_apart_and_the_counts_agree():
    torch.manual_seed(0)
    model = HalfFrozen()
    trainer = L.Trainer(strategy=LowRankStrategy(rank=4, memory_report=False, memory_json=False), max_steps=1, **QUIET)
    trainer.fit(model)
    report = trainer.strategy.memory_report()
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    assert report.frozen_param_bytes == frozen
    assert report.grad_bytes == report.param_bytes - frozen  # gradients: the trainable parameters only
    assert {m.name for m in report.modules if m.frozen} == {"embed", "attn", "extra"}
    text = _text(report, width=120)
    assert f"Parameters: {format_bytes(report.param_bytes)} ({format_bytes(frozen)} frozen)" in text
    assert "Low-rank optimizer memory: 3 layers (and 3 frozen, not listed)" in text
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("By module group"))
    assert lines[start + 1].split()[:4] == ["Group", "Layers", "Frozen", "Projected"]
    groups = [line.split() for line in lines[start + 3 :] if line.strip()][: len(report.groups)]
    assert sum(int(row[1]) for row in groups) == 3  # as the title says: the trainable layers
    assert sum(int(row[2]) for row in groups) == 3  # and the frozen ones
    assert report.as_dict()["frozen_param_bytes"] == frozen


def test_shared_dct_bases_have_a_line_of_their_own_and_the_rows_add_up():
    model = _mlp()
    opt = _projected_adamw(model, projector="dct", dct_scorer="matmul")
    _step(model, opt)
    report = lightning_lowrank.memory_report(opt, model)
    shared = report.shared_basis_bytes
    assert shared == sum(b.numel() * b.element_size() for b in opt.dct_bases().values()) > 0
    # The per-layer (per-module) rows and the shared bases' line are the whole optimizer state.
    assert sum(m.state_bytes for m in report.modules) + shared == report.optimizer_state_bytes
    assert sum(g.state_bytes for g in report.groups) + shared == report.optimizer_state_bytes
    text = _text(report, width=120)
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Optimizer state by kind"))
    kinds = {}
    for line in lines[start + 3 :]:
        if not line.strip():
            break
        label, figures = line.split("  ", 1)
        kinds[label] = figures
    assert format_bytes(shared) in kinds[SHARED_LABEL]
    assert format_bytes(report.state_by_kind["projection"] - shared) in kinds["projection (P, indices, seeds)"]
    note = f"State leaves out the shared DCT bases: {format_bytes(shared)}"
    assert text.count(note) == 1 and text.index(note) < text.index("By module group")  # under the layer table
    assert note in _text(report, width=120, collapse=True)  # or under the groups, which stand for it
