"""Lightning Fabric strategies with low-rank optimizer state: ``Fabric(strategy="lowrank")``, ``"lowrank_ddp"`` (and
``_spawn``, ``_fork``, ``_notebook``), ``"lowrank_fsdp"``.

The names are registered in Fabric's ``STRATEGY_REGISTRY`` by ``lightning_lowrank._registration`` as soon as this
package and Lightning are both imported; this module is loaded only when a strategy is built.
"""

from lightning_lowrank.fabric.ddp import LowRankFabricDDPStrategy
from lightning_lowrank.fabric.fsdp import LowRankFabricFSDPStrategy
from lightning_lowrank.fabric.mixin import LowRankFabricMixin
from lightning_lowrank.fabric.single import LowRankFabricStrategy

__all__ = ["LowRankFabricDDPStrategy", "LowRankFabricFSDPStrategy", "LowRankFabricMixin", "LowRankFabricStrategy"]
