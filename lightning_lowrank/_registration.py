"""Register the strategy names with Lightning without importing Lightning first.

``Trainer(strategy="lowrank")`` looks the name up in Lightning's ``StrategyRegistry``, so the names must be there
once the user has imported both ``lightning_lowrank`` and ``lightning.pytorch``. Importing Lightning from our
``__init__`` would make ``import lightning_lowrank.optim`` (plain torch) pay for it (about 2 s). Instead: if
``lightning.pytorch`` is loaded already, register now; else install a finder that registers right after
``lightning.pytorch`` finishes loading (a post-import hook), then removes itself.

Fabric's names (``Fabric(strategy="lowrank")``) go into ``lightning.fabric.strategies.STRATEGY_REGISTRY`` at the same
moment (``import lightning.fabric`` loads ``lightning.pytorch`` too: the ``lightning`` package imports both). Each entry
is a ``_FabricEntry`` that imports its class from ``lightning_lowrank.fabric`` when Fabric builds the strategy, so
registering imports nothing of ours, which keeps it safe while ``lightning_lowrank.strategies`` is itself loading.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
from types import ModuleType
from typing import Any

_TARGET = "lightning.pytorch"


class _FabricEntry:
    """A Fabric registry entry: builds ``module.name(**init_params)`` when Fabric asks for the strategy."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self, **init_params: Any) -> Any:
        return getattr(importlib.import_module(self.module), self.name)(**init_params)

    def __repr__(self) -> str:
        return f"<{self.module}.{self.name}>"


_FABRIC = "lightning_lowrank.fabric"
_DDP_START = {"lowrank_ddp": "popen", "lowrank_ddp_spawn": "spawn", "lowrank_ddp_fork": "fork"}
# name -> (entry, description, init params), as the Trainer's names (``lightning_lowrank.strategies``)
FABRIC_STRATEGIES: dict[str, tuple[_FabricEntry, str, dict[str, Any]]] = {
    "lowrank": (_FabricEntry(_FABRIC, "LowRankFabricStrategy"), "Single device with low-rank optimizer state", {}),
    **{
        name: (
            _FabricEntry(_FABRIC, "LowRankFabricDDPStrategy"),
            f"DDP ({start}) with low-rank optimizer state",
            {"start_method": start},
        )
        for name, start in (*_DDP_START.items(), ("lowrank_ddp_notebook", "fork"))
    },
    "lowrank_fsdp": (
        _FabricEntry(_FABRIC, "LowRankFabricFSDPStrategy"),
        "FSDP2 (ModelParallelStrategy) with low-rank optimizer state",
        {},
    ),
    "lowrank_deepspeed": (
        _FabricEntry("lightning_lowrank.strategies.unsupported", "_UnsupportedShardedStrategy"),
        "not supported yet (raises)",
        {"requested": "lowrank_deepspeed"},
    ),
}


def _register_fabric() -> None:
    from lightning.fabric.strategies import STRATEGY_REGISTRY

    for name, (entry, description, init_params) in FABRIC_STRATEGIES.items():
        if name not in STRATEGY_REGISTRY:
            STRATEGY_REGISTRY.register(name, entry, description=description, **init_params)


def _register() -> None:
    _register_fabric()
    if "lightning_lowrank.strategies" in sys.modules:  # loaded, or loading: it registers at the end of its import
        return
    from lightning_lowrank.strategies import register_strategies

    register_strategies()


class _RegisterAfterLightning(importlib.abc.MetaPathFinder):
    """Finds ``lightning.pytorch`` as the other finders would and wraps its loader to register after it ran."""

    def find_spec(self, name: str, path: Any, target: ModuleType | None = None) -> Any:
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)  # once: the inner lookup below must not find this finder again
        spec = next(
            filter(None, (f.find_spec(name, path, target) for f in sys.meta_path if hasattr(f, "find_spec"))), None
        )
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_then_register(module: ModuleType) -> None:
            exec_module(module)
            _register()

        loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


def register_when_lightning_loads() -> None:
    if _TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _RegisterAfterLightning) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterLightning())
