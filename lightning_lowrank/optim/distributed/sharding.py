"""Weights sharded by FSDP2 (``fully_shard``: a DTensor whose rows are split over a 1-D device mesh).

The step works on each rank's local rows. With P on the right (``side="right"``: R = G P), the projected gradient,
the moments (local rows x r), the inner rule and the update R' P^T are all row-local, so an ordinary step
communicates nothing beyond FSDP's own reduce-scatter; P is replicated, the same on every rank.

A refresh needs statistics of the whole gradient. What each projector communicates (``refresh``):

* ``dct``: one all-reduce of the n column scores (sums of squares, or of absolute values for ``dct_norm="l1"``,
  over the local rows): exactly the single-device scores, n numbers per layer.
* ``random``, ``gaussian``: nothing; P is rebuilt from a seed that every rank derives alike.
* ``svd``, ``rsvd``: the gradient is gathered (m x n per layer and refresh) and decomposed as on one device, on one
  rank (the layer in slot i of a refresh step on rank i % world), which shares P with the others (one collective
  per refresh step, ``Refresher.refresh``). Decomposing on every rank would assume that the decomposition gives
  the same bits in every process, which cuSOLVER does not promise, and shards updated in different subspaces would
  no longer make one weight. P is the single-device P to the last bit, signs included; the moments kept across a
  refresh (``moments="keep"``) mean the same as on one device. (A Gram all-reduce, n x n, would give the same
  subspace with other signs; for a wide weight, n > m, it would also send more.)

Muon's Newton-Schulz on the projected momentum (local rows x r) needs the Frobenius norm and the r x r Gram matrix of
the whole: one all-reduce of each per iteration (``RowSum``), counted in ``ProjectedOptimizer.sharded_step_bytes``. A
Muon weight kept dense is handled alike when it is tall (m >= n: its n x n Gram); a wide one is refused.

Refused, because their formulas do not separate over rows: the ``online_pca`` projector, ``memory_budget``, the
Subset-Norm and Adafactor inner rules, APOLLO-Mini's tensor-wise scale; Fira's and APOLLO's norm-growth limiter sums
its norm over the ranks (``global_norm``). Plain torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_lowrank.optim.distributed.collectives import SEEDED_PROJECTORS
from lightning_lowrank.optim.projection.dct_fft import dct_scores_fft
from lightning_lowrank.optim.update.rules import MOMENT_KEYS

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # a torch built without distributed: nothing can be sharded
    DTensor, Shard = None, None

SHARDED_PROJECTORS = ("svd", "rsvd", "dct", "random", "gaussian")
DECOMPOSED = frozenset({"svd", "rsvd"})  # refreshed on one rank from the gathered gradient, then shared
ROW_KEYS = frozenset(k for keys in MOMENT_KEYS.values() for k in keys)  # state with the weight's rows: the moments


def is_sharded(t: Tensor | None) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """A DTensor's local shard (for FSDP2 parameters a view: in-place updates reach the parameter), else ``t``."""
    return t.to_local() if is_sharded(t) else t


def process_group(t: Tensor) -> Any:
    return t.device_mesh.get_group()


def check(param: Tensor, group: dict[str, Any], projected: bool, rule: str, budget: bool) -> None:
    """Refuse, when the optimizer is built, a sharded parameter whose update would need other ranks' rows."""
    where = f"a weight sharded by FSDP2 (shape {tuple(param.shape)}, placements {param.placements})"
    if param.device_mesh.ndim != 1 or tuple(param.placements) != (Shard(0),):
        raise ValueError(f"lightning_lowrank supports weights sharded on their rows over a 1-D mesh, not {where}")
    if budget:
        raise ValueError(f"memory_budget allocates ranks over all layers; it does not support {where}")
    if not projected:
        if group["rule"] == "muon" and param.shape[0] < param.shape[1]:
            raise ValueError(
                f"Muon keeps {where} dense (rank not below its smaller side), and Newton-Schulz on a wide matrix "
                "needs every rank's rows; lower rank to project it, or keep it out of FSDP2's sharding"
            )
        return
    problems = []
    if (group["side"] == "left") or (group["side"] == "auto" and param.shape[0] < param.shape[1]):
        problems.append(f"side={group['side']!r} (P^T G would sum over the rows of every rank): use side='right'")
    if group["projector"] not in SHARDED_PROJECTORS:
        problems.append(f"projector={group['projector']!r}: use one of {', '.join(SHARDED_PROJECTORS)}")
    if rule in ("subset_norm", "adafactor", "trion"):
        problems.append(f"the {rule!r} inner rule (its statistics run over the rows)")
    if group["residual"] == "apollo" and group["apollo_scale_type"] == "tensor":
        problems.append("apollo_scale_type='tensor' (APOLLO-Mini's one norm over the whole gradient)")
    if problems:
        raise ValueError(f"Not supported for {where}: " + "; ".join(problems))


