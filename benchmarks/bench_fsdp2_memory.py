"""Per-rank memory under FSDP2: torch AdamW against ``strategy="lowrank_fsdp"``, on 2 CPU processes (gloo).

Each configuration trains the same LightningModule for ``--steps`` steps on random tokens, in its own pair of fresh
processes (this script with ``--config``: Lightning re-runs it for rank 1), and each rank reports what it holds:

* ``adamw``: Lightning's plain ``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)``; the module's
  ``configure_model`` applies ``fully_shard`` to each ``nn.Linear`` the low-rank strategy would project (the default
  selection: every Linear but the output head), then to the root, as ``LowRankFSDPStrategy`` does for a module
  without one; the optimizer is the module's own torch AdamW.
* ``lowrank-dct``, ``lowrank-svd``: ``LowRankFSDPStrategy`` (``strategy="lowrank_fsdp"``) with the module unchanged
  (no ``configure_model``: the strategy shards it), projector ``dct`` with ``dct_scorer="fft"`` or ``svd``, P on the
  right; embedding, output head and norms keep dense AdamW state. The default ``update_gap`` (200): one refresh, at
  the first step.

Figures per rank, all read off the live tensors (a DTensor by ``to_local()``): parameters; gradients (their largest
sum during the run, read before each optimizer step); optimizer state (every tensor in ``optimizer.state``), with its
replicated part (P, DCT indices, 0-d step counters: the same on every rank); for the low-rank rows the strategy's own
``memory_report()`` is checked against that count, and its dense-AdamW baseline against the measured AdamW run. Host
memory: the RSS when training starts (model sharded, optimizer built, no step yet), then the peak over the steps
(``resource.getrusage`` ``ru_maxrss``, whose high-water mark is reset at the start through ``/proc/self/clear_refs``
where Linux allows it, so that it covers the steps only), and its growth. Peak CUDA memory is not measured (CPU).

Models (``--model``):

* ``demo``: ``examples/byte_lm.py``'s ``ByteLM(ByteLMConfig())`` (byte vocabulary 256, d_model 128, 4 blocks),
  rank 32 (d_model / 4, as ``bench_convergence.py``), batches of 8 x 128 tokens per rank.
* ``130M``: ``ByteLM`` with LLaMA-130M's shapes from ``lightning_lowrank.memory.presets.PRESETS["130M"]`` (vocab 32000,
  hidden 768, intermediate 2048, 12 heads; untied embedding and head), ``--blocks`` of its 12 decoder blocks
  (default all 12), rank 128, batches of 2 x 128 tokens per rank.

    python benchmarks/bench_fsdp2_memory.py [--model demo|130M] [--blocks N] [--steps N] [--json PATH]
        [--configs adamw lowrank-dct lowrank-svd] [--malloc-mmap-threshold 65536]
    python benchmarks/bench_fsdp2_memory.py --config adamw --out R.json ...   # one configuration (what runs it)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from byte_lm import ByteLM, ByteLMConfig  # noqa: E402

from lightning_lowrank import LowRankConfig, LowRankFSDPStrategy  # noqa: E402
from lightning_lowrank.memory.presets import PRESETS  # noqa: E402
from lightning_lowrank.selection import select_lowrank_params  # noqa: E402

CONFIGS = ("adamw", "lowrank-dct", "lowrank-svd")
PROJECTORS = {"lowrank-dct": dict(projector="dct", dct_scorer="fft"), "lowrank-svd": dict(projector="svd")}
WORLD = 2
MIB = 2**20


def model_config(model: str, blocks: int | None, seq: int) -> ByteLMConfig:
    if model == "demo":
        base = ByteLMConfig()
        return ByteLMConfig(**{**vars(base), "n_layers": blocks or base.n_layers, "block_size": seq})
    llama = PRESETS["130M"]
    return ByteLMConfig(
        vocab_size=llama.vocab,
        block_size=seq,
        d_model=llama.hidden,
        n_layers=blocks or llama.layers,
        n_heads=llama.heads,
        ffn_hidden=llama.intermediate,
    )


def default_rank(model: str) -> int:
    return ByteLMConfig().d_model // 4 if model == "demo" else 128


class ShardsItself(ByteLM):
    """``ByteLM`` whose ``configure_model`` shards it as ``LowRankFSDPStrategy`` shards a module that has none: each
    module owning a weight of the default low-rank selection, then the root (for the plain Lightning strategy)."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(self, FSDPModule):
            return
        mesh = self.device_mesh["data_parallel"]
        cfg = LowRankConfig()
        weights = set(select_lowrank_params(self, cfg.target_modules, cfg.exclude))
        for sub in self.modules():
            if sub is not self and any(p in weights for p in sub.parameters(recurse=False)):
                fully_shard(sub, mesh=mesh)
        fully_shard(self, mesh=mesh)


