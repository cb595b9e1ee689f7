"""Low-rank optimizer state under DDP.

DDP all-reduces gradients before the optimizer step, so every rank projects the same gradient. Each refresh
is computed on one rank (layer i on rank i % world size) and broadcast, so ranks agree on the subspace
bit for bit even where a decomposition is not bitwise reproducible, and the refresh work is shared.

Because the subspaces agree, ``low_rank_comm=True`` can all-reduce each projected gradient in its subspace
(r x n instead of m x n; see ``comm.py``).

``layerwise=True`` does not wrap the module in ``DistributedDataParallel``: DDP's buckets would hold a full
gradient of every weight for the whole run, which is what layer-wise updates exist to avoid. The layer-wise
optimizer averages each gradient in its own hook instead (``LayerwiseProjectedOptimizer.all_reduce_in_hooks``);
the strategy broadcasts the module's parameters at setup and its buffers before each training step, as DDP does.
"""

from __future__ import annotations

import inspect
from typing import Any

import lightning.pytorch as pl
import torch.distributed as dist
from lightning.fabric.strategies.registry import _StrategyRegistry
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch.nn.parallel import DistributedDataParallel

from lightning_lowrank.config import LowRankConfig
from lightning_lowrank.optim import ProjectedOptimizer
from lightning_lowrank.optim.distributed.collectives import broadcast_
from lightning_lowrank.optim.layerwise import LayerwiseProjectedOptimizer
from lightning_lowrank.strategies.checks import (
    check_bool,
    check_combinations,
    check_keywords,
    precision_plugin_property,
    unknown_options_message,
)
from lightning_lowrank.strategies.comm import (
    CommBytes,
    LowRankCommState,
    check_low_rank_comm_options,
    check_optimizers,
    low_rank_allreduce_hook,
)
from lightning_lowrank.strategies.mixin import LowRankMixin, declare_signature


@declare_signature
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
        **kwargs: ``LowRankMixin``'s (the low-rank options), then ``DDPStrategy``'s and
            ``DistributedDataParallel``'s. With ``layerwise=True`` (``LowRankMixin``'s layer-wise updates) each
            gradient is averaged in its own hook, projected weights in their subspace (as low_rank_comm, but exact
            for every option: a layer whose update reads the full gradient sends it in full), and no
            ``DistributedDataParallel`` wrapper holds gradient buckets. Of DDP's keywords only ``broadcast_buffers``
            then applies. ``comm_bytes`` counts the all-reduced bytes as above.
    """

    strategy_name = "lowrank_ddp"
    layerwise_all_reduce = True
    precision_plugin = precision_plugin_property  # refuses a GradScaler with layerwise=True at Trainer(...)

    def __init__(self, *args: Any, low_rank_comm: bool = False, **kwargs: Any) -> None:
        check_keywords(type(self).__name__, kwargs)
        check_bool("low_rank_comm", low_rank_comm)
        super().__init__(*args, **kwargs)
        check_combinations(self)
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
            known = allowed | LowRankConfig.field_names()
            raise ValueError(unknown_options_message(type(self).__name__, unknown, known, _OTHER_DDP_KEYWORDS))
        if self.layerwise:
            self._check_layerwise_options()

    def _check_layerwise_options(self) -> None:
        """Options of the bucketed DDP path that would do nothing with layer-wise updates, refused at construction."""
        if self.low_rank_comm:
            raise ValueError(
                "layerwise=True already all-reduces each projected gradient in its subspace, in the layer's own hook; "
                "low_rank_comm is the bucketed DDP path's version of that. Drop low_rank_comm."
            )
        if self._ddp_comm_hook is not None:
            raise ValueError(
                "layerwise=True averages gradients in its own hooks, without a DistributedDataParallel wrapper, so a "
                "ddp_comm_hook would never run. Drop ddp_comm_hook, or use layerwise=False."
            )
        # LightningCLI passes every DDP keyword with its default; only a keyword set to something else would be lost.
        defaults = {k: p.default for k, p in inspect.signature(DistributedDataParallel.__init__).parameters.items()}
        ignored = sorted(
            k for k, v in self._ddp_kwargs.items() if k not in _BUFFER_SYNC_KEYS and v is not defaults.get(k, object())
        )
        if ignored:
            raise ValueError(
                f"layerwise=True does not wrap the module in DistributedDataParallel, so {ignored} would do nothing. "
                "Of DDP's options only broadcast_buffers / forward_sync_buffers apply; every rank must give every "
                "trainable parameter "
                "a gradient (find_unused_parameters is not available). Drop them, or use layerwise=False."
            )

    def _syncs_buffers(self) -> bool:
        """DDP's buffer sync before each forward: ``forward_sync_buffers``, else the deprecated ``broadcast_buffers``,
        else on (None is torch's default for both)."""
        for key in ("forward_sync_buffers", "broadcast_buffers"):
            value = self._ddp_kwargs.get(key)
            if value is not None:
                return bool(value)
        return True

    def configure_ddp(self) -> None:
        """Lightning's DDP wrapper, or with ``layerwise=True`` none: each gradient is averaged in its own hook."""
        if not self.layerwise:
            super().configure_ddp()
            return
        # No DDP wrapper (see the module doc): start every rank from rank 0's parameters and buffers, as DDP does.
        _sync_module_states(self.model)

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        if self.layerwise and self._syncs_buffers() and _world_size() > 1:
            # DDP's broadcast_buffers: every forward uses rank 0's buffers (BatchNorm statistics, for one); a
            # non-contiguous buffer goes through a contiguous copy (NCCL refuses it as it is).
            for buffer in self.lightning_module.buffers():
                broadcast_(buffer, src=0)
        return super().training_step(*args, **kwargs)

    def setup_optimizers(self, trainer: pl.Trainer) -> None:
        super().setup_optimizers(trainer)
        if _world_size() > 1:
            for opt in self.optimizers:
                if isinstance(opt, LayerwiseProjectedOptimizer):
                    opt.all_reduce_in_hooks()
                elif isinstance(opt, ProjectedOptimizer):
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
        have (``full``); empty without ``low_rank_comm`` or ``layerwise``. Payload sizes: a ring all-reduce moves
        about twice that."""
        if self.layerwise:
            histories = [opt.comm_history for opt in self.optimizers if isinstance(opt, LayerwiseProjectedOptimizer)]
            return [CommBytes(sum(s for s, _ in step), sum(f for _, f in step)) for step in zip(*histories)]
        return list(self._comm_state.history) if self._comm_state is not None else []

    @classmethod
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        """``lowrank_ddp`` and its ``_spawn``, ``_fork`` and ``_notebook`` start methods."""
        for name, start_method in (
            ("lowrank_ddp", "popen"),
            ("lowrank_ddp_spawn", "spawn"),
            ("lowrank_ddp_fork", "fork"),
            ("lowrank_ddp_notebook", "fork"),
        ):
            strategy_registry.register(
                name, cls, description=f"DDP ({start_method}) with low-rank optimizer state", start_method=start_method
            )


_OTHER_DDP_KEYWORDS = "other keywords go to DDPStrategy and DistributedDataParallel"
_BUFFER_SYNC_KEYS = frozenset({"broadcast_buffers", "forward_sync_buffers"})  # the DDP keywords layer-wise honours


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
