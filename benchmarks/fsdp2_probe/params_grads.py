"""FSDP2 parameters and gradients on 2 CPU ranks (docs/fsdp2-design.md, fact 3).

Shows: the placements ``fully_shard`` gives 2-D weights and 1-D biases; that ``p.to_local()`` is a view of the
parameter's storage (an in-place update of it changes the parameter); that ``p.grad`` is a DTensor whose local
part is the reduce-scattered, *averaged* gradient of the full batch; how an uneven weight (``Linear(16, 13)``: 13 rows
on 2 ranks) is split (local shapes, padding of the storage) and what ``full_tensor()`` gives back; that the
parameter objects and their local storage survive forward/backward (optimizer state keyed by them stays valid).

    .venv/bin/python benchmarks/fsdp2_probe/params_grads.py
"""

from __future__ import annotations

import spawn
import torch
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 13), nn.Tanh(), nn.Linear(13, 8))


def probe(rank: int) -> None:
    reference, net = model(), model()
    for layer in (net[0], net[2]):
        fully_shard(layer, mesh=spawn.mesh())
    fully_shard(net, mesh=spawn.mesh())
    lines = []
    for name, p in net.named_parameters():
        local = p.to_local()
        storage = local.untyped_storage().nbytes() // local.element_size()
        view = local.data_ptr() == p._local_tensor.data_ptr()
        lines.append(
            f"{name}: {type(p).__name__} placements={p.placements} global={tuple(p.shape)} "
            f"local={tuple(local.shape)} storage_elems={storage} view_of_param={view}"
        )
    spawn.ordered(rank, lines)

    ids = {name: (id(p), p.to_local().data_ptr()) for name, p in net.named_parameters()}
    torch.manual_seed(1)
    x, y = torch.randn(8, 16), torch.randn(8, 8)
    half = slice(4 * rank, 4 * rank + 4)
    nn.functional.mse_loss(net(x[half]), y[half]).backward()  # each rank its half of the batch
    nn.functional.mse_loss(reference(x), y).backward()  # the whole batch on one device
    lines = []
    for (name, p), ref in zip(net.named_parameters(), reference.parameters()):
        g = p.grad
        rows = ref.grad.tensor_split(2, dim=0)[rank]  # torch.chunk semantics for 13 rows: 7 + 6
        err_local, err_full = (g.to_local() - rows).abs().max(), (g.full_tensor() - ref.grad).abs().max()
        lines.append(
            f"{name}.grad: {type(g).__name__} placements={g.placements} local={tuple(g.to_local().shape)} "
            f"|local - ref rows|max={err_local:.1e} |full - ref|max={err_full:.1e}"
        )
        same = ids[name] == (id(p), p.to_local().data_ptr())
        lines.append(f"{name}: same param object and local storage after forward/backward: {same}")
    spawn.ordered(rank, lines)

    w = net[0].weight
    before = w.full_tensor().clone()
    with torch.no_grad():
        w.to_local().add_(1.0)  # an optimizer's in-place update of the local shard
    after = w.full_tensor()
    changed = (after - before).tensor_split(2, dim=0)
    means = [c.mean().item() for c in changed]
    spawn.ordered(rank, [f"after to_local().add_(1) on every rank: full-tensor rows changed by {means}"])
    full = w.full_tensor()
    spawn.ordered(
        rank,
        [
            f"full_tensor(): {type(full).__name__} {tuple(full.shape)}; DTensor? {isinstance(full, DTensor)}; "
            f"equals reference weight + 1 on all 13 rows: {torch.equal(full, reference[0].weight.detach() + 1)}"
        ],
    )


if __name__ == "__main__":
    spawn.run(probe)
