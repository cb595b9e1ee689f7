"""Memory under FSDP2 (issue 16): what one rank holds of row-sharded weights, and the sum over the ranks.

FSDP2 (``fully_shard`` over a 1-D mesh) splits every parameter's rows as ``torch.chunk`` does: rank k holds rows
[k c, (k + 1) c) with c = ceil(m / N), so the last ranks may hold fewer (13 rows on 2 ranks: 7 + 6), or none. Each
rank keeps the gradient and the moments of its own rows (dense moments, and with ``side="right"`` projected ones of
local rows x r); P, DCT indices, seeds and step counters are replicated, the same on every rank.

A rank's report counts what it holds (``account_memory``: ``to_local()`` of each DTensor); ``sum_over_ranks`` adds
the ranks' reports up in one all-reduce; ``PlannedShards`` gives the planner (``plan(fsdp=N)``) the same per-rank
view of an unsharded meta twin. FSDP2 pads each rank's parameter storage to c rows, so a rank with fewer rows holds
up to one padded shard more than its report says; the planner's per-rank figures are rank 0's, c rows each.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from lightning_lowrank.config import LowRankConfig
from lightning_lowrank.memory.figures import MemoryReport
from lightning_lowrank.optim.distributed import sharding
from lightning_lowrank.optim.projected import ProjectedOptimizer
from lightning_lowrank.optim.state.layout import STATE_KINDS
from lightning_lowrank.optim.update.rules import projected_rule

REPLICATED_KINDS = ("projection", "scalars")  # P, indices, seeds, counters: the same on every rank
_TOTALS = (
    "param_bytes",
    "grad_bytes",
    "dense_state_bytes",
    "projected_state_bytes",
    "projector_bytes",
    "shared_basis_bytes",
    "baseline_state_bytes",
    "quantization_saving_bytes",
    "frozen_param_bytes",
)


def shard_rows(rows: int, world: int, rank: int) -> int:
    """The rows rank ``rank`` of ``world`` holds of a tensor of ``rows`` rows (``torch.chunk``'s split, as FSDP2's)."""
    chunk = -(-rows // world)
    return max(0, min(chunk, rows - rank * chunk))


@dataclass(frozen=True)
class PlannedShards:
    """``world``-way row sharding applied to plain (meta) tensors: what rank ``rank`` would hold (for the planner)."""

    world: int
    rank: int = 0

    def piece(self, t: Tensor, param: Tensor | None = None, kind: str | None = None) -> Tensor:
        """This rank's piece of ``t``, a parameter (``param`` None) or a state tensor of ``param`` of ``kind``: its
        rows when row-sharded (a parameter of at least one dimension, or a moment whose rows are the parameter's),
        else ``t`` (replicated: P, indices, seeds, counters)."""
        owner = t if param is None else param
        if t.dim() == 0 or owner.dim() == 0 or kind in REPLICATED_KINDS or t.shape[0] != owner.shape[0]:
            return t
        return t.new_empty((shard_rows(t.shape[0], self.world, self.rank), *t.shape[1:]), device="meta")


def sharded_config(world: int, layerwise: bool, options: dict[str, Any]) -> LowRankConfig:
    """The planner's low-rank options for ``world``-way FSDP2, refused as ``lowrank_fsdp`` refuses them: P on the
    right (``side="right"``: a left one would sum every rank's rows at each step), no layer-wise mode, no 8-bit state
    and no ``memory_budget`` yet."""
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"fsdp must be a positive number of ranks, got {world!r}")
    if options.get("side", "auto") == "left":
        raise ValueError(
            "fsdp shards each weight by rows, and side='left' (P^T G) would sum over every rank's rows at each step: "
            "use side='right' (the default with fsdp) or 'auto'"
        )
    if layerwise:
        raise ValueError("layerwise=True is not supported with fsdp (FSDP2) yet")
    for key in ("state_bits", "memory_budget"):
        if options.get(key) is not None:
            raise ValueError(f"fsdp (FSDP2) does not support {key}={options[key]!r} yet, as lowrank_fsdp does not")
    return LowRankConfig(**{**options, "side": "right"})


def check_sharded(optimizers: Iterable[Optimizer]) -> None:
    """Refuse what the optimizer refuses for a weight FSDP2 shards (``sharding.check``: the projectors, inner rules
    and options whose update needs other ranks' rows), on the planner's unsharded twin."""
    if sharding.Shard is None:
        raise ValueError("fsdp needs a torch built with torch.distributed")
    mesh = SimpleNamespace(ndim=1)
    for opt in optimizers:
        if not isinstance(opt, ProjectedOptimizer):
            continue
        for group in opt.param_groups:
            for p, on in zip(group["params"], opt.projection_mask(group)):
                if p.dim():
                    stand_in = SimpleNamespace(shape=p.shape, placements=(sharding.Shard(0),), device_mesh=mesh)
                    sharding.check(stand_in, group, on, projected_rule(group), opt.memory_budget is not None)


def over_planned_ranks(
    account: Callable[[PlannedShards], MemoryReport], params: Iterable[Tensor], world: int
) -> MemoryReport:
    """The sum over ``world`` ranks of what each would hold (``account``: one rank's report). Ranks that hold the same
    rows of every parameter hold the same bytes, so each distinct split is accounted once and counted as often as it
    occurs (a few times, whatever ``world``)."""
    rows = sorted({p.shape[0] for p in params if p.dim()})
    splits: dict[tuple[int, ...], list[int]] = {}
    for rank in range(world):
        splits.setdefault(tuple(shard_rows(m, world, rank) for m in rows), []).append(rank)
    with warnings.catch_warnings():  # the per-rank report has warned already
        warnings.simplefilter("ignore")
        reports = [(account(PlannedShards(world, ranks[0])), len(ranks)) for ranks in splits.values()]
    return sum_reports(reports, world)


def sum_reports(reports: Sequence[tuple[MemoryReport, int]], ranks: int) -> MemoryReport:
    """``sum(count * report)`` of reports of one model (the same layers and modules in the same order), as the sum
    over ``ranks`` ranks (see ``sum_over_ranks`` for what it keeps)."""
    total = [0] * len(_vector(reports[0][0]))
    for report, count in reports:
        vector = _vector(report)
        if len(vector) != len(total):
            raise ValueError("reports of different models (layers or modules differ) cannot be summed")
        total = [t + count * v for t, v in zip(total, vector)]
    return _summed(reports[0][0], total, ranks)


def sum_over_ranks(report: MemoryReport, group: Any = None) -> MemoryReport:
    """``report``'s byte figures summed over the ranks of ``group`` (a process group; default: the whole world), in
    one all-reduce of one int64 vector: the totals, the split by kind and each layer's and module's figures.

    Contract:

    * A collective: every rank of ``group`` calls it, each with its own ``account_memory`` report of the same model
      (the same layers and modules in the same order, as FSDP2 puts one model on every rank). Every rank gets the
      sum back; rank 0 may show it next to its own report (``render_memory_report(own, over_ranks=total)``).
    * The sum is what the ranks hold together: row-sharded tensors once, replicated ones (P, indices, counters, the
      DCT bases) once per rank, as the dense baseline's step counters.
    * It keeps the layers' global shapes and ranks, the refresh counters and ``nonfinite_steps`` (the same on every
      rank); it leaves out what one process measures (peak CUDA, max RSS, the probe's and the phases' figures).
      ``summed`` is True and ``ranks`` the group's size.
    * Without an initialized process group it returns ``report`` unchanged.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return report
    vector = torch.tensor(_vector(report), dtype=torch.int64, device=_device(group))
    dist.all_reduce(vector, group=group)
    return _summed(report, vector.tolist(), dist.get_world_size(group))


def _device(group: Any) -> torch.device:
    """Where the vector goes: the CPU for gloo (and MPI), the current CUDA device for NCCL."""
    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend or "mpi" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _by_kind(kinds: Any) -> list[int]:
    return [int(kinds.get(kind, 0)) for kind in STATE_KINDS]


def _vector(report: MemoryReport) -> list[int]:
    """Every byte figure a sum over ranks adds up, in a fixed order (``_summed`` reads it back)."""
    vector = [int(getattr(report, key)) for key in _TOTALS] + _by_kind(report.state_by_kind)
    for layer in report.layers:
        vector += [layer.state_bytes, layer.projector_bytes, layer.baseline_bytes, *_by_kind(layer.state_by_kind)]
    for module in report.modules:
        vector += [module.param_bytes, module.frozen_bytes, module.baseline_bytes, *_by_kind(module.state_by_kind)]
    return vector


def _summed(report: MemoryReport, vector: Sequence[int], ranks: int) -> MemoryReport:
    figures = iter(int(v) for v in vector)

    def take(n: int) -> list[int]:
        return [next(figures) for _ in range(n)]

    def kinds(old: Any) -> dict[str, int]:
        new = dict(zip(STATE_KINDS, take(len(STATE_KINDS))))
        return new if old else dict(old)  # a row built without the split keeps none

    totals = dict(zip(_TOTALS, take(len(_TOTALS))))
    state_kinds = kinds(True)
    layers = []
    for layer in report.layers:
        state, projector, baseline = take(3)
        layers.append(
            replace(
                layer,
                state_bytes=state,
                projector_bytes=projector,
                baseline_bytes=baseline,
                state_by_kind=kinds(layer.state_by_kind),
            )
        )
    modules = []
    for module in report.modules:
        param, frozen, baseline = take(3)
        modules.append(
            replace(
                module,
                param_bytes=param,
                frozen_bytes=frozen,
                baseline_bytes=baseline,
                state_by_kind=kinds(module.state_by_kind),
            )
        )
    return replace(
        report,
        **totals,
        state_kinds=state_kinds,
        layers=tuple(layers),
        modules=tuple(modules),
        ranks=ranks,
        summed=True,
        peak_allocated_bytes=None,
        cpu_max_rss_bytes=None,
        probe=None,
        phases=None,
    )
