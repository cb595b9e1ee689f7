"""Draws a ``MemoryReport`` with rich, in the look of Lightning's ``RichModelSummary``, within 80 columns."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rich import box, get_console
from rich.console import Console
from rich.table import Table

from lightning_lowrank.memory.figures import KIND_LABELS, MemoryReport, format_bytes
from lightning_lowrank.memory.groups import GROUP_LABELS
from lightning_lowrank.memory.summary import probe_summary, summary_rows

__all__ = ["bar", "probe_summary", "render_memory_report", "summary_rows"]

MAX_LAYER_ROWS = 40  # more layers than this: the per-layer table is collapsed to module groups
BAR_WIDTH = 10
MIN_NAME = 24  # a name column narrower than this (or than its longest name) drops the bar column to make room
SHARED_LABEL = "shared DCT bases (no layer's)"  # dct_scorer="matmul": one d x d basis per size, for every layer
PHASE_LABELS = {
    "forward": "forward",
    "backward": "backward",
    "optimizer_step": "optimizer step + refresh",
    "batch_end": "batch end (probe, callbacks)",
}


def _or_dash(value: int | None) -> str:
    return "-" if value is None else str(value)


def render_memory_report(
    report: MemoryReport,
    console: Console | None = None,
    *,
    collapse: bool | None = None,
    max_layers: int = MAX_LAYER_ROWS,
    over_ranks: MemoryReport | None = None,
    planned: bool = False,
) -> None:
    """Print through rich's global console (or ``console``), like Lightning's own rich callbacks.

    Everything fits the console's width down to 80 columns: the bars give way first, then long layer names are cut
    in the middle, keeping the head and the distinguishing tail (``model.…3.self_attn.q_proj``).
    With more than ``max_layers`` layers, or ``collapse=True``, the per-layer table is left out and the module
    groups (attention, MLP, embeddings, other) stand for it; the groups, the split of the optimizer state by kind,
    the per-phase CUDA peaks (with a ``MemoryPhases`` callback) and the totals are always shown. Bars compare a
    row's optimizer state with what the module's own dense optimizer would hold (full bar: as much as it).
    Frozen modules (no parameter that trains) are counted apart: in the title, a "Frozen" column of the groups and
    the "Parameters" line. Shared DCT bases (``dct_scorer="matmul"``) belong to no layer: a footnote under the
    layer and group tables points to their own row in the split by kind.
    ``over_ranks`` (FSDP2: ``sum_over_ranks`` of ``report``) adds the totals over all ranks below this rank's.
    ``planned`` (``Plan.render``): a report planned before training, which the titles say.
    """
    console = console or get_console()
    width = console.width
    ascii_only = not console.encoding.lower().startswith("utf")
    rows = _layer_rows(report)
    if collapse is None:
        collapse = len(rows) > max_layers
    base = _short_baseline(report.baseline)
    when = " (planned, before training)" if planned else ""
    frozen = sum(m.frozen for m in report.modules)
    also = f" (and {frozen} frozen, not listed)" if frozen else ""
    shared = report.shared_basis_bytes
    note = (
        f"State leaves out the shared DCT bases: {format_bytes(shared)} (one d x d basis per size, used by every "
        "layer of that size), their own row under Optimizer state by kind."
        if shared
        else None
    )
    if rows and not collapse:
        cells = [
            [r.name, r.shape, r.rank, r.projector, format_bytes(r.state), format_bytes(r.baseline), r.bar, r.saving]
            for r in (row.with_bar(ascii_only) for row in rows)
        ]
        headers = ["Layer", "Shape", "Rank", "Proj.", "State", base, f"vs {base}", "Saving"]
        title = f"Low-rank optimizer memory{when}: {len(rows)} layers{also}{_scope(report)}"
        _print_table(console, title, headers, cells, width, note)
    elif rows:
        where = (
            "every layer is in Plan.report; render(collapse=False) lists them"
            if planned
            else "every layer is in the JSON file, and in the logged metrics with log_layers=True"
        )
        console.print(
            f"[bold]Low-rank optimizer memory{when}[/]: {len(rows)} layers{also}, shown by module group "
            f"({'asked for' if len(rows) <= max_layers else f'more than {max_layers}'}; {where})",
            width=width,
        )
    else:
        console.print(f"[bold]Low-rank optimizer memory{when}[/]: no layer holds optimizer state yet", width=width)

    groups = report.groups
    if groups:
        cells = [
            [
                GROUP_LABELS.get(g.name, g.name),
                str(g.trainable),
                *([str(g.frozen)] if frozen else []),
                str(g.projected),
                format_bytes(g.param_bytes),
                format_bytes(g.state_bytes),
                format_bytes(g.baseline_bytes),
                bar(g.state_bytes, g.baseline_bytes, ascii_only=ascii_only),
                _saving(g.state_bytes, g.baseline_bytes),
            ]
            for g in groups
        ]
        headers = ["Group", "Layers", *(["Frozen"] if frozen else []), "Projected", "Params", "State", base]
        headers += [f"vs {base}", "Saving"]
        _print_table(console, f"By module group{when}", headers, cells, width, note if collapse or not rows else None)

    kinds = {k: n for k, n in report.state_by_kind.items() if n}
    total = report.optimizer_state_bytes
    if kinds:
        cells = [
            [label, format_bytes(n), bar(n, total, ascii_only=ascii_only), _percent(n, total, 1)]
            for label, n in _kind_rows(kinds, shared)
        ]
        _print_table(console, f"Optimizer state by kind{when}", ["Kind", "Bytes", "Share", "%"], cells, width)

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


def _scope(report: MemoryReport) -> str:
    if report.ranks <= 1:
        return ""
    return f", summed over {report.ranks} ranks" if report.summed else ", per rank"


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


def _kind_rows(kinds: Mapping[str, int], shared: int) -> list[tuple[str, int]]:
    """The split by kind as (label, bytes) rows; the shared DCT bases, which are in ``projection``, on a row of their
    own right after what the layers hold of it."""
    rows = []
    for kind, n in kinds.items():
        if kind == "projection" and shared:
            if n - shared:
                rows.append((KIND_LABELS[kind], n - shared))
            rows.append((SHARED_LABEL, shared))
        else:
            rows.append((KIND_LABELS.get(kind, kind), n))
    return rows


def _print_table(
    console: Console, title: str, headers: Sequence[str], cells: list[list[str]], width: int, note: str | None = None
) -> None:
    """A compact table within ``width`` columns: every column as wide as its widest cell, but the first one, which
    takes the rest. Where that leaves the names less than ``MIN_NAME`` columns, the bar column goes (the saving's
    figure stays); names still too long are cut in the middle (``_middle``). ``note`` is a footnote below it."""
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
    if note:
        console.print(note, width=width, style="italic", highlight=False, markup=False)
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
