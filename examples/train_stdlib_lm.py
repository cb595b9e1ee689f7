"""Train a byte-level LLaMA on the Python standard library's source with low-rank (GaLore-style) AdamW state.

The LightningModule (``byte_lm.py``) returns a plain ``torch.optim.AdamW``; ``LowRankStrategy`` swaps it for
``ProjectedAdamW`` at setup and prints how much optimizer memory that saved when training ends.

    python examples/train_stdlib_lm.py                     # DCT projector, rank 32
    python examples/train_stdlib_lm.py --projector svd     # GaLore's SVD projector
    python examples/train_stdlib_lm.py --dense             # plain AdamW, default strategy, for comparison
    python examples/train_stdlib_lm.py --memory-budget 1.5 # ranks per layer by curvature, state within 1.5 MiB
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import lightning as L
import torch
from byte_lm import SIZES, ByteLM
from lightning.pytorch.loggers import CSVLogger
from stdlib_data import StdlibDataModule

import lightning_lowrank

# The batches are slices of an in-memory tensor: worker processes would only add start-up time.
warnings.filterwarnings("ignore", ".*does not have many workers.*")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--projector",
        choices=("svd", "rsvd", "dct", "random", "online_pca"),
        default="dct",
        help="subspace projector (default: dct)",
    )
    parser.add_argument("--adaptive", action="store_true", help="Q-GaLore's lazy refresh: stable layers refresh less")
    parser.add_argument("--moments", choices=("keep", "reset", "rotate"), default="keep", help="moments at a refresh")
    parser.add_argument(
        "--size", choices=tuple(SIZES), default="small", help="small: 0.87M parameters; medium: 4.9M (default: small)"
    )
    parser.add_argument(
        "--rank", type=int, default=None, help="subspace rank per projected weight (default: d_model / 4, 32 or 64)"
    )
    parser.add_argument("--update-gap", type=int, default=50, help="steps between subspace refreshes (default: 50)")
    parser.add_argument("--scale", type=float, default=0.25, help="GaLore's alpha on the update (default: 0.25)")
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help="peak learning rate (default: 1e-2 low-rank, as in GaLore's recipe with scale 0.25; 1e-3 with --dense)",
    )
    parser.add_argument("--max-steps", type=int, default=500, help="optimizer steps (default: 500)")
    parser.add_argument("--batch-size", type=int, default=32, help="windows of 128 bytes per step (default: 32)")
    parser.add_argument("--val-every", type=int, default=100, help="validate every this many steps (default: 100)")
    parser.add_argument("--val-batches", type=int, default=4, help="batches per validation (default: 4)")
    parser.add_argument("--max-bytes", type=int, default=None, help="use only this prefix of the corpus")
    parser.add_argument(
        "--memory-budget",
        type=float,
        default=None,
        help="optimizer-state budget in MiB: per-layer ranks (at most --rank) follow each layer's Hessian trace, "
        "measured by a CurvatureProbe every --update-gap steps",
    )
    parser.add_argument(
        "--rank-by",
        choices=("curvature", "residual"),
        default="curvature",
        help="with --memory-budget: ranks by Hessian trace or by gradient energy outside the subspace",
    )
    parser.add_argument("--dense", action="store_true", help="plain AdamW with the default strategy (no low-rank)")
    parser.add_argument("--precision", choices=("32-true", "bf16-mixed"), default="32-true")
    parser.add_argument("--log-dir", default="lightning_logs", help="CSVLogger directory (default: ./lightning_logs)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    lr = args.lr if args.lr is not None else (1e-3 if args.dense else 1e-2)
    L.seed_everything(args.seed, verbose=False)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")

    config = SIZES[args.size]
    args.rank = args.rank if args.rank is not None else config.d_model // 4
    model = ByteLM(config, lr=lr, warmup_steps=max(1, args.max_steps // 10), max_steps=args.max_steps)
    data = StdlibDataModule(
        block_size=config.block_size,
        batch_size=args.batch_size,
        train_samples=args.max_steps * args.batch_size,  # one epoch == the whole run, no window seen twice
        val_samples=args.val_batches * args.batch_size,
        max_bytes=args.max_bytes,
        seed=args.seed,
    )

    callbacks = []
    if args.dense:
        strategy = "auto"
        name = "dense"
    else:
        budget = None if args.memory_budget is None else int(args.memory_budget * 2**20)
        strategy = lightning_lowrank.LowRankStrategy(
            rank=args.rank, projector=args.projector, scale=args.scale, memory_budget=budget, rank_by=args.rank_by
        )
        # The callback owns the refresh schedule; its counts join the memory report.
        callbacks.append(
            lightning_lowrank.SubspaceRefresh(every=args.update_gap, adaptive=args.adaptive, moments=args.moments)
        )
        name = f"lowrank_{args.projector}_r{args.rank}"
        if budget is not None and args.rank_by == "curvature":  # the traces that steer the ranks
            callbacks.append(lightning_lowrank.CurvatureProbe(every=args.update_gap, estimators=("trace",), samples=4))
        if budget is not None:
            name += f"_budget{args.memory_budget:g}MiB_{args.rank_by}"

    val_every = min(args.val_every, args.max_steps)
    trainer = L.Trainer(
        strategy=strategy,
        accelerator="auto",
        devices=1,
        precision=args.precision,
        max_steps=args.max_steps,
        val_check_interval=val_every,
        limit_val_batches=args.val_batches,
        num_sanity_val_steps=0,
        gradient_clip_val=1.0,
        logger=CSVLogger(args.log_dir, name=name),
        callbacks=callbacks,
        enable_checkpointing=False,
        log_every_n_steps=10,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)  # LowRankStrategy prints its memory report when this returns
    elapsed = time.perf_counter() - start
    train_loss = trainer.callback_metrics["train_loss"].item()
    if trainer.global_step % val_every:  # the last step was not a validation step: measure the final model
        trainer.validate(model, datamodule=data, verbose=False)
    val_loss = trainer.callback_metrics["val_loss"].item()

    print(f"\n{name}: {trainer.global_step} steps in {elapsed:.0f}s, lr={lr:g}")
    print(f"a uniform guess over 256 bytes scores ln 256 = {math.log(256):.3f}")
    print(f"final train_loss = {train_loss:.3f}")
    print(f"final val_loss   = {val_loss:.3f}")
    print(f"logs: {trainer.logger.log_dir}")


if __name__ == "__main__":
    main()
