"""Draws a ``MemoryReport`` with rich, in the look of Lightning's ``RichModelSummary``."""

from __future__ import annotations

from collections.abc import Mapping

from rich import get_console
from rich.console import Console
from rich.table import Table

from lightning_lowrank.memory.accounting import MemoryReport


def format_bytes(n: float) -> str:
    """Binary units, three significant digits: 0 B, 812 B, 1.50 KiB, 23.4 MiB."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            break
        n /= 1024
    if unit == "B":
        return f"{sign}{int(n)} B"
    return f"{sign}{n:.3g} {unit}" if n >= 100 else f"{sign}{n:.2f} {unit}"


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


def render_memory_report(report: MemoryReport, console: Console | None = None) -> None:
    """Print through rich's global console, like Lightning's own rich callbacks.

    Output that is not a terminal (a log file, CI) gets at least 160 columns instead of rich's 80, so
    layer names and sizes do not wrap.
    """
    if console is None:
        console = get_console()
        if not console.is_terminal and console.width < 160:
            console = Console(file=console.file, width=160)
    table = Table(header_style="bold magenta", title="Low-rank optimizer memory")
    table.add_column(" ", style="dim")
    table.add_column("Name", justify="left", no_wrap=True)
    table.add_column("Shape")
    table.add_column("Rank", justify="right")
    table.add_column("Projector")
    table.add_column("State", justify="right")
    table.add_column(f"{report.baseline} state", justify="right")
    table.add_column("Saving", justify="right")
    with_refresh = any(layer.refreshes is not None for layer in report.layers)
    if with_refresh:
        for title in ("Refreshes", "Skipped", "Refresh time", "Gap"):
            table.add_column(title, justify="right")
    for i, layer in enumerate(report.layers):
        refresh_cells = []
        if with_refresh:
            refresh_cells = [
                _or_dash(layer.refreshes),
                _or_dash(layer.skipped),
                "-" if layer.refresh_seconds is None else f"{layer.refresh_seconds:.3f} s",
                _or_dash(layer.gap),
            ]
        table.add_row(
            str(i),
            layer.name,
            "x".join(map(str, layer.shape)),
            str(layer.rank),
            layer.projector,
            format_bytes(layer.state_bytes),
            format_bytes(layer.baseline_bytes),
            format_bytes(layer.saving_bytes),
            *refresh_cells,
        )
    console.print(table)

    grid = Table.grid(expand=True)
    grid.add_column()
    rows = [
        ("Parameters", format_bytes(report.param_bytes)),
        ("Gradients", format_bytes(report.grad_bytes)),
        ("Optimizer state", format_bytes(report.optimizer_state_bytes)),
        ("  dense part", format_bytes(report.dense_state_bytes)),
        ("  projected part", format_bytes(report.projected_state_bytes)),
        ("  projectors", format_bytes(report.projector_bytes)),
        (f"Dense {report.baseline} state", format_bytes(report.baseline_state_bytes)),
        (f"Saving vs {report.baseline}", f"{format_bytes(report.saving_bytes)} ({report.saving_percent:.1f}%)"),
    ]
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
    if report.peak_allocated_bytes is not None:
        rows.append(("Peak CUDA allocated", format_bytes(report.peak_allocated_bytes)))
    if report.probe is not None:
        rows.append(("Curvature probe", probe_summary(report.probe, cuda=report.peak_allocated_bytes is not None)))
    for label, value in rows:
        grid.add_row(f"[bold]{label}[/]: {value}")
    console.print(grid)
