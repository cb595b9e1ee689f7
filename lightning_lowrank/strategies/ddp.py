"""Low-rank optimizer state under DDP.

DDP all-reduces gradients before the optimizer step, so every rank projects the same gradient. Each refresh
is computed on one rank (layer i on rank i % world size) and broadcast, so ranks agree on the subspace
bit for bit even where a decomposition is not bitwise reproducible, and the refresh work is shared.

Because the subspaces agree, ``low_rank_comm=True`` can all-reduce each projected gradient in its subspace
(r x n instead of m x n; see ``comm.py``).
"""

from __future__ import annotations

import inspect
from typing import Any

import lightning.pytorch as pl
import torch.distributed as dist
from lightning.fabric.strategies.registry import _StrategyRegistry
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch.nn.parallel import DistributedDataParallel

from lightning_lowrank.config import LowRankConfig
from lightning_lowrank.optim import ProjectedOptimizer
from lightning_lowrank.strategies.comm import (
    CommBytes,
    LowRankCommState,
    check_low_rank_comm_options,
    check_optimizers,
    low_rank_allreduce_hook,
)
from lightning_lowrank.strategies.mixin import LowRankMixin


class LowRankDDPStrategy(LowRankMixin, DDPStrategy):
    """``DDPStrategy`` with projected optimizer state: ``Trainer(strategy="lowrank_ddp", devices=N)``.

    Args:
        low_rank_comm: all-reduce each projected gradient in its subspace (P^T g, r x n, instead of g, m x n) with a
            DDP communication hook, except at steps where the layer refreshes its subspace; dense weights and layers
            without a subspace yet go in full. ``p.grad`` of a projected weight then holds P P^T g_avg, which gives
            the optimizer exactly the projected gradient it uses. Refused with options that read the gradient outside
            the subspace (``residual`` frugal/fira/apollo, ``inner="subset_norm"``, ``projector="online_pca"``) and
            with a user ``ddp_comm_hook``. Gradient clipping by norm is allowed but sees the norm of P P^T g_avg for
            projected weights (and of the full gradient of layers refreshing that step): a warning says so.
            ``comm_bytes`` lists the bytes all-reduced per optimizer step, with and without the projection.
        Other keywords: ``LowRankMixin``'s, then ``DDPStrategy``'s and ``DistributedDataParallel``'s.
    """

    strategy_name = "lowrank_ddp"

    def __init__(self, *args: Any, low_rank_comm: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.low_rank_comm = bool(low_rank_comm)
        self._comm_state: LowRankCommState | None = None
        if self.low_rank_comm:
            if self._ddp_comm_hook is not None:
                raise ValueError(
                    "low_rank_comm=True registers its own DDP communication hook; DDP takes one, so drop "
                    "ddp_comm_hook (or use low_rank_comm=False)."
                )
            check_low_rank_comm_options(self.lowrank_config.optimizer_options(), "the strategy")
        # DDPStrategy hands unknown keywords to torch's DDP at setup; catch a misspelt option now instead.
        allowed = set(inspect.signature(DistributedDataParallel.__init__).parameters) - {"self", "module"}
        unknown = sorted(set(self._ddp_kwargs) - allowed)
        if unknown:
            raise ValueError(
                f"Unknown option(s) {unknown} for LowRankDDPStrategy. Low-rank options: "
                f"{', '.join(sorted(LowRankConfig.field_names()))}; other keywords go to DistributedDataParallel."
            )

    def setup_optimizers(self, trainer: pl.Trainer) -> None:
        super().setup_optimizers(trainer)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for opt in self.optimizers:
                if isinstance(opt, ProjectedOptimizer):
                    opt.shard_refreshes()
        if self.low_rank_comm:
            check_optimizers(self.optimizers)
            if trainer.gradient_clip_val and trainer.gradient_clip_algorithm != "value":
                rank_zero_warn(
                    "low_rank_comm=True: gradient clipping by norm sees P P^T g (the part of each projected gradient "
                    "that was all-reduced) for projected weights, and their full gradient at steps where they "
                    "refresh their subspace, so the norm is smaller than without low_rank_comm."
                )

    def _register_ddp_hooks(self) -> None:
        super()._register_ddp_hooks()
        if self.low_rank_comm:
            assert isinstance(self.model, DistributedDataParallel)
            self._comm_state = LowRankCommState(lambda: self.optimizers)
            self.model.register_comm_hook(self._comm_state, low_rank_allreduce_hook)

    @property
    def comm_bytes(self) -> list[CommBytes]:
        """Per optimizer step, the bytes this rank all-reduced (``sent``) and those a plain all-reduce would
        have (``full``); empty without ``low_rank_comm``. Payload sizes: a ring all-reduce moves about twice that."""
        return list(self._comm_state.history) if self._comm_state is not None else []

    @classmethod
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        for name, start_method in (
            ("lowrank_ddp", "popen"),
            ("lowrank_ddp_spawn", "spawn"),
            ("lowrank_ddp_fork", "fork"),
            ("lowrank_ddp_notebook", "fork"),
        ):
            strategy_registry.register(
                name, cls, description=f"DDP ({start_method}) with low-rank optimizer state", start_method=start_method
            )
