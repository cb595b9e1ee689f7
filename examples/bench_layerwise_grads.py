"""Peak live gradient bytes on the demo model, with and without ``layerwise=True``.

Sampled in a post-accumulate-grad hook on every parameter, registered after the strategy's (so it runs after the
layer-wise update freed the gradient), from the second step on (the first chooses the first subspaces in full).
Random bytes as data: only the shapes matter here.

With ``--devices 2`` (two CPU processes, ``LowRankDDPStrategy``) it also prints, for rank 0, the bytes DDP's
gradient buckets hold for the whole run (none with layer-wise updates, which all-reduce in their own hooks) and
the bytes all-reduced per step.

    python examples/bench_layerwise_grads.py [--devices 2]
"""

import argparse
import os
import sys

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from byte_lm import ByteLM, ByteLMConfig  # noqa: E402

from lightning_lowrank import LowRankDDPStrategy, LowRankStrategy  # noqa: E402


class Peak(Callback):
    def __init__(self):
        self.peak, self.handles = 0, []

    def on_train_start(self, trainer, module):
        params = list(module.parameters())

        def sample(q):  # the live gradients of the others, plus q's own (complete just before its hook freed it)
            live = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None and p is not q)
            if trainer.global_step >= 1:  # after the first window (which chooses the first subspaces in full)
                self.peak = max(self.peak, live + q.numel() * q.element_size())

        self.handles = [p.register_post_accumulate_grad_hook(sample) for p in params]

    def on_train_end(self, trainer, module):
        for h in self.handles:
            h.remove()
        if not trainer.is_global_zero:
            return
        strategy = trainer.strategy
        params = sum(p.numel() * p.element_size() for p in module.parameters())
        line = (
            f"layerwise={strategy.layerwise} accumulate={trainer.accumulate_grad_batches} "
            f"devices={trainer.world_size}: peak live grad bytes {self.peak:,} (all params {params:,})"
        )
        if trainer.world_size > 1:
            ddp = getattr(strategy.model, "_get_ddp_logging_data", None)
            buckets = sum(int(b) for b in ddp()["bucket_sizes"].split(", ")) if ddp else 0
            sent = [b.sent for b in strategy.comm_bytes]
            line += f"; DDP bucket bytes {buckets:,}" + (f"; all-reduced bytes per step {sent}" if sent else "")
        print(line, flush=True)


def run(layerwise, accumulate, devices):
    torch.manual_seed(0)
    cfg = ByteLMConfig()
    model = ByteLM(cfg)
    data = torch.randint(0, 256, (64 * devices, cfg.block_size + 1))
    loader = DataLoader(TensorDataset(data[:, :-1], data[:, 1:]), batch_size=8)
    options = dict(rank=32, update_gap=200, layerwise=layerwise, memory_report=False, memory_json=False)
    strategy = LowRankDDPStrategy(start_method="fork", **options) if devices > 1 else LowRankStrategy(**options)
    trainer = L.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=devices,
        max_steps=3,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[Peak()],
    )
    trainer.fit(model, loader)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=1, help="CPU processes (2 or more: LowRankDDPStrategy)")
    args = parser.parse_args()
    for acc in (1, 2):
        for lw in (False, True):
            run(lw, acc, args.devices)
