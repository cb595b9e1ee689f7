"""Low-rank optimizer state under FSDP2, for Fabric: ``Fabric(strategy="lowrank_fsdp", devices=N)``.

Fabric's ``ModelParallelStrategy`` with a 1-D data-parallel mesh, as ``LowRankFSDPStrategy`` (``strategies/fsdp.py``):
parameters, gradients and optimizer state sharded by rows, every weight projected on the right (``side="right"``), so
an ordinary step is shard-local. Without a ``parallelize_fn`` the strategy shards the module itself: ``fully_shard``
on each ``nn.Linear`` it projects, then on the root.

FSDP2 replaces the module's parameters when it shards them, so the optimizer must be built on the sharded module:
``model = fabric.setup_module(model)``, then ``optimizer = fabric.setup_optimizers(AdamW(model.parameters()))``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from lightning.fabric.strategies import ModelParallelStrategy
from torch import nn
from torch.optim import Optimizer

from lightning_lowrank.config import LowRankConfig
from lightning_lowrank.fabric.mixin import LowRankFabricMixin
from lightning_lowrank.memory import MemoryReport, sum_over_ranks
from lightning_lowrank.memory.ranks import sharded_config
from lightning_lowrank.strategies.checks import check_keywords
from lightning_lowrank.strategies.fsdp import _shard_projected_layers


class LowRankFabricFSDPStrategy(LowRankFabricMixin, ModelParallelStrategy):
    """Fabric's ``ModelParallelStrategy`` (FSDP2, data parallel only) with projected optimizer state (the Fabric twin
    of ``LowRankFSDPStrategy``).

    Args:
        parallelize_fn: ``(module, device_mesh) -> module``, as Fabric's; None: ``fully_shard`` on each projected
            ``nn.Linear``, then on the root, over the mesh's ``"data_parallel"`` dimension.
        data_parallel_size: defaults to every process (Fabric's ``"auto"`` would take the number of nodes).
        **kwargs: the low-rank options (``side`` is ``"right"``; ``side="left"``, ``state_bits``,
            ``memory_budget`` and a tensor-parallel size other than 1 are refused, as by ``lowrank_fsdp``), then
            ``ModelParallelStrategy``'s.
    """

    strategy_name = "lowrank_fsdp"

    def __init__(
        self,
        parallelize_fn: Callable[[Any, Any], Any] | None = None,
        data_parallel_size: int | str = "auto",
        **kwargs: Any,
    ) -> None:
        check_keywords(type(self).__name__, kwargs, ModelParallelStrategy.__init__)
        if kwargs.pop("tensor_parallel_size", 1) != 1:
            raise ValueError(
                "lowrank_fsdp: tensor parallelism is not supported yet (a 1-D data-parallel mesh only): drop "
                "tensor_parallel_size or set it to 1"
            )
        options = {k: v for k, v in kwargs.items() if k in LowRankConfig.field_names()}
        sharded_config(1, False, options)  # what the planner and lowrank_fsdp refuse (side="left", state_bits, ...)
        super().__init__(
            parallelize_fn or self._shard_projected_layers,
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=1,
            **kwargs,
        )
        self.lowrank_config = replace(self.lowrank_config, side="right")

    def _shard_projected_layers(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        _shard_projected_layers(self)(module)  # Trainer's configure_model for an unsharded module (idempotent)
        return module

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":  # every process is a data-parallel rank (Fabric: the node count)
            self._data_parallel_size = self.num_processes * self.num_nodes
        super().setup_environment()

    def setup_optimizer(self, optimizer: Optimizer) -> Optimizer:
        live = {id(p) for module in self._lowrank_modules for p in module.parameters()}
        if live and not any(id(p) in live for group in optimizer.param_groups for p in group["params"]):
            raise RuntimeError(
                "lowrank_fsdp: FSDP2 replaced the module's parameters when it sharded them, and this optimizer holds "
                "none of the new ones (it was built before the module was set up). Set up the module first, then build "
                "the optimizer on it: model = fabric.setup_module(model); optimizer = fabric.setup_optimizers("
                "torch.optim.AdamW(model.parameters(), ...))."
            )
        return super().setup_optimizer(optimizer)

    def memory_report_over_ranks(self, report: MemoryReport) -> MemoryReport | None:
        """Every rank's ``memory_report()`` summed (one all-reduce; ``memory.ranks.sum_over_ranks``)."""
        return sum_over_ranks(report, self.device_mesh["data_parallel"].get_group())
