"""The report tells the truth: negative savings, SGD without momentum, 80 columns, quiet loggers, skipped steps."""

import io
import warnings

import lightning as L
import pytest
import rich
import torch
from rich.console import Console
from torch import nn

from lightning_lowrank import LowRankStrategy, ProjectedOptimizer, SubspaceRefresh, plan
from lightning_lowrank.__main__ import main
from lightning_lowrank.memory import MemoryReport, account_memory, render_memory_report
from lightning_lowrank.memory.figures import ModuleMemory, empty_kinds
from tests.memory.test_memory_report import ManyLinear
from tests.models import QUIET, RecordingLogger, TinyNet

# TinyNet's parameter tensors and their numbers of elements, written out here.
TINY_NUMELS = {
    "embed.weight": 32 * 24,
    "attn.weight": 40 * 24,
    "attn.bias": 40,
    "mlp.weight": 24 * 40,
    "mlp.bias": 24,
    "norm.weight": 24,
    "norm.bias": 24,
    "lm_head.weight": 32 * 24,
    "lm_head.bias": 32,
}
STEP = 4  # a float32 step counter


def _text(report_or_plan, width=80, **kwargs):
    console = Console(file=io.StringIO(), width=width)
    if isinstance(report_or_plan, MemoryReport):
        render_memory_report(report_or_plan, console, **kwargs)
    else:
        report_or_plan.render(console, **kwargs)
    text = console.file.getvalue()
    assert all(len(line) <= width for line in text.splitlines()), text
    return text


class PlainSGD(TinyNet):
    def __init__(self, momentum=0.0):
        super().__init__(scheduler=None)
        self.momentum = momentum

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=self.momentum)


# ---- SGD without momentum ----------------------------------------------------------------------------------------


def test_sgd_without_momentum_keeps_its_weights_dense_and_says_why_at_setup():
    model = TinyNet()
    names = {model.attn.weight: "attn", model.mlp.weight: "mlp"}
    with pytest.warns(UserWarning, match="SGD without momentum keeps no optimizer state") as record:
        opt = ProjectedOptimizer.from_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), names, rank=4)
    message = str(record[0].message)
    assert "attn (40, 24)" in message and "mlp (24, 40)" in message and "momentum > 0" in message
    assert opt.kept_dense == [model.attn.weight, model.mlp.weight] and opt.projected_params() == []
    with warnings.catch_warnings():  # with momentum there is a buffer to shrink: projected, no warning
        warnings.simplefilter("error")
        opt = ProjectedOptimizer.from_optimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), names)
    assert opt.kept_dense == [] and set(opt.projected_params()) == set(names)


def test_sgd_without_momentum_holds_what_torch_sgd_holds_nothing():
    """Kept dense, momentum-free SGD keeps no state at all, not even a step counter, as torch.optim.SGD: the report
    says saving 0 against SGD's 0 B, without a percentage of nothing, and warns of no negative saving."""
    torch.manual_seed(0)
    strategy = LowRankStrategy(rank=4, memory_report=False, memory_json=False)
    with pytest.warns(UserWarning, match="SGD without momentum"):
        trainer = L.Trainer(strategy=strategy, max_steps=2, **QUIET)
        trainer.fit(PlainSGD())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no negative-saving warning
        report = strategy.memory_report()
    assert report.layers == () and report.projector_bytes == 0 and report.baseline_state_bytes == 0
    assert report.optimizer_state_bytes == 0 and report.saving_bytes == 0
    assert all(not s for s in trainer.optimizers[0].state.values())
    text = _text(report)
    assert "Saving vs SGD: 0 B (dense SGD holds no state)" in text and "(0.0%)" not in text
    assert report.as_dict()["saving_percent"] is None  # a share of 0 B is undefined, not 0.0


