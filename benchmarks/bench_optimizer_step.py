"""Optimizer step time and optimizer-state bytes on LLaMA layer shapes, side by side with the published optimizers.

    .venv/bin/python benchmarks/bench_optimizer_step.py             # 60M, 130M, 350M; ~10 minutes on 2 CPU cores
    .venv/bin/python benchmarks/bench_optimizer_step.py --quick     # 60M, few steps: a smoke run
    .venv/bin/python benchmarks/bench_optimizer_step.py --dtype bfloat16  # bf16 weights and gradients
    .venv/bin/python benchmarks/bench_optimizer_step.py --small-layers  # 96 projected 64x64 layers, bench_small_layers
    .venv/bin/python benchmarks/bench_optimizer_step.py --presets 130M --only adamw ours-svd --compile  # + compiled
    bash scripts/bench_env.sh                                       # installs the peers first (--no-deps)

What is measured, per preset (GaLore's LLaMA configs, ``lightning_lowrank.memory.presets.PRESETS``): the seven 2-D
weights of ``--layers`` decoder block(s) (q/k/v/o, gate/up/down) with random Gaussian gradients of their real shapes
(fixed seed; two gradient sets used on alternate steps, so a refresh sees a different gradient than the previous one).
Embeddings, lm_head and the norms are left out for every optimizer: they would be dense AdamW in every
configuration and add the same time and bytes to each row.

Every optimizer refreshes its subspaces every ``gap`` steps (``gap`` small here, so refreshes can be sampled); the
first cycle of ``gap`` steps is an untimed warm-up, then each step is timed alone (``torch.cuda.synchronize`` around
it on a GPU) and filed as a refresh step or an ordinary step by the optimizer's own schedule. The benchmark checks
that schedule: the projector tensors must change exactly on the steps filed as refreshes ("refresh_check" in the
JSON). Reported: median ordinary step, median refresh step, and the cost per step amortised at gap 200,
(refresh + 199 * ordinary) / 200; state bytes as counted by ``peers.state_bytes`` (see its docstring: tensors in the
state, inside projector objects there, and on the optimizer itself, such as a shared DCT basis). Each is divided by
torch AdamW (foreach) measured in the same run. A peer that cannot run here is a row "not run: <reason>".

A second table per preset, Muon: torch.optim.Muon on the same weights (momentum 0.95 nesterov, Newton-Schulz in
bfloat16, ``adjust_lr_fn="match_rms_adamw"``) is its reference, and ``ours-muon-svd`` / ``ours-muon-dct`` are that
Muon taken over by ``ProjectedOptimizer.from_optimizer`` (momentum in a rank-r subspace, Newton-Schulz on the
projected momentum); state and times are divided by torch's Muon's. ``--only`` picks rows of either table; a table
runs when some of its rows are picked (with no ``--only``, both).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers

from lightning_lowrank.memory.presets import PRESETS, LlamaConfig, LlamaSkeleton, llama_preset

# The ranks GaLore trained these sizes with (paper, Table 2 / configs); --rank overrides them.
GALORE_RANKS = {"60M": 128, "130M": 256, "350M": 256, "1B": 512, "7B": 1024, "tiny": 16}
# Not a model anyone trained: a LLaMA block at hidden 64, for smoke runs where a real block is too slow (bf16 on a CPU).
TINY = LlamaConfig(64, 176, 4, 1)
PEER_PACKAGES = ("galore-torch", "q-galore-torch", "fira", "apollo-torch", "ista-daslab-optimizers", "bitsandbytes")
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "optimizer_step.json"
MIB = 1024**2
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
COMPILED_ROW = "ours-svd-compile"  # --compile: ours-svd with the optimizer's compile option


# -- the Muon table ---------------------------------------------------------------------------------------------------

MUON_REFERENCE = "muon"


def _torch_muon(params: list[Tensor], cfg: peers.PeerConfig) -> torch.optim.Optimizer:
    return torch.optim.Muon(params, lr=cfg.lr, weight_decay=cfg.weight_decay, adjust_lr_fn="match_rms_adamw")


def muon(params: list[Tensor], cfg: peers.PeerConfig, device: torch.device) -> peers.Built:
    """torch.optim.Muon with its defaults (momentum 0.95 nesterov, 5 Newton-Schulz steps in bfloat16)."""
    return peers.Built(_torch_muon(params, cfg))


def ours_muon(params: list[Tensor], cfg: peers.PeerConfig, device: torch.device, **options: Any) -> peers.Built:
    """That Muon, taken over by ``ProjectedOptimizer.from_optimizer``: each weight's momentum in a rank-r subspace,
    refreshed every ``update_gap`` steps, Newton-Schulz on the projected momentum (scale 1)."""
    from lightning_lowrank.optim.projected import ProjectedOptimizer

    opt = ProjectedOptimizer.from_optimizer(
        _torch_muon(params, cfg), set(params), rank=cfg.rank, update_gap=cfg.update_gap, scale=1.0, **options
    )
    return peers.Built(opt)


# Row order of the Muon table; the first is its reference.
MUON_BUILDERS: dict[str, peers.Builder] = {
    MUON_REFERENCE: muon,
    "ours-muon-svd": partial(ours_muon, projector="svd"),
    "ours-muon-dct": partial(ours_muon, projector="dct"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--presets",
        nargs="+",
        default=None,
        choices=[*PRESETS, "tiny"],
        help="default: 60M 130M 350M; tiny: a hidden-64 block, for smoke runs",
    )
    parser.add_argument("--reps", type=int, default=None, help="timed ordinary steps (default 30; --quick 4)")
    parser.add_argument("--refreshes", type=int, default=None, help="timed refresh steps (default 3; --quick 1)")
    parser.add_argument("--rank", type=int, default=None, help="rank for every preset (default: GaLore's per preset)")
    parser.add_argument("--layers", type=int, default=1, help="decoder blocks whose weights are optimized (default 1)")
    parser.add_argument("--scale", type=float, default=0.25, help="GaLore scale / Fira alpha / APOLLO scale / ours")
    parser.add_argument("--amortise-gap", type=int, default=200, help="gap for the amortised column (default 200)")
    parser.add_argument(
        "--only", nargs="+", default=None, choices=[*peers.BUILDERS, *MUON_BUILDERS], help="optimizers to run"
    )
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"default: {DEFAULT_JSON}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="float32",
        help="dtype of the weights and gradients (default float32); each optimizer keeps its own state dtype",
    )
    parser.add_argument("--quick", action="store_true", help="60M only, 4 ordinary + 1 refresh timed steps")
    parser.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        default=None,
        metavar="BACKEND",
        help="add the row ours-svd-compile: ours-svd with compile=BACKEND (default inductor; its compilation falls in "
        "the untimed warm-up, its first step's time is in the JSON as first_step_ms)",
    )
    parser.add_argument(
        "--small-layers",
        action="store_true",
        help="the many-small-layers regime instead (benchmarks/bench_small_layers.py with its defaults)",
    )
    args = parser.parse_args(argv)
    args.presets = args.presets or (["60M"] if args.quick else ["60M", "130M", "350M"])
    args.reps = args.reps or (4 if args.quick else 30)
    args.refreshes = args.refreshes or (1 if args.quick else 3)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    names = args.only or [*peers.BUILDERS, *MUON_BUILDERS]
    if args.compile:
        backend = True if args.compile == "inductor" else args.compile
        peers.BUILDERS[COMPILED_ROW] = partial(peers.ours, projector="svd", compile=backend)
        names = [*names, COMPILED_ROW]
    # Each table's reference first, whenever that table runs: every ratio needs it.
    adamw_names = [n for n in names if n not in MUON_BUILDERS and n != peers.REFERENCE]
    muon_names = [n for n in names if n in MUON_BUILDERS and n != MUON_REFERENCE]
    runs_muon = any(n in MUON_BUILDERS for n in names)
    args.names = [peers.REFERENCE, *adamw_names] if adamw_names or peers.REFERENCE in names or not runs_muon else []
    args.muon_names = [MUON_REFERENCE, *muon_names] if runs_muon else []
    return args


def cycle_length(reps: int, refreshes: int) -> int:
    """Steps between refreshes so that ``refreshes`` cycles give at least ``reps`` ordinary steps. Odd, so that with
    two alternating gradient sets consecutive refreshes see different gradients (and the subspace visibly moves)."""
    gap = math.ceil(reps / refreshes) + 1
    return gap if gap % 2 else gap + 1


def amortised(refresh: float, ordinary: float, gap: int) -> float:
    """Mean cost per step when one step in ``gap`` is a refresh."""
    return (refresh + (gap - 1) * ordinary) / gap


def layer_shapes(preset: str, layers: int) -> list[tuple[str, tuple[int, int]]]:
    """Names and shapes of the 2-D weights of the first ``layers`` decoder blocks (meta tensors: nothing allocated)."""
    model = LlamaSkeleton(TINY, device="meta") if preset == "tiny" else llama_preset(preset, device="meta")
    return [(name, tuple(p.shape)) for name, p in model.layers[:layers].named_parameters() if p.ndim == 2]


def make_params(
    shapes: list[tuple[int, int]], seed: int, device: torch.device, dtype: torch.dtype = torch.float32
) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(device, dtype)) for s in shapes]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Run:
    """One optimizer on its own copy of the weights, stepped one cycle of ``gap`` steps at a time.

    The runs of a preset are interleaved cycle by cycle, so a burst of load from elsewhere on a shared machine lands
    on every optimizer's samples rather than on one row."""

    def __init__(
        self, name: str, shapes: list[tuple[int, int]], grads: list[list[Tensor]], cfg: peers.PeerConfig, args
    ):
        self.name, self.grads, self.gap = name, grads, cfg.update_gap
        self.device = torch.device(args.device)
        self.params = make_params(shapes, args.seed, self.device, DTYPES[args.dtype])
        self.buffers = [torch.empty_like(p) for p in self.params]
        self.ordinary: list[float] = []
        self.refresh: list[float] = []
        self.mismatches: list[int] = []
        self.refreshes_seen = 0
        self.first_ms: float | None = None  # the first step: state, first subspace (and a compiled row's compilation)
        self.failure: str | None = None
        try:
            if name in MUON_BUILDERS:
                self.built = MUON_BUILDERS[name](self.params, cfg, self.device)
            else:
                self.built = peers.build(name, self.params, cfg, self.device)
        except peers.PeerUnavailable as err:
            self.failure = str(err)
        except Exception as err:  # a peer whose API moved: report it, never drop the row
            self.failure = f"construction failed: {type(err).__name__}: {err}"

    def is_refresh(self, i: int) -> bool:
        return i == 0 or (i + self.built.refresh_lag) % self.gap == 0

    def cycle(self, c: int) -> None:
        """Steps c*gap ... (c+1)*gap - 1; cycle 0 is the untimed warm-up (state creation, first subspace)."""
        if self.failure:
            return
        try:
            for i in range(c * self.gap, (c + 1) * self.gap):
                self.step(i, timed=c > 0)
        except Exception as err:
            self.failure = f"step() failed: {type(err).__name__}: {err}"

    def step(self, i: int, timed: bool) -> None:
        refresh = self.is_refresh(i)
        self.refreshes_seen += refresh
        # Each refresh sees the other gradient set than the previous one, so a refresh visibly moves the subspace.
        for p, buf, g in zip(self.params, self.buffers, self.grads[self.refreshes_seen % 2]):
            p.grad = buf.copy_(g)  # fresh each step: some peers overwrite or replace p.grad
        opt = self.built.optimizer
        before = peers.projector_fingerprint(opt)
        _sync(self.device)
        start = time.perf_counter()
        with peers.maybe_quiet(self.built.quiet):
            opt.step()
        _sync(self.device)
        ms = (time.perf_counter() - start) * 1e3
        if i > 0 and (peers.projector_fingerprint(opt) != before) != refresh:
            self.mismatches.append(i)
        if timed:
            (self.refresh if refresh else self.ordinary).append(ms)
        if i == 0:
            self.first_ms = ms

    def row(self) -> dict[str, Any]:
        """Medians (ms), state bytes and the refresh-schedule check; frees the optimizer."""
        if self.failure:
            return {"name": self.name, "status": "not run", "reason": self.failure}
        opt = self.built.optimizer
        dense = self.name.startswith("adamw") or self.name == MUON_REFERENCE  # no subspace: all steps ordinary
        ordinary = self.ordinary + self.refresh if dense else self.ordinary
        check = "ok" if not self.mismatches else f"mismatch at steps {self.mismatches}"
        row = {
            "name": self.name,
            "status": "ok",
            "state_bytes": peers.state_bytes(opt),
            "state_bytes_logical": peers.state_bytes(opt, logical=True),
            "step_ms": statistics.median(ordinary),
            "step_ms_min": min(ordinary),
            "refresh_ms": None if dense else statistics.median(self.refresh),
            "refresh_ms_min": None if dense else min(self.refresh),
            "step_ms_samples": ordinary,
            "refresh_ms_samples": [] if dense else self.refresh,
            "refresh_check": "n/a" if dense else check,
            "first_step_ms": self.first_ms,
        }
        del self.built, self.params, self.buffers
        gc.collect()
        return row


