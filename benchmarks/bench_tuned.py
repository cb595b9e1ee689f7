"""Tuned, multi-seed convergence: every method at its best learning rate from one shared grid, over several seeds.

``bench_convergence.py`` runs each method at its paper's recipe from one seed, so its ratios compare recipes. Here:

1. Tuning: every method trains from seed 0 for ``--tune-steps`` at each lr of ``--lrs`` (the same grid for all);
   the lr with the lowest validation loss is the method's.
2. Evaluation: every method at its lr, from each of ``--seeds`` (initial weights, batch order, subspace draws), for
   ``--max-steps``.

Each method keeps its own recipe's scale (GaLore 0.25, APOLLO 1, ...). Reported: validation loss relative to tuned
AdamW's (mean over seeds, with min and max), optimizer-state bytes, wall time per step; a PNG of the mean train-loss
curves and a memory-vs-loss scatter. ``--model medium`` is a 4.9M-parameter byte LM (d 256, 6 layers); rank d/4.

    python benchmarks/bench_tuned.py --plan            # the runs and steps it would take, no training
    python benchmarks/bench_tuned.py --model medium    # the full study (see docs/benchmarks.md for its time)
    python benchmarks/bench_tuned.py --quick           # a smoke run: tiny steps, two methods

docs/benchmarks.md runs the study as two single-threaded processes that split ``--methods`` and share ``--cache``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "examples")]
import bench_convergence as conv  # noqa: E402
from byte_lm import SIZES  # noqa: E402
from stdlib_data import StdlibDataModule  # noqa: E402

MODELS = SIZES  # small: 0.87M parameters (the demo); medium: 4.9M (d 256, 6 layers)
METHODS = (
    "adamw",
    "ours-svd",
    "ours-dct",
    "ours-dct-fira",
    "ours-apollo",
    "ours-svd-8bit",
    "galore",
    "fira",
    "apollo",
    "dct-adamw",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(MODELS), default="medium")
    parser.add_argument("--methods", nargs="+", choices=list(conv.RUNS), default=list(METHODS))
    parser.add_argument("--lrs", nargs="+", type=float, default=[1e-3, 3e-3, 1e-2], help="the shared lr grid")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--tune-steps", type=int, default=300)
    parser.add_argument(
        "--widen",
        type=int,
        default=0,
        help="where a method's best lr is on the grid's edge, try up to this many more lrs past it (the grid's ratio)",
    )
    parser.add_argument("--max-steps", type=int, default=1000)
    parser.add_argument("--update-gap", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--val-batches", type=int, default=8)
    parser.add_argument(
        "--cache",
        default="",
        help="a JSON-lines file of finished runs: each run is appended when it ends and skipped when found, so a "
        "study survives an interruption and can be split by --methods over processes that share the file",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    parser.add_argument("--plan", action="store_true", help="print the runs it would make, and stop")
    parser.add_argument("--quick", action="store_true", help="smoke: small model, 6 steps, adamw and ours-dct")
    parser.add_argument("--json", default=str(HERE / "results" / "tuned.json"))
    parser.add_argument("--png", default=str(HERE / "results" / "tuned.png"), help="'' to skip the plots")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.methods, args.tune_steps, args.max_steps, args.update_gap = (
            "small",
            ["adamw", "ours-dct"],
            6,
            6,
            3,
        )
    args.config = MODELS[args.model]
    return args


def _key(name: str, lr: float, seed: int, steps: int, args: argparse.Namespace) -> str:
    """What makes two runs the same run: the method, lr, seed, length and every setting that changes the numbers."""
    return json.dumps([args.model, name, lr, seed, steps, args.batch_size, args.update_gap, args.val_batches])


def _cached(key: str, args: argparse.Namespace) -> conv.Result | None:
    if not args.cache or not Path(args.cache).exists():
        return None
    for line in Path(args.cache).read_text().splitlines():
        entry = json.loads(line) if line.strip() else {}
        if entry.get("key") == key:
            name, lr = entry["result"]["name"], json.loads(key)[2]
            return conv.Result(**{**entry["result"], "run": dataclasses.replace(conv.RUNS[name], lr=lr)})
    return None


def _run(name: str, lr: float, seed: int, steps: int, args: argparse.Namespace) -> conv.Result:
    """One training run of ``bench_convergence`` with this lr, seed and length (its data seeded alike), or its
    result from ``--cache``; a finished run is appended there in one write."""
    key = _key(name, lr, seed, steps, args)
    if (found := _cached(key, args)) is not None:
        return found
    result = _train(name, lr, seed, steps, args)
    if args.cache:
        fields = {k: v for k, v in dataclasses.asdict(result).items() if k != "run"}
        with open(args.cache, "a") as f:
            f.write(json.dumps({"key": key, "result": fields}) + "\n")
    return result


def _train(name: str, lr: float, seed: int, steps: int, args: argparse.Namespace) -> conv.Result:
    run_args = argparse.Namespace(**{**vars(args), "seed": seed, "max_steps": steps})
    data = StdlibDataModule(
        block_size=args.config.block_size,
        batch_size=args.batch_size,
        train_samples=steps * args.batch_size,
        val_samples=args.val_batches * args.batch_size,
        seed=seed,
    )
    data.setup("fit")
    return conv.train(name, dataclasses.replace(conv.RUNS[name], lr=lr), data, run_args)


def tune(
    args: argparse.Namespace, log: Any = print, grid: dict[str, dict[float, float]] | None = None
) -> dict[str, float | None]:
    """Each method's best lr from the grid (seed 0, ``--tune-steps``): the lowest finite validation loss; None for a
    method that cannot run here or diverged at every lr. ``grid`` receives every loss (inf: diverged)."""
    best: dict[str, float | None] = {}
    grid = {} if grid is None else grid
    for name in args.methods:
        losses = grid.setdefault(name, {})
        lrs, widened = list(args.lrs), 0
        while lrs:
            lr = lrs.pop(0)
            result = _run(name, lr, args.seeds[0], args.tune_steps, args)
            if result.not_run:
                log(f"tune {name}: not run: {result.not_run}")
                break
            losses[lr] = math.inf if result.diverged else result.val_loss
            log(f"tune {name} lr {lr:g}: val {result.val_loss:.4f}")
            if not lrs and widened < getattr(args, "widen", 0):  # the optimum on the grid's edge: one lr past it
                finite = {k: v for k, v in losses.items() if math.isfinite(v)}
                edge = _beyond_edge(sorted(losses), min(finite, key=finite.get) if finite else None)
                if edge is not None:
                    lrs, widened = [edge], widened + 1
        finite = {lr: v for lr, v in losses.items() if math.isfinite(v)}
        best[name] = min(finite, key=finite.get) if finite else None
    return best


def _beyond_edge(tried: list[float], best: float | None) -> float | None:
    """The next lr past the grid's edge where the best lr sits on it (the grid's own ratio), else None."""
    if best is None or len(tried) < 2:
        return None
    if best == tried[-1]:
        return tried[-1] * tried[-1] / tried[-2]
    if best == tried[0]:
        return tried[0] * tried[0] / tried[1]
    return None


def tuning_table(grid: dict[str, dict[float, float]], lrs: list[float]) -> str:
    """Every method's seed-0 validation loss at each lr of the grid (and any ``--widen`` added), its best in bold:
    where the optimum sits."""
    lrs = sorted(set(lrs).union(*(g.keys() for g in grid.values())))
    lines = ["| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---|" + "---:|" * len(lrs)]
    for name, losses in grid.items():
        finite = {lr: v for lr, v in losses.items() if math.isfinite(v)}
        best = min(finite, key=finite.get) if finite else None
        cells = [
            "-" if lr not in losses else "diverged" if lr not in finite else
            f"**{losses[lr]:.4f}**" if lr == best else f"{losses[lr]:.4f}"
            for lr in lrs
        ]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarise(results: dict[str, list[conv.Result]], lrs: dict[str, float | None]) -> list[dict[str, Any]]:
    """Per method: mean, min and max validation loss over seeds, each also over tuned AdamW's mean; state bytes;
    seconds per step (mean); the mean train-loss curve."""
    reference = statistics.fmean(r.val_loss for r in results["adamw"]) if results.get("adamw") else math.nan
    rows = []
    for name, runs in results.items():
        losses = [r.val_loss for r in runs]
        steps = max(1, len(runs[0].losses))
        rows.append(
            {
                "name": name,
                "lr": lrs[name],
                "seeds": len(runs),
                "val_mean": statistics.fmean(losses),
                "val_min": min(losses),
                "val_max": max(losses),
                "val_losses": losses,  # in seed order: same seed, same initial weights and batches for every method
                "vs_adamw": statistics.fmean(losses) / reference,
                # the loss is nats per byte, so exp(difference) is the ratio of per-byte perplexities. The papers'
                # ratios are per token, and a token spans several bytes: compare signs and order, not magnitudes
                "ppl_vs_adamw": math.exp(statistics.fmean(losses) - reference),
                "state_bytes": runs[0].state_bytes,
                "seconds_per_step": statistics.fmean(r.seconds for r in runs) / steps,
                "seconds_per_step_min": min(r.seconds for r in runs) / steps,
                "seconds_per_step_max": max(r.seconds for r in runs) / steps,
                "curve": [statistics.fmean(c) for c in zip(*(r.losses for r in runs))],
                "diverged": any(r.diverged for r in runs),
            }
        )
    return rows


def table(rows: list[dict[str, Any]], skipped: dict[str, str]) -> str:
    adamw = next((r for r in rows if r["name"] == "adamw"), None)
    lines = [
        "| method | best lr | seeds | val loss mean (min - max) | / tuned AdamW | ppl / tuned AdamW "
        "| optimizer state | / AdamW | s / step mean (min - max) |",
        "|---|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        state = f"{r['state_bytes'] / adamw['state_bytes']:.3f}" if adamw else "-"
        flag = " DIVERGED" if r["diverged"] else ""
        lines.append(
            f"| {r['name']}{flag} | {r['lr']:g} | {r['seeds']} | {r['val_mean']:.4f} ({r['val_min']:.4f} - "
            f"{r['val_max']:.4f}) | {r['vs_adamw']:.3f} | {r['ppl_vs_adamw']:.3f} | {r['state_bytes'] / 2**20:.2f} MiB "
            f"| {state} | {r['seconds_per_step']:.3f} ({r['seconds_per_step_min']:.3f} - "
            f"{r['seconds_per_step_max']:.3f}) |"
        )
    lines += [f"| {name} | not run: {why} | | | | | | | |" for name, why in skipped.items()]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str, title: str) -> None:
    """Two panels: the mean train-loss curves, and optimizer state against validation loss (the memory trade)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, trade) = plt.subplots(1, 2, figsize=(13, 5), dpi=120)
    top = 0.0
    for r, color in zip(rows, plt.cm.tab20.colors * 2):  # one color per method in both panels
        window = max(1, len(r["curve"]) // 30)
        smoothed = conv.smooth(r["curve"], window)
        top = max(top, smoothed[len(smoothed) // 10])  # the warmup's losses would flatten the rest
        style = "-" if r["name"] in ("adamw", "muon", "trion") or r["name"].startswith("ours") else "--"
        curves.plot(smoothed, style, color=color, label=f"{r['name']} (lr {r['lr']:g})")
        trade.scatter(r["state_bytes"] / 2**20, r["val_mean"], color=color, label=r["name"])
        trade.errorbar(
            r["state_bytes"] / 2**20,
            r["val_mean"],
            yerr=[[r["val_mean"] - r["val_min"]], [r["val_max"] - r["val_mean"]]],
            fmt="none",
            ecolor="grey",
        )
        trade.annotate(r["name"], (r["state_bytes"] / 2**20, r["val_mean"]), fontsize=7)
    curves.set_ylim(top=top)
    curves.set_xlabel("optimizer step")
    curves.set_ylabel("train loss, mean over seeds (moving average)")
    curves.legend(fontsize=7)
    trade.set_xlabel("optimizer state (MiB)")
    trade.set_ylabel("validation loss, mean over seeds (bars: min - max)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    runs = len(args.methods) * (len(args.lrs) + len(args.seeds))
    steps = len(args.methods) * (len(args.lrs) * args.tune_steps + len(args.seeds) * args.max_steps)
    print(f"{runs} runs, {steps} optimizer steps in all ({args.model}: rank {conv.rank_of(args)})", flush=True)
    if args.plan:
        return []
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    grid: dict[str, dict[float, float]] = {}
    lrs = tune(args, grid=grid)
    tuning = tuning_table(grid, args.lrs)
    print(tuning)
    results: dict[str, list[conv.Result]] = {}
    skipped = {name: "cannot run here, or diverged at every lr" for name, lr in lrs.items() if lr is None}
    for name, lr in lrs.items():
        if lr is not None:
            results[name] = [_run(name, lr, seed, args.max_steps, args) for seed in args.seeds]
            print(f"{name} lr {lr:g}: val {[round(r.val_loss, 4) for r in results[name]]}", flush=True)
    rows = summarise(results, lrs)
    text = table(rows, skipped)
    print(text)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "png", "config", "cache")}
    record = {
        "command": " ".join(["python", "benchmarks/bench_tuned.py", *(argv or sys.argv[1:])]),
        "machine": conv.machine(),
    }
    tuned = {"tuning": {name: {str(lr): v for lr, v in g.items()} for name, g in grid.items()}, "tuning_table": tuning}
    Path(args.json).write_text(
        json.dumps({**record, "settings": settings, **tuned, "rows": rows, "table": text}, indent=1)
    )
    if args.png:
        title = f"Byte LM ({args.model}), rank {conv.rank_of(args)}, each at its best lr, {len(args.seeds)} seeds"
        plot(rows, args.png, title)
    return rows


if __name__ == "__main__":
    main()
