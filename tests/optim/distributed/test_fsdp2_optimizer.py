"""The optimizer on weights sharded by FSDP2 (``fully_shard``, 2 CPU processes, gloo), without Lightning.

Each rank trains on its half of every batch; FSDP2 averages the gradients (a reduce-scatter), so the run must equal a
single-process run on the whole batch with the same options and ``side="right"``: the parameters after six steps,
refreshes included, within 5e-5. A DCT refresh all-reduces one n-vector of scores per layer: the bytes are counted.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_lowrank.optim import ProjectedOptimizer
from tests.fsdp2_spawn import WORLD, free_port, process_group, shard_linears

pytestmark = pytest.mark.skipif(sys.platform == "win32" or not dist.is_available(), reason="gloo workers")

STEPS, BATCH = 6, 8
SHAPES = ((24, 16), (40, 24), (8, 40))  # tall, tall, wide: every weight projects on the right (side="right")
CASES = {
    "dct": dict(projector="dct"),
    "svd": dict(projector="svd"),
    "rsvd+fira": dict(projector="rsvd", residual="fira"),
    "random": dict(projector="random"),
    "dct fft l1, sgd": dict(projector="dct", dct_scorer="fft", dct_norm="l1"),
}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    layers = []
    for out, inp in SHAPES:
        layers += [torch.nn.Linear(inp, out), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers[:-1])


def _batch(step: int) -> torch.Tensor:
    return torch.randn(BATCH, SHAPES[0][1], generator=torch.Generator().manual_seed(100 + step))


def _optimizer(model: torch.nn.Module, options: dict) -> ProjectedOptimizer:
    options = {"rank": 4, "update_gap": 2, "side": "right", **options}
    name = str(options.pop("_name", ""))
    if "muon" in name:  # the 2-D weights; the rest untrained
        base = torch.optim.Muon([p for p in model.parameters() if p.ndim == 2], lr=0.02)
    elif "sgd" in name:
        base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    else:
        base = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    dense = "dense" in name  # nothing projected
    return ProjectedOptimizer.from_optimizer(base, lambda p: p.ndim == 2 and not dense, **options)


def _train(model: torch.nn.Module, opt: ProjectedOptimizer, rows: slice, poison: bool = False) -> None:
    for step in range(STEPS):
        opt.zero_grad()
        model(_batch(step)[rows]).pow(2).mean().backward()
        if poison and step == 3:  # a NaN in one rank's rows only (rank 1 holds rows 12..23 of "0.weight")
            grad = model[0].weight.grad.to_local()
            if dist.get_rank() == 1:
                grad[0, 0] = float("nan")
        opt.step()


def _worker(rank: int, port: int, name: str, out: str, poison: bool = False) -> None:
    with process_group(rank, port):
        model = shard_linears(_model())
        opt = _optimizer(model, {**CASES[name], "_name": name})
        half = BATCH // WORLD
        _train(model, opt, slice(rank * half, (rank + 1) * half), poison)
        full = {n: p.full_tensor() for n, p in model.named_parameters()}
        first = "momentum_buffer" if "sgd" in name else "exp_avg"
        moments = {n: tuple(opt.state[p][first].shape) for n, p in model.named_parameters() if p.ndim == 2}
        if rank == 0:
            result = {"params": full, "moments": moments, "refresh_bytes": opt.sharded_refresh_bytes}
            torch.save({**result, "nonfinite_steps": opt.nonfinite_steps}, out)


@pytest.mark.parametrize("name", list(CASES))
def test_a_sharded_run_equals_the_single_process_run(name, tmp_path):
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(free_port(), name, out), nprocs=WORLD, join=True)
    sharded = torch.load(out, weights_only=True)
    model = _model()
    _train(model, _optimizer(model, {**CASES[name], "_name": name}), slice(None))
    for n, p in model.named_parameters():
        torch.testing.assert_close(sharded["params"][n], p.detach(), rtol=0, atol=5e-5, msg=n)
    # the moments are sharded with the weight: each rank holds its rows x r
    assert sharded["moments"] == {f"{2 * i}.weight": (out // WORLD, 4) for i, (out, _) in enumerate(SHAPES)}
    refreshes = STEPS // 2  # update_gap=2: steps 0, 2, 4
    if name.startswith("dct"):  # one n-vector of float32 scores per layer and refresh
        assert sharded["refresh_bytes"] == refreshes * sum(n * 4 for _, n in SHAPES)
    elif name == "random":
        assert sharded["refresh_bytes"] == 0


def test_a_nan_in_one_ranks_rows_skips_the_step_on_every_rank(tmp_path):
    """The non-finite flag is agreed over the ranks: rank 0's rows are finite, yet it skips with rank 1, so the
    shards stay consistent (a rank that stepped alone would leave the weight half-updated)."""
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(free_port(), "dct", out, True), nprocs=WORLD, join=True)
    sharded = torch.load(out, weights_only=True)
    assert sharded["nonfinite_steps"] == 1  # on rank 0, whose own gradient rows were all finite
    assert all(torch.isfinite(p).all() for p in sharded["params"].values())


def _dcp_worker(rank: int, port: int, out: str, path: str) -> None:
    """Lightning's sharded save and load (``get_optimizer_state_dict``, ``dcp.save``; a template, ``dcp.load``,
    ``set_optimizer_state_dict``), with the live count zeroed in between so that only the checkpoint can restore it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    with process_group(rank, port):
        model = shard_linears(_model())
        opt = _optimizer(model, dict(projector="dct"))
        half = BATCH // WORLD
        _train(model, opt, slice(rank * half, (rank + 1) * half), poison=True)
        saved = opt.nonfinite_steps
        dcp.save({"optimizer": get_optimizer_state_dict(model, opt)}, checkpoint_id=path)
        opt.nonfinite_steps = 0
        template = {"optimizer": get_optimizer_state_dict(model, opt)}
        dcp.load(template, checkpoint_id=path)
        set_optimizer_state_dict(model, opt, template["optimizer"])
        if rank == 0:
            keys = sorted(k for g in opt.param_groups for k in g if k == "nonfinite_steps")
            torch.save({"saved": saved, "loaded": opt.nonfinite_steps, "group_keys": keys}, out)


