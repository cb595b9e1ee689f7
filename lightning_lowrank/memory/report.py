"""Draws a ``MemoryReport`` with rich, in the look of Lightning's ``RichModelSummary``, within 80 columns."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rich import box, get_console
from rich.console import Console
from rich.table import Table

from lightning_lowrank.memory.baseline import MAX_NAMED
from lightning_lowrank.memory.figures import KIND_LABELS, MemoryReport, format_bytes
from lightning_lowrank.memory.groups import GROUP_LABELS

MAX_LAYER_ROWS = 40  # more layers than this: the per-layer table is collapsed to module groups
BAR_WIDTH = 10
MIN_NAME = 24  # a name column narrower than this (or than its longest name) drops the bar column to make room
PHASE_LABELS = {
    "forward": "forward",
    "backward": "backward",
    "optimizer_step": "optimizer step + refresh",
    "batch_end": "batch end (probe, callbacks)",
}


def _or_dash(value: int | None) -> str:
    return "-" if value is None else str(value)


def probe_summary(probe: Mapping[str, float], cuda: bool) -> str:
    """One line such as ``12 calls, 0.210 s each (3.1x a training step), +1.20 MiB extra (peak)``.

    A figure is left out until it has been measured. On CUDA the extra memory is the allocator's peak rise during a
    probe; elsewhere it is a count of what the probe holds (see ``CurvatureProbe``)."""
    calls = int(probe.get("calls", 0))
    text = f"{calls} call{'' if calls == 1 else 's'}"
    if "seconds" in probe:
        text += f", {probe['seconds']:.3f} s each"
        if "ratio" in probe:
            text += f" ({probe['ratio']:.1f}x a training step)"
    if "extra_bytes" in probe:
        kind = "peak" if cuda else "saved for backward + kept results"
        text += f", +{format_bytes(probe['extra_bytes'])} extra ({kind})"
    return text


def render_memory_report(
    report: MemoryReport,
    console: Console | None = None,
    *,
    collapse: bool | None = None,
    max_layers: int = MAX_LAYER_ROWS,
    over_ranks: MemoryReport | None = None,
) -> None:
    """Print through rich's global console (or ``console``), like Lightning's own rich callbacks.

    Everything fits the console's width down to 80 columns: the bars give way first, then long layer names are cut
    in the middle, keeping the head and the distinguishing tail (``model.…3.self_attn.q_proj``).
    With more than ``max_layers`` layers, or ``collapse=True``, the per-layer table is left out and the module
    groups (attention, MLP, embeddings, other) stand for it; the groups, the split of the optimizer state by kind,
    the per-phase CUDA peaks (with a ``MemoryPhases`` callback) and the totals are always shown. Bars compare a
    row's optimizer state with what the module's own dense optimizer would hold (full bar: as much as it).
    ``over_ranks`` (FSDP2: ``sum_over_ranks`` of ``report``) adds the totals over all ranks below this rank's.
    """
    console = console or get_console()
    width = console.width
    ascii_only = not console.encoding.lower().startswith("utf")
    rows = _layer_rows(report)
    if collapse is None:
        collapse = len(rows) > max_layers
    base = _short_baseline(report.baseline)
    if rows and not collapse:
        cells = [
            [r.name, r.shape, r.rank, r.projector, format_bytes(r.state), format_bytes(r.baseline), r.bar, r.saving]
            for r in (row.with_bar(ascii_only) for row in rows)
        ]
        headers = ["Layer", "Shape", "Rank", "Proj.", "State", base, f"vs {base}", "Saving"]
        title = f"Low-rank optimizer memory: {len(rows)} layers{_scope(report)}"
        _print_table(console, title, headers, cells, width)
    elif rows:
        console.print(
            f"[bold]Low-rank optimizer memory[/]: {len(rows)} layers, shown by module group "
            f"({'asked for' if len(rows) <= max_layers else f'more than {max_layers}'}; every layer is in the JSON "
            "file, and in the logged metrics with log_layers=True)",
            width=width,
        )
    else:
        console.print("[bold]Low-rank optimizer memory[/]: no layer holds optimizer state yet", width=width)

    groups = report.groups
    if groups:
        cells = [
            [
                GROUP_LABELS.get(g.name, g.name),
                str(g.modules),
                str(g.projected),
                format_bytes(g.param_bytes),
                format_bytes(g.state_bytes),
                format_bytes(g.baseline_bytes),
                bar(g.state_bytes, g.baseline_bytes, ascii_only=ascii_only),
                _saving(g.state_bytes, g.baseline_bytes),
            ]
            for g in groups
        ]
        headers = ["Group", "Layers", "Projected", "Params", "State", base, f"vs {base}", "Saving"]
        _print_table(console, "By module group", headers, cells, width)

    kinds = {k: n for k, n in report.state_by_kind.items() if n}
    total = report.optimizer_state_bytes
    if kinds:
        cells = [
            [KIND_LABELS.get(k, k), format_bytes(n), bar(n, total, ascii_only=ascii_only), _percent(n, total, 1)]
            for k, n in kinds.items()
        ]
        _print_table(console, "Optimizer state by kind", ["Kind", "Bytes", "Share", "%"], cells, width)

    phases = {k: v for k, v in (report.phases or {}).items() if k in PHASE_LABELS}
    if phases:
        top = max(phases.values())
        cells = [[PHASE_LABELS[k], format_bytes(v), bar(v, top, ascii_only=ascii_only)] for k, v in phases.items()]
        samples = int((report.phases or {}).get("samples", 0))
        title = f"Peak CUDA allocated per phase ({samples} sampled step{'' if samples == 1 else 's'})"
        _print_table(console, title, ["Phase", "Peak", "vs largest"], cells, width)

    refresh_rows = [layer for layer in report.layers if layer.refreshes is not None]
    if refresh_rows and not collapse:
        cells = [
            [
                layer.name,
                _or_dash(layer.refreshes),
                _or_dash(layer.skipped),
                "-" if layer.refresh_seconds is None else f"{layer.refresh_seconds:.3f} s",
                _or_dash(layer.gap),
            ]
            for layer in refresh_rows
        ]
        _print_table(console, "Subspace refreshes", ["Layer", "Refreshes", "Skipped", "Time", "Gap"], cells, width)

    grid = Table.grid()
    grid.add_column()
    for label, value in summary_rows(report, over_ranks):
        grid.add_row(f"[bold]{label}[/]: {value}")
    console.print(grid, width=width)


def summary_rows(report: MemoryReport, over_ranks: MemoryReport | None = None) -> list[tuple[str, str]]:
    """The totals below the tables, as (label, value); under FSDP2 first whose bytes they are, and last, with
    ``over_ranks``, the totals over all ranks."""
    rows = _ranks_rows(report)
    rows += [
        ("Parameters", format_bytes(report.param_bytes)),
        (
            "Gradients",
            format_bytes(report.grad_bytes) + (" (layer-wise: the largest single one)" if report.layerwise else ""),
        ),
        ("Optimizer state", format_bytes(report.optimizer_state_bytes)),
        ("  dense part", format_bytes(report.dense_state_bytes)),
        ("  projected part", format_bytes(report.projected_state_bytes)),
        ("  projectors", format_bytes(report.projector_bytes)),
    ]
    if report.shared_basis_bytes:
        rows.append(("  of which shared bases", format_bytes(report.shared_basis_bytes)))
    rows += [
        (f"Dense {report.baseline} state", format_bytes(report.baseline_state_bytes)),
        (f"Saving vs {report.baseline}", report.saving_text()),
    ]
    costly = report.costly_layers()
    if costly:
        more = f" and {len(costly) - MAX_NAMED} more" if len(costly) > MAX_NAMED else ""
        names = ", ".join(costly[:MAX_NAMED]) + more
        rows.append((f"  costing more than dense {report.baseline}", f"{len(costly)} layer(s): {names}"))
    if report.quantization_saving_bytes:
        rows.append(("  of which P quantization", format_bytes(report.quantization_saving_bytes)))
    if report.memory_budget is not None:
        rows.append(
            (
                "Memory budget",
                f"{format_bytes(report.optimizer_state_bytes)} of {format_bytes(report.memory_budget)} "
                f"({report.budget_used_percent:.1f}%); ranks chosen per layer by the budget",
            )
        )
    refreshed = [layer for layer in report.layers if layer.refreshes is not None]
    if refreshed:
        seconds = sum(layer.refresh_seconds or 0.0 for layer in refreshed)
        rows.append(
            (
                "Subspace refreshes",
                f"{sum(layer.refreshes or 0 for layer in refreshed)} in {len(refreshed)} layers, "
                f"{sum(layer.skipped or 0 for layer in refreshed)} skipped, {seconds:.3f} s",
            )
        )
    if report.peak_allocated_bytes is not None:
        rows.append(("Peak CUDA allocated", format_bytes(report.peak_allocated_bytes)))
    if report.cpu_max_rss_bytes is not None:
        rows.append(("Process max RSS", format_bytes(report.cpu_max_rss_bytes)))
    if report.probe is not None:
        rows.append(("Curvature probe", probe_summary(report.probe, cuda=report.peak_allocated_bytes is not None)))
    if report.nonfinite_steps:
        rows.append(("Non-finite steps skipped", str(report.nonfinite_steps)))
    if over_ranks is not None:
        rows.append(
            (
                f"All {over_ranks.ranks} ranks together",
                f"parameters {format_bytes(over_ranks.param_bytes)}, gradients {format_bytes(over_ranks.grad_bytes)}, "
                f"optimizer state {format_bytes(over_ranks.optimizer_state_bytes)} (dense {over_ranks.baseline} "
                f"{format_bytes(over_ranks.baseline_state_bytes)})",
            )
        )
    return rows


def _scope(report: MemoryReport) -> str:
    if report.ranks <= 1:
        return ""
    return f", summed over {report.ranks} ranks" if report.summed else ", per rank"


def _ranks_rows(report: MemoryReport) -> list[tuple[str, str]]:
    """Under FSDP2: whose bytes the figures are."""
    n = report.ranks
    if n <= 1:
        return []
    if report.summed:
        return [(f"Summed over {n} ranks", f"what each holds, added up: replicated P, indices and counters {n} times")]
    what = (
        "this rank's rows of parameters, gradients and moments; P, indices and counters are replicated, counted in full"
    )
    return [(f"Per rank (FSDP2, {n} ranks)", f"{what}; layer shapes are global")]


def bar(value: float, whole: float, width: int = BAR_WIDTH, ascii_only: bool = False) -> str:
    """``value / whole`` as a bar of ``width`` cells (capped at full; one cell shows for any nonzero value)."""
    full, empty = ("#", ".") if ascii_only else ("█", "░")
    if whole <= 0:
        return empty * width if value <= 0 else full * width
    filled = min(width, round(width * value / whole))
    if value > 0 and filled == 0:
        filled = 1
    return full * filled + empty * (width - filled)


@dataclass(frozen=True)
class _Row:
    name: str
    shape: str
    rank: str
    projector: str
    state: int
    baseline: int
    bar: str = ""

    @property
    def saving(self) -> str:
        return _saving(self.state, self.baseline)

    def with_bar(self, ascii_only: bool) -> _Row:
        from dataclasses import replace

        return replace(self, bar=bar(self.state, self.baseline, ascii_only=ascii_only))


def _layer_rows(report: MemoryReport) -> list[_Row]:
    """One row per module that holds optimizer state (or per projected weight when the report has no modules)."""
    projected = {layer.name: layer for layer in report.layers}
    if not report.modules:
        return [
            _Row(
                layer.name,
                _shape(layer.shape),
                str(layer.rank),
                _short_projector(layer.projector),
                layer.state_bytes,
                layer.baseline_bytes,
            )
            for layer in report.layers
        ]
    rows = []
    for m in report.modules:
        if not m.state_bytes and not m.projected:
            continue
        layer = projected.get(m.name)
        rows.append(
            _Row(
                m.name,
                _shape(layer.shape) if layer else "",
                str(layer.rank if layer else m.rank or "") if m.projected else "",
                _short_projector(layer.projector) if layer else ("dense" if not m.projected else "?"),
                m.state_bytes,
                m.baseline_bytes,
            )
        )
    return rows


def _print_table(console: Console, title: str, headers: Sequence[str], cells: list[list[str]], width: int) -> None:
    """A compact table within ``width`` columns: every column as wide as its widest cell, but the first one, which
    takes the rest. Where that leaves the names less than ``MIN_NAME`` columns, the bar column goes (the saving's
    figure stays); names still too long are cut in the middle (``_middle``)."""
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    room = width - sum(widths[1:]) - 2 * (len(headers) - 1)
    bars = [i for i, h in enumerate(headers) if i and (h.startswith("vs ") or h == "Share")]
    if bars and room < min(widths[0], MIN_NAME):
        keep = [i for i in range(len(headers)) if i not in bars]
        headers, cells = [headers[i] for i in keep], [[c[i] for i in keep] for c in cells]
        room += sum(widths[i] + 2 for i in bars)
    first = max(min(widths[0], room), 8)
    table = Table(
        title=title,
        title_justify="left",
        title_style="bold",
        header_style="bold magenta",
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
        pad_edge=False,
        collapse_padding=True,
        show_edge=False,
    )
    for i, h in enumerate(headers):
        if i == 0:
            table.add_column(h, no_wrap=True, width=first, overflow="ellipsis")
        else:
            table.add_column(h, no_wrap=True, justify="left" if h in ("Shape", "Proj.", "Kind", "Phase") else "right")
    for row in cells:
        table.add_row(_middle(row[0], first), *row[1:])
    console.print(table, width=width)
    console.print()


def _middle(text: str, width: int) -> str:
    """``text`` within ``width`` characters, cut in the middle: the head, then the tail from the last index on
    (``model.la…11.mlp.gate_proj``), which says which layer it is. A tail too long for that keeps the index and both
    ends of what follows it (``…11.post_atten…_layernorm``); a name without an index keeps its end."""
    if len(text) <= width:
        return text
    room = width - 1
    parts = text.split(".")
    index = max((i for i, part in enumerate(parts) if part.isdigit()), default=None)
    tail = ".".join(parts[index if index is not None else -1 :])
    if room - len(tail) >= 4:  # room for a useful head
        return text[: room - len(tail)] + "…" + tail
    if index is None or index == len(parts) - 1:
        return "…" + text[-room:]
    number, rest = parts[index] + ".", ".".join(parts[index + 1 :])
    keep = room - len(number) - 1  # both ends of what follows the index, around a second ellipsis
    if keep < 6:
        return "…" + text[-room:]
    return "…" + number + rest[: keep // 2] + "…" + rest[len(rest) - (keep - keep // 2) :]


def _shape(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def _short_projector(name: str) -> str:
    return name.replace("online_pca", "pca").replace("/int", "/i")


def _short_baseline(name: str) -> str:
    if " + " in name:  # several optimizers ("Muon + AdamW"): the column holds each layer's own
        return "Dense"
    return name if len(name) <= 9 else name[:8] + "…"


def _saving(state: int, baseline: int) -> str:
    """A row's saving as a share of its baseline; against a baseline of 0 B (SGD without momentum) the bytes it
    holds more, as a negative figure."""
    if not baseline and state:
        return format_bytes(-state)
    return _percent(baseline - state, baseline)


def _percent(part: float, whole: float, digits: int = 0) -> str:
    return "-" if not whole else f"{100.0 * part / whole:.{digits}f}%"
