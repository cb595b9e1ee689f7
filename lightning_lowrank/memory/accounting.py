"""Exact byte accounting of parameters, gradients and optimizer state, read off the tensors themselves.

Nothing here is estimated: every figure is a sum of ``numel * element_size`` over live tensors, so
it holds on CPU as on GPU. The peak allocated figure is the allocator's own and is CUDA-only.
The figures land in ``figures.MemoryReport``; the savings are measured against ``baseline``.

Under FSDP2 (DTensor parameters, whose ``numel()`` is global) every figure is the calling rank's: parameters,
gradients, state and the dense baseline by their local shard (``to_local()``); ``ranks.sum_over_ranks`` adds the
ranks up.

``memory_report(optimizer, model)`` is the public entry without Lightning: the report the strategy's
``memory_report()`` gives, for any optimizer and model of a plain PyTorch loop.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_lowrank.memory.baseline import RULE_NAMES, baseline_state_bytes, warn_negative_saving
from lightning_lowrank.memory.figures import LayerMemory, MemoryReport, ModuleMemory, empty_kinds, tensor_bytes
from lightning_lowrank.memory.groups import module_group
from lightning_lowrank.memory.ranks import PlannedShards
from lightning_lowrank.optim.distributed.sharding import is_sharded, local
from lightning_lowrank.optim.layerwise import LayerwiseProjectedOptimizer
from lightning_lowrank.optim.projected import ProjectedOptimizer
from lightning_lowrank.optim.projection.bases import projected_dim
from lightning_lowrank.optim.projection.projectors import quantized_projection

UNNAMED = "(unnamed)"  # the row of parameters no module or name owns
Piece = Callable[..., Tensor]  # (tensor, param=None, kind=None) -> the part of it this rank holds


def foreign_state_kinds(state: Mapping[str, Any]) -> dict[str, str]:
    """The kinds of a foreign optimizer's state (a torch one kept as it is with ``fallback='dense'``), which declares
    nothing: it holds only dense state, so a 0-d tensor is a counter (torch's ``step``) and anything else a moment.
    A ``ProjectedOptimizer`` answers for itself (``state_kinds``, from its components' declarations)."""
    return {key: "scalars" if isinstance(v, Tensor) and v.dim() == 0 else "dense_moments" for key, v in state.items()}


def max_rss_bytes() -> int:
    """The process's maximum resident set size so far (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss) if sys.platform == "darwin" else int(rss) * 1024


def account_memory(
    optimizers: Iterable[Optimizer],
    params: Iterable[Tensor],
    names: Mapping[Tensor, str],
    device: torch.device | None = None,
    refresh_stats: Mapping[str, Mapping[str, float]] | None = None,
    probe: Mapping[str, float] | None = None,
    *,
    module: nn.Module | None = None,
    phases: Mapping[str, float] | None = None,
    shards: PlannedShards | None = None,
) -> MemoryReport:
    """Account ``params`` (the model's) and the state of ``optimizers``; ``names`` labels projected layers,
    ``refresh_stats`` (by name: refreshes, skipped, seconds, gap) adds refresh counters to them and ``probe`` (a
    ``CurvatureProbe``'s ``probe_stats``) is passed through to the report.

    ``module`` (the model) names every parameter's owning module for the per-module and per-group split; without
    it projected weights are named by ``names`` and every other parameter falls in one ``(unnamed)`` row.
    ``phases`` (a ``MemoryPhases``' ``phase_stats``) is passed through.

    FSDP2: a DTensor counts by its local shard, so the report is this rank's (``ranks`` says over how many the
    parameters are sharded); replicated state counts in full on each rank and layer shapes stay global. ``shards``
    (the planner's ``fsdp=N``) counts unsharded tensors as that rank of N would hold them."""
    refresh_stats = refresh_stats or {}
    optimizers = list(optimizers)
    params = list({id(p): p for p in params}.values())
    piece: Piece = shards.piece if shards is not None else (lambda t, param=None, kind=None: local(t))
    ranks = shards.world if shards is not None else max((_mesh_size(p) for p in params), default=1)
    owners = _owners(module, names)
    rows: dict[str, dict[str, Any]] = {}

    def row_of(p: Tensor) -> dict[str, Any]:
        name, owner = owners.get(id(p), (UNNAMED, None))
        if name not in rows:
            rows[name] = dict(
                name=name,
                group=module_group(name, owner),
                kind=_class_name(owner) if owner is not None else "",
                param_bytes=0,
                frozen_bytes=0,
                state_by_kind=empty_kinds(),
                baseline_bytes=0,
                projected=0,
                rank=None,
            )
        return rows[name]

    for p in params:  # rows in the model's order
        row_of(p)["param_bytes"] += tensor_bytes(piece(p))
        if not p.requires_grad:
            row_of(p)["frozen_bytes"] += tensor_bytes(piece(p))

    layers: list[LayerMemory] = []
    dense_state = projected_state = projector = shared = adamw = quant_saving = 0
    totals = empty_kinds()
    baselines: list[str] = []  # each optimizer's (in order, once): "AdamW", or "Muon + AdamW" for two
    budget = None
    for opt in optimizers:
        if getattr(opt, "memory_budget", None) is not None:
            budget = (budget or 0) + opt.memory_budget
        projected_params = _projected(opt)
        group_of = {p: g for g in opt.param_groups for p in g["params"]}
        ours = isinstance(opt, ProjectedOptimizer)
        # An optimizer kept as it is (fallback="dense") is its own baseline: it holds what it would hold anyway.
        name = RULE_NAMES.get(opt.param_groups[0]["rule"], type(opt).__name__) if ours else type(opt).__name__
        if name not in baselines:
            baselines.append(name)
        for p, state in opt.state.items():
            if not state:
                continue
            is_projected = p in projected_params
            kind_of = opt.state_kinds(p) if ours else foreign_state_kinds(state)
            kinds = empty_kinds()
            for key, value in state.items():
                if isinstance(value, Tensor):
                    kinds[kind_of[key]] += tensor_bytes(piece(value, p, kind_of[key]))
            total = sum(kinds.values())
            p_baseline = baseline_state_bytes(piece(p), group_of[p]) if ours else total
            adamw += p_baseline
            row = row_of(p)
            row["baseline_bytes"] += p_baseline
            for kind, n in kinds.items():
                row["state_by_kind"][kind] += n
                totals[kind] += n
            if is_projected:
                own = kinds["projection"]
                projected_state += total - own
                projector += own
                group = projected_params[p]
                rank = opt.layer_rank(p)
                row["projected"] += 1
                row["rank"] = max(row["rank"] or 0, rank)
                name = names.get(p, "?")
                bits = group.get("projector_bits")
                if quantized_projection(group) and own:
                    quant_saving += projected_dim(p.shape, group["side"]) * rank * p.element_size() - own
                stats = refresh_stats.get(name, {})
                layers.append(
                    LayerMemory(
                        name,
                        tuple(p.shape),
                        rank,
                        "trion"
                        if group["projected_rule"] == "trion"
                        else group["projector"] + (f"/int{bits}" if bits else ""),
                        total,
                        own,
                        p_baseline,
                        _opt_int(stats.get("refreshes")),
                        _opt_int(stats.get("skipped")),
                        stats.get("seconds"),
                        _opt_int(stats.get("gap")),
                        kinds,
                    )
                )
            else:
                dense_state += total
        if isinstance(opt, ProjectedOptimizer):
            bases = sum(tensor_bytes(b) for b in opt.dct_bases().values())
            shared += bases
            projector += bases
            totals["projection"] += bases
    peak = None
    if device is not None and device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    report = MemoryReport(
        layers=tuple(sorted(layers, key=lambda layer: layer.name)),
        param_bytes=sum(tensor_bytes(piece(p)) for p in params),
        frozen_param_bytes=sum(tensor_bytes(piece(p)) for p in params if not p.requires_grad),
        grad_bytes=gradient_bytes(params, optimizers, piece),
        dense_state_bytes=dense_state,
        projected_state_bytes=projected_state,
        projector_bytes=projector,
        shared_basis_bytes=shared,
        baseline_state_bytes=adamw,
        peak_allocated_bytes=peak,
        quantization_saving_bytes=quant_saving,
        baseline=" + ".join(baselines) or "AdamW",
        probe=None if probe is None else dict(probe),
        memory_budget=budget,
        modules=tuple(ModuleMemory(**row) for row in rows.values()),
        state_kinds=totals,
        phases=None if phases is None else dict(phases),
        nonfinite_steps=sum(getattr(opt, "nonfinite_steps", 0) for opt in optimizers),
        layerwise=any(isinstance(opt, LayerwiseProjectedOptimizer) for opt in optimizers),
        ranks=ranks,
    )
    warn_negative_saving(report)
    return report


def memory_report(
    optimizers: Optimizer | Iterable[Optimizer],
    model: nn.Module,
    *,
    names: Mapping[Tensor, str] | None = None,
    device: torch.device | None = None,
    refresh_stats: Mapping[str, Mapping[str, float]] | None = None,
    probe: Mapping[str, float] | None = None,
    phases: Mapping[str, float] | None = None,
) -> MemoryReport:
    """The memory report of ``optimizers`` (one optimizer, a ``ProjectedOptimizer`` or any torch one, or several)
    training ``model``, right now: what ``LowRankStrategy.memory_report()`` gives, in a plain PyTorch loop.

    Every figure is read off the live tensors (parameters, gradients, optimizer state), so call it after a step (before
    one, no optimizer holds state yet). Each projected weight is named by its module's qualified name in ``model``
    (``"0"`` for ``nn.Sequential(nn.Linear(...), ...)``'s first layer), found through ``model.named_modules()``;
    ``names`` overrides that. ``device`` (default: the model's first parameter's) adds the CUDA allocator's peak on a
    GPU; ``refresh_stats``, ``probe`` and ``phases`` are the callbacks' figures, as in ``account_memory``. Print it
    with ``lightning_lowrank.render_memory_report(report)``; ``report.as_dict()`` is every figure as JSON-ready data.
    """
    optimizers = [optimizers] if isinstance(optimizers, Optimizer) else list(optimizers)
    optimizers = [getattr(opt, "_optimizer", opt) for opt in optimizers]  # a LightningOptimizer: the one it wraps
    if names is None:
        owners = _owners(model, {})
        names = {p: owners[id(p)][0] for opt in optimizers for p in _projected(opt) if id(p) in owners}
    if device is None:
        device = next((p.device for p in model.parameters()), None)
    report = account_memory(
        optimizers, model.parameters(), names, device, refresh_stats, probe, module=model, phases=phases
    )
    return replace(report, cpu_max_rss_bytes=max_rss_bytes())


def gradient_bytes(params: Iterable[Tensor], optimizers: Iterable[Optimizer], piece: Piece = local) -> int:
    """The trainable parameters' gradients at their peak during a step: all of them at once, except that the
    parameters a ``LayerwiseProjectedOptimizer`` updates in their hooks free each gradient right after its update,
    so of those only the largest single gradient counts. Each as large as ``piece`` of its parameter (under FSDP2
    the local shard: gradients are sharded as their parameters)."""
    hooked = {
        id(p)
        for opt in optimizers
        if isinstance(opt, LayerwiseProjectedOptimizer)
        for g in opt.param_groups
        for p in g["params"]
    }
    trainable = [p for p in params if p.requires_grad]
    held = sum(tensor_bytes(piece(p)) for p in trainable if id(p) not in hooked)
    return held + max((tensor_bytes(piece(p)) for p in trainable if id(p) in hooked), default=0)


def _class_name(module: nn.Module) -> str:
    """The module's class name; for one ``fully_shard`` wrapped (FSDP2's ``FSDPLinear``), its own (``Linear``)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without distributed
        return type(module).__name__
    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule)).__name__


def _mesh_size(p: Tensor) -> int:
    """How many ranks a DTensor parameter is spread over (1 for a plain tensor)."""
    return p.device_mesh.size() if is_sharded(p) else 1


def _owners(module: nn.Module | None, names: Mapping[Tensor, str]) -> dict[int, tuple[str, nn.Module | None]]:
    """id(param) -> (row name, owning module): the module's qualified name, or the parameter's for one the model
    holds itself."""
    owners: dict[int, tuple[str, nn.Module | None]] = {}
    if module is not None:
        for module_name, m in module.named_modules():
            for param_name, p in m.named_parameters(recurse=False):
                if id(p) not in owners:  # tied weights: the first owner
                    owners[id(p)] = (module_name, m) if module_name else (param_name, None)
    for p, name in names.items():
        owners.setdefault(id(p), (name, None))
    return owners


def _opt_int(value: float | None) -> int | None:
    return None if value is None else int(value)


def _projected(opt: Optimizer) -> dict[Tensor, dict]:
    if not isinstance(opt, ProjectedOptimizer):
        return {}
    return {p: group for group in opt.param_groups for p, on in zip(group["params"], opt.projection_mask(group)) if on}
