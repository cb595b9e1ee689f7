"""DCT against SVD at equal optimizer memory and equal time (issue 27): the frontier of loss against state bytes.

Every configuration goes through ``bench_tuned.py`` (its resumable cache, its shared lr grid): each lr is tuned at the
full training horizon (``--tune-steps`` = ``--max-steps``, so the tuning run of seed 0 is also its evaluation run),
the grid is widened past its edge wherever the optimum lands on it (``--widen``), and AdamW gets the same treatment.
The configurations (``configs``), on top of the harness's settings (scale 0.25, GaLore's recipe, for ours):

* SVD at ranks d/8, d/4, d/2 (the memory points), each refreshed every 200 (GaLore's default) or 50 steps with the
  moments kept, and every 50 with them rotated, with ``svd_signs="none"`` (the default when the study ran);
  ``svd_signs="max_abs"`` (the default since) at d/4 for the two kept-moment gaps.
* DCT at *equal bytes*: at each memory point, the largest rank whose optimizer state (the planner's figure, which the
  report measures) is no more than SVD's at that point. At d/4's point: refresh gap {10, 25, 50, 100, 200} x
  moments {keep, rotate, reset}; at the other points gap 10 with rotated moments and 50 and 100 with kept ones (100:
  the grid's best on seed 0, added once it was known). DCT's scorer and
  norm (``fft``, ``l1``) at d/4's point; DCT at SVD's rank (the equal-rank comparison of the earlier study).
* Fira's residual on each basis at d/4's point.

Equal time is measured apart (``--time``, ``time_configs``): each configuration's optimizer step and refresh step on
the model's own gradients, one thread, plus the model's forward and backward once, which gives seconds per step with
the refreshes amortised at each one's own gap (seconds for all; pause any other process while it runs).

    python benchmarks/bench_frontier.py --model small --part 0/2 &   # two single-threaded processes,
    python benchmarks/bench_frontier.py --model small --part 1/2     # one cache (resumable)
    python benchmarks/bench_frontier.py --model small --time         # timing, alone on the machine
    python benchmarks/bench_frontier.py --model small --report       # tables and the plot from the caches

Results: ``benchmarks/results/frontier_<model>.json`` / ``.md`` / ``.png``; runs in ``frontier_runs.jsonl``.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "examples")]
import bench_convergence as conv  # noqa: E402
import bench_tuned  # noqa: E402
from byte_lm import SIZES, ByteLM  # noqa: E402

import lightning_lowrank  # noqa: E402

RESULTS = HERE / "results"
GAPS = (10, 25, 50, 100, 200)
MOMENTS = ("keep", "rotate", "reset")


def state_bytes(model: str, **options: Any) -> int:
    """The optimizer state ``LowRankStrategy(**options)`` holds for ByteLM ``model`` (the planner: no training)."""
    return lightning_lowrank.plan(ByteLM(SIZES[model]), **options).report.optimizer_state_bytes


@functools.cache  # the report asks for each memory point's rank again per table; each answer is a dozen plans
def equal_memory_rank(model: str, svd_rank: int, **dct: Any) -> int:
    """The largest DCT rank whose state is at most SVD's at ``svd_rank`` (``lightning_lowrank.equal_memory_rank``)."""
    return lightning_lowrank.equal_memory_rank(ByteLM(SIZES[model]), svd_rank, **dct)


def _run(name: str, options: dict[str, Any], recipe: str) -> str:
    conv.RUNS[name] = conv.Run("ours", 1e-2, 0.25, options, recipe)
    return name


