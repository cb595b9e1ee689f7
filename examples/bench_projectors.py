"""Benchmark the subspace projectors: what one refresh costs, and how much of a real gradient each subspace keeps.

    python examples/bench_projectors.py            # about a minute on 2 CPU cores
    python examples/bench_projectors.py --quick    # fewer repeats and training steps, for a smoke run

Table 1 times the work ``ProjectedAdamW`` does for one layer, through the same projector classes and a
``LayerContext`` built from the optimizer's own default param group, on random Gaussian float32 gradients of
LLaMA-60M/130M/350M layer shapes at GaLore's ranks. ``refresh()`` is what the optimizer times as a layer's
refresh; ``matrix()`` rebuilds P from the stored state and runs at every step (``random`` stores only a seed, so
its P is a fresh QR each time); online PCA's refresh is an SVD, its own cost is ``after_update()`` at every step.
Times are medians of ``--repeats`` calls after one untimed warm-up; on a small shared CPU they are noisy, so read
the ratios to the SVD measured in the same run.

Table 2 asks how good each subspace is on real gradients: the demo byte LM (``examples/byte_lm.py``) is trained
briefly with plain AdamW, then every projected weight's gradient is split by each projector at rank 32. The score
is the fraction of ||G||_F^2 inside the subspace divided by the best any rank-32 subspace can do (the SVD's),
right after the refresh (batch t) and K steps later with P left as the optimizer would hold it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from byte_lm import ByteLM, ByteLMConfig
from rich import box
from rich.console import Console
from rich.table import Table
from stdlib_data import RandomWindows, load_stdlib_bytes, train_val_split
from torch import Tensor

from lightning_lowrank.optim import ProjectedAdamW
from lightning_lowrank.optim.projection.bases import dct_basis, effective_rank, orthonormalize, project
from lightning_lowrank.optim.projection.projectors import PROJECTOR_CLASSES, LayerContext

# LLaMA-60M/130M/350M weight shapes (attention, MLP) with the ranks GaLore used for them.
SHAPES: list[tuple[str, tuple[int, int], int]] = [
    ("60M attn", (512, 512), 128),
    ("60M mlp", (512, 1376), 128),
    ("130M mlp", (768, 2048), 256),
    ("350M mlp", (1024, 2736), 256),
]
# (label, projector, dct_scorer): every subspace family the optimizer offers, DCT with both scorers.
VARIANTS: list[tuple[str, str, str]] = [
    ("svd", "svd", "matmul"),
    ("rsvd", "rsvd", "matmul"),
    ("dct (matmul)", "dct", "matmul"),
    ("dct (fft)", "dct", "fft"),
    ("random", "random", "matmul"),
    ("online_pca", "online_pca", "matmul"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per cell (default: 3, 1 with --quick)")
    parser.add_argument("--train-steps", type=int, default=None, help="AdamW steps before batch t (default: 200)")
    parser.add_argument("--track-steps", type=int, default=None, help="K, steps from batch t to t+K (default: 20)")
    parser.add_argument("--rank", type=int, default=32, help="rank for the quality table (default: 32)")
    parser.add_argument("--batch-size", type=int, default=32, help="windows of 128 bytes per batch (default: 32)")
    parser.add_argument("--pca-lr", type=float, default=None, help="online PCA step size (default: the optimizer's)")
    parser.add_argument("--quick", action="store_true", help="1 repeat, 10 training steps, K = 5")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    quick = args.quick
    args.repeats = args.repeats if args.repeats is not None else (1 if quick else 3)
    # 200, not fewer: after ~50 steps the demo's gradients are still nearly rank 4 (top-4 singular values hold ~98%
    # of ||G||^2), which makes every gradient-aware rank-32 subspace look perfect; by 200 steps that is ~72%.
    args.train_steps = args.train_steps if args.train_steps is not None else (10 if quick else 200)
    args.track_steps = args.track_steps if args.track_steps is not None else (5 if quick else 20)
    return args


# -- driving a projector the way ProjectedAdamW does ------------------------------------------------------------


def make_group(projector: str, scorer: str, seed: int, pca_lr: float | None = None) -> dict[str, Any]:
    """The optimizer's own default param group for this projector, so every knob matches what training uses."""
    options: dict[str, Any] = dict(projector=projector, dct_scorer=scorer, rsvd_oversample=8, rsvd_niter=2, seed=seed)
    if pca_lr is not None:
        options["pca_lr"] = pca_lr
    return ProjectedAdamW([torch.zeros(1, 1, requires_grad=True)], **options).param_groups[0]


