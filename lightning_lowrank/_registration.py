"""Register the strategy names with Lightning without importing Lightning first.

``Trainer(strategy="lowrank")`` looks the name up in Lightning's ``StrategyRegistry``, so the names must be there
once the user has imported both ``lightning_lowrank`` and ``lightning.pytorch``. Importing Lightning from our
``__init__`` would make ``import lightning_lowrank.optim`` (plain torch) pay for it (about 2 s). Instead: if
``lightning.pytorch`` is loaded already, register now; else install a finder that registers right after
``lightning.pytorch`` finishes loading (a post-import hook), then removes itself.
"""

from __future__ import annotations

import importlib.abc
import sys
from types import ModuleType
from typing import Any

_TARGET = "lightning.pytorch"


def _register() -> None:
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
