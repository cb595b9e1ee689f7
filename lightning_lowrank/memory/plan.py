"""Plan the memory of low-rank training before any training: the memory report that training would measure.

``plan(model, rank=..., projector=..., ...)`` builds what ``LowRankStrategy`` builds in ``setup_optimizers`` (the same
layer selection, the same full-rank drop, ``ProjectedOptimizer.from_optimizer`` over the module's own optimizer) on a
``meta``-device twin of the model, gives every trainable parameter a meta gradient and runs the real
``optimizer.step()`` once. Meta tensors have shapes and dtypes but no data, so the step creates exactly the state
tensors the first training step creates, without computing anything or allocating their memory (a 7B model plans in
seconds on a laptop). The report comes from the same ``account_memory`` the strategy's ``memory_report()`` uses, so
the two agree by construction (``tests/memory/test_plan.py`` checks them against each other after a real step).

Two things cannot run on meta tensors, and are bridged here rather than changed in the optimizer:

* Reading a tensor as a Python number (``.item()``, ``bool(t)``): Adafactor's relative step and update clipping, and
  the 8-bit moment quantizer's sign check. Under ``_MetaValues`` such a read of a meta tensor returns a placeholder
  (1.0, 0 or False). These values only scale updates or guard against bad input; no state tensor's shape depends
  on them.
* Copying a meta tensor to another device (``memory_budget``'s per-layer gradient energy, moved to the CPU): the copy
  is a zero tensor of the same shape. With ``memory_budget`` the ranks are chosen from gradients at the first
  refresh, so the plan's per-layer ranks are those of equal gradient energy; the budget still bounds the total,
  which is what the plan reports (``Plan.notes`` says so).

And one shortcut for speed: the random projector's P is rebuilt from its seed by a QR on the CPU at every use; for
meta weights the plan's optimizer returns an empty meta P of the same shape instead (its stored state, the seed, is
created by the unchanged refresh).

With ``fsdp=N`` (FSDP2, ``lowrank_fsdp`` on N ranks) the report is rank 0's, which holds the most rows: each
parameter, its gradient and its moments (projected ones m x r, as ``side="right"`` makes them) take ceil(m / N) rows,
and P and the counters are replicated (``ranks.py``); ``Plan.total`` sums all N ranks.

With ``layerwise=True`` (the strategy's layer-wise mode, GaLore's per-layer weight update) each parameter is updated
in its own hook during backward and its gradient freed right away, so the planned gradients are the largest single
gradient, not their sum.

With ``protect=ratio`` the optimizer also holds the bases ``ProtectedSubspaces(ratio)`` hands it at its first task
(``protection.py``): ``protect`` is called with meta bases before the step, as the callback calls it at train start.

What is planned: parameters, their gradients and the optimizer state. Not planned: activations (they depend on batch
size, sequence length, checkpointing and precision), temporary buffers inside a step and the CUDA context. Measure
those with a short run on the GPU: the memory report printed at the end of training shows "Peak CUDA allocated".
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from rich import get_console
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_lowrank.config import LowRankConfig
from lightning_lowrank.memory.accounting import account_memory
from lightning_lowrank.memory.figures import MemoryReport, format_bytes
from lightning_lowrank.memory.presets import llama_preset
from lightning_lowrank.memory.protection import PlannedProtection
from lightning_lowrank.memory.ranks import PlannedShards, check_sharded, over_planned_ranks, sharded_config
from lightning_lowrank.memory.report import render_memory_report
from lightning_lowrank.optim.layerwise import LayerwiseProjectedOptimizer
from lightning_lowrank.optim.options import SUPPORTED_OPTIMIZERS
from lightning_lowrank.optim.projected import ProjectedOptimizer
from lightning_lowrank.selection import drop_full_rank, select_lowrank_params

GIB = 1024**3
OPTIMIZERS: dict[str, type[Optimizer]] = {
    "adamw": torch.optim.AdamW,
    "adam": torch.optim.Adam,
    "sgd": torch.optim.SGD,
    "adafactor": torch.optim.Adafactor,
    "muon": torch.optim.Muon,  # on the hidden weights (``_base_optimizers``), AdamW on the rest
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ACTIVATIONS_NOTE = (
    "Activations, temporary buffers and the CUDA context are not planned (they depend on batch size, sequence "
    "length, activation checkpointing and precision): measure them with a few training steps on the GPU, where "
    "the memory report at the end of training shows 'Peak CUDA allocated' (torch.cuda.max_memory_allocated)."
)


# -- the plan ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """A planned ``MemoryReport`` and, with ``gpu_bytes``, whether it fits (parameters + gradients + optimizer state
    only: activations are not planned, see ``ACTIVATIONS_NOTE``)."""

    report: MemoryReport
    gpu_bytes: int | None = None
    notes: tuple[str, ...] = ()
    layerwise: bool = False  # planned with layer-wise updates: gradients are the largest single one
    fsdp: int | None = None  # planned for FSDP2 on this many ranks: ``report`` is rank 0's, ``total`` all of theirs
    total: MemoryReport | None = None

    @property
    def lowrank_bytes(self) -> int:
        """Parameters + gradients + the low-rank optimizer's state (per rank with ``fsdp``)."""
        r = self.report
        return r.param_bytes + r.grad_bytes + r.optimizer_state_bytes

    @property
    def dense_bytes(self) -> int:
        """Parameters + gradients + the state of the module's own (dense) optimizer (per rank with ``fsdp``)."""
        r = self.report
        return r.param_bytes + r.grad_bytes + r.baseline_state_bytes

    @property
    def fits(self) -> bool | None:
        """Whether the planned low-rank memory fits ``gpu_bytes`` (None without a GPU size)."""
        return None if self.gpu_bytes is None else self.lowrank_bytes <= self.gpu_bytes

    @property
    def fits_dense(self) -> bool | None:
        """Whether dense training (the module's own optimizer) fits ``gpu_gib``; None without one."""
        return None if self.gpu_bytes is None else self.dense_bytes <= self.gpu_bytes

    def verdict(self) -> list[str]:
        """Plain-language lines: the totals with and without low rank, and whether each fits the GPU."""
        baseline, mode = self.report.baseline, ", layer-wise" if self.layerwise else ""
        where = f" per rank (FSDP2, {self.fsdp} rank{'s' if self.fsdp > 1 else ''})" if self.fsdp else ""
        rows = [
            (f"with low-rank state{mode}", self.lowrank_bytes, self.fits),
            (f"dense {baseline}{mode}", self.dense_bytes, self.fits_dense),
        ]
        if self.gpu_bytes is None:
            lines = [f"Planned parameters + gradients + optimizer state{where} (activations not included):"]
            lines += [f"  {label}: {format_bytes(total)}" for label, total, _ in rows]
        else:
            lines = [
                f"Fits a {format_bytes(self.gpu_bytes)} GPU{where}? (parameters + gradients + optimizer state only)"
            ]
            for label, total, fits in rows:
                room = self.gpu_bytes - total
                tail = f"{format_bytes(room)} left for activations" if fits else f"{format_bytes(-room)} over"
                lines.append(f"  {label}: {format_bytes(total)} -> {'FITS' if fits else 'DOES NOT FIT'} ({tail})")
        if self.total is not None:
            t = self.total
            lines += [
                f"In total over {self.fsdp} ranks (replicated P and counters on each):",
                f"  with low-rank state: {format_bytes(t.param_bytes + t.grad_bytes + t.optimizer_state_bytes)}",
                f"  dense {baseline}: {format_bytes(t.param_bytes + t.grad_bytes + t.baseline_state_bytes)}",
            ]
        return [*lines, *self.notes, ACTIVATIONS_NOTE]

    def render(self, console: Any = None, **render_options: Any) -> None:
        """The rich memory report, titled as planned (``render_options`` go to ``render_memory_report``), followed by
        the verdict lines, wrapped between words at the console's width (rich's global console by default)."""
        console = console or get_console()
        render_memory_report(self.report, console, over_ranks=self.total, **{"planned": True, **render_options})
        for line in self.verdict():
            for part in wrap_line(line, console.width):
                console.print(part, highlight=False, markup=False, soft_wrap=True)