def basis_cache() -> Callable[[int, torch.dtype, torch.device], Tensor]:
    """A shared DCT basis per (size, dtype, device), built on first use, as the optimizer keeps them."""
    cache: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}

    def basis(size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        key = (size, dtype, device)
        if key not in cache:
            cache[key] = dct_basis(size, dtype=dtype, device=device)
        return cache[key]

    return basis


def make_context(param: Tensor, rank: int, group: dict[str, Any], basis: Callable, index: int = 0) -> LayerContext:
    return LayerContext(index=index, step=0, rank=effective_rank(param.shape, rank), group=group, basis=basis)


def time_ms(repeats: int, fn: Callable[..., Any], *args: Any) -> float:
    """Median wall time of ``repeats`` calls ``fn(*args)`` in ms, after one untimed warm-up (allocator, caches)."""
    fn(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


# -- table 1: cost -----------------------------------------------------------------------------------------------


def bench_cost(repeats: int, seed: int) -> tuple[list[str], list[tuple[str, str, str, list[float]]]]:
    """Rows (variant, what is timed, when the optimizer pays it, ms per shape)."""
    headers = [f"{m}x{n} r={r}" for _, (m, n), r in SHAPES]
    rows: dict[tuple[str, str, str], list[float]] = {}

    def add(key: tuple[str, str, str], value: float) -> None:
        rows.setdefault(key, []).append(value)

    for shape_index, (_, shape, rank) in enumerate(SHAPES):
        grad = torch.randn(shape, generator=torch.Generator().manual_seed(seed + shape_index))
        param = torch.zeros(shape)
        d = min(shape)
        for label, projector_name, scorer in VARIANTS:
            projector = PROJECTOR_CLASSES[projector_name]()
            basis = basis_cache()
            ctx = make_context(param, rank, make_group(projector_name, scorer, seed), basis)
            state: dict[str, Tensor] = {}
            if projector_name == "online_pca":  # refresh is an SVD (row "svd"); its own work is every step
                projector.refresh(param, grad, state, ctx)
                ms = time_ms(repeats, _online_step, projector, param, grad, state["proj"], ctx)
                add((label, "after_update()", "every step"), ms)
                continue
            add((label, "refresh()", "per refresh"), time_ms(repeats, projector.refresh, param, grad, state, ctx))
            if projector_name == "dct" and scorer == "matmul":
                add((label, "dct_basis(d) build", "once per size"), time_ms(repeats, dct_basis, d))
            if projector_name in ("dct", "random"):
                add((label, "matrix()", "every step"), time_ms(repeats, projector.matrix, param, state, ctx))
    return headers, [(*key, values) for key, values in rows.items()]


def _online_step(projector: Any, param: Tensor, grad: Tensor, P0: Tensor, ctx: LayerContext) -> None:
    """One online-PCA update from the same starting P, so every timed call does the same work."""
    projector.after_update(param, grad, {"proj": P0}, ctx)


# -- table 2: subspace quality on the demo model's gradients --------------------------------------------------------


def captured(P: Tensor, grad: Tensor) -> float:
    """Fraction of ||G||_F^2 inside span(P); P is orthonormalized first (online PCA's drifts off orthonormal)."""
    g = grad.float()
    return (project(g, orthonormalize(P)).pow(2).sum() / g.pow(2).sum()).item()


def optimum(grad: Tensor, rank: int) -> float:
    """The most any rank-r subspace can capture: top-r squared singular values over ||G||_F^2 (Eckart-Young)."""
    s2 = torch.linalg.svdvals(grad.float()).pow(2)
    return (s2[:rank].sum() / s2.sum()).item()


class DemoRun:
    """The demo byte LM trained with plain AdamW on stdlib windows, exposing the projected weights' gradients."""

    def __init__(self, batch_size: int, num_batches: int, seed: int) -> None:
        torch.manual_seed(seed)
        self.config = ByteLMConfig()
        self.model = ByteLM(self.config)
        train, _ = train_val_split(load_stdlib_bytes())
        self.windows = RandomWindows(train, self.config.block_size, num_batches * batch_size, seed=seed)
        self.batch_size = batch_size
        self.batch = 0
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
            lr=1e-3,
            betas=(0.9, 0.95),
        )
        # The weights LowRankStrategy projects in the demo: attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj.
        self.projected = [
            (n, p) for n, p in self.model.named_parameters() if p.ndim == 2 and (".attn." in n or ".mlp." in n)
        ]

    def next_gradients(self) -> tuple[float, dict[str, Tensor]]:
        """Loss and projected-weight gradients on the next batch (the model is not updated)."""
        lo = self.batch * self.batch_size
        x, y = (torch.stack(t) for t in zip(*(self.windows[i] for i in range(lo, lo + self.batch_size))))
        self.batch += 1
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.model(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        return loss.item(), {n: p.grad.detach().clone() for n, p in self.projected}

    def step(self) -> None:
        """Apply the gradients of the last batch (clipped to norm 1.0, as the demo's Trainer does)."""
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()


def bench_quality(args: argparse.Namespace) -> tuple[list[tuple[str, list[float], list[float]]], dict[str, float]]:
    """Per variant: captured / optimum for every layer at batch t and at batch t+K; plus context numbers.

    Every projector but online PCA keeps P fixed between refreshes, so at t+K it is the subspace chosen at t.
    Online PCA's P is what the optimizer holds when it projects G_{t+K}: the SVD of G_t, then one
    ``after_update`` per step on G_t, ..., G_{t+K-1} (K updates). The model keeps training meanwhile.
    """
    K = args.track_steps
    run = DemoRun(args.batch_size, args.train_steps + K + 1, args.seed)
    first_loss, _ = run.next_gradients()
    run.step()
    for _ in range(args.train_steps - 1):
        run.next_gradients()
        run.step()

    basis = basis_cache()
    setups = {}  # label -> (projector, [(name, param, state, ctx) per layer])
    loss_t, grads_t = run.next_gradients()
    for label, name, scorer in VARIANTS:
        projector = PROJECTOR_CLASSES[name]()
        group = make_group(name, scorer, args.seed, args.pca_lr)
        layers = []
        for index, (param_name, param) in enumerate(run.projected):
            ctx = make_context(param, args.rank, group, basis, index)
            state: dict[str, Tensor] = {}
            projector.refresh(param, grads_t[param_name], state, ctx)
            layers.append((param_name, param, state, ctx))
        setups[label] = (projector, layers)
    at_t = {
        label: [captured(proj.matrix(p, s, c), grads_t[n]) / optimum(grads_t[n], c.rank) for n, p, s, c in layers]
        for label, (proj, layers) in setups.items()
    }

    grads = grads_t
    pca, pca_layers = setups["online_pca"]
    for _ in range(K):
        for name, param, state, ctx in pca_layers:
            pca.after_update(param, grads[name], state, ctx)
        run.step()
        _, grads = run.next_gradients()
    at_tk = {
        label: [captured(proj.matrix(p, s, c), grads[n]) / optimum(grads[n], c.rank) for n, p, s, c in layers]
        for label, (proj, layers) in setups.items()
    }
    context = {
        "first_loss": first_loss,
        "loss_t": loss_t,
        "layers": len(run.projected),
        "opt_t": statistics.mean(optimum(g, effective_rank(g.shape, args.rank)) for g in grads_t.values()),
        "opt_tk": statistics.mean(optimum(g, effective_rank(g.shape, args.rank)) for g in grads.values()),
        "pca_lr": make_group("online_pca", "matmul", args.seed, args.pca_lr)["pca_lr"],
    }
    return [(label, at_t[label], at_tk[label]) for label in setups], context


# -- output -----------------------------------------------------------------------------------------------------


def _load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def _mean_min(values: list[float]) -> tuple[str, str]:
    """Mean and min over layers; a diverged layer (NaN: online PCA with too large a step) is counted, not hidden."""
    t = torch.tensor(values)
    bad = int(t.isnan().sum())
    if bad:
        return f"nan ({bad}/{len(values)} layers)", f"{t[~t.isnan()].min().item():.3f} (finite)"
    return f"{t.mean().item():.3f}", f"{t.min().item():.3f}"


def _ratio(x: float) -> str:
    return f"{x:.3f}x" if x >= 0.001 else "<0.001x"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    console = Console(width=140)
    console.print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, float32, "
        f"repeats={args.repeats} (median), load average {_load()} at start"
    )

    start = time.perf_counter()
    headers, rows = bench_cost(args.repeats, args.seed)
    svd_ms = next(values for label, what, _, values in rows if label == "svd")
    table = Table(title="1. Cost on a Gaussian gradient: ms (x svd refresh, same shape, same run)", box=box.MARKDOWN)
    for column in ("projector", "timed", "paid"):
        table.add_column(column)
    for header in headers:
        table.add_column(header, justify="right")
    for label, what, paid, values in rows:
        cells = [f"{v:.2f} ({_ratio(v / s)})" for v, s in zip(values, svd_ms)]
        table.add_row(label, what, paid, *cells)
    console.print(table)
    console.print(
        f"Shapes: LLaMA-{', '.join(name for name, _, _ in SHAPES)} weights at GaLore's ranks. rsvd: oversample 8, "
        "niter 2. dct (matmul) scores against the shared d x d basis, whose one-off build is the dct_basis row. "
        "online_pca's refresh is the svd row; after_update() is its online_pca_gradient + SGD step. "
        f"Load average {_load()} after the table: other processes on the machine inflate single cells."
    )
    cost_s = time.perf_counter() - start

    start = time.perf_counter()
    results, ctx = bench_quality(args)
    K, r = args.track_steps, args.rank
    table = Table(
        title=f"2. Captured energy / SVD optimum on the demo LM's gradients, rank {r}, {ctx['layers']} layers",
        box=box.MARKDOWN,
    )
    table.add_column("projector")
    for column in ("batch t: mean", "batch t: min", f"batch t+{K}: mean", f"batch t+{K}: min"):
        table.add_column(column, justify="right")
    for label, at_t, at_tk in results:
        name = {"online_pca": f"online_pca (+{K} updates)"}.get(label, label)
        table.add_row(name, *_mean_min(at_t), *_mean_min(at_tk))
    console.print(table)
    console.print(
        f"Model: ByteLM(ByteLMConfig()), AdamW lr 1e-3, {args.train_steps} steps of {args.batch_size}x128 bytes "
        f"(loss {ctx['first_loss']:.3f} -> {ctx['loss_t']:.3f} at batch t), training on until t+{K}. "
        f"SVD optimum: top-{r} directions hold {ctx['opt_t']:.2%} of ||G||^2 at t, {ctx['opt_tk']:.2%} at t+{K} "
        f"(layer mean). Every P is chosen at t and kept, except online_pca (SVD at t, then one step per batch, "
        f"pca_lr={ctx['pca_lr']:g})."
    )
    console.print(f"cost table {cost_s:.0f}s, quality table {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
