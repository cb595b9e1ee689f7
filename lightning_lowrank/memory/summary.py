"""The totals printed below the report's tables, as (label, value) rows, and the probe's one-line cost."""

from __future__ import annotations

from collections.abc import Mapping

from lightning_lowrank.memory.baseline import MAX_NAMED
from lightning_lowrank.memory.figures import MemoryReport, format_bytes


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


def summary_rows(report: MemoryReport, over_ranks: MemoryReport | None = None) -> list[tuple[str, str]]:
    """The totals below the tables, as (label, value); under FSDP2 first whose bytes they are, and last, with
    ``over_ranks``, the totals over all ranks."""
    rows = _ranks_rows(report)
    frozen = report.frozen_param_bytes
    rows += [
        ("Parameters", format_bytes(report.param_bytes) + (f" ({format_bytes(frozen)} frozen)" if frozen else "")),
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
        rows.append(("  of which shared DCT bases", format_bytes(report.shared_basis_bytes)))
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
