"""A DDP communication hook that all-reduces projected gradients in their subspace.

Every rank holds the same P for a projected weight (refreshes are broadcast), so averaging the projected
gradients P^T g_i (r x n, or m x r) gives exactly P^T g_avg, the only part of the gradient the optimizer uses for
that weight. The hook all-reduces those small tensors instead of the m x n gradients and writes P P^T g_avg back
into the bucket, so ``p.grad`` holds the projected-back average: P^T (P P^T g_avg) = P^T g_avg for orthonormal P.

A weight goes through in full (the plain average) when it is dense, has no subspace yet, or is due for a
refresh at this step (the refresh needs the full average gradient); the hook reads the same condition the
optimizer's ``step()`` reads afterwards.

Consequences for other readers of ``.grad``: residual rules (``frugal``, ``fira``, ``apollo``), the Subset-Norm
inner rule and the online-PCA projector use the gradient outside the subspace, so they are refused; gradient
clipping by norm sees the norm of the projected-back gradient (and the full one of layers refreshing that step).
"""

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from lightning_lowrank.optim import ProjectedOptimizer
from lightning_lowrank.optim.projection.bases import project, project_back, projected_shape

# Group options whose update reads the gradient outside the subspace, with why; refused with low_rank_comm.
_NEEDS_FULL_GRADIENT = (
    ("residual", ("frugal", "fira", "apollo"), "updates the complement of the subspace from the full gradient"),
    ("projected_rule", ("subset_norm",), "(inner='subset_norm') steps on the complement of the subspace"),
    ("projected_rule", ("trion",), "(inner='trion') chooses its columns from the whole momentum at every step"),
    ("projector", ("online_pca",), "moves P every step along the full gradient"),
    ("projector", ("gaussian",), "is not orthonormal, so P^T (P P^T g) is not P^T g"),
    # A dequantized P is only nearly orthonormal, so P^T (P P^T g) would not be exactly P^T g.
    ("projector_bits", (4, 8), "stores P quantized, and a dequantized P is not exactly orthonormal"),
)


class CommBytes(NamedTuple):
    """Bytes one rank all-reduced in one optimizer step (the payload of its all-reduce calls)."""

    sent: int  # what the hook all-reduced
    full: int  # what a plain all-reduce of the same buckets would have


def check_low_rank_comm_options(options: dict[str, Any], where: str) -> None:
    """Raise when an option needs the full averaged gradient of projected weights."""
    for key, bad, why in _NEEDS_FULL_GRADIENT:
        if options.get(key) in bad:
            name = "inner" if key == "projected_rule" and where == "the strategy" else key
            raise ValueError(
                f"low_rank_comm=True all-reduces only the projected part of each projected gradient, but "
                f"{name}={options[key]!r} (in {where}) {why}. Use low_rank_comm=False, or drop {name}."
            )


def check_optimizers(optimizers: Iterable[Optimizer]) -> None:
    """The same check on the groups of the projected optimizers (a group may override the strategy's options)."""
    for opt in optimizers:
        if isinstance(opt, ProjectedOptimizer):
            for group in opt.param_groups:
                if any(opt.projection_mask(group)):
                    check_low_rank_comm_options(group, "a param group of the projected optimizer")


@dataclass
class LowRankCommState:
    """The hook's state: where to find the projected optimizers, and the bytes counted per step."""

    optimizers: Callable[[], Sequence[Optimizer]]
    process_group: Any = None
    history: list[CommBytes] = field(default_factory=list)
    _sent: int = 0
    _full: int = 0
    _owners: dict[Tensor, tuple[ProjectedOptimizer, dict[str, Any]]] = field(default_factory=dict)

    def owners(self) -> dict[Tensor, tuple[ProjectedOptimizer, dict[str, Any]]]:
        """Each projected weight's optimizer and param group (rebuilt at each step's first bucket)."""
        return self._owners

    def rebuild_owners(self) -> None:
        self._owners = {
            p: (opt, group)
            for opt in self.optimizers()
            if isinstance(opt, ProjectedOptimizer)
            for group in opt.param_groups
            for p, on in zip(group["params"], opt.projection_mask(group))
            if on
        }

    def side(self, param: Tensor) -> str:
        """The side ``param``'s P multiplies its gradient from (``ProjectedOptimizer.projection_side``)."""
        return self._owners[param][0].projection_side(param)

    def subspace(self, param: Tensor) -> Tensor | None:
        """P when ``param``'s gradient can be all-reduced in its subspace at this step, else None."""
        owner = self._owners.get(param)
        if owner is None:
            return None
        opt, _ = owner
        if opt.refreshes_at_next_step(param):  # a refresh (or a first subspace) needs the full averaged gradient
            return None
        return opt.projection_matrix(param)


def low_rank_allreduce_hook(state: LowRankCommState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """Average a bucket over ranks, sending projected gradients as P^T g (or g P) and writing back P P^T g_avg."""
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    if bucket.index() == 0:
        state.rebuild_owners()
    buffer = bucket.buffer()
    parts: list[Tensor] = []  # what is sent, flattened, in order
    slots: list[tuple[Tensor, Tensor | None, str]] = []  # (the gradient's view in the bucket, P or None, its side)
    for param, grad in zip(bucket.parameters(), bucket.gradients()):
        P = state.subspace(param)
        side = "auto" if P is None else state.side(param)
        if P is None:
            parts.append(grad.reshape(-1))
        else:
            parts.append(project(grad, P.to(grad.dtype), side).reshape(-1))
        slots.append((grad, P, side))
    compressed = any(P is not None for _, P, _ in slots)
    send = torch.cat(parts) if compressed else buffer
    send.div_(world)  # as torch's allreduce_hook: divide first, so the sum cannot overflow
    state._sent += send.numel() * send.element_size()
    state._full += buffer.numel() * buffer.element_size()
    if bucket.is_last():
        state.history.append(CommBytes(state._sent, state._full))
        state._sent = state._full = 0
    fut = dist.all_reduce(send, group=group, async_op=True).get_future()

    def write_back(fut: torch.futures.Future[list[Tensor]]) -> Tensor:
        reduced = fut.value()[0]
        if not compressed:
            return reduced
        offset = 0
        for (grad, P, side), part in zip(slots, parts):
            chunk = reduced[offset : offset + part.numel()]
            offset += part.numel()
            if P is None:
                grad.copy_(chunk.view_as(grad))
            else:
                low_rank = chunk.view(projected_shape(grad.shape, P.shape[1], side))
                grad.copy_(project_back(low_rank, P.to(grad.dtype), grad.shape, side))
        return buffer

    return fut.then(write_back)


def low_rank_comm_bytes(shapes: Iterable[tuple[tuple[int, ...], int | None]], element_size: int = 4) -> int:
    """Bytes one rank all-reduces for gradients of these shapes, each with the rank it is sent in (None: in full).

    The counter's formula: numel elements for a gradient sent in full, r * n (m < n) or m * r (m >= n) elements for
    one sent in its subspace, r clamped to min(m, n).
    """
    total = 0
    for shape, rank in shapes:
        if rank is None:
            total += torch.Size(shape).numel()
        else:
            rows, cols = projected_shape(shape, rank)
            total += rows * cols
    return total * element_size
