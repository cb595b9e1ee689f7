"""One device, whatever launched it: the ``parallel_devices`` a Trainer's or Fabric's connector sets, kept as the
device unless it names several (then a clear error pointing at ``lowrank_ddp``). Shared by ``LowRankStrategy`` and
``LowRankFabricStrategy``; plain Python over torch devices, no Lightning import."""

from __future__ import annotations

import torch


class OneDevice:
    """Mixin for a single-device strategy whose ``device`` defaults to the launcher's accelerator."""

    device_owner = "the Trainer"  # who asked for the devices, in the error message
    _root_device: torch.device

    def _keep_device(self, device: torch.device | str | None) -> None:
        # The connector fills ``parallel_devices`` on any strategy that has the attribute.
        self._parallel_devices: list[torch.device] | None = [torch.device(device)] if device is not None else None

    @property
    def parallel_devices(self) -> list[torch.device] | None:
        """The one device (a list of one, as the accelerator connector sets it); more are refused."""
        return self._parallel_devices

    @parallel_devices.setter
    def parallel_devices(self, devices: list[torch.device] | None) -> None:
        if devices and len(devices) > 1:
            raise ValueError(
                f"{type(self).__name__} runs on one device, but {self.device_owner} asked for {len(devices)}. "
                "Use strategy='lowrank_ddp' (or 'lowrank_ddp_spawn', 'lowrank_ddp_fork') for several devices, "
                "or devices=1."
            )
        self._parallel_devices = devices

    @property
    def root_device(self) -> torch.device:
        """The device the accelerator connector chose (or the one given at construction)."""
        return self._parallel_devices[0] if self._parallel_devices else self._root_device
