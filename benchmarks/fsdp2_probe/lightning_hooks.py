"""Lightning's ``ModelParallelStrategy`` (FSDP2) on 2 CPU processes: hook order, where a strategy subclass swaps the
optimizer, and where it can apply ``fully_shard`` itself (docs/fsdp2-design.md, fact 6).

Two fits in one launch (Lightning starts the second process by re-running this script):

1. a module whose ``configure_model`` calls ``fully_shard``; the strategy subclass replaces the user's AdamW by
   ``probe_optim.ProbeOptimizer`` in ``setup_optimizers``; 2 steps, then ``trainer.save_checkpoint`` (DCP folder);
2. a module *without* ``configure_model``: the subclass installs one on the module in ``setup_environment`` (after
   the device mesh exists, before the Trainer calls the hook), which then shards it; it resumes from fit 1's
   checkpoint, so Lightning's load path runs against the swapped optimizer.

Each hook prints ``[rank] fit N: hook ...`` as it runs.

    .venv/bin/python benchmarks/fsdp2_probe/lightning_hooks.py
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import types
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).parent))
from probe_optim import ProbeOptimizer  # noqa: E402

FIT = {"n": 0}


def log(module_or_strategy, text: str) -> None:
    rank = getattr(module_or_strategy, "global_rank", 0)
    print(f"[{rank}] fit {FIT['n']}: {text}", flush=True)


def shard(module: LightningModule) -> None:
    """What the strategy would do for a module without ``configure_model``: each Linear, then the root."""
    mesh = module.device_mesh["data_parallel"]
    for layer in module.net:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(module, mesh=mesh)


class Plain(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 13), nn.Tanh(), nn.Linear(13, 8))

    def setup(self, stage: str) -> None:
        log(self, f"LightningModule.setup({stage!r})")

    def training_step(self, batch, batch_idx):
        if batch_idx == 0:
            log(self, f"training_step; optimizer is {type(self.optimizers().optimizer).__name__}")
        torch.manual_seed(batch_idx + self.global_rank)
        return nn.functional.mse_loss(self.net(torch.randn(4, 16)), torch.randn(4, 8))

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(8, 1), batch_size=1)

    def configure_optimizers(self):
        log(self, "configure_optimizers")
        return torch.optim.AdamW(self.parameters(), lr=0.01)

    def on_fit_start(self) -> None:
        log(self, "on_fit_start")

    def on_train_start(self) -> None:
        opt = self.optimizers().optimizer
        steps = [int(s["step"]) for s in opt.state.values()]
        zero = [c for c in opt.calls if c.startswith("step lr=0.0")]
        log(self, f"on_train_start: optimizer {type(opt).__name__}, state steps {steps}; zero-lr steps {zero}")


class Sharded(Plain):
    def configure_model(self) -> None:
        log(self, "configure_model (the module's)")
        shard(self)


class Strategy(ModelParallelStrategy):
    def setup_environment(self) -> None:
        super().setup_environment()
        module = self.lightning_module
        log(
            self,
            f"strategy.setup_environment; module overrides configure_model: {is_overridden('configure_model', module)}",
        )
        if not is_overridden("configure_model", module):

            def configure_model(self: LightningModule) -> None:
                log(self, "configure_model (installed by the strategy)")
                shard(self)

            module.configure_model = types.MethodType(configure_model, module)
            log(self, f"installed; is_overridden now {is_overridden('configure_model', module)}")

    def setup(self, trainer) -> None:
        log(self, "strategy.setup begins")
        super().setup(trainer)
        log(self, "strategy.setup ends")

    def setup_optimizers(self, trainer) -> None:
        log(self, "strategy.setup_optimizers begins")
        super().setup_optimizers(trainer)
        user = self.optimizers[0]
        params = [p for g in user.param_groups for p in g["params"]]
        kinds = {type(p).__name__ for p in params}
        log(self, f"user optimizer {type(user).__name__} over {len(params)} params of types {kinds}; swapping")
        self.optimizers = [ProbeOptimizer(params, lr=0.01)]

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        log(self, f"strategy.load_checkpoint into {type(self.optimizers[0]).__name__}")
        return super().load_checkpoint(checkpoint_path, weights_only)

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        log(self, f"strategy.save_checkpoint; optimizer_states[0] keys {sorted(checkpoint['optimizer_states'][0])}")
        super().save_checkpoint(checkpoint, filepath, storage_options)


def fit(module: LightningModule, ckpt: Path, resume: bool) -> None:
    FIT["n"] += 1
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy=Strategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=2 if not resume else 4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, ckpt_path=ckpt if resume else None)
    if not resume:
        trainer.save_checkpoint(ckpt)
    opt = trainer.strategy.optimizers[0]
    w = module.net[0].weight
    log(trainer.strategy, f"after fit: weight {type(w).__name__} {getattr(w, 'placements', '')}")
    log(trainer.strategy, f"after fit: state steps {[int(s['step']) for s in opt.state.values()]}")
    if resume:
        moments = opt.state[w]["exp_avg"]
        log(trainer.strategy, f"after fit: 0.weight exp_avg {type(moments).__name__} {tuple(moments.shape)}")


if __name__ == "__main__":
    ckpt = Path(tempfile.gettempdir()) / "fsdp2_probe_lightning.ckpt"
    shutil.rmtree(ckpt, ignore_errors=True)  # each process starts before fit 1 saves
    fit(Sharded(), ckpt, resume=False)
    fit(Plain(), ckpt, resume=True)
