"""Convergence side by side: torch AdamW, our low-rank configurations and the published optimizers on the byte LM.

Every run trains ``ByteLM(ByteLMConfig())`` (d_model 128, 4 layers) on the Python standard library's source from
the same seed (same initial weights, same batches in the same order) for the same number of steps, with rank
d/4 = 32 and a subspace refresh every ``--update-gap`` steps. The projected weights are the same for everyone: the
ones ``LowRankStrategy`` selects (every attention and MLP ``nn.Linear``); embeddings, norms and the head train with
dense AdamW inside each optimizer. Betas, eps, weight decay, warmup + cosine schedule and clipping at 1.0 are
ByteLM's, the same for every run; lr and scale are each method's paper recipe (see RUNS). Peers run through plain
Lightning (``configure_optimizers`` returns the peer), ours through ``LowRankStrategy``.

The Muon runs (``muon``, ``ours-muon-*``, ``trion``) train ``MuonByteLM``: torch's Muon on those same projected
weights and torch AdamW on the rest, two optimizers under manual optimization (one global clip at 1.0 in the step).

    bash scripts/bench_env.sh                          # peers, with --no-deps (once)
    python benchmarks/bench_convergence.py             # ~12 min on 2 CPU cores
    python benchmarks/bench_convergence.py --quick     # 20 steps per run: a smoke run
    python benchmarks/bench_convergence.py --only adamw ours-svd galore

Prints a Markdown table (validation loss and its ratio to AdamW's, optimizer state and its ratio, wall time),
writes it with every loss curve to ``benchmarks/results/convergence.json`` and plots the curves to
``benchmarks/results/convergence.png``. A peer that cannot run here is a "not run: reason" row.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "examples")]
import peers  # noqa: E402
from byte_lm import ByteLM, ByteLMConfig  # noqa: E402
from compare_update_rules import DIVERGED_LOSS, LossCurve, comparison_trainer, evaluate, smooth  # noqa: E402
from stdlib_data import StdlibDataModule  # noqa: E402

import lightning_lowrank  # noqa: E402
from lightning_lowrank.selection import select_lowrank_params  # noqa: E402

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*isinstance.treespec, LeafSpec.*")

RANK = ByteLMConfig().d_model // 4


def config_of(args: argparse.Namespace) -> ByteLMConfig:
    """The model a run trains: ``args.config`` where a driver sets one (``bench_tuned.py``), else ByteLM's default."""
    return getattr(args, "config", None) or ByteLMConfig()


def rank_of(args: argparse.Namespace) -> int:
    """d/4 of the model trained."""
    return config_of(args).d_model // 4


@dataclass(frozen=True)
class Run:
    """One row: who optimizes (``adamw``, ``ours`` or a peer's name), with which lr / scale and options."""

    who: str
    lr: float
    scale: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)  # LowRankStrategy keywords (ours only)
    recipe: str = ""
    refresh: dict[str, Any] | None = None  # SubspaceRefresh keywords besides every=--update-gap (ours only)


MUON_RECIPE = (
    "torch Muon (adjust_lr_fn='match_rms_adamw', momentum 0.95 nesterov) on the hidden weights + AdamW on the "
    "rest, one lr for both: ByteLM's"
)

