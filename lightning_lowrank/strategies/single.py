"""Low-rank optimizer state on one device."""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.strategies.registry import _StrategyRegistry
from lightning.pytorch.strategies import SingleDeviceStrategy

from lightning_lowrank.strategies.checks import check_combinations, check_keywords, precision_plugin_property
from lightning_lowrank.strategies.mixin import LowRankMixin, declare_signature


@declare_signature
class LowRankStrategy(LowRankMixin, SingleDeviceStrategy):
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
        # Lightning's connector fills ``parallel_devices`` on any strategy that has the attribute.
        self._parallel_devices: list[torch.device] | None = [torch.device(device)] if device is not None else None

    @property
    def parallel_devices(self) -> list[torch.device] | None:
        """The one device (a list of one, as the accelerator connector sets it); more are refused."""
        return self._parallel_devices

    @parallel_devices.setter
    def parallel_devices(self, devices: list[torch.device] | None) -> None:
        if devices and len(devices) > 1:
            raise ValueError(
                f"LowRankStrategy runs on one device, but the Trainer asked for {len(devices)}. "
                "Use strategy='lowrank_ddp' (or 'lowrank_ddp_spawn', 'lowrank_ddp_fork') for several devices, "
                "or devices=1."
            )
        self._parallel_devices = devices

    @property
    def root_device(self) -> torch.device:
        """The device the accelerator connector chose (or the one given at construction)."""
        return self._parallel_devices[0] if self._parallel_devices else self._root_device

    @classmethod
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        """``lowrank``."""
        strategy_registry.register(cls.strategy_name, cls, description="Single device with low-rank optimizer state")
