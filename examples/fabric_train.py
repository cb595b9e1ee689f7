"""Train the byte-level LLaMA on the Python standard library's source with Lightning Fabric and low-rank AdamW state.

The loop is an ordinary Fabric loop: the model's own ``torch.optim.AdamW`` and LR scheduler go through
``fabric.setup``, which (with ``strategy="lowrank"``) swaps the AdamW for a projected one. At the end the strategy
prints its memory report. Nothing is downloaded: the data is the running interpreter's own ``.py`` files.

    python examples/fabric_train.py --quick               # a 0.1M-parameter model, 20 steps: seconds on a CPU
    python examples/fabric_train.py                       # 200 steps, DCT projector, rank 32
    python examples/fabric_train.py --devices 2           # strategy="lowrank_ddp" over 2 processes (CPU: gloo)
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from byte_lm import ByteLM, ByteLMConfig
from lightning.fabric import Fabric
from stdlib_data import RandomWindows, load_stdlib_bytes, train_val_split
from torch.utils.data import DataLoader

from lightning_lowrank import LowRankFabricDDPStrategy, LowRankFabricStrategy


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="d_model 64, 2 blocks, rank 16, 20 steps of 8 windows of 64 bytes"
    )
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps (default: 200)")
    parser.add_argument("--batch-size", type=int, default=16, help="windows of 128 bytes per step (default: 16)")
    parser.add_argument("--rank", type=int, default=32, help="subspace rank per projected weight (default: 32)")
    parser.add_argument("--projector", default="dct", help="svd, rsvd, dct, random, ... (default: dct)")
    parser.add_argument("--update-gap", type=int, default=50, help="steps between subspace refreshes (default: 50)")
    parser.add_argument("--lr", type=float, default=1e-2, help="peak learning rate (default: 1e-2)")
    parser.add_argument("--accelerator", default="auto", help="cpu, cuda, auto (default: auto)")
    parser.add_argument("--devices", type=int, default=1, help="more than 1: strategy='lowrank_ddp'")
    parser.add_argument("--max-bytes", type=int, default=None, help="use only this prefix of the corpus")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.config = ByteLMConfig()  # 0.87M parameters, 4 blocks of d_model 128
    if args.quick:
        args.config = ByteLMConfig(block_size=64, d_model=64, n_layers=2, n_heads=4, ffn_hidden=176)
        args.steps, args.batch_size, args.rank = min(args.steps, 20), 8, min(args.rank, 16)
        args.max_bytes = args.max_bytes or 2_000_000
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    options = dict(rank=args.rank, projector=args.projector, update_gap=args.update_gap, scale=0.25)
    # The names work too: Fabric(strategy="lowrank") / "lowrank_ddp" with the default options (rank 128).
    strategy = LowRankFabricDDPStrategy(**options) if args.devices > 1 else LowRankFabricStrategy(**options)
    fabric = Fabric(accelerator=args.accelerator, devices=args.devices, strategy=strategy)
    fabric.launch()
    fabric.seed_everything(args.seed)

    train, val = train_val_split(load_stdlib_bytes(args.max_bytes))
    model = ByteLM(args.config, lr=args.lr, warmup_steps=max(1, args.steps // 10), max_steps=args.steps)
    configured = model.configure_optimizers()  # the module's AdamW (two param groups) and its LambdaLR
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    # The swap: optimizer becomes a projected AdamW; the scheduler is pointed at it.
    model, optimizer, scheduler = fabric.setup(model, optimizer, scheduler=scheduler)
    fabric.print(f"{type(optimizer.optimizer).__module__}.{type(optimizer.optimizer).__qualname__}")

    block = model.config.block_size
    train_set = RandomWindows(train, block, args.steps * args.batch_size, seed=args.seed)
    val_set = RandomWindows(val, block, 4 * args.batch_size, seed=args.seed + 1)
    train_loader, val_loader = fabric.setup_dataloaders(
        DataLoader(train_set, batch_size=args.batch_size // fabric.world_size),
        DataLoader(val_set, batch_size=args.batch_size // fabric.world_size),
    )

    def loss_of(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        logits = model(x)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))

    start = time.perf_counter()
    model.train()
    for step, batch in enumerate(train_loader):
        loss = loss_of(batch)
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            fabric.print(f"step {step:4d}  loss {loss.item():.3f}  lr {scheduler.get_last_lr()[0]:.2e}")
    model.eval()
    with torch.no_grad():
        val_loss = fabric.all_reduce(torch.stack([loss_of(b) for b in val_loader]).mean())
    fabric.print(f"{args.steps} steps in {time.perf_counter() - start:.1f} s, validation loss {val_loss.item():.3f}")

    fabric.strategy.print_memory_report()  # what the projected state saved against AdamW (rank 0 prints)


if __name__ == "__main__":
    main()
