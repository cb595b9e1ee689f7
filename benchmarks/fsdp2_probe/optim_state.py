"""Optimizer state of a custom optimizer under FSDP2 and distributed checkpoints (DCP), 2 CPU ranks with gloo
(docs/fsdp2-design.md, facts 1 and 2).

The optimizer is ``probe_optim.ProbeOptimizer`` (moments as a DTensor ``Shard(0)`` of global shape (m, r), or plain
local tensors; a replicated P; int64 indices; a CPU scalar step; a top-level ``nonfinite_steps``) on
``Linear(16, 13)`` (13 rows: 7 + 6, uneven) and ``Linear(13, 8)``. It shows:

A. what ``get_optimizer_state_dict`` returns, sharded (``cpu_offload=True``, as Lightning saves a DCP checkpoint)
   and full (``full_state_dict=True, cpu_offload=True``, as ``save_distributed_checkpoint=False`` saves);
B. a DCP save and Lightning's load sequence (``lightning/fabric/strategies/model_parallel.py`` ``_load_checkpoint``:
   ``get_optimizer_state_dict`` of the fresh optimizer as the template, ``dcp.load`` into it,
   ``set_optimizer_state_dict``): what ``_init_optim_state`` makes the fresh optimizer do, what its
   ``load_state_dict`` receives, and whether every rank gets its own state back bit for bit;
C. the same with moments kept as plain per-rank tensors, uneven (13 rows) and even (12 rows);
D. templates that do not match the checkpoint (another rank; a key the checkpoint lacks; a key the template lacks);
E. the full state dict (rekeyed as Lightning does) loaded back into FSDP2 as Lightning loads a full checkpoint
   (``broadcast_from_rank0=True``);
F. the same dict loaded by a single-process optimizer over an unsharded model.

    .venv/bin/python benchmarks/fsdp2_probe/optim_state.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import spawn
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from lightning.fabric.strategies.model_parallel import _rekey_optimizer_state_if_needed
from probe_optim import ProbeOptimizer, describe, local
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.fsdp import FullyShardedDataParallel, OptimStateKeyType, fully_shard
from torch.distributed.tensor import DTensor

from lightning_lowrank.optim.state.host_ints import read_int

FAILURES = (Exception, dcp.api.CheckpointException)  # DCP raises CheckpointException, a BaseException


def model(rows: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, rows), nn.Tanh(), nn.Linear(rows, 8))


def sharded(rows: int) -> nn.Module:
    net = model(rows)
    for layer in (net[0], net[2]):
        fully_shard(layer, mesh=spawn.mesh())
    fully_shard(net, mesh=spawn.mesh())
    return net


def train(net: nn.Module, opt: ProbeOptimizer, rank: int, steps: int = 3) -> None:
    for i in range(steps):
        torch.manual_seed(100 + 10 * i + rank)  # each rank its own batch
        nn.functional.mse_loss(net(torch.randn(4, 16)), torch.randn(4, 8)).backward()
        opt.step()
        opt.zero_grad()


def lightning_load(net: nn.Module, opt: ProbeOptimizer, path: Path, edit=None) -> None:
    """``_load_checkpoint`` for a sharded checkpoint, optimizer part (``edit`` may change the template first)."""
    template = {"optimizer_0": get_optimizer_state_dict(net, opt)}
    if edit is not None:
        edit(template["optimizer_0"])
    dcp.load(template, checkpoint_id=path)
    set_optimizer_state_dict(net, opt, template["optimizer_0"], options=StateDictOptions(cpu_offload=True))


def reason(err: BaseException) -> str:
    """The error's type and its last line (a CheckpointException carries the failing rank's traceback)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[-1] if lines else ''}"


def same_state(a: ProbeOptimizer, b: ProbeOptimizer) -> dict[str, bool]:
    out = {}
    for pa, pb in zip(a.param_groups[0]["params"], b.param_groups[0]["params"]):
        for key, value in a.state[pa].items():
            out[f"{tuple(pa.shape)}.{key}"] = torch.equal(local(value), local(b.state[pb][key]))
    return out