def configs(model: str) -> dict[str, list[str]]:
    """The study's configurations by table, registered in ``bench_convergence.RUNS`` (names carry every setting)."""
    d = SIZES[model].d_model
    points = (d // 8, d // 4, d // 2)
    middle = points[1]
    tables: dict[str, list[str]] = {"adamw": ["adamw"], "svd": [], "dct": [], "dct_grid": [], "variants": []}
    for r in points:
        for gap, moments in ((200, "keep"), (50, "keep"), (50, "rotate")):
            # svd_signs="none": the study ran before max_abs became the default, which the -maxabs rows measure
            options = dict(projector="svd", rank=r, update_gap=gap, moments=moments, svd_signs="none")
            tables["svd"].append(_run(f"svd-r{r}-g{gap}-{moments}", options, f"SVD rank {r}, gap {gap}, {moments}"))
        dct_rank = equal_memory_rank(model, r)
        grid = [(g, m) for g in GAPS for m in MOMENTS] if r == middle else [(10, "rotate"), (50, "keep"), (100, "keep")]
        for gap, moments in grid:
            options = dict(projector="dct", rank=dct_rank, update_gap=gap, moments=moments)
            name = _run(f"dct-r{dct_rank}-g{gap}-{moments}", options, f"DCT at SVD rank {r}'s bytes")
            tables["dct_grid" if r == middle else "dct"].append(name)
    dct_rank = equal_memory_rank(model, middle)
    tables["variants"] = [
        _run(f"dct-r{middle}-g50-keep", dict(projector="dct", rank=middle, update_gap=50), "DCT at SVD's rank"),
        *(
            _run(f"svd-r{middle}-g{g}-keep-maxabs",
                 dict(projector="svd", rank=middle, update_gap=g, svd_signs="max_abs"),
                 "SVD, deterministic column signs")
            for g in (200, 50)
        ),
        *(
            _run(f"dct-r{dct_rank}-g10-rotate-{scorer}-{norm}",
                 dict(projector="dct", rank=dct_rank, update_gap=10, moments="rotate", dct_scorer=scorer,
                      dct_norm=norm),
                 f"DCT, {scorer} scorer, {norm} norm (the matmul scorer's equal-bytes rank)")
            for scorer, norm in (("fft", "l2"), ("matmul", "l1"), ("fft", "l1"))
        ),
        _run(f"svd-r{middle}-g200-keep-fira",
             dict(projector="svd", rank=middle, update_gap=200, residual="fira", svd_signs="none"),
             "SVD + Fira's residual"),
        _run(f"dct-r{dct_rank}-g10-rotate-fira",
             dict(projector="dct", rank=dct_rank, update_gap=10, moments="rotate", residual="fira"),
             "DCT + Fira's residual"),
    ]  # fmt: skip
    return tables


def screened(tables: dict[str, list[str]], promoted: Sequence[str] = ()) -> set[str]:
    """Configurations run on seed 0 only (its lr tuned at the full horizon): the gap x moments grid's cells other than
    the two every memory point has, and DCT's scorer/norm variants. The 2-core study cannot afford three seeds of all;
    the tables mark these rows. ``promoted`` (``--promote``: the grid's best cells on seed 0) get every seed."""
    grid = [n for n in tables["dct_grid"] if not n.endswith(("-g10-rotate", "-g50-keep", "-g100-keep"))]
    return (set(grid) | {n for n in tables["variants"] if "-fft-" in n or "-l1" in n}) - set(promoted)


def priority(name: str, tables: dict[str, list[str]]) -> tuple[int, str]:
    """Run order: AdamW, the memory points' SVD and DCT configurations, the variants, then the screened grid."""
    rank = 0 if name == "adamw" else 1 if name in tables["svd"] + tables["dct"] else 2
    if name in screened(tables):
        rank = 3
    elif name in tables["dct_grid"]:
        rank = 1
    return rank, name


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(SIZES), default="small")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: 500 small, 1000 medium)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 16 small, 4 medium")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--lrs", nargs="+", type=float, default=[1e-3, 3e-3, 1e-2], help="AdamW's lr grid")
    parser.add_argument(
        "--lowrank-lrs", nargs="+", type=float, default=[1e-2, 1e-2 * 1e-2 / 3e-3],
        help="the low-rank configurations' grid (GaLore's recipe, scale 0.25: every optimum so far was at 3.3e-2); "
        "both grids are widened past whichever edge holds the optimum",
    )  # fmt: skip
    parser.add_argument("--widen", type=int, default=2, help="lrs tried past the grid's edge (bench_tuned.py)")
    parser.add_argument("--part", default="0/1", help="K/N: this process runs every N-th configuration from K")
    parser.add_argument("--cache", default=str(RESULTS / "frontier_runs.jsonl"))
    parser.add_argument("--time", action="store_true", help="time every configuration (run alone)")
    parser.add_argument("--time-steps", type=int, default=60, help="timed optimizer steps per configuration")
    parser.add_argument("--report", action="store_true", help="tables and plot from the caches")
    parser.add_argument("--list", action="store_true", help="print the configurations and their state, and stop")
    parser.add_argument("--only", nargs="+", default=None, help="run or time only these configurations")
    parser.add_argument(
        "--promote", nargs="+", default=[], help="screened configurations to run (and report) on every seed"
    )
    args = parser.parse_args(argv)
    args.steps = args.steps or (500 if args.model == "small" else 1000)
    args.batch_size = args.batch_size or (16 if args.model == "small" else 4)
    return args