def test_dense_sgd_without_momentum_steps_as_torch_sgd():
    """With no state to keep, the update is still torch's SGD, weight decay included."""
    torch.manual_seed(0)
    ours_model, ref_model = PlainSGD(), PlainSGD()
    ref_model.load_state_dict(ours_model.state_dict())
    with pytest.warns(UserWarning, match="SGD without momentum"):
        ours = ProjectedOptimizer.from_optimizer(
            torch.optim.SGD(ours_model.parameters(), lr=0.1, weight_decay=0.01), lambda p: p.ndim == 2, rank=4
        )
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.1, weight_decay=0.01)
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        for p, q in zip(ours_model.parameters(), ref_model.parameters()):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        ours.step()
        ref.step()
    for p, q in zip(ours_model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert all(not s for s in ours.state.values()) and ours.completed_steps(ours_model.attn.weight) == 0


# ---- a negative saving is shown negative ------------------------------------------------------------------------


def test_a_negative_saving_is_shown_negative_and_names_the_layers():
    # rank 20 on 40x24 and 24x40: P (24 x 20) + moments (20 x 40) x 2 + a step, against AdamW's 2 x 960 + a step.
    layer_state = 24 * 20 * 4 + 2 * 20 * 40 * 4 + STEP
    layer_dense = 2 * 960 * 4 + STEP
    assert layer_state - layer_dense == 640
    with pytest.warns(UserWarning, match=r"2 layer\(s\) hold more optimizer state than dense AdamW") as record:
        report = plan(TinyNet(scheduler=None), rank=20).report
    assert "attn (rank 20, svd)" in str(record[0].message) and "mlp (rank 20, svd)" in str(record[0].message)
    baseline = sum(2 * 4 * n + STEP for n in TINY_NUMELS.values())
    assert report.baseline_state_bytes == baseline and report.saving_bytes == -2 * 640
    assert report.costly_layers() == ["attn", "mlp"]
    percent = 100 * -1280 / baseline
    text = _text(report)
    assert f"Saving vs AdamW: -1.25 KiB ({percent:.1f}%; more than dense AdamW holds)" in text
    assert "costing more than dense AdamW: 2 layer(s): attn, mlp" in text
    assert report.as_dict()["costly_layers"] == ["attn", "mlp"]


# ---- 80 columns ---------------------------------------------------------------------------------------------------


class LongNames(nn.Module):
    """LLaMA-7B-sized layers under HF-style names (``model.layers.11.mlp.gate_proj``), on the meta device."""

    def __init__(self, n=12, hidden=4096, inter=11008):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList()
        for _ in range(n):
            layer = nn.Module()
            layer.self_attn = nn.Module()
            layer.mlp = nn.Module()
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(layer.self_attn, name, nn.Linear(hidden, hidden, bias=False, device="meta"))
            layer.mlp.gate_proj = nn.Linear(hidden, inter, bias=False, device="meta")
            layer.mlp.up_proj = nn.Linear(hidden, inter, bias=False, device="meta")
            layer.mlp.down_proj = nn.Linear(inter, hidden, bias=False, device="meta")
            layer.post_attention_layernorm = nn.LayerNorm(hidden, device="meta")
            self.model.layers.append(layer)


def test_long_names_are_cut_in_the_middle_keeping_the_layer_index_and_leaf():
    report = plan(LongNames(), rank=1024, dtype="bf16").report
    lines = _text(report, collapse=False).splitlines()
    table = lines[3 : next(i for i, line in enumerate(lines) if line.startswith("By module group")) - 1]
    leaves = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj")
    leaves += ("mlp.up_proj", "mlp.down_proj", "post_attention_layernorm")
    names = [f"model.layers.{i}.{leaf}" for i in range(12) for leaf in leaves]
    assert len(table) == len(names)
    for name, line in zip(names, table):
        cell, index = line.split()[0], name.split(".")[2]
        # whole, or cut in the middle: the layer's index right after an ellipsis, and the name's end
        assert cell == name or (f"…{index}." in cell and cell.endswith(name[-6:])), (name, cell)
    cells = [line.split()[0] for line in table]
    assert "model.la…11.mlp.gate_proj" in cells and "…11.post_atten…_layernorm" in cells


def test_group_labels_are_never_cut_at_80_columns():
    """Wide figures and a long baseline name (Adafactor): the bar gives way, the labels stay whole."""
    gib = 2**30
    kinds = empty_kinds()
    kinds["projected_moments"] = int(11.25 * gib)  # every figure as wide as format_bytes makes it: "11.25 GiB"
    modules = tuple(
        ModuleMemory(name, group, "Linear", int(12.5 * gib), kinds, int(13.75 * gib), projected=1000, rank=1024)
        for name, group in (("a", "attention"), ("m", "mlp"), ("e", "embeddings"), ("o", "other"))
    )
    report = MemoryReport(
        layers=(),
        param_bytes=50 * gib,
        grad_bytes=0,
        dense_state_bytes=0,
        projected_state_bytes=45 * gib,
        projector_bytes=0,
        shared_basis_bytes=0,
        baseline_state_bytes=55 * gib,
        baseline="Adafactor",
        modules=modules,
    )
    text = _text(report, collapse=True)
    for label in ("Attention", "MLP", "Embeddings", "Other"):
        assert any(line.startswith(label + " ") for line in text.splitlines()), label


def test_the_planner_wraps_its_lines_at_80_columns(monkeypatch, capsys):
    console = Console(file=io.StringIO(), width=80)
    monkeypatch.setattr(rich, "_console", console)  # what rich's get_console() returns
    assert main(["plan", "--preset", "60M", "--rank", "128", "--gpu", "8"]) == 0
    text = console.file.getvalue()
    assert "Activations, temporary buffers" in text and "Fits a 8.00 GiB GPU?" in text
    assert max(len(line) for line in text.splitlines()) <= 80
    assert all(len(line) <= 80 for line in capsys.readouterr().out.splitlines())


# ---- quiet loggers --------------------------------------------------------------------------------------------------

HEADLINE = {
    "param_bytes",
    "grad_bytes",
    "optimizer_state_bytes",
    "dense_state_bytes",
    "projected_state_bytes",
    "projector_bytes",
    "baseline_state_bytes",
    "saving_bytes",
    "saving_percent",
    "quantization_saving_bytes",
    "nonfinite_steps",
    "cpu_max_rss_bytes",
    *(f"state/{kind}_bytes" for kind in ("dense_moments", "projected_moments", "projection", "residual")),
    *(f"state/{kind}_bytes" for kind in ("curvature", "scalars", "protected_bases")),
}


class Blocks(L.LightningModule):
    """``n`` transformer-like blocks: attention q/k/v/o, MLP gate/up/down, two norms (9 modules a block)."""

    def __init__(self, n, width=8):
        super().__init__()
        self.blocks = nn.ModuleList()
        for _ in range(n):
            block = nn.Module()
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(block, name, nn.Linear(width, width))
            block.gate_proj, block.up_proj = nn.Linear(width, 2 * width), nn.Linear(width, 2 * width)
            block.down_proj = nn.Linear(2 * width, width)
            block.norm1, block.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
            self.blocks.append(block)
        self.x = torch.randn(4, width, generator=torch.Generator().manual_seed(0))

    def training_step(self, batch, batch_idx):
        (x,) = batch
        for b in self.blocks:
            h = b.norm1(x)
            x = x + b.o_proj(b.q_proj(h) + b.k_proj(h) + b.v_proj(h))
            h = b.norm2(x)
            x = x + b.down_proj(torch.relu(b.gate_proj(h)) * b.up_proj(h))
        return x.pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.x), batch_size=4)