def local_bytes(t: Tensor) -> int:
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.to_local()
    return t.numel() * t.element_size()


def is_replicated(t: Tensor, param: Tensor) -> bool:
    """Held in full on every rank: a plain tensor that is not a row shard of ``param`` (0-d step counters, P, DCT
    indices); a DTensor, or a plain tensor with the parameter's local rows (the low-rank moments, local rows x r),
    is sharded."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        return False
    rows = param.to_local().shape[0] if isinstance(param, DTensor) and param.dim() else None
    return t.dim() == 0 or rows is None or t.shape[0] != rows


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def max_rss() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss) if sys.platform == "darwin" else int(rss) * 1024


def reset_peak_rss() -> bool:
    """Reset the process's RSS high-water mark (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``), which
    ``ru_maxrss`` reads; False where that is not allowed (the peak then covers the process's whole life)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


class Measure(L.Callback):
    """Each rank's figures, gathered on rank 0 at the end of training (``self.ranks``)."""

    def __init__(self) -> None:
        self.grad_bytes = 0
        self.ranks: list[dict[str, Any]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.peak_reset = reset_peak_rss()
        self.start_rss = current_rss()
        self.start = time.perf_counter()

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        grads = sum(local_bytes(p.grad) for p in pl_module.parameters() if p.grad is not None)
        self.grad_bytes = max(self.grad_bytes, grads)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seconds = time.perf_counter() - self.start
        peak = max_rss()
        (opt,) = trainer.strategy.optimizers
        state = [(t, p) for p, s in opt.state.items() for t in s.values() if isinstance(t, Tensor)]
        figures: dict[str, Any] = {
            "rank": trainer.global_rank,
            "optimizer": type(opt).__name__,
            "param_bytes": sum(local_bytes(p) for p in pl_module.parameters()),
            "grad_bytes": self.grad_bytes,
            "state_bytes": sum(local_bytes(t) for t, _ in state),
            "replicated_state_bytes": sum(local_bytes(t) for t, p in state if is_replicated(t, p)),
            "start_rss_bytes": self.start_rss,
            "max_rss_bytes": peak,
            "rss_growth_bytes": peak - self.start_rss,
            "peak_reset": self.peak_reset,
            "seconds": seconds,
            "steps": trainer.global_step,
        }
        if isinstance(trainer.strategy, LowRankFSDPStrategy):
            report = trainer.strategy.memory_report()
            kinds = report.state_by_kind
            figures["report"] = {
                "param_bytes": report.param_bytes,
                "grad_bytes": report.grad_bytes,
                "state_bytes": report.optimizer_state_bytes,
                "replicated_state_bytes": kinds["projection"] + kinds["scalars"],
                "baseline_state_bytes": report.baseline_state_bytes,
                "projected_layers": len(report.layers),
                "ranks": report.ranks,
            }
        gathered: list[Any] = [None] * trainer.world_size
        dist.all_gather_object(gathered, figures)
        self.ranks = gathered


def run_config(args: argparse.Namespace) -> None:
    """One configuration on 2 processes; rank 0 writes every rank's figures to ``args.out``."""
    torch.set_num_threads(args.threads)
    cfg = model_config(args.model, args.blocks, args.seq)
    torch.manual_seed(0)  # the same initial weights on every rank: each keeps its own rows of them
    cls = ShardsItself if args.config == "adamw" else ByteLM
    model = cls(cfg, max_steps=args.steps)
    numel = sum(p.numel() for p in model.parameters())
    if args.config == "adamw":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy: Any = ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1)
    else:
        rank = args.rank or default_rank(args.model)
        strategy = LowRankFSDPStrategy(rank=rank, memory_report=False, memory_json=False, **PROJECTORS[args.config])
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (args.steps * args.batch * WORLD, args.seq + 1), generator=generator)
    data = DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=args.batch)
    measure = Measure()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy=strategy,
        max_steps=args.steps,
        limit_val_batches=0,
        logger=False,
        callbacks=[measure],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, train_dataloaders=data)
    if trainer.global_rank == 0:
        result = {"config": args.config, "numel": numel, "ranks": measure.ranks}
        Path(args.out).write_text(json.dumps(result, indent=1))


