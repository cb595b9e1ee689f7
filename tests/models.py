"""Small LightningModules written the way a user would: plain AdamW, no knowledge of low rank.

Module level so DDP spawn/fork workers can import them.
"""

import lightning as L
import torch
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

VOCAB, WIDTH = 32, 24


def token_data(n: int = 64, seed: int = 0) -> TensorDataset:
    """A learnable toy task: predict (3x + 1) mod VOCAB from x."""
    x = torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))
    return TensorDataset(x, (3 * x + 1) % VOCAB)


class TinyNet(L.LightningModule):
    def __init__(
        self,
        lr: float = 1e-2,
        scheduler: str | None = "step",
        batch_size: int = 16,
        n: int = 64,
        width: int = WIDTH,
        hidden: int = 40,
    ):
        super().__init__()
        self.lr, self.scheduler, self.batch_size, self.n = lr, scheduler, batch_size, n
        self.embed = nn.Embedding(VOCAB, width)
        self.attn = nn.Linear(width, hidden)
        self.mlp = nn.Linear(hidden, width)
        self.norm = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, VOCAB)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.mlp(torch.relu(self.attn(h)))
        return self.lm_head(self.norm(h))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)
        if self.scheduler is None:
            return opt
        if self.scheduler == "step":
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.8)
        else:  # warmup then cosine, nested in SequentialLR
            warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=2)
            cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
            sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, cos], milestones=[2])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self):
        return DataLoader(token_data(self.n), batch_size=self.batch_size, shuffle=False)


class ManualNet(TinyNet):
    def __init__(self):
        super().__init__(scheduler=None)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        self.log("train_loss", loss)
        return loss


class RMSpropNet(TinyNet):
    """An optimizer lightning_lowrank cannot project."""

    def configure_optimizers(self):
        return torch.optim.RMSprop(self.parameters(), lr=1e-3)


class SGDNet(TinyNet):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)


class AdafactorNet(TinyNet):
    def configure_optimizers(self):
        return torch.optim.Adafactor(self.parameters(), lr=0.05)


class NoisyNet(TinyNet):
    """Dropout (uses the global RNG) and BatchNorm (updates buffers in train mode): what a probe must not disturb."""

    def __init__(self):
        super().__init__(scheduler=None)
        self.drop = nn.Dropout(0.2)
        self.bn = nn.BatchNorm1d(40)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.mlp(self.drop(torch.relu(self.bn(self.attn(h)))))
        return self.lm_head(self.norm(h))


class SmallMLP(L.LightningModule):
    """Few enough parameters (51) for the test to form the exact Hessian."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=16)


# -- shared by the Lightning tests ----------------------------------------------------------------------------------

# A Trainer on the CPU that prints and writes nothing.
QUIET = dict(
    accelerator="cpu",
    devices=1,
    logger=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    enable_checkpointing=False,
)


class RecordingLogger(Logger):
    """Keeps every metric logged, for tests that read what the strategy logs."""

    def __init__(self):
        super().__init__()
        self.metrics = {}

    @property
    def name(self):
        return "recording"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)
