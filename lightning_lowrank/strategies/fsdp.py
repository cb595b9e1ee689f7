"""Low-rank optimizer state under FSDP2: ``Trainer(strategy="lowrank_fsdp")``.

Lightning's ``ModelParallelStrategy`` with a 1-D data-parallel mesh: parameters, gradients and the optimizer state
are all sharded by rows. Every weight projects on the right (``side="right"``), so the projected moments are
sharded with it (local rows x r) and an ordinary step is shard-local; P is replicated (for DCT only its indices).
What a refresh communicates, and what is refused, is in ``optim/distributed/sharding.py``; ``docs/fsdp2-design.md``
has the facts behind it.

A module that defines ``configure_model`` shards itself there, as Lightning expects. One that does not is sharded by
the strategy: ``fully_shard`` on each ``nn.Linear`` it projects, then on the root, so an unchanged module trains.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any

from lightning.fabric.strategies.registry import _StrategyRegistry
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_lowrank.memory import MemoryReport, sum_over_ranks
from lightning_lowrank.selection import select_lowrank_params
from lightning_lowrank.strategies.mixin import LowRankMixin, declare_signature


@declare_signature
class LowRankFSDPStrategy(LowRankMixin, ModelParallelStrategy):
    """``ModelParallelStrategy`` (FSDP2, data parallel only) with projected optimizer state.

    ``data_parallel_size`` defaults to every process (Lightning's ``"auto"`` would take the number of nodes);
    ``save_distributed_checkpoint`` as Lightning's: True writes a folder of shards (DCP), False one full checkpoint on
    rank 0, which ``LowRankStrategy(side="right")`` loads on one device.
    """

    strategy_name = "lowrank_fsdp"

    def __init__(
        self,
        *args: Any,
        data_parallel_size: int | str = "auto",
        save_distributed_checkpoint: bool = True,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("side", "auto") == "left":
            raise ValueError(
                "lowrank_fsdp shards each weight by rows, and side='left' (P^T G) would sum over every rank's rows "
                "at each step: use side='right' (the default here) or 'auto'"
            )
        # (layerwise=True is refused by LowRankMixin, as for any parallel strategy that does not average in the hooks)
        if kwargs.pop("tensor_parallel_size", 1) != 1:
            raise ValueError(
                "lowrank_fsdp: tensor parallelism is not supported yet (a 1-D data-parallel mesh only): drop "
                "tensor_parallel_size or set it to 1"
            )
        for key in ("state_bits", "memory_budget"):
            if kwargs.get(key) is not None:
                raise ValueError(
                    f"lowrank_fsdp does not support {key}={kwargs[key]!r} yet: a distributed checkpoint needs every "
                    "row-sharded state tensor in a row-aligned form, and these are not (see docs/fsdp2-design.md)"
                )
        super().__init__(
            *args,
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            **kwargs,
        )
        self.lowrank_config = dataclasses.replace(self.lowrank_config, side="right")

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":  # every process is a data-parallel rank (Lightning: the node count)
            self._data_parallel_size = self.num_processes * self.num_nodes
        super().setup_environment()
        module = self.lightning_module
        if not is_overridden("configure_model", module):
            module.configure_model = types.MethodType(_shard_projected_layers(self), module)

    def memory_report_over_ranks(self, report: MemoryReport) -> MemoryReport | None:
        """Every rank's ``memory_report()`` summed (one all-reduce; ``memory.ranks.sum_over_ranks``)."""
        return sum_over_ranks(report, self.device_mesh["data_parallel"].get_group())

    @classmethod
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        """``lowrank_fsdp``."""
        strategy_registry.register(
            cls.strategy_name, cls, description="FSDP2 (ModelParallelStrategy) with low-rank optimizer state"
        )


def _shard_projected_layers(strategy: LowRankFSDPStrategy) -> Any:
    """The ``configure_model`` the strategy gives a module that has none: ``fully_shard`` on each ``nn.Linear`` the
    strategy projects, then on the root (idempotent: a module sharded already is left alone)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    def configure_model(module: LightningModule) -> None:
        if isinstance(module, FSDPModule):
            return
        cfg = strategy.lowrank_config
        mesh = strategy.device_mesh["data_parallel"]
        weights = set(select_lowrank_params(module, cfg.target_modules, cfg.exclude))
        for sub in module.modules():
            if sub is not module and any(p in weights for p in sub.parameters(recurse=False)):
                fully_shard(sub, mesh=mesh)
        fully_shard(module, mesh=mesh)

    return configure_model
