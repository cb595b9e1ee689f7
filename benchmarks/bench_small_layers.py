"""Optimizer step time in the many-small-layers regime, where per-tensor Python overhead (a GPU's kernel-launch
regime) dominates: 96 projected 64 x 64 weights and their 96 biases, rank 16, no refresh in the timed steps.

Prints the median step time of ours (with the default non-finite check, and with nonfinite="ignore") and of torch's
AdamW (foreach and single-tensor, and fused where available),
measured interleaved in one run, and each as a ratio to AdamW foreach. CPU by default, one thread.

    python benchmarks/bench_small_layers.py [--layers 96] [--size 64] [--rank 16] [--steps 50] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lightning_lowrank.optim import ProjectedOptimizer


def build(kind: str, params: list[torch.Tensor], rank: int) -> torch.optim.Optimizer:
    if kind in ("ours", "ours-ignore"):  # ours: the default non-finite check; ours-ignore: nonfinite="ignore"
        base = torch.optim.AdamW(params, lr=1e-3, foreach=True)  # the dense biases: torch's foreach, as compared
        nonfinite = "ignore" if kind == "ours-ignore" else "skip"
        return ProjectedOptimizer.from_optimizer(
            base, lambda p: p.ndim == 2, rank=rank, update_gap=10_000, nonfinite=nonfinite
        )
    options = {"foreach": {"foreach": True}, "single": {"foreach": False}, "fused": {"fused": True}}[kind]
    return torch.optim.AdamW(params, lr=1e-3, **options)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=96)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device(args.device)
    kinds = ["ours", "ours-ignore", "foreach", "single"] + (["fused"] if device.type == "cuda" else [])
    gen = torch.Generator().manual_seed(0)
    runs = {}
    for kind in kinds:
        params = []
        for _ in range(args.layers):
            params.append(torch.nn.Parameter(torch.randn(args.size, args.size, generator=gen).to(device)))
            params.append(torch.nn.Parameter(torch.zeros(args.size, device=device)))
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(device)
        runs[kind] = build(kind, params, args.rank)
        runs[kind].step()  # state and the first subspace
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(args.steps):  # interleaved, so drifts in machine speed hit every row alike
        for kind in kinds:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            runs[kind].step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[kind].append(time.perf_counter() - start)
    medians = {kind: statistics.median(t) * 1e3 for kind, t in times.items()}
    print(f"{args.layers} projected {args.size}x{args.size} weights + biases, rank {args.rank}, {device}, 1 thread")
    for kind in kinds:
        print(f"  {kind:11s} {medians[kind]:8.3f} ms   {medians[kind] / medians['foreach']:5.2f} x AdamW foreach")
    return medians


if __name__ == "__main__":
    main()
