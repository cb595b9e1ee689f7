"""Compare low-rank update rules (GaLore, FRUGAL, Fira, APOLLO) with dense AdamW on the stdlib byte LM.

Every run trains ``ByteLM(ByteLMConfig())`` from the same initial weights on the same batches in the same order,
for the same number of steps, with the same rank, projector and ``SubspaceRefresh(every=50)`` schedule. Only the
update rule and its paper's lr / scale differ, so the table shows what each rule buys for its optimizer state.

    python examples/compare_update_rules.py                   # six runs of 300 steps (~7 min on 2 CPU cores)
    python examples/compare_update_rules.py --quick           # 60 steps each: a smoke run
    python examples/compare_update_rules.py --methods dense galore fira
    python examples/compare_update_rules.py --methods dense-lr1e-2   # opt-in control: dense AdamW at lr 1e-2
    python examples/compare_update_rules.py --methods galore lazy-hessian   # Sophia's step in the subspace

Per-method lr / scale are the papers' recipes (see METHODS) and are not retuned here: a recipe that diverges at
this scale is reported as diverged. The train-loss curves are written as a PNG (needs matplotlib).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from byte_lm import ByteLM, ByteLMConfig
from stdlib_data import StdlibDataModule
from torch.utils.data import DataLoader

import lightning_lowrank

# The batches are slices of an in-memory tensor: worker processes would only add start-up time.
warnings.filterwarnings("ignore", ".*does not have many workers.*")
# Lightning 2.6 on torch 2.13 warns once per run about torch's LeafSpec deprecation: noise for this table.
warnings.filterwarnings("ignore", ".*isinstance.treespec, LeafSpec.*")


@dataclass(frozen=True)
class Method:
    """One row of the comparison: the strategy options and the paper recipe they come from."""

    lr: float
    scale: float | None  # None: dense AdamW, no projection
    options: dict[str, Any] = field(default_factory=dict)  # extra LowRankStrategy keywords
    rank: int | None = None  # overrides --rank (APOLLO-Mini is rank 1 by design)
    recipe: str = ""
    probe: dict[str, Any] | None = None  # CurvatureProbe keywords, for rules that consume curvature


# lr / scale follow each paper's LLaMA-60M recipe (GaLore, FRUGAL, Fira and APOLLO repos' 60M scripts); warmup,
# cosine decay, weight decay 0.1 and clipping at 1.0 come from ByteLM and the demo, the same for every run.
# FRUGAL's own recipe keeps the projected update at scale 1 with lr 1e-3 (in FRUGAL's code lr 1e-2 with 0.25 is its
# GaLore baseline), so that is what it gets here. Not reproduced: FRUGAL's --reset_statistics and blockwise
# subspaces, APOLLO's random projection; every run keeps its moments at a refresh and uses the --projector given.
METHODS: dict[str, Method] = {
    "dense": Method(1e-3, None, recipe="torch AdamW, the demo's dense lr"),
    "galore": Method(1e-2, 0.25, {"residual": "none"}, recipe="GaLore: lr 0.01, alpha 0.25"),
    "frugal": Method(
        1e-3,
        1.0,
        {"residual": "frugal", "frugal_rule": "signsgd", "residual_lr_scale": 1.0},
        recipe="FRUGAL: lr 1e-3, proj lr scale 1, signSGD residual at 1x lr",
    ),
    "fira": Method(1e-2, 0.25, {"residual": "fira"}, recipe="Fira: lr 0.01, alpha 0.25, limiter 1.01"),
    "apollo": Method(
        1e-2, 1.0, {"residual": "apollo", "apollo_scale_type": "channel"}, recipe="APOLLO: lr 0.01, scale 1, channel"
    ),
    "apollo-mini": Method(
        1e-2,
        128.0,
        {"residual": "apollo", "apollo_scale_type": "tensor"},
        rank=1,
        recipe="APOLLO-Mini: lr 0.01, scale 128, tensor, rank 1",
    ),
    # Opt-in: GaLore's lr/alpha with Sophia's clipped step in the subspace; Sophia's rho, its hessian EMA 0.99 and its
    # refresh of h every 10 steps (here one Hutchinson sample in each layer's subspace, fed by the probe).
    "lazy-hessian": Method(
        1e-2,
        0.25,
        {"preconditioner": "lazy_hessian", "rho": 0.04, "hessian_beta": 0.99},
        recipe="Sophia-H in the subspace: lr 0.01, alpha 0.25, rho 0.04, h every 10 steps",
        probe={"every": 10, "estimators": ("subspace_diagonal",), "samples": 1},
    ),
    # Opt-in control for the row above: the same rule with no probe ever run, so h stays 0 and every step is the
    # clipped sign of the momentum. What lazy-hessian gains over this is what the curvature buys.
    "clipped-sign": Method(
        1e-2,
        0.25,
        {"preconditioner": "lazy_hessian", "rho": 0.04, "hessian_beta": 0.99},
        recipe="control: lazy-hessian's rule with h never measured (sign of momentum)",
        probe={"every": 10**9, "estimators": ("subspace_diagonal",), "samples": 1},
    ),
    # Opt-in control, not run by default: dense AdamW at the low-rank runs' lr, to see how much of a gap to
    # "dense" is the 10x larger lr that the low-rank recipes give every parameter (embeddings, norms, head too).
    "dense-lr1e-2": Method(1e-2, None, recipe="control: torch AdamW at the low-rank lr (not a paper recipe)"),
}
DEFAULT_METHODS = ["dense", "galore", "frugal", "fira", "apollo", "apollo-mini"]
DIVERGED_LOSS = math.log(256)  # a byte model that ends no better than uniform has not trained


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-steps", type=int, default=300, help="optimizer steps per run (default: 300)")
    parser.add_argument("--rank", type=int, default=32, help="subspace rank (default: 32; apollo-mini uses 1)")
    parser.add_argument(
        "--projector", choices=("svd", "rsvd", "dct", "random", "online_pca"), default="svd", help="(default: svd)"
    )
    parser.add_argument("--refresh-every", type=int, default=50, help="SubspaceRefresh(every=...) (default: 50)")
    parser.add_argument("--batch-size", type=int, default=32, help="windows of 128 bytes per step (default: 32)")
    parser.add_argument("--val-batches", type=int, default=8, help="fixed validation batches (default: 8)")
    parser.add_argument("--quick", action="store_true", help="60 steps per run: a smoke test")
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        default=DEFAULT_METHODS,
        metavar="METHOD",
        help=f"subset to run, in this order (default: {' '.join(DEFAULT_METHODS)}; also: "
        + ", ".join(m for m in METHODS if m not in DEFAULT_METHODS)
        + ")",
    )
    parser.add_argument("--out", default="compare_update_rules.png", help="train-loss plot (PNG)")
    parser.add_argument("--log-y", action="store_true", help="log-scale loss axis in the plot")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.max_steps = 60
    return args


class LossCurve(L.Callback):
    """Train loss at every optimizer step (one batch per step here), read off the value the step returned."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *_: Any) -> None:
        self.losses.append(float(outputs["loss"]))