def add_ratios(rows: list[dict[str, Any]], amortise_gap: int, reference: str = peers.REFERENCE) -> None:
    """Amortised cost of each row, and its state and times over ``reference``'s (a row of ``rows``)."""
    ref = next(r for r in rows if r["name"] == reference)
    for row in rows:
        if row["status"] != "ok":
            continue
        refresh = row["refresh_ms"] if row["refresh_ms"] is not None else row["step_ms"]
        row["amortised_ms"] = amortised(refresh, row["step_ms"], amortise_gap)
        if ref["status"] == "ok":
            row["state_ratio"] = row["state_bytes"] / ref["state_bytes"]
            row["step_ratio"] = row["step_ms"] / ref["step_ms"]
            row["amortised_ratio"] = row["amortised_ms"] / ref["step_ms"]


def format_table(preset: dict[str, Any], amortise_gap: int, muon: bool = False) -> str:
    """The AdamW table of a preset (its ``rows``), or with ``muon`` its Muon table (``muon_rows``, over torch Muon)."""
    ref, rows = ("xMuon", preset["muon_rows"]) if muon else ("xAdamW", preset["rows"])
    head = ["optimizer", "state MiB", ref, "step ms", ref, "refresh ms", f"amort@{amortise_gap} ms", ref]
    title = preset["title"] + (" -- Muon, over torch's Muon" if muon else "")
    lines = [title, "  ".join(f"{h:>12}" if i else f"{h:<16}" for i, h in enumerate(head))]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['name']:<16}  not run: {r['reason']}")
            continue
        refresh = "-" if r["refresh_ms"] is None else f"{r['refresh_ms']:.1f}"
        cells = [
            f"{r['state_bytes'] / MIB:.2f}",
            f"{r.get('state_ratio', float('nan')):.3f}",
            f"{r['step_ms']:.2f}",
            f"{r.get('step_ratio', float('nan')):.2f}",
            refresh,
            f"{r['amortised_ms']:.2f}",
            f"{r.get('amortised_ratio', float('nan')):.2f}",
        ]
        flag = "" if r["refresh_check"] in ("ok", "n/a") else "  (!) refresh schedule: " + r["refresh_check"]
        lines.append(f"{r['name']:<16}  " + "  ".join(f"{c:>12}" for c in cells) + flag)
    for r in rows:
        if r["status"] == "ok" and r["name"] == COMPILED_ROW:
            lines.append(
                f"  note: {r['name']}'s first step (state, subspace, compilation) took {r['first_step_ms']:.0f} ms"
            )
        if r["status"] == "ok" and r["state_bytes"] > 1.01 * r["state_bytes_logical"]:
            lines.append(
                f"  note: {r['name']} keeps {r['state_bytes'] / MIB:.2f} MiB alive for "
                f"{r['state_bytes_logical'] / MIB:.2f} MiB of state tensors (views into larger storages)"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.small_layers:  # where per-layer overhead (a GPU's kernel launches) dominates, not the matmuls
        import bench_small_layers

        return bench_small_layers.main([])
    device = torch.device(args.device)
    gap = cycle_length(args.reps, args.refreshes)
    result: dict[str, Any] = {
        "machine": peers.machine_info(PEER_PACKAGES, device),
        "config": {
            "reps": args.reps,
            "refreshes": args.refreshes,
            "bench_gap": gap,
            "amortise_gap": args.amortise_gap,
            "scale": args.scale,
            "layers": args.layers,
            "seed": args.seed,
            "dtype": args.dtype,
            "reference": peers.REFERENCE,
            "muon_reference": MUON_REFERENCE,
            "weights": "the 2-D weights of the first `layers` decoder blocks; embeddings, lm_head, norms excluded",
        },
        "presets": {},
    }
    for preset in args.presets:
        named = layer_shapes(preset, args.layers)
        shapes = [s for _, s in named]
        rank = args.rank or GALORE_RANKS[preset]
        cfg = peers.PeerConfig(rank=rank, update_gap=gap, scale=args.scale)
        gen = torch.Generator().manual_seed(args.seed + 1)
        dtype = DTYPES[args.dtype]
        grads = [[torch.randn(s, generator=gen).to(device, dtype) for s in shapes] for _ in range(2)]
        distinct = ", ".join(sorted({f"{m}x{n}" for m, n in shapes}))
        title = (
            f"LLaMA-{preset}: {len(shapes)} weights of {args.layers} decoder block(s) ({distinct}), rank {rank}, "
            f"{(gap - 1) * args.refreshes} ordinary + {args.refreshes} refresh steps timed (gap {gap}), "
            f"{args.dtype}, {args.device}, {torch.get_num_threads()} threads"
        )
        runs = [Run(name, shapes, grads, cfg, args) for name in args.names + args.muon_names]
        for c in range(1 + args.refreshes):
            for run in runs:
                run.cycle(c)
            print(f"  {preset}: cycle {c + 1}/{1 + args.refreshes} done", file=sys.stderr, flush=True)
        rows = [run.row() for run in runs]
        del runs
        rows, muon_rows = rows[: len(args.names)], rows[len(args.names) :]
        entry = {"title": title, "rank": rank, "weights": [{"name": n, "shape": list(s)} for n, s in named]}
        entry["rows"] = rows
        if rows:
            add_ratios(rows, args.amortise_gap)
            print(format_table(entry, args.amortise_gap) + "\n", flush=True)
        if muon_rows:
            entry["muon_rows"] = muon_rows
            add_ratios(muon_rows, args.amortise_gap, MUON_REFERENCE)
            print(format_table(entry, args.amortise_gap, muon=True) + "\n", flush=True)
        result["presets"][preset] = entry
        del grads
        gc.collect()
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")  # after each preset: a long run keeps what it has
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