def wrap_line(line: str, width: int) -> list[str]:
    """``line`` in lines of at most ``width`` columns (where its words allow), broken between words but not inside a
    parenthesis that fits on a line of its own (``(67.66 GiB left for activations)`` moves whole). The lines after
    the first of an indented line (a verdict row) are indented 4 more, those of a paragraph not at all."""
    indent = len(line) - len(line.lstrip())
    units: list[str] = []
    depth = 0
    for word in line.split():
        if depth and units:
            units[-1] += " " + word
        else:
            units.append(word)
        depth = max(0, depth + word.count("(") - word.count(")"))
    lead, more = " " * indent, " " * (indent + 4 if indent else 0)
    lines, current = [], ""
    for unit in units:
        for piece in [unit] if len(more) + len(unit) <= width else unit.split(" "):
            if current and len(current) + 1 + len(piece) > width:
                lines.append(current)
                current = more + piece
            else:
                current = f"{current} {piece}" if current else lead + piece
    return [*lines, current]


def plan(
    model: nn.Module | str,
    optimizer: str | type[Optimizer] | Callable[..., Optimizer] | None = None,
    *,
    lr: float = 1e-3,
    optimizer_options: Mapping[str, Any] | None = None,
    dtype: torch.dtype | str | None = None,
    gpu_gib: float | None = None,
    layerwise: bool = False,
    fsdp: int | None = None,
    protect: float | None = None,
    protect_targets: Sequence[str] | str | None = None,
    protect_exclude: Sequence[str] | str = (),
    protect_bits: int | None = None,
    **lowrank_options: Any,
) -> Plan:
    """The memory report ``LowRankStrategy(**lowrank_options)`` would measure after the first step, without training.

    Args:
        model: an ``nn.Module`` or ``LightningModule`` (it is not changed: the plan runs on a meta twin, so its
            weights are never copied), or a preset name (``"60M"``, ``"130M"``, ``"350M"``, ``"1B"``, ``"7B"``).
        optimizer: the optimizer the module trains with: ``"adamw"``, ``"adam"``, ``"sgd"``, ``"adafactor"``,
            ``"muon"`` (torch's Muon on the hidden weights: every ``nn.Linear`` but output heads; AdamW on the
            rest), a torch optimizer class, or a callable ``params -> Optimizer``. None: the module's own
            ``configure_optimizers()`` when it has one (as the strategy does), else AdamW.
        lr: for the optimizer built from a name or class.
        optimizer_options: its other keywords (e.g. ``{"momentum": 0.9}`` for SGD).
        dtype: cast floating parameters (``torch.bfloat16`` or ``"bf16"`` for bf16-true training); None keeps them.
        gpu_gib: GPU memory in GiB; the plan then says whether it fits with and without low rank.
        layerwise: plan the strategy's ``layerwise=True`` (GaLore's per-layer weight update): one parameter's full
            gradient exists at a time, so the gradients are the largest single one (and ``memory_budget`` is
            refused, as by the strategy).
        fsdp: plan ``lowrank_fsdp`` on this many ranks: per-rank figures (rank 0's, ceil(m / N) rows of every
            parameter, gradient and moment; P and counters replicated) and ``Plan.total`` over all ranks. It plans
            ``side="right"`` and refuses what ``lowrank_fsdp`` refuses (``side="left"``, ``layerwise``, ...).
        protect: plan ``ProtectedSubspaces(ratio=protect, schedule="uniform", target_modules=protect_targets,
            exclude=protect_exclude)`` at its first task: the optimizer also holds each targeted weight's protected
            bases (k = floor(protect x min(m, n))). Refused with ``layerwise`` and ``fsdp``, as the callback refuses
            them.
        protect_targets: that callback's ``target_modules``.
        protect_exclude: that callback's ``exclude``.
        protect_bits: passed to ``ProjectedOptimizer.protect(bits=...)`` (quantized bases) when given.
        **lowrank_options: any ``LowRankConfig`` field (rank, projector, state_bits, residual, ...), validated there,
            so a bad option raises the error the strategy raises.
    """
    unknown = sorted(set(lowrank_options) - LowRankConfig.field_names())
    if unknown:
        raise TypeError(
            f"plan() got unknown low-rank option(s) {', '.join(unknown)}; the options are LowRankConfig's fields: "
            f"{', '.join(sorted(LowRankConfig.field_names()))}"
        )
    protection = PlannedProtection.from_options(
        protect, protect_targets, protect_exclude, protect_bits, layerwise=layerwise, fsdp=fsdp
    )
    cfg = LowRankConfig(**lowrank_options) if fsdp is None else sharded_config(fsdp, layerwise, lowrank_options)
    if gpu_gib is not None and not gpu_gib > 0:
        raise ValueError(f"gpu_gib must be > 0, got {gpu_gib!r}")
    dtype = _dtype(dtype)
    if isinstance(model, str):
        twin: nn.Module = llama_preset(model, dtype=dtype or torch.float32)
        optimizer = optimizer or "adamw"
    else:
        twin = meta_twin(model, dtype)
    selected = drop_full_rank(select_lowrank_params(twin, cfg.target_modules, cfg.exclude), cfg.rank)
    optimizers = []
    # A meta gradient has no values to check for inf/NaN (a placeholder read would call it non-finite and skip the
    # step); the check creates no state, so the planned state is the same under every ``nonfinite`` policy.
    options = {**cfg.optimizer_options(), "nonfinite": "ignore"}
    cls = LayerwiseProjectedOptimizer if layerwise else ProjectedOptimizer
    for opt in _base_optimizers(twin, optimizer, lr, optimizer_options or {}):
        if not isinstance(opt, ProjectedOptimizer):
            opt = cls.from_optimizer(opt, selected, **options)
        optimizers.append(opt)
    if fsdp is not None:
        check_sharded(optimizers)
    for p in twin.parameters():
        if p.requires_grad:
            p.grad = torch.empty_like(p)  # meta: a shape, no memory
    with _MetaValues():
        protected = {} if protection is None else protection.apply(twin, optimizers)  # as at the callback's start
        for opt in optimizers:
            if isinstance(opt, LayerwiseProjectedOptimizer):  # its hooks run the same per-layer step: run it here
                ProjectedOptimizer.step(opt)
            else:
                opt.step()
    shards = None if fsdp is None else PlannedShards(fsdp)  # rank 0: the most rows

    def account(shards: PlannedShards | None) -> MemoryReport:  # as the strategy's memory_report()
        return account_memory(optimizers, twin.parameters(), selected, module=twin, shards=shards)

    report = account(shards)
    total = None if fsdp is None else over_planned_ranks(account, twin.parameters(), fsdp)
    notes: tuple[str, ...] = ()
    if cfg.memory_budget is not None:
        notes = (
            "memory_budget: each layer's rank is chosen from its gradients at the first refresh; the plan shows the "
            "ranks of equal gradient energy. The optimizer state never exceeds the budget.",
        )
    if layerwise:
        notes = (
            f"layer-wise: gradients are the largest single one ({format_bytes(report.grad_bytes)}), each freed "
            "after its update in backward; with accumulate_grad_batches > 1, dense parameters (and layers due to "
            "refresh) keep their full gradient through the window, which this plan does not count.",
        )
    if protection is not None:
        notes += (protection.note(report, protected),)
    return Plan(report, None if gpu_gib is None else int(gpu_gib * GIB), notes, layerwise, fsdp, total)


