"""``ProtectedSubspaces``: continual fine-tuning that keeps what earlier tasks taught (Sculpting Subspaces, Nayak et
al. 2025). The callback decides *when* a task starts and *what* each targeted weight protects (its top-k singular
directions, k per layer from a schedule); the optimizer confines every later update of the weight to the two-sided
orthogonal complement of those directions (``ProjectedOptimizer.protect``, ``optim/update/protect.py``).

A task is one ``trainer.fit``, or the stretch of a fit after a ``start_task()`` call. A task begins in
``on_train_start``: the optimizer exists from ``strategy.setup`` on, and its checkpointed state (the bases of a task
being resumed) is loaded after ``on_fit_start``, which would overwrite bases set there. The task index, the layer
ranks and the adaptive schedule's measurements are this callback's ``state_dict``; the bases are optimizer state.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_lowrank.layer_importance import LayerSimilarity, normalise
from lightning_lowrank.optim import ProjectedOptimizer
from lightning_lowrank.optim.distributed.collectives import broadcast_
from lightning_lowrank.optim.update import protect
from lightning_lowrank.selection import select_lowrank_params

SCHEDULES = ("uniform", "progressive", "adaptive")
_SLACK = 1e-9  # floor(ratio x min(m, n)) with slack for binary rounding: 0.29 x 100 is 28.999...


class ProtectedSubspaces(Callback):
    """Protect each targeted weight's top-k singular directions from every task's updates.

    At the start of each task every targeted weight W (m x n) is decomposed (float32 SVD of the current weights,
    float64 for a float64 weight), W = U S Vᵀ, and its top k directions are handed to the optimizer, which confines
    every update to (I - U_k U_kᵀ) dW (I - V_k V_kᵀ): the top-k singular triples stay exactly as they were (to float32
    rounding; with ``bits``, only to within the bases' quantization error).

    Args:
        ratio: the share of min(m, n) protected, k = floor(ratio x min(m, n)): every task's for ``"uniform"``, the
            first task's for ``"progressive"`` and ``"adaptive"``.
        schedule: ``"uniform"``: ``ratio`` at every task. ``"progressive"``: ``ratio + progressive_step x t`` at task
            t (0, 1, ...), capped at 1 (the research code's 0.07 per task; peft's (t + 1) / n for n tasks is
            ``ratio=progressive_step=1/n``). ``"adaptive"`` (the paper's): per layer ``min_ratio + I x (target_ratio -
            min_ratio)``, clamped to [0, 1], where I is the layer's importance measured on the previous task (see
            ``importance_batches``), normalised to mean 1 over the targeted layers; the first task has no previous
            one and uses ``ratio``.
        target_modules: module-name globs of the weights to protect (``selection.py``'s matching: a glob of the whole
            name or of a substring). None: every ``nn.Linear`` but output heads, as the strategy selects, which in a
            LLaMA/Mistral/Qwen block is exactly q, k, v, o, gate, up and down; embeddings, norms (1-D) and the head
            train as usual: new data needs new token rows and output rows, and a norm has no singular directions.
        exclude: module-name globs never to protect.
        progressive_step: added to the ratio per task (``"progressive"``).
        min_ratio: the paper's mrr (``"adaptive"``): the ratio of a layer of no importance.
        target_ratio: the paper's trr (``"adaptive"``): the ratio of a layer of average importance, not a maximum: a
            layer twice as important as the average gets 2 trr - mrr.
        importance_batches: ``"adaptive"`` measures each layer's mean cosine similarity between its input and output
            (the first min(m, n) coordinates) on the last this many training batches of each task, with forward
            hooks (under DDP averaged over the ranks' batches), and sets the next task's ranks from it.
        bits: None keeps the bases in float32 (float64 for a float64 weight); 8 or 4 keeps them group-wise quantized
            (``optim/update/protect.py``) in about 26% or 13% of the bytes (the memory report's "protected bases").
            The dequantized bases are only nearly orthonormal, so the protected directions move a little. Measured
            over 20 AdamW steps (``test_protect.py``), the top-k singular values' largest relative change: 1.9e-6
            with 8 bits, 6.1e-4 with 4 bits, 1.9e-8 with float32 bases, 0.127 unprotected; the top-k subspace's
            largest angle (sine): 1.0e-3, 1.4e-2, 7.9e-8 and 0.132.

    A layer whose k reaches min(m, n) is frozen (its complement is empty), with a warning naming it; one whose k is 0
    trains freely. Under DDP each layer is decomposed on one rank (layer i on rank i % world) and broadcast, so every
    rank holds the same bases. Sharded strategies (FSDP, FSDP2's ``lowrank_fsdp``, DeepSpeed) and ``layerwise=True``
    are refused at setup.
    """

    def __init__(
        self,
        ratio: float = 0.5,
        schedule: str = "uniform",
        *,
        target_modules: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str = (),
        progressive_step: float = 0.07,
        min_ratio: float = 0.1,
        target_ratio: float = 0.8,
        importance_batches: int = 8,
        bits: int | None = None,
    ) -> None:
        for key, value in (
            ("ratio", ratio),
            ("progressive_step", progressive_step),
            ("min_ratio", min_ratio),
            ("target_ratio", target_ratio),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"ProtectedSubspaces {key} must be a number in [0, 1], got {value!r}")
        if schedule not in SCHEDULES:
            raise ValueError(
                f"ProtectedSubspaces schedule must be one of {', '.join(map(repr, SCHEDULES))}, got {schedule!r}"
            )
        if min_ratio > target_ratio:
            raise ValueError(
                f"ProtectedSubspaces min_ratio ({min_ratio}) must not exceed target_ratio ({target_ratio}): the ratio "
                "of a layer of average importance"
            )
        if isinstance(importance_batches, bool) or not isinstance(importance_batches, int) or importance_batches < 1:
            raise ValueError(f"ProtectedSubspaces importance_batches must be an int >= 1, got {importance_batches!r}")
        if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int) or bits not in protect.BITS):
            raise ValueError(f"ProtectedSubspaces bits must be None (float32 bases), 8 or 4, got {bits!r}")
        self.ratio, self.schedule, self.progressive_step = float(ratio), schedule, float(progressive_step)
        self.min_ratio, self.target_ratio = float(min_ratio), float(target_ratio)
        self.importance_batches, self.bits = importance_batches, bits
        self.target_modules = _patterns("target_modules", target_modules)
        self.exclude = _patterns("exclude", exclude) or ()
        self.task = -1  # the current task's index (-1: none started)
        self.ranks: dict[str, int] = {}  # k per layer name, this task's
        self.importance: dict[str, float] = {}  # the normalised importance this task's ranks came from (adaptive)
        self._in_task = False  # a task started and its fit has not ended (a checkpoint saved now resumes it)
        self._start_requested = False  # start_task() outside a fit: the next fit starts a task even if it resumes one
        self._trainer: pl.Trainer | None = None
        self._targets: dict[Tensor, str] = {}  # weight -> module name
        self._owners: dict[Tensor, ProjectedOptimizer] = {}
        self._similarity = LayerSimilarity(importance_batches)

    @property
    def state_key(self) -> str:
        return "ProtectedSubspaces"  # a subclass resumes its base's checkpoints (one instance per Trainer)

    # -- the task boundary ------------------------------------------------------------------------------------------

    def start_task(self) -> None:
        """Start a new task. During a fit (between steps, on every rank: it broadcasts under DDP), now: for users who
        switch data inside one fit. Outside a fit, at the next fit's start, even when that fit resumes a checkpoint
        saved during the previous task (which it would otherwise continue)."""
        if self._trainer is not None and self._trainer.training and self._in_task:
            self._begin_task(self._trainer)
        else:
            self._start_requested = True

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if isinstance(trainer.strategy, (ModelParallelStrategy, FSDPStrategy, DeepSpeedStrategy)):
            raise ValueError(
                f"ProtectedSubspaces does not support {type(trainer.strategy).__name__} yet: each weight is sharded "
                "there, and its SVD and its protected bases need the whole matrix. Use strategy='lowrank' or "
                "'lowrank_ddp' (LowRankStrategy(rank=None) / LowRankDDPStrategy(rank=None) for full optimizer state)."
            )
        if getattr(trainer.strategy, "layerwise", False):
            raise ValueError(
                "ProtectedSubspaces does not support layerwise=True yet: layer-wise updates run in gradient hooks, "
                "where they are not confined. Use layerwise=False."
            )
        self._trainer = trainer

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After strategy.setup (the optimizer exists) and configure_model (the layers exist).
        try:
            self._targets = select_lowrank_params(pl_module, self.target_modules, self.exclude)
        except ValueError as error:  # a pattern that matches nothing: the message names the candidates
            raise ValueError(f"ProtectedSubspaces {error}") from None
        if not self._targets:
            raise ValueError(
                "ProtectedSubspaces found no weight to protect: the default targets every trainable nn.Linear but "
                "output heads, and this module has none; name the layers with target_modules=[...]"
            )
        owners = {p: opt for opt in trainer.strategy.optimizers for g in opt.param_groups for p in g["params"]}
        missing = [name for p, name in self._targets.items() if not isinstance(owners.get(p), ProjectedOptimizer)]
        if missing:
            raise ValueError(
                f"ProtectedSubspaces confines updates through a lightning_lowrank ProjectedOptimizer, and "
                f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not in one. Use strategy='lowrank' / "
                "'lowrank_ddp' (LowRankStrategy(rank=None) keeps the module's optimizer with its full state), give "
                "every targeted weight to configure_optimizers' optimizer, or exclude the layer."
            )
        self._owners = {p: owners[p] for p in self._targets}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After the checkpoint's optimizer state is loaded: a resumed task finds its bases there.
        restored = any(opt.protected_rank(p) > 0 for p, opt in self._owners.items())
        if self._in_task and restored and not self._start_requested:
            rank_zero_info(f"ProtectedSubspaces: task {self.task} resumed with its bases from the checkpoint")
        else:
            self._begin_task(trainer)
        self._start_requested, self._in_task = False, True
        if self.schedule == "adaptive":
            modules = dict(pl_module.named_modules())
            self._similarity.attach({name: modules[name] for name in self._targets.values()})

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._similarity.end_batch()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._in_task = False
        self._similarity.detach()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._similarity.detach()

    def _begin_task(self, trainer: pl.Trainer) -> None:
        task = self.task + 1
        shapes = {name: tuple(p.shape) for p, name in self._targets.items()}
        ratios = self._ratios(trainer, task, list(shapes))
        self.ranks = {
            name: min(math.floor(ratios[name] * min(shape) + _SLACK), min(shape)) for name, shape in shapes.items()
        }
        group = _process_group(trainer)
        if group is not None:  # the bases' broadcasts are sized by k: every rank takes rank 0's
            ks = torch.tensor(list(self.ranks.values()), device=next(iter(self._targets)).device)
            broadcast_(ks, src=0, group=group)
            self.ranks = dict(zip(self.ranks, ks.tolist()))
        frozen = [f"{name} {shapes[name]}" for name, k in self.ranks.items() if k == min(shapes[name])]
        if frozen:
            rank_zero_warn(
                f"ProtectedSubspaces: task {task} protects every direction of {', '.join(frozen)}: k reaches "
                "min(m, n), so the complement is empty and the layer is frozen for this task. Lower the ratio, or "
                "exclude it."
            )
        for p, U, V in self._bases(trainer):
            if U is None:
                self._owners[p].unprotect([p])
            else:
                self._owners[p].protect({p: (U, V)}, bits=self.bits)
        self.task = task
        self._similarity.clear()
        protected = [k for k in self.ranks.values() if k]
        rank_zero_info(
            f"ProtectedSubspaces: task {task} ({self.schedule}) protects {len(protected)} of {len(self.ranks)} "
            f"layers, k from {min(protected, default=0)} to {max(protected, default=0)}"
        )

    def plan_options(self) -> dict[str, Any]:
        """What ``plan()`` needs to count the bases of the next task (``LowRankStrategy(memory_plan=True)``): its one
        ratio, none where ``"adaptive"`` sets k per layer from measurements (every task after the first)."""
        task = self.task + 1
        if self.schedule == "adaptive" and task > 0:
            return {}
        ratio = min(self.ratio + self.progressive_step * task, 1.0) if self.schedule == "progressive" else self.ratio
        return dict(
            protect=ratio, protect_targets=self.target_modules, protect_exclude=self.exclude, protect_bits=self.bits
        )

    def _ratios(self, trainer: pl.Trainer, task: int, names: list[str]) -> dict[str, float]:
        if self.schedule == "progressive":
            self.importance = {}
            return dict.fromkeys(names, min(self.ratio + self.progressive_step * task, 1.0))
        if self.schedule == "uniform" or task == 0:  # adaptive's first task has no previous task to measure
            self.importance = {}
            return dict.fromkeys(names, self.ratio)
        measured = self._similarity.mean(names, _process_group(trainer), next(iter(self._targets)).device)
        if measured is None:
            raise ValueError(
                f"ProtectedSubspaces(schedule='adaptive') sets task {task}'s ranks from each layer's importance "
                f"measured on the last importance_batches={self.importance_batches} training batches of the previous "
                "task, and none were recorded: the previous task ran without this callback in adaptive mode, trained "
                "no batch, targeted other layers, or its state was not restored. Run the previous task with "
                "ProtectedSubspaces(schedule='adaptive'), resume from its checkpoint (ckpt_path=...), or use "
                "schedule='uniform' or 'progressive' for this task."
            )
        self.importance = normalise(measured)
        spread = self.target_ratio - self.min_ratio
        return {n: min(max(self.min_ratio + self.importance[n] * spread, 0.0), 1.0) for n in names}

    def _bases(self, trainer: pl.Trainer) -> Iterator[tuple[Tensor, Tensor | None, Tensor | None]]:
        """Each target's (weight, U_k, V_k), one layer at a time; (weight, None, None) where k = 0. Under DDP layer i
        (of those with k > 0) is decomposed on rank i % world and broadcast, so every rank holds the same bases."""
        group = _process_group(trainer)
        world = dist.get_world_size(group) if group is not None else 1
        here = dist.get_rank(group) if group is not None else 0
        index = 0
        for p, name in self._targets.items():
            k = self.ranks[name]
            if k == 0:
                yield p, None, None
                continue
            src, index = index % world, index + 1
            if world == 1:
                U, V = self._decompose(p, k)
                yield p, U.contiguous(), V.contiguous()
                continue
            m, n = p.shape
            if src == here:
                flat = torch.cat([t.reshape(-1) for t in self._decompose(p, k)])
            else:
                flat = torch.empty((m + n) * k, dtype=_basis_dtype(p), device=p.device)
            broadcast_(flat, src=src, group=group)
            yield p, flat[: m * k].view(m, k).clone(), flat[m * k :].view(n, k).clone()

    def _decompose(self, weight: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The top-k left and right singular vectors of ``weight`` (m x k, n x k), from a float32 SVD (float64 for a
        float64 weight) of its current values."""
        U, _, Vh = torch.linalg.svd(weight.detach().to(_basis_dtype(weight)), full_matrices=False)
        return U[:, :k], Vh[:k].T

    # -- checkpoints ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "in_task": self._in_task,
            "ranks": dict(self.ranks),
            "importance": dict(self.importance),
            **self._similarity.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.task, self._in_task = int(state_dict["task"]), bool(state_dict["in_task"])
        self.ranks, self.importance = dict(state_dict["ranks"]), dict(state_dict["importance"])
        self._similarity.load_state_dict(state_dict)


def _basis_dtype(weight: Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _process_group(trainer: pl.Trainer) -> Any:
    """The default process group when the trainer runs several processes under torch.distributed, else None."""
    if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return None


def _patterns(kind: str, value: Sequence[str] | str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    value = (value,) if isinstance(value, str) else tuple(value)
    if kind == "target_modules" and not value:
        raise ValueError("ProtectedSubspaces target_modules must name at least one pattern; None for the default")
    for pattern in value:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(
                f"ProtectedSubspaces {kind} entries must be non-empty strings (module-name globs), got {pattern!r}"
            )
    return value
