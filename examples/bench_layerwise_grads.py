"""Peak live gradient bytes on the demo model, with and without ``LowRankStrategy(layerwise=True)``.

Sampled in a post-accumulate-grad hook on every parameter, registered after the strategy's (so it runs after the
layer-wise update freed the gradient), from the second step on (the first chooses the first subspaces in full).
Random bytes as data: only the shapes matter here.

    python examples/bench_layerwise_grads.py
"""

import os
import sys

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from byte_lm import ByteLM, ByteLMConfig  # noqa: E402

from lightning_lowrank import LowRankStrategy  # noqa: E402


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


def run(layerwise, accumulate):
    torch.manual_seed(0)
    cfg = ByteLMConfig()
    model = ByteLM(cfg)
    data = torch.randint(0, 256, (64, cfg.block_size + 1))
    loader = DataLoader(TensorDataset(data[:, :-1], data[:, 1:]), batch_size=8)
    peak = Peak()
    trainer = L.Trainer(
        strategy=LowRankStrategy(rank=32, update_gap=200, layerwise=layerwise, memory_report=False, memory_json=False),
        accelerator="cpu",
        devices=1,
        max_steps=3,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[peak],
    )
    trainer.fit(model, loader)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"layerwise={layerwise} accumulate={accumulate}: peak live grad bytes {peak.peak:,} (all params {params:,})")


if __name__ == "__main__":
    for acc in (1, 2):
        for lw in (False, True):
            run(lw, acc)
