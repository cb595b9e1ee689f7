"""Forgetting, with and without protected subspaces: fine-tune one byte LM on task after task and watch the old ones.

A small LLaMA-style byte LM (``byte_lm.py``, 0.87M parameters) is pretrained on the Python standard library's source
with AdamW. Then it is fine-tuned on three more tasks in a row, one ``trainer.fit`` per task on the same module, twice
from the same pretrained weights:

1. sequential fine-tuning: the module's AdamW, nothing protected;
2. ``ProtectedSubspaces(ratio=0.5)``: at the start of each task the callback takes the top half of each attention and
   MLP weight's singular directions and the optimizer confines every update to their orthogonal complement, so what
   those directions encode stays. ``LowRankStrategy(rank=None)`` keeps AdamW's full state;
   ``--lowrank dct`` (or ``svd``) runs the same protection with rank-d/4 low-rank optimizer state.

After pretraining and after each task it prints the validation loss on every task (rows: after training; columns:
evaluated on), then each run's backward transfer (how much the earlier tasks got worse, positive = forgetting) and
plasticity (the loss on the task just trained).

    python examples/continual_finetune.py                    # stdlib pseudo-tasks: nothing to install, ~3 minutes
    python examples/continual_finetune.py --tasks corpora    # Shakespeare, the KJV, fortunes (see continual_data.py)
    python examples/continual_finetune.py --lowrank dct      # protection at low-rank optimizer memory
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time
import warnings

import lightning as L
import torch
import torch.nn.functional as F
from byte_lm import SIZES, ByteLM
from continual_data import SEQUENCES, Task, load_tasks
from stdlib_data import RandomWindows
from torch.utils.data import DataLoader

import lightning_lowrank

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*The low-rank state holds more than dense AdamW.*")  # rank=None: no saving


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--tasks",
        choices=list(SEQUENCES),
        default="stdlib",
        help="stdlib: the standard library split into pseudo-tasks, nothing to install (default); corpora: "
        "Shakespeare, the KJV and fortunes after the stdlib (installed as continual_data.py says)",
    )
    parser.add_argument("--pretrain-steps", type=int, default=300, help="AdamW steps on the first corpus")
    parser.add_argument("--steps", type=int, default=100, help="steps per fine-tuning task (default: 100)")
    parser.add_argument("--lr", type=float, default=1e-3, help="fine-tuning peak lr (default: 1e-3)")
    parser.add_argument("--ratio", type=float, default=0.5, help="share of each weight's directions protected")
    parser.add_argument("--lowrank", choices=("dct", "svd"), default=None, help="protected run with low-rank state")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--val-batches", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def loader(task: Task, samples: int, seed: int, batch_size: int, val: bool = False) -> DataLoader:
    data = task.val if val else task.train
    return DataLoader(RandomWindows(data, SIZES["small"].block_size, samples, seed=seed), batch_size=batch_size)


@torch.no_grad()
def evaluate(model: ByteLM, val: DataLoader) -> float:
    model.eval()
    loss = statistics.fmean(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item() for x, y in val)
    model.train()
    return loss


QUIET = dict(memory_report=False, memory_json=False)  # no report printed or written per task


def trainer(steps: int, strategy, callbacks) -> L.Trainer:
    return L.Trainer(
        strategy=strategy,
        accelerator="cpu",
        max_steps=steps,
        limit_val_batches=0,
        gradient_clip_val=1.0,
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def fine_tune(name, model, tasks, vals, args, protect: bool) -> list[list[float]]:
    """The tasks after the first, one fit each on ``model``; the loss on every task after each."""
    callback = lightning_lowrank.ProtectedSubspaces(ratio=args.ratio) if protect else None  # one for all tasks
    rows = [[evaluate(model, v) for v in vals]]
    for index, task in enumerate(tasks[1:], start=1):
        if not protect:
            strategy = "auto"
        elif args.lowrank:
            rank = model.config.d_model // 4
            strategy = lightning_lowrank.LowRankStrategy(rank=rank, projector=args.lowrank, update_gap=50, **QUIET)
        else:
            strategy = lightning_lowrank.LowRankStrategy(rank=None, **QUIET)
        run = trainer(args.steps, strategy, [callback] if callback else [])
        start = time.perf_counter()
        run.fit(model, loader(task, args.steps * args.batch_size, 1000 * args.seed + index, args.batch_size))
        rows.append([evaluate(model, v) for v in vals])
        seconds = time.perf_counter() - start
        kept = f", k = {sorted(set(callback.ranks.values()))} of each weight's directions kept" if callback else ""
        print(f"  {name}: {task.name} trained in {seconds:.0f}s{kept}", flush=True)
    return rows


def show(name: str, rows: list[list[float]], names: list[str]) -> None:
    width = max(len(n) for n in names) + 2
    print(f"\n{name}: validation loss (row: after training on; column: evaluated on)")
    print(" " * width + "".join(f"{n:>{width}}" for n in names))
    for i, row in enumerate(rows):
        cells = "".join(f"{('*' if j == i else '') + f'{x:.3f}':>{width}}" for j, x in enumerate(row))
        print(f"{names[i]:<{width}}{cells}")
    last = len(rows) - 1
    bwt = statistics.fmean(rows[last][j] - rows[j][j] for j in range(last))
    plasticity = statistics.fmean(rows[i][i] for i in range(1, last + 1))
    print(
        f"final average loss {statistics.fmean(rows[last]):.3f} | backward transfer {bwt:+.3f} (positive = "
        f"forgetting) | plasticity {plasticity:.3f} | {names[0]} drift {rows[last][0] - rows[0][0]:+.3f}"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # one line per task instead of Lightning's
    tasks = load_tasks(args.tasks)
    names = [t.name for t in tasks]
    print(f"tasks: {' -> '.join(names)} (the first is pretraining)")
    vals = [
        loader(t, args.val_batches * args.batch_size, 10_000 + j, args.batch_size, val=True)
        for j, t in enumerate(tasks)
    ]

    L.seed_everything(args.seed, verbose=False)
    model = ByteLM(SIZES["small"], lr=3e-3, warmup_steps=args.pretrain_steps // 10, max_steps=args.pretrain_steps)
    start = time.perf_counter()
    trainer(args.pretrain_steps, "auto", []).fit(model, loader(tasks[0], args.pretrain_steps * args.batch_size,
                                                               1000 * args.seed, args.batch_size))  # fmt: skip
    print(f"pretrained on {names[0]} in {time.perf_counter() - start:.0f}s")

    results = {}
    protected = f"protected (ratio {args.ratio}" + (f", {args.lowrank} low-rank state)" if args.lowrank else ")")
    for name, protect in (("sequential AdamW", False), (protected, True)):
        tuned = ByteLM(SIZES["small"], lr=args.lr, warmup_steps=max(1, args.steps // 10), max_steps=args.steps)
        tuned.load_state_dict(copy.deepcopy(model.state_dict()))
        L.seed_everything(args.seed, verbose=False)
        results[name] = fine_tune(name, tuned, tasks, vals, args, protect)
    for name, rows in results.items():
        show(name, rows, names)


if __name__ == "__main__":
    main()