@dataclass
class Result:
    name: str
    method: Method
    rank: int | None
    losses: list[float]
    val_loss: float
    state_bytes: int
    adamw_bytes: int  # what torch AdamW holds for this model: the reference when no dense run is in the list
    seconds: float

    def final_train_loss(self, window: int = 10) -> float:
        """Mean of the last ``window`` steps: one batch's loss is too noisy to compare methods by."""
        tail = self.losses[-window:]
        return sum(tail) / len(tail)

    @property
    def diverged(self) -> bool:
        return not all(map(math.isfinite, self.losses + [self.val_loss])) or self.final_train_loss() >= DIVERGED_LOSS


@torch.no_grad()
def evaluate(model: ByteLM, loader: DataLoader) -> float:
    """Mean cross-entropy over the fixed validation windows (every run sees the same ones)."""
    model.eval()
    losses = [F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten()).item() for x, y in loader]
    model.train()
    return sum(losses) / len(losses)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Exact bytes of every tensor in an optimizer's state (AdamW: exp_avg, exp_avg_sq and the step scalar)."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))


def adamw_bytes(model: torch.nn.Module) -> int:
    """What torch.optim.AdamW holds once it has stepped: exp_avg and exp_avg_sq like each parameter, a float32 step."""
    step = torch.tensor(0.0).element_size()
    return sum(2 * p.numel() * p.element_size() + step for p in model.parameters() if p.requires_grad)


