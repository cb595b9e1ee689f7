"""``fully_shard(..., shard_placement_fn=...)``: weights sharded on dim 1 (columns) on 2 CPU ranks with gloo
(docs/fsdp2-design.md, fact 4).

A left projection (R = P^T G, P over the rows) is shard-local only when the *columns* are sharded. This shards the
2-D weights on dim 1 (biases stay on dim 0), runs forward/backward on half a batch per rank, and compares the local
gradient with the matching columns of a single-device gradient of the whole batch; then tries a weight whose
column count is not divisible by the world size.

    .venv/bin/python benchmarks/fsdp2_probe/shard_dim1.py
"""

from __future__ import annotations

import spawn
import torch
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard


def by_columns(p: nn.Parameter) -> Shard | None:
    return Shard(1) if p.ndim == 2 else None


def probe(rank: int) -> None:
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 4))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 4))
    for layer in (net[0], net[2]):
        fully_shard(layer, mesh=spawn.mesh(), shard_placement_fn=by_columns)
    fully_shard(net, mesh=spawn.mesh())
    torch.manual_seed(1)
    x, y = torch.randn(8, 16), torch.randn(8, 4)
    nn.functional.mse_loss(net(x[4 * rank : 4 * rank + 4]), y[4 * rank : 4 * rank + 4]).backward()
    nn.functional.mse_loss(reference(x), y).backward()
    lines = []
    for (name, p), ref in zip(net.named_parameters(), reference.parameters()):
        dim = p.placements[0].dim
        cols = ref.grad.tensor_split(2, dim=dim)[rank]
        lines.append(
            f"{name}: placements={p.placements} global={tuple(p.shape)} local={tuple(p.to_local().shape)} "
            f"grad placements={p.grad.placements} |local grad - ref|max={(p.grad.to_local() - cols).abs().max():.1e}"
        )
    spawn.ordered(rank, lines)

    odd = nn.Linear(13, 8)  # 13 columns on 2 ranks
    try:
        fully_shard(odd, mesh=spawn.mesh(), shard_placement_fn=by_columns)
        out = f"Linear(13, 8) on dim 1: local {tuple(odd.weight.to_local().shape)}"
        odd(torch.randn(2, 13)).sum().backward()
        out += f", backward ok, grad local {tuple(odd.weight.grad.to_local().shape)}"
    except Exception as err:  # noqa: BLE001 - the probe reports whatever fails
        out = f"Linear(13, 8) on dim 1: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
    spawn.ordered(rank, [out])


if __name__ == "__main__":
    spawn.run(probe)