def tuned_argv(
    args: argparse.Namespace, methods: list[str], json_path: str, seeds: Sequence[int], lrs: Sequence[float]
) -> list[str]:
    return [
        "--model", args.model, "--batch-size", str(args.batch_size), "--val-batches", "16",
        "--tune-steps", str(args.steps), "--max-steps", str(args.steps), "--widen", str(args.widen),
        "--seeds", *map(str, seeds), "--lrs", *map(repr, lrs), "--threads", "1",
        "--cache", args.cache, "--png", "", "--json", json_path, "--methods", *methods,
    ]  # fmt: skip


def run_one(args: argparse.Namespace, name: str, tables: dict[str, list[str]], json_path: str) -> dict[str, Any]:
    """One configuration tuned and run on its seeds (served from the cache where it holds them): its row."""
    seeds = args.seeds[:1] if name in screened(tables, args.promote) else args.seeds
    lrs = args.lrs if name == "adamw" else args.lowrank_lrs
    return bench_tuned.main(tuned_argv(args, [name], json_path, seeds, lrs))[0]


def run_part(args: argparse.Namespace, names: list[str], tables: dict[str, list[str]]) -> None:
    k, n = (int(x) for x in args.part.split("/"))
    mine = sorted(names, key=lambda name: priority(name, tables))[k::n]
    for name in mine:  # one at a time, so a finished configuration is a finished row
        run_one(args, name, tables, f"/tmp/frontier_{args.model}_{k}.json")


def amortised(forward_backward: float, step: float, refresh_step: float, gap: int) -> float:
    """Seconds per training step with one refresh every ``gap`` steps: what a refresh step costs beyond an ordinary
    one, spread over the gap (never negative: a refresh that timed faster than the median step adds nothing)."""
    return forward_backward + step + max(refresh_step - step, 0.0) / gap


