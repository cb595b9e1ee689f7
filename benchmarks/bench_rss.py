"""Peak host memory (max RSS) of a few training steps of a LLaMA-130M-shaped model on the CPU, per optimizer.

Optimizer state in bytes is only part of what a step costs: the transients of the update (dequantized 8-bit moments,
the rule's temporaries) can cost more than the state saves. This measures the real process: each configuration
runs in its own subprocess, which builds the model (plain torch: embedding 32000 x 768, 12 blocks of q/k/v/o
768 x 768, gate/up 768 -> 2048 and down 2048 -> 768, RMSNorms, an untied LM head), reads its RSS, then trains
``--steps`` steps on a random batch and reports the growth of ``ru_maxrss`` over that RSS, with the optimizer's state
bytes. The blocks' linear weights are projected (rank 256, DCT); embedding, LM head and norms are dense.

For the 8-bit rows it checks the bound ``growth(8-bit) <= growth(full precision) - 0.7 * (state bytes saved)``:
storing moments in 8 bits must save most of what it saves in state at the process's peak too.

    python benchmarks/bench_rss.py [--steps 3] [--threads 2] [--configs adamw dct ...] [--malloc-mmap-threshold 65536]
    python benchmarks/bench_rss.py --config dct-8bit      # one configuration, one JSON line (what the parent runs)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CONFIGS = ("adamw", "dct", "dct-8bit", "dct-layerwise", "dct-layerwise-8bit")
VOCAB, HIDDEN, LAYERS, INTERMEDIATE, HEADS = 32000, 768, 12, 2048, 12
BOUND_SHARE = 0.7  # share of the state bytes 8-bit storage saves that must show at the process's peak
MB = 1e6


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(HIDDEN, HIDDEN, bias=False) for _ in range(4))
        self.gate_proj = nn.Linear(HIDDEN, INTERMEDIATE, bias=False)
        self.up_proj = nn.Linear(HIDDEN, INTERMEDIATE, bias=False)
        self.down_proj = nn.Linear(INTERMEDIATE, HIDDEN, bias=False)
        self.attn_norm, self.mlp_norm = RMSNorm(HIDDEN), RMSNorm(HIDDEN)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        h = self.attn_norm(x)
        q, k, v = (f(h).view(b, t, HEADS, -1).transpose(1, 2) for f in (self.q_proj, self.k_proj, self.v_proj))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, HIDDEN)
        x = x + self.o_proj(attn)
        h = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Llama130M(nn.Module):
    """LLaMA-130M's parameter shapes (GaLore's config) with a plain causal forward; no rotary embedding (the memory
    of a step does not depend on it)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = RMSNorm(HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))

    def projected(self) -> set[Tensor]:
        return {m.weight for block in self.blocks for m in block.modules() if isinstance(m, nn.Linear)}


def current_rss() -> int:
    """Resident set size now, in bytes (Linux; elsewhere the high-water mark so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return max_rss()


def max_rss() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss) if sys.platform == "darwin" else int(rss) * 1024


def build_optimizer(config: str, model: Llama130M) -> torch.optim.Optimizer:
    base = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    if config == "adamw":
        return base
    from lightning_lowrank.optim import ProjectedOptimizer
    from lightning_lowrank.optim.layerwise import LayerwiseProjectedOptimizer

    cls = LayerwiseProjectedOptimizer if "layerwise" in config else ProjectedOptimizer
    bits = 8 if config.endswith("8bit") else None
    opt = cls.from_optimizer(base, model.projected(), rank=256, projector="dct", state_bits=bits)
    if isinstance(opt, LayerwiseProjectedOptimizer):
        opt.attach()
    return opt


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if isinstance(t, Tensor))


def run_one(config: str, steps: int, threads: int, batch: int = 2, seq: int = 64) -> dict[str, Any]:
    """One configuration in this process: RSS growth over the built model, and the optimizer's state bytes."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = Llama130M()
    base_rss = current_rss()
    opt = build_optimizer(config, model)
    layerwise = "layerwise" in config
    tokens = torch.randint(0, VOCAB, (batch, seq + 1), generator=torch.Generator().manual_seed(1))

    def closure() -> Tensor:
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        loss.backward()
        return loss

    start = time.perf_counter()
    for _ in range(steps):
        if layerwise:
            opt.step(closure)  # each weight updates in its hook during backward
        else:
            closure()
            opt.step()
        opt.zero_grad(set_to_none=True)
    return {
        "config": config,
        "growth_bytes": max_rss() - base_rss,
        "state_bytes": state_bytes(opt),
        "seconds": time.perf_counter() - start,
    }


def bound_lines(rows: dict[str, dict[str, Any]]) -> list[str]:
    """For each 8-bit row: growth(8-bit) <= growth(without) - 0.7 * (state bytes saved), and whether it holds."""
    lines = []
    for config, row in rows.items():
        plain = rows.get(config.removesuffix("-8bit"))
        if not config.endswith("8bit") or plain is None:
            continue
        saved = plain["state_bytes"] - row["state_bytes"]
        limit = plain["growth_bytes"] - BOUND_SHARE * saved
        verdict = "holds" if row["growth_bytes"] <= limit else "DOES NOT HOLD"
        lines.append(
            f"{config}: growth {row['growth_bytes'] / MB:.0f} MB <= {plain['growth_bytes'] / MB:.0f} MB - "
            f"{BOUND_SHARE} * {saved / MB:.0f} MB saved = {limit / MB:.0f} MB: {verdict}"
        )
    return lines


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=CONFIGS, help="run one configuration here and print it as JSON")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    parser.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        help="glibc: serve allocations of at least this many bytes by mmap, so that freed tensors leave the process "
        "(without it glibc raises the threshold up to 32 MiB as it goes, and freed heap memory stays resident): the "
        "growth is then close to the live tensors' peak rather than the allocator's",
    )
    args = parser.parse_args(argv)
    if args.config:
        row = run_one(args.config, args.steps, args.threads, args.batch, args.seq)
        print(json.dumps(row))
        return {args.config: row}
    rows = {}
    for config in args.configs:
        child = [sys.executable, str(Path(__file__).resolve()), "--config", config]
        child += ["--steps", str(args.steps), "--threads", str(args.threads)]
        child += ["--batch", str(args.batch), "--seq", str(args.seq)]
        env = dict(os.environ)
        if args.malloc_mmap_threshold is not None:
            env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
        out = subprocess.run(child, check=True, capture_output=True, text=True, env=env).stdout
        rows[config] = json.loads(out.strip().splitlines()[-1])
    print(
        f"LLaMA-130M shape, rank 256 DCT, {args.steps} steps of batch {args.batch} x {args.seq} tokens, "
        f"{args.threads} threads; max RSS growth over the built model"
        + ("" if args.malloc_mmap_threshold is None else f"; MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold}")
    )
    print(f"{'config':<20} {'RSS growth':>12} {'state':>10} {'seconds':>8}")
    for config, row in rows.items():
        growth, state = row["growth_bytes"] / MB, row["state_bytes"] / MB
        print(f"{config:<20} {growth:>9.0f} MB {state:>7.0f} MB {row['seconds']:>8.1f}")
    for line in bound_lines(rows):
        print(line)
    return rows


if __name__ == "__main__":
    main()