def fmt(n: int | None) -> str:
    return "" if n is None else f"{n / MIB:.2f}"


def table(results: dict[str, Any]) -> list[str]:
    """One markdown row per configuration and rank, and one for the sum over the ranks."""
    head = (
        "| config | rank | params MiB | grads MiB | optimizer state MiB | of which replicated KiB | state / AdamW "
        "| RSS at start MiB | max RSS MiB | RSS growth MiB | s |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    adamw = results.get("adamw", {}).get("ranks")
    for config, result in results.items():
        if "error" in result:
            lines.append(f"| {config} | failed: {result['error']} | | | | | | | | | |")
            continue
        ranks = result["ranks"]
        for r in ranks:
            ratio = f"{r['state_bytes'] / adamw[r['rank']]['state_bytes']:.3f}" if adamw else ""
            lines.append(
                f"| {config} | {r['rank']} | {fmt(r['param_bytes'])} | {fmt(r['grad_bytes'])} | "
                f"{fmt(r['state_bytes'])} | {r['replicated_state_bytes'] / 1024:.1f} | {ratio} | "
                f"{fmt(r['start_rss_bytes'])} | {fmt(r['max_rss_bytes'])} | {fmt(r['rss_growth_bytes'])} | "
                f"{r['seconds']:.1f} |"
            )
        total = {k: sum(r[k] for r in ranks) for k in ("param_bytes", "grad_bytes", "state_bytes")}
        ratio = f"{total['state_bytes'] / sum(r['state_bytes'] for r in adamw):.3f}" if adamw else ""
        replicated = sum(r["replicated_state_bytes"] for r in ranks)
        lines.append(
            f"| {config} | sum | {fmt(total['param_bytes'])} | {fmt(total['grad_bytes'])} | "
            f"{fmt(total['state_bytes'])} | {replicated / 1024:.1f} | {ratio} | | | | |"
        )
    return lines


def checks(results: dict[str, Any]) -> list[str]:
    """The strategy's ``memory_report()`` against the tensor count, and its dense baseline against the AdamW run."""
    lines = []
    adamw = results.get("adamw", {}).get("ranks")
    for config, result in results.items():
        if "error" in result or config == "adamw":
            continue
        for r in result["ranks"]:
            rep = r["report"]
            same = all(rep[k] == r[k] for k in ("param_bytes", "state_bytes", "replicated_state_bytes"))
            line = (
                f"{config} rank {r['rank']}: memory_report() state {rep['state_bytes']} B, params "
                f"{rep['param_bytes']} B, grads {rep['grad_bytes']} B ({rep['projected_layers']} projected layers, "
                f"ranks={rep['ranks']}); the tensor count: state {r['state_bytes']} B, params {r['param_bytes']} B, "
                f"grads {r['grad_bytes']} B: {'agree' if same else 'DIFFER'}"
            )
            if adamw:
                measured = adamw[r["rank"]]["state_bytes"]
                verdict = "equal" if rep["baseline_state_bytes"] == measured else "DIFFERENT"
                line += f"; its dense AdamW baseline {rep['baseline_state_bytes']} B, measured {measured} B: {verdict}"
            lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("demo", "130M"), default="demo")
    parser.add_argument("--blocks", type=int, help="decoder blocks (default: the model's own, 4 or 12)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rank", type=int, help="projection rank (default: 32 for demo, 128 for 130M)")
    parser.add_argument("--batch", type=int, help="sequences per rank and step (default: 8 for demo, 2 for 130M)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        help="glibc: serve allocations of at least this many bytes by mmap (MALLOC_MMAP_THRESHOLD_ in both ranks), so "
        "that freed tensors leave the process and the RSS peak is close to the live tensors' peak (as bench_rss.py)",
    )
    parser.add_argument("--json", help="also write every figure here")
    parser.add_argument("--config", choices=CONFIGS, help="run this one configuration here (2 processes)")
    parser.add_argument("--out", help="with --config: where rank 0 writes its figures")
    args = parser.parse_args(argv)
    args.batch = args.batch or (8 if args.model == "demo" else 2)
    if args.config:
        run_config(args)
        return {}
    cfg = model_config(args.model, args.blocks, args.seq)
    results: dict[str, Any] = {}
    for config in args.configs:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            child = [sys.executable, str(Path(__file__).resolve()), "--config", config, "--out", str(out)]
            child += ["--model", args.model, "--steps", str(args.steps), "--batch", str(args.batch)]
            child += ["--seq", str(args.seq), "--threads", str(args.threads)]
            child += ["--blocks", str(cfg.n_layers)] + (["--rank", str(args.rank)] if args.rank else [])
            env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "LOCAL_RANK", "WORLD_SIZE")}
            if args.malloc_mmap_threshold is not None:
                env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)  # rank 1 inherits it from rank 0
            done = subprocess.run(child, capture_output=True, text=True, env=env)
            if done.returncode != 0 or not out.exists():
                lines = (done.stderr or done.stdout).strip().splitlines()
                errors = [line for line in lines if "Error" in line or "Exception" in line]
                results[config] = {"error": (errors or lines or ["no output"])[-1].strip()}
                print(f"{config} failed (exit {done.returncode}):\n" + "\n".join(lines[-40:]), file=sys.stderr)
            else:
                results[config] = json.loads(out.read_text())
    numel = next((r["numel"] for r in results.values() if "numel" in r), None)
    rank = args.rank or default_rank(args.model)
    name = "demo ByteLM" if args.model == "demo" else "LLaMA-130M shapes"
    blocks = f"{cfg.n_layers} of {ByteLMConfig().n_layers if args.model == 'demo' else PRESETS['130M'].layers}"
    header = (
        f"{name} (vocab {cfg.vocab_size}, d_model {cfg.d_model}, ffn {cfg.ffn_hidden}, {cfg.n_heads} heads, "
        f"{blocks} blocks, {numel / 1e6 if numel else float('nan'):.2f}M parameters), rank {rank}; "
        f"FSDP2 on {WORLD} CPU processes (gloo), {args.steps} steps of {args.batch} x {args.seq} tokens per rank, "
        f"{args.threads} thread(s) per rank; bytes per rank, 'sum' over the ranks"
        + ("" if args.malloc_mmap_threshold is None else f"; MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold}")
    )
    print(header)
    for line in table(results):
        print(line)
    for line in checks(results):
        print(line)
    resets = {r["peak_reset"] for res in results.values() for r in res.get("ranks", [])}
    if resets != {True}:
        print("note: the RSS high-water mark could not be reset: max RSS covers each process's whole life")
    if args.json:
        payload = {"header": header, "args": vars(args), "results": results}
        Path(args.json).write_text(json.dumps(payload, indent=1))
    return results


if __name__ == "__main__":
    main()
