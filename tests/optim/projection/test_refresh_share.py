"""Sharing a refresh between ranks (``collectives.share_refreshes``): receivers allocate what a refresh stores from
the layer alone and take the tensors in one collective per refresh step, never through pickled objects.

Two CPU processes (gloo) run the optimizer as DDP does without Lightning: each rank averages its gradients with the
other's, then steps with ``shard_refreshes()``. Every projector and storage is run, and checked against the ranks'
agreement and against one process on the whole batch."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_lowrank.optim import ProjectedOptimizer
from lightning_lowrank.optim.distributed.collectives import SEEDED_PROJECTORS, refresh_layout
from lightning_lowrank.optim.projection.projectors import PROJECTOR_KEYS
from tests.fsdp2_spawn import WORLD, free_port, process_group

STEPS, BATCH, GAP = 6, 8, 2
SHAPES = ((24, 16), (40, 24), (8, 40))  # tall, tall, wide: P on both sides
CASES = {
    "svd": dict(),
    "rsvd": dict(projector="rsvd"),
    "dct": dict(projector="dct"),
    "dct fft": dict(projector="dct", dct_scorer="fft", dct_norm="l1"),
    "random": dict(projector="random"),
    "gaussian": dict(projector="gaussian"),
    "online_pca": dict(projector="online_pca"),
    "svd 8-bit P": dict(projector_bits=8),
    "svd 4-bit P, groups of 7": dict(projector_bits=4, proj_group_size=7),  # padded groups, an odd code count
    "dct 8-bit P": dict(projector="dct", projector_bits=8),
    "memory_budget": dict(memory_budget=9_000),  # ranks that differ per layer
}
COLLECTIVES = ("broadcast", "all_gather_single", "all_gather_into_tensor", "all_reduce", "broadcast_object_list")
pytestmark = pytest.mark.skipif(sys.platform == "win32" or not dist.is_available(), reason="gloo workers")


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    layers = []
    for out, inp in SHAPES:
        layers += [torch.nn.Linear(inp, out), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers[:-1])


def _optimizer(model: torch.nn.Module, options: dict) -> ProjectedOptimizer:
    base = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    return ProjectedOptimizer.from_optimizer(base, lambda p: p.ndim == 2, rank=4, update_gap=GAP, **options)


def _batch(step: int) -> torch.Tensor:
    return torch.randn(BATCH, SHAPES[0][1], generator=torch.Generator().manual_seed(100 + step))


class Recorder:
    """Wraps torch.distributed's collectives: what the optimizer calls while ``active`` (name, contiguous)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bool]] = []
        self.active = False
        for name in COLLECTIVES:
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _wrap(self, name, fn):
        def wrapper(*args, **kwargs):
            if self.active:
                tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
                self.calls.append((name, all(t.is_contiguous() for t in tensors)))
            return fn(*args, **kwargs)

        return wrapper


def _train(model, opt, rows: slice, recorder: Recorder | None = None) -> dict:
    record = {"P": [], "calls": [], "here": []}
    for step in range(STEPS):
        opt.zero_grad()
        model(_batch(step)[rows]).pow(2).mean().backward()
        if recorder is not None:  # what DDP does before the step: average the gradients
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad.div_(WORLD)
            recorder.active, recorder.calls = True, []
        opt.step()
        if recorder is not None:
            recorder.active = False
            record["calls"].append(recorder.calls)
        record["P"].append([opt.projection_matrix(p).clone() for p in opt.projected_params()])
        infos = [opt.last_refreshes.get(p) for p in opt.projected_params()]
        record["here"].append([None if info is None else info.computed_here for info in infos])
    record["params"] = [p.detach().clone() for p in model.parameters()]
    return record


def _worker(rank: int, port: int, out: str) -> None:
    with process_group(rank, port):
        recorder = Recorder()
        half = BATCH // WORLD
        results = {}
        for name, options in CASES.items():
            model = _model()
            opt = _optimizer(model, options)
            opt.shard_refreshes()
            results[name] = _train(model, opt, slice(rank * half, (rank + 1) * half), recorder)
        torch.save(results, f"{out}/rank{rank}.pt")


def test_ranks_share_every_projectors_refresh_in_one_collective_without_pickling(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    for name, options in CASES.items():
        a, b = r0[name], r1[name]
        for step in range(STEPS):
            for P0, P1 in zip(a["P"][step], b["P"][step]):
                assert torch.equal(P0, P1), (name, step)
            calls = a["calls"][step]
            assert calls == b["calls"][step], (name, step)
            assert all(contiguous for _, contiguous in calls), (name, step, calls)  # NCCL's rule
            assert "broadcast_object_list" not in {c for c, _ in calls}, (name, step)
            seeded = options.get("projector") in SEEDED_PROJECTORS
            # update_gap=2: refreshes at steps 0, 2, 4, all three layers at once: layers 0 and 2 on rank 0, layer 1 on
            # rank 1, then one all-gather; a seeded projector is refreshed on both ranks, with nothing sent.
            refreshes = step % GAP == 0 and not seeded
            assert len(calls) == (1 if refreshes else 0), (name, step, calls)
            if refreshes:
                assert a["here"][step] == [True, False, True] and b["here"][step] == [False, True, False], name
        for p0, p1 in zip(a["params"], b["params"]):
            assert torch.equal(p0, p1), name
        # Against one process on the whole batch (the averaged halves differ from it by rounding only).
        model = _model()
        reference = _train(model, _optimizer(model, options), slice(None))
        for p, q in zip(a["params"], reference["params"]):
            torch.testing.assert_close(p, q, rtol=0, atol=5e-5, msg=name)
        assert not torch.equal(a["params"][0], _model()[0].weight), name  # it trained


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_refresh_layout_is_what_each_projector_stores(name, dtype):
    """Receivers allocate from ``refresh_layout``: it must be what the refresh stores, shape and dtype, for every
    projector, side, storage and weight dtype (P of a bf16 weight is float32, its state dtype)."""
    model = _model().to(dtype)
    opt = _optimizer(model, CASES[name])
    model(_batch(0).to(dtype)).pow(2).mean().backward()
    opt.step()
    for p in opt.projected_params():
        state = opt.state[p]
        keys = tuple(k for k in state if k in PROJECTOR_KEYS)
        group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
        P = opt.projection_matrix(p)
        layout = refresh_layout(keys, P.shape[0], P.shape[1], P.dtype, group)
        assert layout == [(k, tuple(state[k].shape), state[k].dtype) for k in keys], (name, tuple(p.shape))