def comparison_trainer(
    strategy: Any, callbacks: list[L.Callback], max_steps: int, clip: float | None = 1.0
) -> L.Trainer:
    """The Trainer every compared run gets: CPU, fp32, clipping at ``clip`` (1.0 as in the demo; None for manual
    optimization, which refuses it), no validation loop (each script validates after training, on a fixed set), no
    logger or checkpoints."""
    return L.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_steps=max_steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        gradient_clip_val=clip,
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def train(name: str, method: Method, data: StdlibDataModule, args: argparse.Namespace) -> Result:
    """One run from the same seed: model init and batch order are identical across methods."""
    L.seed_everything(args.seed, verbose=False)
    model = ByteLM(ByteLMConfig(), lr=method.lr, warmup_steps=max(1, args.max_steps // 10), max_steps=args.max_steps)
    curve = LossCurve()
    callbacks: list[L.Callback] = [curve]
    rank = None
    if method.scale is None:
        strategy: Any = "auto"
    else:
        rank = method.rank or args.rank
        strategy = lightning_lowrank.LowRankStrategy(
            rank=rank,
            projector=args.projector,
            scale=method.scale,
            seed=args.seed,
            memory_report=False,
            **method.options,
        )
        callbacks.append(lightning_lowrank.SubspaceRefresh(every=args.refresh_every))
        if method.probe is not None:
            callbacks.append(lightning_lowrank.CurvatureProbe(**method.probe))
    trainer = comparison_trainer(strategy, callbacks, args.max_steps)
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    if method.scale is None:
        measured = state_bytes(trainer.optimizers[0])
    else:
        measured = trainer.strategy.memory_report().optimizer_state_bytes
    val_loss = evaluate(model, data.val_dataloader())
    if method.options.get("preconditioner") == "lazy_hessian":
        print(
            f"  {name}: {100 * clipped_fraction(trainer.optimizers[0]):.1f}% of subspace coordinates clipped at the end"
        )
    return Result(name, method, rank, curve.losses, val_loss, measured, adamw_bytes(model), seconds)


def clipped_fraction(optimizer: Any) -> float:
    """Share of projected coordinates where Sophia's ratio |m| / max(rho * h, eps) is clipped at 1 (sign steps)."""
    clipped = total = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if "hessian" in state:
                denom = (group["rho"] * state["hessian"]).clamp(min=group["eps"])
                clipped += int((state["exp_avg"].abs() >= denom).sum())
                total += state["hessian"].numel()
    return clipped / max(total, 1)


def format_table(results: list[Result], dense_bytes: int) -> str:
    """A Markdown table, so the printed output can be pasted into the README as is."""
    header = (
        "method",
        "rank",
        "lr",
        "scale",
        "train loss (last 10)",
        "val loss",
        "optimizer state bytes",
        "saving vs dense",
        "wall s",
        "note",
    )
    rows = []
    for r in results:
        m = r.method
        rows.append(
            (
                r.name,
                "-" if r.rank is None else str(r.rank),
                f"{m.lr:g}",
                "-" if m.scale is None else f"{m.scale:g}",
                f"{r.final_train_loss():.3f}",
                f"{r.val_loss:.3f}",
                f"{r.state_bytes:,} ({r.state_bytes / 2**20:.2f} MiB)",
                f"{100 * (1 - r.state_bytes / dense_bytes):.1f}%",
                f"{r.seconds:.0f}",
                ("DIVERGED; " if r.diverged else "") + m.recipe,
            )
        )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    right = {1, 2, 3, 4, 5, 6, 7, 8}

    def line(cells: tuple[str, ...]) -> str:
        padded = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if i in right else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule, *map(line, rows)])


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average; the first points average what exists so far, so the curve starts at step 1."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot(results: list[Result], args: argparse.Namespace) -> None:
    """All methods' smoothed train-loss curves on one axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = max(1, args.max_steps // 30)
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    for r in results:
        label = f"{r.name} (lr {r.method.lr:g}" + ("" if r.method.scale is None else f", scale {r.method.scale:g}")
        label += f"): val {r.val_loss:.3f}" + (" DIVERGED" if r.diverged else "")
        steps = range(1, len(r.losses) + 1)
        ax.plot(steps, smooth(r.losses, window), label=label, linewidth=1.6, linestyle="--" if r.diverged else "-")
    if args.log_y:
        from matplotlib.ticker import FormatStrFormatter

        ax.set_yscale("log")  # plain numbers on the ticks: 10^0-style labels are unreadable over 1.5..5.5
        ax.yaxis.set_major_formatter(FormatStrFormatter("%.1f"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%.1f"))
    finite = [v for r in results if not r.diverged for v in smooth(r.losses, window)[args.max_steps // 3 :]]
    if finite:  # zoom on the part where the methods separate; the first third is warmup and falls steeply
        ax.set_ylim(min(finite) * 0.97, DIVERGED_LOSS * 1.05)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"train loss (moving average of {window} steps)")
    ax.set_title(
        f"ByteLM on stdlib source: rank {args.rank}, {args.projector}, refresh every {args.refresh_every}, "
        f"batch {args.batch_size}x128 bytes",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no "GPU available: ..." per run
    config = ByteLMConfig()
    data = StdlibDataModule(
        block_size=config.block_size,
        batch_size=args.batch_size,
        train_samples=args.max_steps * args.batch_size,  # one epoch == the whole run, no window seen twice
        val_samples=args.val_batches * args.batch_size,
        seed=args.seed,
    )
    data.setup("fit")  # read the corpus once; every run reuses the same windows
    print(
        f"{len(args.methods)} runs x {args.max_steps} steps, batch {args.batch_size}, rank {args.rank}, "
        f"projector {args.projector}, SubspaceRefresh(every={args.refresh_every}), {args.val_batches} val batches, "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}"  # wall times depend on it
    )
    results = []
    total = time.perf_counter()
    for i, name in enumerate(args.methods, 1):
        result = train(name, METHODS[name], data, args)
        results.append(result)
        print(
            f"[{i}/{len(args.methods)}] {name}: {result.seconds:.0f}s, train {result.final_train_loss():.3f}, "
            f"val {result.val_loss:.3f}" + (" DIVERGED" if result.diverged else ""),
            flush=True,
        )
    total = time.perf_counter() - total

    dense = next((r for r in results if r.method.scale is None), None)
    dense_bytes = results[0].adamw_bytes if dense is None else dense.state_bytes  # measured when there is a dense run
    if dense is not None and dense.state_bytes != dense.adamw_bytes:
        print(f"note: the dense run held {dense.state_bytes} B of AdamW state, not the expected {dense.adamw_bytes} B")
    print(
        f"\nfirst-step train loss {results[0].losses[0]:.3f} (ln 256 = {math.log(256):.3f} is a uniform guess); "
        f"all runs took {total:.0f}s, "
        f"load average now {os.getloadavg()[0]:.2f}\n"
    )
    print(format_table(results, dense_bytes))
    if any(r.diverged for r in results):
        print(
            "\nDIVERGED: final train loss not finite or no better than uniform, with the lr/scale shown (not retuned)."
        )
    try:
        plot(results, args)
        print(f"\ntrain-loss plot: {args.out}")
    except ImportError:
        print("\nno plot: matplotlib is not installed (pip install matplotlib)")


if __name__ == "__main__":
    main()