def meta_twin(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are meta tensors (weights are never copied; tied
    parameters stay tied). Floating parameters are cast to ``dtype`` when given."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        if id(p) not in memo:
            cast = dtype if dtype is not None and p.is_floating_point() else p.dtype
            memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta", dtype=cast), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo.setdefault(id(b), torch.empty_like(b, device="meta"))
    for attr in ("_trainer", "_fabric"):  # a LightningModule's links stay links, never copies
        if getattr(model, attr, None) is not None:
            memo[id(getattr(model, attr))] = getattr(model, attr)
    return copy.deepcopy(model, memo)


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _base_optimizers(model: nn.Module, optimizer: Any, lr: float, options: Mapping[str, Any]) -> list[Optimizer]:
    """The optimizer(s) the strategy would receive from Lightning, built on the meta twin."""
    if optimizer is None and callable(getattr(model, "configure_optimizers", None)):
        from lightning.pytorch.core.optimizer import _configure_optimizers

        try:
            optimizers, _, _ = _configure_optimizers(model.configure_optimizers())
        except Exception as err:  # e.g. it reads self.trainer, which a plan does not have
            raise RuntimeError(
                f"{type(model).__name__}.configure_optimizers() failed outside a Trainer ({err}); pass the optimizer "
                "to plan(), e.g. optimizer='adamw', lr=..."
            ) from err
        return optimizers
    optimizer = optimizer or "adamw"
    if isinstance(optimizer, str):
        if optimizer.lower() not in OPTIMIZERS:
            raise ValueError(f"Unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        optimizer = OPTIMIZERS[optimizer.lower()]
    if isinstance(optimizer, type) and issubclass(optimizer, Optimizer):
        if optimizer not in SUPPORTED_OPTIMIZERS:
            names = ", ".join(c.__name__ for c in SUPPORTED_OPTIMIZERS)
            raise TypeError(f"lightning_lowrank can project {names}, not {optimizer.__name__}")
        trainable = [p for p in model.parameters() if p.requires_grad]
        if optimizer is torch.optim.Muon:  # the usual recipe: Muon for the hidden weights, AdamW for the rest
            hidden = set(select_lowrank_params(model))
            rest = [p for p in trainable if p not in hidden]
            muon = optimizer([p for p in trainable if p in hidden], lr=lr, **options)
            return [muon, torch.optim.AdamW(rest, lr=lr)] if rest else [muon]
        return [optimizer(trainable, lr=lr, **options)]
    if callable(optimizer):
        return [optimizer(model.parameters())]
    raise TypeError(f"optimizer must be a name, an Optimizer class or a callable, got {optimizer!r}")


class _MetaValues(TorchDispatchMode):
    """Lets the real optimizer step run on meta tensors: a Python-number read of a meta tensor gives a placeholder
    (1.0 for floats, 0 for ints, False for bools) and a copy off the meta device gives zeros of the same shape.
    No state tensor's shape or dtype depends on these values (see the module docstring)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default and args[0].is_meta:
            t = args[0]
            return False if t.dtype == torch.bool else (1.0 if t.is_floating_point() or t.is_complex() else 0)
        if func is torch.ops.aten._to_copy.default and isinstance(args[0], Tensor) and args[0].is_meta:
            device = kwargs.get("device")
            if device is not None and torch.device(device).type != "meta":
                return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype, device=device)
        return func(*args, **kwargs)