def time_configs(args: argparse.Namespace, names: list[str]) -> dict[str, float]:
    """Seconds per training step of each configuration, its refreshes amortised at its own gap: forward and backward
    (the model's, once: the same for all), plus the optimizer's ordinary step (median), plus (refresh step - ordinary
    step) / gap. A plain loop on one thread over two fixed gradient sets of the model, alternating (Lightning's
    per-step overhead is the same for every configuration); the refresh is sampled every 5 steps, whatever the gap."""
    import torch

    from lightning_lowrank.optim.projected import ProjectedOptimizer
    from lightning_lowrank.selection import drop_full_rank, select_lowrank_params

    torch.set_num_threads(1)
    sample_gap, warmup, timed = 5, 5, args.time_steps
    torch.manual_seed(0)
    model = ByteLM(SIZES[args.model])
    batches = [torch.randint(0, 256, (args.batch_size, SIZES[args.model].block_size + 1)) for _ in range(2)]
    grads, forward_backward = [], []
    for i in range(12):
        x = batches[i % 2]
        start = time.perf_counter()
        model._loss((x[:, :-1], x[:, 1:])).backward()
        forward_backward.append(time.perf_counter() - start)
        grads.append([q.grad.clone() for q in model.parameters()])
        model.zero_grad()
    fb = statistics.median(forward_backward[2:])
    out = RESULTS / f"frontier_{args.model}_timing.json"
    timing = json.loads(out.read_text()) if out.exists() else {}  # others timed before are kept
    for name in names:
        options = dict(conv.RUNS[name].options)
        gap = options.pop("update_gap", 200)
        decay = [q for q in model.parameters() if q.ndim >= 2]
        groups = [{"params": decay, "weight_decay": 0.1}, {"params": [q for q in model.parameters() if q.ndim < 2]}]
        optimizer = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
        if options:
            projected = drop_full_rank(select_lowrank_params(model), options["rank"])
            optimizer = ProjectedOptimizer.from_optimizer(
                optimizer, projected, scale=0.25, update_gap=sample_gap, **options
            )
        ordinary, refresh = [], []
        for i in range(warmup + timed):
            for q, g in zip(model.parameters(), grads[i % 2]):
                q.grad = g.clone()
            start = time.perf_counter()
            optimizer.step()
            seconds = time.perf_counter() - start
            if i >= warmup:
                (refresh if options and i % sample_gap == 0 else ordinary).append(seconds)
        step = statistics.median(ordinary)
        timing[name] = amortised(fb, step, statistics.median(refresh) if refresh else step, gap)
        extra = timing[name] - fb - step
        timing[f"{name}/optimizer"] = timing[name] - fb  # the part where configurations differ
        print(f"{name}: {timing[name] * 1e3:.1f} ms/step (step {step * 1e3:.2f} ms, refresh +{extra * gap * 1e3:.2f} "
              f"ms every {gap}, forward+backward {fb * 1e3:.1f} ms)", flush=True)  # fmt: skip
    out.write_text(json.dumps(timing, indent=1))
    return timing


def _cell(row: dict[str, Any]) -> str:
    if row["seeds"] == 1:
        return f"{row['val_mean']:.4f} (seed 0 only)"
    return f"{row['val_mean']:.4f} ({row['val_min']:.4f} - {row['val_max']:.4f})"