def _logged(model, callbacks=(), **options):
    torch.manual_seed(0)
    logger = RecordingLogger()
    strategy = LowRankStrategy(rank=2, memory_report=False, memory_json=False, **options)
    trainer = L.Trainer(strategy=strategy, max_steps=2, callbacks=list(callbacks), **{**QUIET, "logger": logger})
    trainer.fit(model)
    return {k[len("lowrank/") :]: v for k, v in logger.metrics.items() if k.startswith("lowrank/")}


def _groups(*names):
    return {f"group/{g}/{figure}_bytes" for g in names for figure in ("param", "state", "baseline")}


def test_loggers_get_headline_and_group_totals_whatever_the_depth():
    mlp56 = _logged(ManyLinear(56))
    assert set(mlp56) == HEADLINE | _groups("other")  # ManyLinear's "layers.i" are all "other"
    assert set(_logged(ManyLinear(8))) == set(mlp56)  # the depth adds no column
    assert mlp56["group/other/param_bytes"] == 56 * (6 * 6 + 6) * 4
    blocks14 = _logged(Blocks(14))
    assert set(blocks14) == HEADLINE | _groups("attention", "mlp", "other")
    assert len(blocks14) <= 40 and set(_logged(Blocks(2))) == set(blocks14)
    # the attention group: 4 Linear(8, 8) a block, params 72 each
    assert blocks14["group/attention/param_bytes"] == 14 * 4 * 72 * 4


def test_log_layers_restores_the_per_layer_columns():
    logged = _logged(ManyLinear(56), log_layers=True)
    assert len(logged) > 3 * 56
    for i in (0, 55):
        assert logged[f"module/layers.{i}/param_bytes"] == (6 * 6 + 6) * 4
    assert "log_layers" in LowRankStrategy.__init__.__signature__.parameters  # LightningCLI sees it


def test_subspace_refresh_logs_no_column_per_layer():
    logged = _logged(ManyLinear(56), callbacks=[SubspaceRefresh(every=1)])
    assert not any("layers." in key for key in logged)
    assert len(logged) <= 40
    assert logged["refresh/total"] > 0 and "refresh/seconds" in logged  # the report's totals, not per layer


# ---- skipped non-finite steps ---------------------------------------------------------------------------------------


