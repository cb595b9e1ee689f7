"""What bites an optimizer under FSDP2, 2 CPU ranks with gloo (docs/fsdp2-design.md, fact 7).

1. torch's functional Adam (``torch.optim.adam.adam``, what ``dispatch.dense_adam`` calls) on a DTensor
   parameter with plain-tensor state, with DTensor state, and on the local tensors (run after 2);
2. ``torch.nn.utils.clip_grad_norm_`` over FSDP2 gradients, against a single-device clip of the whole batch's;
3. ``torch._foreach_*`` over lists of local shards, and over a list mixing DTensors and plain tensors;
4. whether a post-accumulate-grad hook (the layer-wise mode's trigger) fires on a sharded parameter;
5. ``nonfinite.finite_flag`` (the optimizer's one-flag check) on DTensor gradients and on local ones when only one
   rank's shard holds an inf.

    .venv/bin/python benchmarks/fsdp2_probe/pitfalls.py
"""

from __future__ import annotations

import spawn
import torch
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.optim.adam import adam

from lightning_lowrank.optim.nonfinite import finite_flag


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 13), nn.Tanh(), nn.Linear(13, 8))


def backward(net: nn.Module, rank: int | None) -> None:
    torch.manual_seed(1)
    x, y = torch.randn(8, 16), torch.randn(8, 8)
    if rank is not None:
        x, y = x[4 * rank : 4 * rank + 4], y[4 * rank : 4 * rank + 4]
    nn.functional.mse_loss(net(x), y).backward()


def attempt(fn) -> str:
    try:
        return f"ok ({fn()})"
    except Exception as err:  # noqa: BLE001 - the probe reports whatever fails
        return f"{type(err).__name__}: {str(err).splitlines()[0][:150]}"


def zeros(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros_like(t), torch.zeros_like(t)


def one_adam(p, grad, m, v, foreach: bool):
    kw = dict(beta1=0.9, beta2=0.999, lr=0.1, weight_decay=0.0, eps=1e-8, maximize=False, amsgrad=False)
    adam([p], [grad], [m], [v], [], [torch.tensor(0.0)], foreach=foreach, **kw)
    return type(p).__name__


def probe(rank: int) -> None:
    reference, net = model(), model()
    hooks: list[str] = []
    for layer in (net[0], net[2]):
        fully_shard(layer, mesh=spawn.mesh())
    fully_shard(net, mesh=spawn.mesh())
    seen: list[torch.Tensor] = []

    def hook(p: torch.Tensor) -> None:
        hooks.append(f"{type(p.grad).__name__} local {tuple(p.grad.to_local().shape)}")
        seen.append(p.grad.to_local().clone())

    net[0].weight.register_post_accumulate_grad_hook(hook)
    backward(net, rank)
    backward(reference, None)
    w = net[0].weight
    final = torch.equal(seen[0], w.grad.to_local()) if seen else None
    lines = [f"4 post-accumulate-grad hook on the sharded weight fired {len(hooks)} times {hooks}; final grad: {final}"]

    # 2. gradient clipping
    total = torch.nn.utils.clip_grad_norm_(net.parameters(), 0.05)
    ref_total = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
    diff = max(
        (p.grad.full_tensor() - r.grad).abs().max().item() for p, r in zip(net.parameters(), reference.parameters())
    )
    shown = total.full_tensor() if isinstance(total, DTensor) else total
    lines.append(
        f"2 clip_grad_norm_: total norm {type(total).__name__} "
        f"{getattr(total, 'placements', '')} = {shown.item():.6f} (single device {ref_total.item():.6f}); "
        f"max |clipped grad - single-device clipped grad| {diff:.1e}"
    )

    # 1. functional Adam
    with torch.no_grad():
        for foreach in (False, True):
            plain = attempt(lambda f=foreach: one_adam(w, w.grad, torch.zeros(w.shape), torch.zeros(w.shape), f))
            lines.append(f"1 adam(foreach={foreach}) DTensor param, plain state: {plain}")
            dstate = attempt(
                lambda f=foreach: one_adam(w, w.grad, torch.zeros_like(w), torch.zeros_like(w), f)  # DTensor zeros
            )
            lines.append(f"1 adam(foreach={foreach}) DTensor param, DTensor state: {dstate}")
            local = attempt(lambda f=foreach: one_adam(w.to_local(), w.grad.to_local(), *zeros(w.to_local()), f))
            lines.append(f"1 adam(foreach={foreach}) local tensors: {local}")

    # 3. foreach on local shards
    params = [p.to_local() for p in net.parameters()]
    local_grads = [p.grad.to_local() for p in net.parameters()]
    before = net[0].weight.full_tensor().clone()
    with torch.no_grad():
        ok = attempt(lambda: torch._foreach_add_(params, local_grads, alpha=-1.0) and "applied")
    changed = not torch.equal(before, net[0].weight.full_tensor())
    lines.append(f"3 _foreach_add_ over to_local() lists: {ok}; parameter changed: {changed}")
    mixed = [net[0].weight.grad, torch.zeros(3)]
    lines.append(f"3 _foreach_norm over [DTensor, Tensor]: {attempt(lambda: len(torch._foreach_norm(mixed)))}")

    # 5. the non-finite flag
    grads = [p.grad for p in net.parameters()]
    lines.append(f"5 all finite: finite_flag(DTensor grads) {attempt(lambda: bool(finite_flag(grads)))}")
    if rank == 1:
        net[0].weight.grad.to_local()[0, 0] = float("inf")
    on_dtensors = attempt(lambda: bool(finite_flag(grads)))
    on_local = attempt(lambda: bool(finite_flag([g.to_local() for g in grads])))
    global_flag = attempt(lambda: bool(torch.stack([g.isfinite().all().full_tensor() for g in grads]).all()))
    lines.append(
        f"5 inf in rank 1's shard only: finite_flag(DTensor grads) {on_dtensors}; finite_flag(local grads) {on_local}; "
        f"DTensor isfinite().all().full_tensor() {global_flag}"
    )
    spawn.ordered(rank, lines)


if __name__ == "__main__":
    spawn.run(probe)