def _apart(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Whether two rows' seed ranges do not overlap (a difference larger than the spread), and seed by seed: each
    seed gives both runs the same initial weights and batches, so ``a - b`` per seed is a paired difference."""
    if a["val_max"] < b["val_min"]:
        verdict = "lower, beyond the spread"
    elif b["val_max"] < a["val_min"]:
        verdict = "higher, beyond the spread"
    else:
        verdict = "within the spread"
    if a["seeds"] == b["seeds"] > 1:
        diffs = [x - y for x, y in zip(a["val_losses"], b["val_losses"])]
        higher = sum(d > 0 for d in diffs)
        verdict += f"; paired {statistics.fmean(diffs):+.3f}, higher on {higher} of {len(diffs)} seeds"
    return verdict


class NotFinished(Exception):
    """A run the report needs is not in the cache (the report trains nothing)."""


def _not_finished(*args: Any, **kwargs: Any) -> Any:
    raise NotFinished


def finished_rows(args: argparse.Namespace, tables: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
    """Every configuration whose runs are all in the cache, as its row; the others are left out (and named)."""
    rows, missing = {}, []
    train, bench_tuned._train = bench_tuned._train, _not_finished
    try:
        for name in [n for group in tables.values() for n in group]:
            try:
                rows[name] = run_one(args, name, tables, f"/tmp/frontier_{args.model}_report.json")
            except NotFinished:
                missing.append(name)
    finally:
        bench_tuned._train = train
    if missing:
        print(f"not finished, left out: {', '.join(missing)}", file=sys.stderr)
    return rows


def report(args: argparse.Namespace, tables: dict[str, list[str]]) -> str:
    rows = finished_rows(args, tables)
    tables = {k: [n for n in group if n in rows] for k, group in tables.items()}
    names = [n for group in tables.values() for n in group]
    for row in rows.values():  # each row was reported on its own: against the tuned AdamW here
        row["vs_adamw"] = row["val_mean"] / rows["adamw"]["val_mean"]
    (RESULTS / f"frontier_{args.model}_tuned.json").write_text(json.dumps(list(rows.values()), indent=1))
    timing_path = RESULTS / f"frontier_{args.model}_timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.exists() else {}
    adamw = rows["adamw"]
    mib = 2**20
    lines = [f"Model {args.model}, {args.steps} steps, seeds {args.seeds}; lr grids {args.lrs} (AdamW) and "
             f"{[float(f'{x:.3g}') for x in args.lowrank_lrs]} (low rank), each widened past its edge by up to "
             f"{args.widen}; tuned AdamW {_cell(adamw)} at lr {adamw['lr']:g}.", ""]  # fmt: skip
    lines += ["Equal memory: the best SVD and the best DCT configuration at each memory point.", "",
              "| SVD rank | state | best SVD | val loss | best DCT (equal bytes) | state | val loss | DCT vs SVD |",
              "|---:|---:|---|---|---|---:|---|---|"]  # fmt: skip
    d = SIZES[args.model].d_model
    frontier: dict[str, list[dict[str, Any]]] = {"svd": [], "dct": []}
    for r in (d // 8, d // 4, d // 2):
        svd = min((rows[n] for n in tables["svd"] if f"-r{r}-" in n), key=lambda x: x["val_mean"])
        dct_rank = equal_memory_rank(args.model, r)
        candidates = [rows[n] for n in tables["dct"] + tables["dct_grid"] if n.startswith(f"dct-r{dct_rank}-")]
        candidates = [r for r in candidates if r["seeds"] == len(args.seeds)]  # a screened cell's one seed is no mean
        dct = min(candidates, key=lambda x: x["val_mean"])
        frontier["svd"].append(svd)
        frontier["dct"].append(dct)
        lines.append(
            f"| {r} | {svd['state_bytes'] / mib:.2f} MiB | {svd['name']} (lr {svd['lr']:g}) | {_cell(svd)} "
            f"| {dct['name']} (lr {dct['lr']:g}) | {dct['state_bytes'] / mib:.2f} MiB | {_cell(dct)} "
            f"| {_apart(dct, svd)} |"
        )
    lines += ["", "DCT at SVD rank d/4's bytes: mean validation loss by refresh gap and moments.", "",
              "| gap | " + " | ".join(MOMENTS) + " |", "|---:|" + "---|" * len(MOMENTS)]  # fmt: skip
    grid = {n: rows[n] for n in tables["dct_grid"]}
    for gap in GAPS:
        cells = [next((_cell(r) for n, r in grid.items() if f"-g{gap}-{m}" in n), "-") for m in MOMENTS]
        lines.append(f"| {gap} | " + " | ".join(cells) + " |")
    lines += ["", "Every configuration (seeds' mean, min - max; state; seconds per step timed alone).", "",
              "| configuration | lr | val loss | / AdamW | state | ms / step (optimizer's) |",
              "|---|---:|---|---:|---:|---:|"]  # fmt: skip
    for name in names:
        r = rows[name]
        ms = f"{timing[name] * 1e3:.1f} ({timing[name + '/optimizer'] * 1e3:.2f})" if name in timing else "-"
        lines.append(
            f"| {name} | {r['lr']:g} | {_cell(r)} | {r['vs_adamw']:.3f} | {r['state_bytes'] / mib:.2f} MiB | {ms} |"
        )
    if timing:
        opt_ms = {n: timing[f"{n}/optimizer"] * 1e3 for n in names if f"{n}/optimizer" in timing}
        lines += ["", "Equal memory and equal time: for each SVD configuration, the best DCT configuration at the same "
                  "memory point whose optimizer time per step (its step, plus its refresh spread over its gap) is no "
                  "more than SVD's; forward and backward take the same for all.", "",
                  "| SVD | optimizer ms / step | val loss | best DCT no slower | optimizer ms / step | val loss "
                  "| DCT vs SVD |", "|---|---:|---|---|---:|---|---|"]  # fmt: skip
        for svd_name in tables["svd"]:
            if svd_name not in opt_ms:
                continue
            rank = int(svd_name.split("-")[1][1:])
            prefix = f"dct-r{equal_memory_rank(args.model, rank)}-"
            pool = [n for n in tables["dct"] + tables["dct_grid"] if n.startswith(prefix) and n in opt_ms]
            fast = [rows[n] for n in pool if opt_ms[n] <= opt_ms[svd_name] and rows[n]["seeds"] == len(args.seeds)]
            if not fast:
                lines.append(f"| {svd_name} | {opt_ms[svd_name]:.2f} | {_cell(rows[svd_name])} | none | | | |")
                continue
            svd, dct = rows[svd_name], min(fast, key=lambda x: x["val_mean"])
            lines.append(
                f"| {svd_name} | {opt_ms[svd_name]:.2f} | {_cell(svd)} | {dct['name']} | {opt_ms[dct['name']]:.2f} "
                f"| {_cell(dct)} | {_apart(dct, svd)} |"
            )
    text = "\n".join(lines)
    (RESULTS / f"frontier_{args.model}.md").write_text(text + "\n")
    _plot(frontier, adamw, args)
    return text


def _plot(frontier: dict[str, list[dict[str, Any]]], adamw: dict[str, Any], args: argparse.Namespace) -> None:
    """Loss against optimizer-state bytes, one line per projector through its best configuration at each memory
    point, bars from the best to the worst seed; into the results and into docs/assets/ for the documentation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mib = 2**20
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for projector, rows in frontier.items():
        rows = sorted(rows, key=lambda r: r["state_bytes"])
        xs = [r["state_bytes"] / mib for r in rows]
        ys = [r["val_mean"] for r in rows]
        spread = [[r["val_mean"] - r["val_min"] for r in rows], [r["val_max"] - r["val_mean"] for r in rows]]
        ax.errorbar(xs, ys, yerr=spread, marker="o", capsize=3, label=f"{projector} (best configuration per point)")
        for r, x, y in zip(rows, xs, ys):
            ax.annotate(r["name"], (x, y), fontsize=6, xytext=(4, 4), textcoords="offset points")
    ax.errorbar([adamw["state_bytes"] / mib], [adamw["val_mean"]],
                yerr=[[adamw["val_mean"] - adamw["val_min"]], [adamw["val_max"] - adamw["val_mean"]]],
                marker="x", color="black", capsize=3, label="AdamW (dense)")  # fmt: skip
    ax.set_xlabel("optimizer state (MiB)")
    ax.set_ylabel(f"validation loss, mean of {len(args.seeds)} seeds (bars: min - max)")
    ax.set_title(f"Byte LM ({args.model}), {args.steps} steps: loss against optimizer memory")
    ax.legend(fontsize=7)
    fig.tight_layout()
    for folder in (RESULTS, HERE.parent / "docs" / "assets"):
        fig.savefig(folder / f"frontier_{args.model}.png", dpi=120)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    tables = configs(args.model)
    names = [n for group in tables.values() for n in group]
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            raise SystemExit(f"unknown configuration(s) {', '.join(unknown)}; --list shows them")
        names = [n for n in names if n in args.only]
    if args.list:
        for name in names:
            options = conv.RUNS[name].options
            state = state_bytes(args.model, **options) if options else None
            print(f"{name:40s} {'' if state is None else f'{state / 2**20:.3f} MiB'}")
        return
    if args.time:
        time_configs(args, names)
    elif args.report:
        print(report(args, tables))
    else:
        run_part(args, names, tables)


if __name__ == "__main__":
    main()