def refresh(projector: Any, param: Tensor, state: dict[str, Tensor], ctx: Any, decompose: bool = True) -> int:
    """Refresh a sharded layer's subspace exactly as on one device; returns the payload bytes of its collectives.

    Every rank calls it; for ``DECOMPOSED`` projectors only the one with ``decompose`` computes P, and the caller
    shares it."""
    grad = param.grad
    if projector.name in SEEDED_PROJECTORS:
        projector.refresh(param, grad, state, ctx)
        return 0
    if projector.name == "dct":
        scores = _dct_partial_scores(projector, param, local(grad), ctx)
        dist.all_reduce(scores, group=process_group(grad))
        state["proj_idx"] = torch.topk(scores, ctx.rank, sorted=True).indices
        return scores.numel() * scores.element_size()
    full = grad.full_tensor()  # an all-gather (a gather to the one rank that decomposes would send less)
    if decompose:
        projector.refresh(param, full, state, ctx)
    return (full.numel() - local(grad).numel()) * full.element_size()


def _dct_partial_scores(projector: Any, param: Tensor, grad: Tensor, ctx: Any) -> Tensor:
    """This rank's share of each DCT column's score: the sum over its rows of squares (l2) or absolute values (l1)
    of G's coefficients, so the all-reduced sum ranks the columns as the single-device norms do."""
    power = 2 if ctx.group["dct_norm"] == "l2" else 1
    if ctx.group["dct_scorer"] == "fft":
        return dct_scores_fft(grad, False, ctx.group["dct_norm"]).pow(power).contiguous()
    basis = projector.basis(param, ctx)
    coefficients = grad.to(basis.dtype) @ basis
    return (coefficients.square() if power == 2 else coefficients.abs()).sum(dim=0)


def global_norm(t: Tensor, sharded_like: Tensor | None) -> Tensor:
    """||t||_F over all ranks' rows when ``sharded_like`` (the layer's gradient) is sharded, else ``t.norm()``."""
    if not is_sharded(sharded_like):
        return t.norm()
    square = t.float().square().sum() if t.dtype in (torch.float16, torch.bfloat16) else t.square().sum()
    dist.all_reduce(square, group=process_group(sharded_like))
    return square.sqrt()


class RowSum:
    """Sums a tensor over the ranks that hold the other rows of ``param`` (one all-reduce per call), counting the
    bytes each sends: what Muon's Newton-Schulz needs of a row-sharded matrix (``muon.newton_schulz(reduce=...)``)."""

    def __init__(self, param: Tensor) -> None:
        self.group, self.bytes = process_group(param), 0

    def __call__(self, t: Tensor) -> Tensor:
        t = t.contiguous()
        dist.all_reduce(t, group=self.group)
        self.bytes += t.numel() * t.element_size()
        return t


def all_ranks_finite(flag: Tensor, params: Iterable[Tensor]) -> Tensor:
    """The non-finite check's flag agreed over the ranks that shard ``params`` (one all-reduce of one number)."""
    sharded = next((p for p in params if is_sharded(p)), None)
    if sharded is None:
        return flag
    bad = (~flag).to(torch.int32).reshape(1)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=process_group(sharded))
    return bad[0] == 0


def as_dtensors(param: Tensor, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` as a distributed checkpoint must see it for a sharded ``param``: each tensor whose rows are the
    parameter's local rows (the moments, dense or projected: local rows x r) wrapped as a ``Shard(0)`` DTensor of the
    global row count, without a copy; replicated ones (P, indices, seeds, counters) plain. DCP saves a plain tensor
    once, from one rank, so plain per-rank moments would lose the other ranks' rows."""
    rows, global_rows = local(param).shape[0], param.shape[0]
    out = {}
    for key, t in state.items():
        if isinstance(t, Tensor) and t.ndim >= 1 and t.shape[0] == rows and key in ROW_KEYS:
            shape = (global_rows, *t.shape[1:])
            t = DTensor.from_local(t, param.device_mesh, [Shard(0)], shape=shape, stride=t.stride())
        out[key] = t
    return out


def as_local(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of ``as_dtensors``: each DTensor's local rows (the same storage: DCP loads in place)."""
    return {k: local(t) if isinstance(t, Tensor) else t for k, t in state.items()}


def distributed_state_dict(params: list[Tensor], state_dict: dict[str, Any]) -> dict[str, Any]:
    """An optimizer's ``state_dict`` (its ``state`` keyed by position in ``params``) with each sharded parameter's
    row-sharded state as DTensors (``as_dtensors``); unchanged without sharded parameters."""
    if not any(is_sharded(p) for p in params):
        return state_dict
    state = {k: as_dtensors(params[k], v) if is_sharded(params[k]) else v for k, v in state_dict["state"].items()}
    return {**state_dict, "state": state}


def local_state_dict(params: list[Tensor], state_dict: dict[str, Any]) -> dict[str, Any]:
    """What ``load_state_dict`` installs from a distributed checkpoint: every DTensor as its local rows."""
    if not any(is_sharded(p) for p in params):
        return state_dict
    return {**state_dict, "state": {k: as_local(v) for k, v in state_dict["state"].items()}}
