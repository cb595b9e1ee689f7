"""Low-rank optimizer state on one device, for Fabric: ``Fabric(strategy="lowrank")``."""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.strategies import SingleDeviceStrategy

from lightning_lowrank.fabric.mixin import LowRankFabricMixin
from lightning_lowrank.strategies.checks import check_keywords


class LowRankFabricStrategy(LowRankFabricMixin, SingleDeviceStrategy):
    """Fabric's ``SingleDeviceStrategy`` with projected optimizer state (the Fabric twin of ``LowRankStrategy``).

    ``device`` defaults to Fabric's accelerator (its first device), so the registered name still lands on the GPU
    with ``Fabric(accelerator="cuda", strategy="lowrank")``.
    """

    strategy_name = "lowrank"

    def __init__(self, *args: Any, device: torch.device | str | None = None, **kwargs: Any) -> None:
        check_keywords(type(self).__name__, kwargs, SingleDeviceStrategy.__init__)
        super().__init__(*args, device=device or "cpu", **kwargs)
        # Fabric's connector fills ``parallel_devices`` on any strategy that has the attribute.
        self._parallel_devices: list[torch.device] | None = [torch.device(device)] if device is not None else None

    @property
    def parallel_devices(self) -> list[torch.device] | None:
        """The one device (a list of one, as the accelerator connector sets it); more are refused."""
        return self._parallel_devices

    @parallel_devices.setter
    def parallel_devices(self, devices: list[torch.device] | None) -> None:
        if devices and len(devices) > 1:
            raise ValueError(
                f"{type(self).__name__} runs on one device, but Fabric was given {len(devices)}. Use "
                "strategy='lowrank_ddp' (or 'lowrank_ddp_spawn', 'lowrank_ddp_fork') for several devices, or devices=1."
            )
        self._parallel_devices = devices

    @property
    def root_device(self) -> torch.device:
        """The device the accelerator connector chose (or the one given at construction)."""
        return self._parallel_devices[0] if self._parallel_devices else self._root_device