def test_the_skipped_step_count_survives_a_distributed_checkpoint(tmp_path):
    """DCP keeps only "state" and "param_groups" of an optimizer's state_dict: the count rides in the first group,
    and is taken out of the live groups again at load."""
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_dcp_worker, args=(free_port(), out, str(tmp_path / "dcp")), nprocs=WORLD, join=True)
    result = torch.load(out, weights_only=True)
    assert (result["saved"], result["loaded"], result["group_keys"]) == (1, 1, [])


REFUSED = {
    "side left": (dict(side="left"), "side='left'"),
    "online_pca": (dict(projector="online_pca"), "projector='online_pca'"),
    "subset_norm": (dict(projected_rule="subset_norm", side="auto"), "'subset_norm' inner rule"),
    "apollo-mini": (dict(residual="apollo", apollo_scale_type="tensor", rank=1), "APOLLO-Mini"),
    "memory_budget": (dict(memory_budget=10**6), "memory_budget"),
    "muon kept dense, wide": (dict(_name="muon dense"), "Newton-Schulz on a wide matrix"),
}
ALLOWED = {  # formulas that separate over rows: built without complaint
    "fira": dict(residual="fira"),
    "frugal": dict(residual="frugal"),
    "apollo (channel)": dict(residual="apollo"),
    "sgd": dict(),
    "muon": dict(),
}


def _refusals_worker(rank: int, port: int, out: str) -> None:
    with process_group(rank, port):
        model = shard_linears(_model())
        messages = {}
        for name, (options, _) in REFUSED.items():
            try:
                _optimizer(model, options)
                messages[name] = None
            except ValueError as err:
                messages[name] = str(err)
        for name, options in ALLOWED.items():
            _optimizer(model, {**options, "_name": name})
        if rank == 0:
            torch.save(messages, out)


def test_what_needs_other_ranks_rows_is_refused_when_the_optimizer_is_built(tmp_path):
    out = str(tmp_path / "messages.pt")
    mp.spawn(_refusals_worker, args=(free_port(), out), nprocs=WORLD, join=True)
    messages = torch.load(out, weights_only=True)
    for name, (_, match) in REFUSED.items():
        assert messages[name] is not None and match in messages[name], (name, messages[name])
        assert "sharded by FSDP2" in messages[name] or "FSDP2" in messages[name], messages[name]


DECOMPOSITIONS = {"svd": "svd_projection", "rsvd": "randomized_svd_projection"}


def _one_rank_decomposes_worker(rank: int, port: int, name: str, out: str) -> None:
    """Rank 1's decomposition returns -P: still orthonormal, the same subspace, other bits (as another process's
    cuSOLVER may). Each rank records what its decompositions returned."""
    from lightning_lowrank.optim.projection import projectors

    decomposed = []
    original = getattr(projectors, DECOMPOSITIONS[name])

    def decompose(*args, **kwargs):
        P = original(*args, **kwargs)
        P = -P if rank == 1 else P
        decomposed.append(P.clone())
        return P

    setattr(projectors, DECOMPOSITIONS[name], decompose)
    with process_group(rank, port):
        model = shard_linears(_model())
        opt = _optimizer(model, dict(projector=name))
        half = BATCH // WORLD
        _train(model, opt, slice(rank * half, (rank + 1) * half))
        P = [opt.projection_matrix(p) for p in opt.projected_params()]
        torch.save({"P": P, "decomposed": decomposed}, f"{out}/rank{rank}.pt")


@pytest.mark.parametrize("name", ["svd", "rsvd"])
def test_an_svd_refresh_is_decomposed_on_one_rank_and_shared(name, tmp_path):
    """Each layer's decomposition runs on one rank (the layer in slot i of a refresh on rank i % 2) and every rank
    steps with that P: ranks whose decompositions differ in their bits still hold one P per layer."""
    mp.spawn(_one_rank_decomposes_worker, args=(free_port(), name, str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    for layer, (P0, P1) in enumerate(zip(r0["P"], r1["P"])):
        assert torch.equal(P0, P1), layer
    refreshes = STEPS // 2  # update_gap=2: steps 0, 2, 4, three layers each
    assert (len(r0["decomposed"]), len(r1["decomposed"])) == (2 * refreshes, refreshes)
    # the last refresh: layers 0 and 2 decomposed on rank 0, layer 1 on rank 1 (its -P)
    owners = [r0["decomposed"][-2], r1["decomposed"][-1], r0["decomposed"][-1]]
    for layer, (P, owned) in enumerate(zip(r0["P"], owners)):
        assert torch.equal(P, owned), layer
