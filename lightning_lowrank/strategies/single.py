"""Low-rank optimizer state on one device."""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.strategies.registry import _StrategyRegistry
from lightning.pytorch.strategies import SingleDeviceStrategy

from lightning_lowrank.strategies.checks import check_combinations, check_keywords, precision_plugin_property
from lightning_lowrank.strategies.mixin import LowRankMixin, declare_signature
from lightning_lowrank.strategies.one_device import OneDevice


@declare_signature
class LowRankStrategy(OneDevice, LowRankMixin, SingleDeviceStrategy):
    """``SingleDeviceStrategy`` with projected optimizer state: ``Trainer(strategy="lowrank")``.

    ``device`` defaults to the Trainer's accelerator (the first of its devices), so a registry name
    still lands on the GPU with ``accelerator="gpu"``.
    """

    strategy_name = "lowrank"
    precision_plugin = precision_plugin_property  # refuses a GradScaler with layerwise=True at Trainer(...)

    def __init__(self, *args: Any, device: torch.device | str | None = None, **kwargs: Any) -> None:
        check_keywords(type(self).__name__, kwargs, SingleDeviceStrategy.__init__)
        super().__init__(*args, device=device or "cpu", **kwargs)
        check_combinations(self)
        self._keep_device(device)

    @classmethod
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        """``lowrank``."""
        strategy_registry.register(cls.strategy_name, cls, description="Single device with low-rank optimizer state")