# lr / scale: each paper's LLaMA-60M recipe, as in examples/compare_update_rules.py. Ours and the peer of the same
# method get the same recipe, so their rows differ only in the implementation.
RUNS: dict[str, Run] = {
    "adamw": Run("adamw", 1e-3, recipe="torch AdamW, ByteLM's lr"),
    "ours-svd": Run("ours", 1e-2, 0.25, {"projector": "svd"}, "GaLore recipe: lr 0.01, scale 0.25"),
    "ours-dct": Run("ours", 1e-2, 0.25, {"projector": "dct"}, "GaLore recipe, DCT basis"),
    "ours-dct-frugal": Run(
        "ours",
        1e-3,
        1.0,
        {"projector": "dct", "residual": "frugal", "frugal_rule": "signsgd", "residual_lr_scale": 1.0},
        "FRUGAL recipe: lr 1e-3, scale 1, signSGD residual",
    ),
    "ours-dct-fira": Run("ours", 1e-2, 0.25, {"projector": "dct", "residual": "fira"}, "Fira recipe: lr 0.01, 0.25"),
    "ours-svd-8bit": Run("ours", 1e-2, 0.25, {"projector": "svd", "state_bits": 8}, "GaLore recipe, 8-bit moments"),
    "ours-svd-fira": Run("ours", 1e-2, 0.25, {"projector": "svd", "residual": "fira"}, "Fira recipe, as the peer"),
    "ours-svd-fira-torch": Run(
        "ours",
        1e-2,
        0.25,
        {"projector": "svd", "residual": "fira", "adam_form": "torch"},
        "Fira recipe, adam_form='torch' (torch's AdamW form)",
    ),
    "ours-svd-fira-exact": Run(
        "ours",
        1e-2,
        0.25,
        {"projector": "svd", "residual": "fira", "fira_complement": "exact"},
        "Fira recipe, fira_complement='exact' (G - P P^T G)",
    ),
    "ours-svd-fira-torch-exact": Run(
        "ours",
        1e-2,
        0.25,
        {"projector": "svd", "residual": "fira", "adam_form": "torch", "fira_complement": "exact"},
        "Fira recipe, adam_form='torch', fira_complement='exact' (our earlier rule)",
    ),
    "ours-dct-fira-torch-exact": Run(
        "ours",
        1e-2,
        0.25,
        {"projector": "dct", "residual": "fira", "adam_form": "torch", "fira_complement": "exact"},
        "Fira recipe, DCT, adam_form='torch', fira_complement='exact' (our earlier rule)",
    ),
    "ours-apollo": Run(
        "ours",
        1e-2,
        1.0,
        {"residual": "apollo", "apollo_scale_type": "channel"},
        "APOLLO recipe: lr 0.01, scale 1, APOLLO's Gaussian P, channel",
    ),
    "ours-svd-adaptive": Run(
        "ours", 1e-2, 0.25, {"projector": "svd"}, "GaLore recipe, SubspaceRefresh(adaptive=True)", {"adaptive": True}
    ),
    "ours-svd-qgalore": Run(
        "ours",
        1e-2,
        0.25,
        {"projector": "svd"},
        "GaLore recipe, SubspaceRefresh(adaptive=True, rule='qgalore')",
        {"adaptive": True, "rule": "qgalore"},
    ),
    "adamw-split": Run(
        "adamw-split",
        1e-2,
        0.25,
        recipe="a control: torch AdamW with GaLore's lr split (the projected weights at scale x lr), no projection",
    ),
    "galore": Run("galore", 1e-2, 0.25, recipe="galore-torch GaLoreAdamW, GaLore recipe"),
    "fira": Run("fira", 1e-2, 0.25, recipe="fira FiraAdamW, Fira recipe"),
    "apollo": Run("apollo", 1e-2, 1.0, recipe="apollo-torch APOLLOAdamW, APOLLO recipe"),
    "q-galore": Run("q-galore", 1e-2, 0.25, recipe="q-galore-torch QGaLoreAdamW8bit, GaLore recipe"),
    "dct-adamw": Run("dct-adamw", 1e-2, 1.0, recipe="ista-daslab DCTAdamW (no scale option), GaLore's lr"),
    "ours-dct-scale1": Run("ours", 1e-2, 1.0, {"projector": "dct"}, "as dct-adamw: lr 0.01, scale 1"),
    # Muon (torch.optim.Muon) on the hidden weights, AdamW on the rest (MuonByteLM). adjust_lr_fn="match_rms_adamw"
    # (Moonshot's scaling: Muon's update RMS matched to AdamW's) lets Muon take AdamW's lr, so one lr (and the
    # tuned study's shared grid) drives both optimizers.
    "muon": Run("muon", 1e-3, recipe=MUON_RECIPE),
    "ours-muon-svd": Run("ours-muon", 1e-3, 1.0, {"projector": "svd"}, MUON_RECIPE + "; momentum in an SVD subspace"),
    "ours-muon-dct": Run("ours-muon", 1e-3, 1.0, {"projector": "dct"}, MUON_RECIPE + "; momentum in a DCT subspace"),
    "trion": Run(
        "ours-muon",
        1e-3,
        1.0,
        {"projector": "dct", "inner": "trion"},
        MUON_RECIPE + "; Trion: DCT columns chosen every step, full momentum with error feedback",
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-steps", type=int, default=300, help="optimizer steps per run (default: 300)")
    parser.add_argument("--update-gap", type=int, default=50, help="steps between subspace refreshes (default: 50)")
    parser.add_argument("--batch-size", type=int, default=32, help="windows of 128 bytes per step (default: 32)")
    parser.add_argument("--val-batches", type=int, default=8, help="fixed validation batches (default: 8)")
    parser.add_argument("--only", nargs="+", choices=list(RUNS), default=list(RUNS), metavar="RUN")
    parser.add_argument("--quick", action="store_true", help="20 steps per run, gap 5: a smoke run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=str(HERE / "results" / "convergence.json"))
    parser.add_argument("--png", default=str(HERE / "results" / "convergence.png"), help="'' to skip the plot")
    parser.add_argument("--replot", action="store_true", help="only redraw --png from the curves in --json")
    args = parser.parse_args(argv)
    if args.quick:
        args.max_steps, args.update_gap = 20, 5
    return args


class PeerByteLM(ByteLM):
    """ByteLM whose configure_optimizers hands its param groups and schedule to a peer optimizer."""

    make_peer: Any = None  # (groups, lr, betas, eps) -> optimizer; set after construction, not a hyperparameter

    def configure_optimizers(self):
        config = super().configure_optimizers()
        base = config["optimizer"]
        projected = set(select_lowrank_params(self))
        groups = []
        for group in base.param_groups:
            keep = {k: v for k, v in group.items() if k in ("weight_decay",)}
            dense = [p for p in group["params"] if p not in projected]
            low = [p for p in group["params"] if p in projected]
            groups += [{"params": dense, **keep}] if dense else []
            groups += [{"params": low, **keep, "low": True}] if low else []
        defaults = base.defaults
        optimizer = self.make_peer(groups, lr=defaults["lr"], betas=defaults["betas"], eps=defaults["eps"])
        scheduler = config["lr_scheduler"]["scheduler"]
        lambdas = scheduler.lr_lambdas
        config["optimizer"] = optimizer
        config["lr_scheduler"]["scheduler"] = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas[0])
        return config


class MuonByteLM(ByteLM):
    """ByteLM with torch's Muon on the weights ``select_lowrank_params`` picks (attention and MLP projections) and
    torch AdamW on the rest (embedding, norms, head), by manual optimization: Lightning's automatic optimization
    steps one optimizer. Muon's update RMS is matched to AdamW's (``adjust_lr_fn="match_rms_adamw"``), so both take
    ByteLM's lr; weight decay, AdamW's betas and the warmup + cosine schedule (one LambdaLR per optimizer) are
    ByteLM's. The step clips the global gradient norm at 1.0, as ``gradient_clip_val=1.0`` does for the others."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        optimizers, schedulers = self.optimizers(), self.lr_schedulers()
        for optimizer in optimizers:
            optimizer.zero_grad()
        self.manual_backward(loss)
        torch.nn.utils.clip_grad_norm_(self.parameters(), 1.0)
        for optimizer in optimizers:
            optimizer.step()
        for scheduler in schedulers:
            scheduler.step()
        return loss  # LossCurve reads outputs["loss"]

    def configure_optimizers(self):
        config = super().configure_optimizers()
        base, lr_lambda = config["optimizer"], config["lr_scheduler"]["scheduler"].lr_lambdas[0]
        hidden = list(select_lowrank_params(self))
        ids = {id(p) for p in hidden}
        rest = [p for p in self.parameters() if id(p) not in ids]
        hp = self.hparams
        muon = torch.optim.Muon(
            hidden,
            lr=hp.lr,
            weight_decay=hp.weight_decay,  # every hidden weight is 2-D
            momentum=0.95,
            nesterov=True,
            adjust_lr_fn="match_rms_adamw",
        )
        groups = [
            {"params": [p for p in rest if p.ndim >= 2], "weight_decay": hp.weight_decay},
            {"params": [p for p in rest if p.ndim < 2], "weight_decay": 0.0},
        ]
        defaults = base.defaults
        adamw = torch.optim.AdamW(groups, lr=hp.lr, betas=defaults["betas"], eps=defaults["eps"])
        optimizers = [muon, adamw]
        schedulers = [
            {"scheduler": torch.optim.lr_scheduler.LambdaLR(o, lr_lambda), "interval": "step"} for o in optimizers
        ]
        return optimizers, schedulers


def manual_trainer(callbacks: list[Any], steps: int, strategy: Any, optimizers: int = 2) -> L.Trainer:
    """``comparison_trainer`` without ``gradient_clip_val`` (refused under manual optimization; ``MuonByteLM`` clips in
    its step). Lightning counts every optimizer's step in ``global_step``, so ``max_steps`` is ``steps`` batches
    times the optimizers stepped per batch."""
    return comparison_trainer(strategy, callbacks, steps * optimizers, clip=None)


def peer_factory(name: str, run: Run, args: argparse.Namespace) -> Any:
    """A function (groups, lr, betas, eps) -> the peer optimizer, or raises ``peers.PeerUnavailable``."""
    if name == "q-galore":  # the builder says why it cannot run here
        cfg = peers.PeerConfig(rank=rank_of(args), update_gap=args.update_gap, scale=run.scale, lr=run.lr)
        peers.build(name, [torch.zeros(2, 2)], cfg, torch.device("cpu"))
    if name == "dct-adamw":
        return partial(_dct_adamw, peers._import("ista_daslab_optimizers", "fft_low_rank.dct_adamw"), args)
    if name == "adamw-split":
        return partial(_adamw_split, run.scale)
    keys = {
        "galore": ("galore_torch", "adamw", {"scale": run.scale}),
        "fira": ("fira", "fira_adamw", {"alpha": run.scale}),
        "apollo": ("apollo_torch", "apollo", {"scale": run.scale, "proj": "random", "scale_type": "channel"}),
    }
    package, module, extra = keys[name]
    cls = peers._import(package, module).AdamW

    def make(groups: list[dict[str, Any]], **kwargs: Any) -> torch.optim.Optimizer:
        for group in groups:
            if group.pop("low", False):
                group.update(rank=rank_of(args), update_proj_gap=args.update_gap, proj_type="std", **extra)
        return cls(groups, **kwargs)

    return make


def _adamw_split(scale: float, groups: list[dict[str, Any]], lr: float, **kwargs: Any) -> torch.optim.Optimizer:
    """Torch AdamW where the weights a low-rank recipe would project train at ``scale * lr`` and the rest (embedding,
    norms, head) at ``lr``: what GaLore's recipe changes besides the projection. The weight decay of those weights
    is scaled with their lr (GaLore's ``scale`` leaves it at ``lr``)."""
    for group in groups:
        if group.pop("low", False):
            group["lr"] = scale * lr
    return torch.optim.AdamW(groups, lr=lr, **kwargs)


def _dct_adamw(module: Any, args: argparse.Namespace, groups: list[dict[str, Any]], **kwargs: Any) -> Chained:
    """DCTAdamW projects every 2-D weight it is given (embedding and head too), so it gets the projected weights
    only and torch AdamW the rest, with the same hyperparameters."""
    low = [g for g in groups if g.pop("low", False)]
    dense = [g for g in groups if g not in low]
    wd = low[0]["weight_decay"]
    rank, gap = rank_of(args), args.update_gap
    dct = module.DCTAdamW(low, weight_decay=wd, rank=rank, proj="dct", update_proj_gap=gap, **kwargs)
    return Chained([torch.optim.AdamW(dense, **kwargs), dct])


class Chained(torch.optim.Optimizer):
    """Several optimizers stepped as one, sharing their param-group dicts (so an LR scheduler reaches all)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        super().__init__([p for o in optimizers for g in o.param_groups for p in g["params"]], {})
        self.optimizers = optimizers
        self.param_groups = [g for o in optimizers for g in o.param_groups]

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers:
            with peers.maybe_quiet(True):  # DCTAdamW prints a line per parameter it initialises
                optimizer.step()
        return loss


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    parts = optimizer.optimizers if isinstance(optimizer, Chained) else [optimizer]
    return sum(peers.state_bytes(o) for o in parts)


@dataclass
class Result:
    name: str
    run: Run
    losses: list[float] = field(default_factory=list)
    val_loss: float = math.nan
    state_bytes: int = 0
    seconds: float = 0.0
    not_run: str = ""

    @property
    def diverged(self) -> bool:
        tail = self.losses[-10:]
        return not all(map(math.isfinite, self.losses + [self.val_loss])) or sum(tail) / len(tail) >= DIVERGED_LOSS


def train(name: str, run: Run, data: StdlibDataModule, args: argparse.Namespace) -> Result:
    """One run from the same seed (identical initial weights and batch order for every run)."""
    schedule = dict(lr=run.lr, warmup_steps=max(1, args.max_steps // 10), max_steps=args.max_steps)
    strategy: Any = "auto"
    try:
        if run.who in ("adamw", "ours"):
            L.seed_everything(args.seed, verbose=False)
            model = ByteLM(config_of(args), **schedule)
        elif run.who in ("muon", "ours-muon"):
            L.seed_everything(args.seed, verbose=False)
            model = MuonByteLM(config_of(args), **schedule)
        else:
            make = peer_factory(run.who, run, args)
            L.seed_everything(args.seed, verbose=False)
            model = PeerByteLM(config_of(args), **schedule)
            model.make_peer = make
    except peers.PeerUnavailable as why:
        return Result(name, run, not_run=str(why))
    if run.who in ("ours", "ours-muon"):
        options = {"rank": rank_of(args), "update_gap": args.update_gap, **run.options}  # a run may set its own
        strategy = lightning_lowrank.LowRankStrategy(scale=run.scale, seed=args.seed, memory_report=False, **options)
    curve = LossCurve()
    callbacks: list[Any] = [curve]
    if run.refresh is not None:
        callbacks.append(lightning_lowrank.SubspaceRefresh(every=args.update_gap, **run.refresh))
    if isinstance(model, MuonByteLM):
        trainer = manual_trainer(callbacks, args.max_steps, strategy)
    else:
        trainer = comparison_trainer(strategy, callbacks, args.max_steps)
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    if run.who in ("ours", "ours-muon"):  # every optimizer's state
        state = trainer.strategy.memory_report().optimizer_state_bytes
    else:
        state = sum(state_bytes(o) for o in trainer.optimizers)
    return Result(name, run, curve.losses, evaluate(model, data.val_dataloader()), state, seconds)


def table(results: list[Result]) -> str:
    """Markdown, each figure also as a ratio to AdamW's from this run."""
    ref = next((r for r in results if r.name == "adamw" and not r.not_run), None)
    header = "| run | val loss | / AdamW | optimizer state | / AdamW | wall s | recipe |"
    lines = [header, "|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        if r.not_run:
            lines.append(f"| {r.name} | not run: {r.not_run} | | | | | {r.run.recipe} |")
            continue
        loss_ratio = f"{r.val_loss / ref.val_loss:.3f}" if ref else "-"
        state_ratio = f"{r.state_bytes / ref.state_bytes:.3f}" if ref else "-"
        note = ("DIVERGED; " if r.diverged else "") + r.run.recipe
        lines.append(
            f"| {r.name} | {r.val_loss:.3f} | {loss_ratio} | {r.state_bytes / 2**20:.2f} MiB | {state_ratio} "
            f"| {r.seconds:.0f} | {note} |"
        )
    return "\n".join(lines)


def plot(results: list[Result], path: str, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = max(1, steps // 30)
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    ax.set_prop_cycle(color=plt.cm.tab20.colors)  # 20 distinct colours: the default cycle repeats after 10
    for r in results:
        if r.not_run:
            continue
        style = "-" if r.run.who in ("adamw", "ours", "muon", "ours-muon") else "--"
        ax.plot(range(1, len(r.losses) + 1), smooth(r.losses, window), style, label=f"{r.name}: val {r.val_loss:.3f}")
    finite = [v for r in results if r.losses and not r.diverged for v in smooth(r.losses, window)[steps // 3 :]]
    if finite:
        ax.set_ylim(min(finite) * 0.97, DIVERGED_LOSS * 1.05)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"train loss (moving average of {window} steps)")
    ax.set_title(f"Byte LM, rank {RANK}, same seed and batches (solid: torch and ours; dashed: published)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "torch_threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def replot(args: argparse.Namespace) -> list[Result]:
    """The plot again from a saved JSON, without training."""
    saved = json.loads(Path(args.json).read_text())
    results = [
        Result(r["name"], RUNS[r["name"]], r["train_losses"], r["val_loss"] or math.nan, not_run=r["not_run"] or "")
        for r in saved["runs"]
    ]
    plot(results, args.png, saved["settings"]["max_steps"])
    return results


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    if args.replot:
        return replot(args)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no "GPU available: ..." per run
    data = StdlibDataModule(
        block_size=ByteLMConfig().block_size,
        batch_size=args.batch_size,
        train_samples=args.max_steps * args.batch_size,  # one epoch == the whole run, no window seen twice
        val_samples=args.val_batches * args.batch_size,
        seed=args.seed,
    )
    data.setup("fit")  # read the corpus once; every run reuses the same windows
    results = []
    for name in args.only:
        result = train(name, RUNS[name], data, args)
        shown = result.not_run or f"val {result.val_loss:.3f}, {result.seconds:.0f} s"
        print(f"{name}: {shown}", flush=True)
        results.append(result)
    print(table(results))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    record = {
        "command": " ".join(["python", "benchmarks/bench_convergence.py", *(argv or sys.argv[1:])]),
        "machine": machine(),
        "settings": {"rank": RANK, **{k: v for k, v in vars(args).items() if k not in ("json", "png")}},
        "runs": [
            {
                "name": r.name,
                "recipe": r.run.recipe,
                "lr": r.run.lr,
                "scale": r.run.scale,
                "not_run": r.not_run or None,
                "val_loss": None if r.not_run else r.val_loss,
                "state_bytes": r.state_bytes,
                "seconds": r.seconds,
                "train_losses": r.losses,
            }
            for r in results
        ],
        "table": table(results),
    }
    Path(args.json).write_text(json.dumps(record, indent=1))
    if args.png:
        plot(results, args.png, args.max_steps)
    return results


if __name__ == "__main__":
    main()
