"""Low-rank optimizer state on one device, for Fabric: ``Fabric(strategy="lowrank")``."""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.strategies import SingleDeviceStrategy

from lightning_lowrank.fabric.mixin import LowRankFabricMixin
from lightning_lowrank.strategies.checks import check_keywords
from lightning_lowrank.strategies.one_device import OneDevice


class LowRankFabricStrategy(OneDevice, LowRankFabricMixin, SingleDeviceStrategy):
    """Fabric's ``SingleDeviceStrategy`` with projected optimizer state (the Fabric twin of ``LowRankStrategy``).

    ``device`` defaults to Fabric's accelerator (its first device), so the registered name still lands on the GPU
    with ``Fabric(accelerator="cuda", strategy="lowrank")``.
    """

    strategy_name = "lowrank"
    device_owner = "Fabric"

    def __init__(self, *args: Any, device: torch.device | str | None = None, **kwargs: Any) -> None:
        check_keywords(type(self).__name__, kwargs, SingleDeviceStrategy.__init__)
        super().__init__(*args, device=device or "cpu", **kwargs)
        self._keep_device(device)
