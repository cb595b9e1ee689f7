"""What a CurvatureProbe costs on the stdlib byte LM, per call and against one training step.

Each configuration trains ``ByteLM(ByteLMConfig())`` with the demo's low-rank strategy (DCT, rank 32) for the same
steps from the same seed, with one ``CurvatureProbe`` every ``--every`` steps, and prints the probe's own figures
(``probe_stats``): seconds per call, the mean training step between probes, their ratio, and the extra memory of a
call (on CUDA the allocator's peak rise; on CPU a count of what the probe holds, see ``CurvatureProbe``).

    python examples/bench_probe_cost.py                 # 5 configurations x 60 steps
    python examples/bench_probe_cost.py --max-steps 20  # a smoke run
"""

from __future__ import annotations

import argparse
import logging
import os
import warnings
from typing import Any

import lightning as L
import torch
from byte_lm import ByteLM, ByteLMConfig
from stdlib_data import StdlibDataModule

import lightning_lowrank
from lightning_lowrank.memory.figures import format_bytes

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*isinstance.treespec, LeafSpec.*")

# name -> (CurvatureProbe keywords, extra strategy keywords)
CONFIGS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "trace (8 samples)": ({"estimators": ("trace",), "samples": 8}, {}),
    "top eigenvalue (<= 20 iterations)": ({"estimators": ("top_eigenvalues",), "top_k": 1, "max_iter": 20}, {}),
    "diagonal (8 samples)": ({"estimators": ("diagonal",), "samples": 8}, {}),
    "subspace diagonal for lazy_hessian (1 sample)": (
        {"estimators": ("subspace_diagonal",), "samples": 1},
        {"preconditioner": "lazy_hessian"},
    ),
    "all four (8 samples, <= 20 iterations)": (
        {"estimators": ("trace", "top_eigenvalues", "diagonal", "subspace_diagonal"), "samples": 8, "max_iter": 20},
        {"preconditioner": "lazy_hessian"},
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-steps", type=int, default=60, help="optimizer steps per configuration (default: 60)")
    parser.add_argument("--every", type=int, default=10, help="probe every this many steps (default: 10)")
    parser.add_argument("--batch-size", type=int, default=32, help="windows of 128 bytes per step (default: 32)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def run(name: str, probe_kwargs: dict[str, Any], strategy_kwargs: dict[str, Any], args: argparse.Namespace) -> dict:
    L.seed_everything(args.seed, verbose=False)
    model = ByteLM(ByteLMConfig(), lr=1e-2, warmup_steps=max(1, args.max_steps // 10), max_steps=args.max_steps)
    data = StdlibDataModule(batch_size=args.batch_size, train_samples=args.max_steps * args.batch_size, seed=args.seed)
    probe = lightning_lowrank.CurvatureProbe(every=args.every, **probe_kwargs)
    strategy = lightning_lowrank.LowRankStrategy(
        rank=32, projector="dct", scale=0.25, memory_report=False, **strategy_kwargs
    )
    trainer = L.Trainer(
        strategy=strategy,
        accelerator="auto",
        devices=1,
        max_steps=args.max_steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        gradient_clip_val=1.0,
        logger=False,
        callbacks=[probe, lightning_lowrank.SubspaceRefresh(every=50)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data)
    stats = probe.probe_stats(trainer)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"name": name, "params": params, **stats}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    device = "cuda" if torch.cuda.is_available() else f"cpu, {torch.get_num_threads()} threads"
    print(
        f"{len(CONFIGS)} configurations x {args.max_steps} steps, probe every {args.every}, batch {args.batch_size}, "
        f"{device}, load average {os.getloadavg()[0]:.2f}"
    )
    rows = [run(name, *CONFIGS[name], args) for name in CONFIGS]
    print(f"\nparameters: {format_bytes(rows[0]['params'])}\n")
    print("| probe | calls | s per call | s per training step | call / step | extra memory per call |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['name']} | {int(r['calls'])} | {r['seconds']:.3f} | {r['step_seconds']:.3f} | "
            f"{r['ratio']:.1f}x | {format_bytes(r['extra_bytes'])} |"
        )


if __name__ == "__main__":
    main()