def probe(rank: int, tmp: str) -> None:
    tmp = Path(tmp)
    # A. what get_optimizer_state_dict returns
    net = sharded(13)
    opt = ProbeOptimizer(net.parameters())
    train(net, opt, rank)
    trained = opt
    opt.param_groups[0]["skipped"] = 5  # a group key both optimizers have (the fresh one: 0)
    opt.param_groups[0]["only_saved"] = 7  # a group key the fresh optimizer lacks
    sd = get_optimizer_state_dict(net, opt, options=StateDictOptions(cpu_offload=True))
    lines = [f"A sharded: top-level keys {sorted(sd)}; param_groups[0] keys {sorted(sd['param_groups'][0])}"]
    lines += [f"A sharded: {fqn}.{k}: {describe(v)}" for fqn, s in sd["state"].items() for k, v in s.items()]
    full = get_optimizer_state_dict(net, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    lines.append(f"A full: top-level keys {sorted(full)}")
    lines += [f"A full: {fqn}.{k}: {describe(v)}" for fqn, s in full.get("state", {}).items() for k, v in s.items()]
    x = torch.zeros(7 - rank, 4)  # does DTensor.from_local wrap the local tensor without a copy?
    d = DTensor.from_local(x, net[0].weight.device_mesh, net[0].weight.placements, shape=(13, 4), stride=(4, 1))
    x.add_(1.0)
    lines.append(f"A from_local: an in-place change of the local tensor shows in the DTensor: {bool(d.all())}")
    gathered = {k: v.full_tensor() for k, v in opt.state[net[0].weight].items() if isinstance(v, DTensor)}
    if rank == 0:
        w = full["state"]["0.weight"]["exp_avg"]
        same = torch.equal(w, gathered["exp_avg"])
        lines.append(f"A full: 0.weight.exp_avg equals the DTensor's full_tensor(): {same}")
        rekeyed = FullyShardedDataParallel.rekey_optim_state_dict(full, OptimStateKeyType.PARAM_ID, net)
        lines.append(f"A full rekeyed as Lightning does: state keys {sorted(rekeyed['state'])}")
        torch.save({"optimizer": rekeyed, "exp_avg": gathered["exp_avg"]}, tmp / "full.pt")
    spawn.ordered(rank, lines)

    # B. DCP round trip with DTensor moments, Lightning's load sequence
    dcp.save({"optimizer_0": sd}, checkpoint_id=tmp / "dtensor")
    net2 = sharded(13)
    opt2 = ProbeOptimizer(net2.parameters())
    opt2.nonfinite_steps = 0
    cached = []  # host_ints caches a step counter's value by tensor identity; DCP writes the tensor in place
    lightning_load(net2, opt2, tmp / "dtensor", lambda osd: cached.append(read_int(osd["state"]["0.weight"]["step"])))
    lines = [f"B {c}" for c in opt2.calls]
    lines.append(f"B grads after load: {[p.grad for p in net2.parameters()]}")
    lines.append(f"B nonfinite_steps after load: {opt2.nonfinite_steps!r} (saved: {opt.nonfinite_steps})")
    step = opt2.state[net2[0].weight]["step"]
    lines.append(f"B step counter: holds {int(step)}, host_ints.read_int says {read_int(step)} (cached {cached})")
    lines.append(f"B restored bit for bit: {same_state(opt, opt2)}")
    lines.append(f"B param_groups[0] after load: { {k: v for k, v in opt2.param_groups[0].items() if k != 'params'} }")
    spawn.ordered(rank, lines)

    # C. moments as plain per-rank tensors
    for rows in (13, 12):
        net = sharded(rows)
        opt = ProbeOptimizer(net.parameters(), local_moments=True)
        train(net, opt, rank)
        lines = []
        try:
            sd = get_optimizer_state_dict(net, opt, options=StateDictOptions(cpu_offload=True))
            dcp.save({"optimizer_0": sd}, checkpoint_id=tmp / f"local{rows}")
            lines.append(f"C local moments, {rows} rows: DCP save ok")
            net2 = sharded(rows)
            opt2 = ProbeOptimizer(net2.parameters(), local_moments=True)
            lightning_load(net2, opt2, tmp / f"local{rows}")
            lines.append(f"C local moments, {rows} rows: loaded; restored bit for bit: {same_state(opt, opt2)}")
        except FAILURES as err:  # the probe reports whatever fails
            lines.append(f"C local moments, {rows} rows: {reason(err)}")
        full = get_optimizer_state_dict(net, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            moments = describe(full["state"]["0.weight"]["exp_avg"])
            lines.append(f"C local moments, {rows} rows, full: 0.weight.exp_avg {moments}")
        spawn.ordered(rank, lines)

    # D. templates that differ from the checkpoint
    def extra_key(osd):
        osd["state"]["0.weight"]["extra"] = torch.zeros(1)

    def fewer_keys(osd):
        del osd["state"]["0.weight"]["proj_idx"]

    lines = []
    for label, kwargs, edit in (
        ("rank 3 instead of 4", {"rank": 3}, None),
        ("template has a key the checkpoint lacks", {}, extra_key),
        ("template lacks proj_idx", {}, fewer_keys),
    ):
        net2 = sharded(13)
        opt2 = ProbeOptimizer(net2.parameters(), **kwargs)
        try:
            lightning_load(net2, opt2, tmp / "dtensor", edit)
            lines.append(f"D {label}: loaded; state keys of 0.weight {sorted(opt2.state[net2[0].weight])}")
        except FAILURES as err:
            lines.append(f"D {label}: {reason(err)}")
    spawn.ordered(rank, lines)

    # E. the full state dict loaded back into FSDP2, as Lightning's _load_checkpoint loads a full checkpoint
    saved = torch.load(tmp / "full.pt", weights_only=True)  # every rank reads the file, as Lightning does
    net3 = sharded(13)
    opt3 = ProbeOptimizer(net3.parameters())
    state = _rekey_optimizer_state_if_needed(saved["optimizer"], net3)
    options = StateDictOptions(broadcast_from_rank0=True, full_state_dict=True, strict=True)
    set_optimizer_state_dict(net3, opt3, optim_state_dict=state, options=options)
    lines = [f"E {c}" for c in opt3.calls if "0.weight" in c]
    lines.append(f"E full -> FSDP2 restored bit for bit: {same_state(trained, opt3)}")
    spawn.ordered(rank, lines)

    # F. the full state dict in a single process, over an unsharded copy
    dist.barrier()
    if rank == 0:
        plain = model(13)
        single = ProbeOptimizer(plain.parameters())
        single.load_state_dict(saved["optimizer"])
        m = single.state[plain[0].weight]["exp_avg"]
        print(f"[0] F single process: exp_avg {describe(m)} equals gathered: {torch.equal(m, saved['exp_avg'])}")
        nn.functional.mse_loss(plain(torch.randn(4, 16)), torch.randn(4, 8)).backward()
        single.step()
        print(f"[0] F single process: a step after loading ran; step = {single.state[plain[0].weight]['step']}")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        spawn.run(probe, tmp)