def test_skipped_nonfinite_steps_are_counted_shown_and_logged():
    model = nn.Linear(4, 4)
    opt = ProjectedOptimizer.from_optimizer(torch.optim.AdamW(model.parameters()), {model.weight: "w"}, rank=2)
    for _ in range(2):
        model.weight.grad = torch.full((4, 4), float("nan"))
        model.bias.grad = torch.zeros(4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step()
    other = ProjectedOptimizer.from_optimizer(torch.optim.AdamW(nn.Linear(2, 2).parameters()), {}, rank=1)
    other.nonfinite_steps = 1
    no_counter = torch.optim.SGD(nn.Linear(2, 2).parameters())  # a foreign optimizer counts nothing
    report = account_memory([opt, other, no_counter], model.parameters(), {model.weight: "w"})
    assert report.nonfinite_steps == 2 + 1
    assert "Non-finite steps skipped: 3" in _text(report)
    assert report.as_dict()["nonfinite_steps"] == 3
    assert report.as_metrics()["lowrank/nonfinite_steps"] == 3.0
    assert "Non-finite" not in _text(account_memory([ProjectedOptimizer(nn.Linear(2, 2).parameters())], [], {}))


# ---- the planner's layer-wise mode ----------------------------------------------------------------------------------


def test_layerwise_plan_counts_the_largest_single_gradient():
    model = TinyNet(scheduler=None)
    largest = 40 * 24 * 4  # attn.weight and mlp.weight, float32
    assert max(TINY_NUMELS.values()) * 4 == largest
    whole = plan(model, rank=4)
    layerwise = plan(model, rank=4, layerwise=True)
    assert whole.report.grad_bytes == sum(TINY_NUMELS.values()) * 4
    assert layerwise.report.grad_bytes == largest and layerwise.report.layerwise
    assert layerwise.report.optimizer_state_bytes == whole.report.optimizer_state_bytes  # the same state
    assert "Gradients: 3.75 KiB (layer-wise: the largest single one)" in _text(layerwise)
    # The strategy's layer-wise run measures the same figures, and its memory_plan plans them.
    strategy = LowRankStrategy(rank=4, layerwise=True, memory_report=False, memory_json=False, memory_plan=True)
    L.Trainer(strategy=strategy, max_steps=1, **QUIET).fit(TinyNet(scheduler=None))
    measured = strategy.memory_report()
    assert measured.grad_bytes == largest and strategy.planned.report.grad_bytes == largest
    assert measured.layers == layerwise.report.layers
    with pytest.raises(ValueError, match="layerwise=True does not support memory_budget"):
        plan(model, rank=4, layerwise=True, memory_budget=10**6)


def test_galore_7b_layerwise_8bit_plan_fits_24_gib():
    """GaLore's 7B setup: bf16 weights, rank 1024, 8-bit state, per-layer updates."""
    result = plan("7B", rank=1024, state_bits=8, dtype="bf16", layerwise=True, gpu_gib=24)
    report = result.report
    n_params = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096) + 2 * 32000 * 4096 + 4096
    assert report.param_bytes == 2 * n_params
    assert report.grad_bytes == 32000 * 4096 * 2  # the embedding (or the LM head) in bf16
    assert result.lowrank_bytes == 2 * n_params + 32000 * 4096 * 2 + report.optimizer_state_bytes
    assert result.fits and not result.fits_dense
    assert not plan("7B", rank=1024, state_bits=8, dtype="bf16", gpu_gib=24).fits  # all gradients at once
    assert "with low-rank state, layer-wise" in "\n".join(result.verdict())


def test_cli_plans_layerwise(capsys):
    assert main(["plan", "--preset", "60M", "--rank", "128", "--layerwise"]) == 0
    out = capsys.readouterr().out
    assert "largest single" in out and "layer-wise" in out


def test_protected_bases_are_their_own_kind_and_no_negative_saving_warning():
    """With ProtectedSubspaces the bases can make the state larger than dense AdamW's: that is the price of
    protection, reported as its own kind, not a misconfigured low-rank state to warn about."""
    from lightning_lowrank import ProtectedSubspaces

    torch.manual_seed(0)
    trainer = L.Trainer(
        strategy=LowRankStrategy(rank=16, memory_report=False),  # near the smaller side: little saving to spend
        callbacks=[ProtectedSubspaces(ratio=0.5)],
        max_steps=2,
        **QUIET,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TinyNet(scheduler=None))
        report = trainer.strategy.memory_report()
    assert report.state_by_kind["protected_bases"] > 0
    assert report.saving_bytes + report.state_by_kind["protected_bases"] >= 0 > report.saving_bytes
    assert not [w for w in caught if "outweigh" in str(w.message) or "negative saving" in str(w.message)]
