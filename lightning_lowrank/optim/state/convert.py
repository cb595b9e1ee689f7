"""Optimizer state moved between forms: full size and a subspace, 8-bit and full precision. Plain torch.

Used when a checkpoint is resumed under other options (``resume.py``) and by the dense-checkpoint converter
(``lightning_lowrank.checkpoint``). A buffer with a rank axis (``refresh.rank_axis_keys``) crosses between the
d-dimensional side of a weight and a rank-r subspace with P (d x r), as ``refresh.move_moments`` maps a change
of basis (first moments with P, the others with P's elementwise square):

* into the subspace: a first moment m -> P^T m, exact (the projection of an EMA of gradients is the EMA of their
  projections); a second moment v -> (P∘P)^T v. The projected gradient's square is (sum_i P_ij g_i)^2, whose
  expectation is sum_i P_ij^2 E[g_i^2] when the gradient's coordinates are independent with zero mean (the cross
  terms vanish): the mapping is that expectation, and it ignores the correlations between coordinates.
* back to full size: m_low -> P m_low, exact for what the subspace kept (a first moment has nothing outside it);
  v_low -> (P∘P) v_low, the second moment of a gradient that lies in the subspace with independent coordinates
  there. What the subspace never saw (the gradient's residual) is in neither: the dense optimizer's moments grow
  it back within about 1 / (1 - beta2) steps.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_lowrank.optim.options import OptimizerOptions
from lightning_lowrank.optim.projection.bases import dct_basis, effective_rank, is_left, projected_dim
from lightning_lowrank.optim.projection.projectors import PROJECTOR_CLASSES, LayerContext, resolve_projector
from lightning_lowrank.optim.projection.refresh import rank_axis_keys
from lightning_lowrank.optim.state.storage import decoded_buffers, stored_shape
from lightning_lowrank.optim.update import rules

_DEFAULTS = OptimizerOptions().group_options()


def resolved_group(saved: Mapping[str, Any], rule: str) -> dict[str, Any]:
    """A saved param group read with the library's defaults for keys it lacks (written before they existed, or by a
    torch optimizer), ``rule`` where it names none, and its projector resolved as ``add_param_group`` does."""
    group = {**_DEFAULTS, "rule": rule, "lowrank_mask": None, **saved}
    resolve_projector(group)
    return group


def decode_moments(
    state: Mapping[str, Tensor], rule: str, group: Mapping[str, Any], dtype: torch.dtype, device: torch.device | str
) -> dict[str, Tensor]:
    """The rule's buffers held in ``state``, in full precision (8-bit ones decoded), in ``dtype`` on ``device``."""
    buffers = decoded_buffers(state, rule, dtype, group["state_block_size"])
    return {key: t.to(device=device, dtype=dtype) for key, t in buffers.items()}


def _factor(key: str, P: Tensor, dtype: torch.dtype) -> Tensor:
    return (P if key in rules.FIRST_MOMENTS else P.square()).to(dtype)


def into_subspace(moments: dict[str, Tensor], rule: str, P: Tensor, left: bool) -> None:
    """Full-size buffers -> P's coordinates, in place: P^T m, (P∘P)^T v (see the module's docstring)."""
    for key in rank_axis_keys(rule, left) & moments.keys():
        M = _factor(key, P, moments[key].dtype)
        moments[key] = M.T @ moments[key] if left else moments[key] @ M


def out_of_subspace(moments: dict[str, Tensor], rule: str, P: Tensor, left: bool) -> None:
    """P's coordinates -> full-size buffers, in place: P m, (P∘P) v (see the module's docstring)."""
    for key in rank_axis_keys(rule, left) & moments.keys():
        M = _factor(key, P, moments[key].dtype)
        moments[key] = M @ moments[key] if left else moments[key] @ M.T


def gradient_estimate(
    full: Mapping[str, Tensor], shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str
) -> Tensor:
    """The best stand-in for a gradient that full-size moments hold, for choosing a subspace without one: the first
    moment (an EMA of gradients); for Adafactor, which keeps none, the square root of its factored second moment
    (torch.optim.Adafactor's estimate); zeros (any subspace) when the rule keeps nothing."""
    for key in rules.FIRST_MOMENTS:
        if key in full:
            return full[key]
    if "row_var" in full and "col_var" in full:
        row, col = full["row_var"], full["col_var"]
        return (row @ col / row.mean(dim=-2, keepdim=True).clamp_min(torch.finfo(row.dtype).tiny)).sqrt()
    return torch.zeros(shape, dtype=dtype, device=device)


def saved_rank(state: Mapping[str, Tensor], shape: tuple[int, ...], group: Mapping[str, Any]) -> int:
    """The rank a saved projected layer was updated at: its own under ``memory_budget``, else the group's."""
    if "rank" in state:
        return int(state["rank"])
    if "proj" in state:
        return state["proj"].shape[1]
    if "proj_idx" in state:
        return state["proj_idx"].numel()
    return effective_rank(shape, group["rank"] if group["rank"] is not None else min(shape))


def saved_matrix(
    shape: tuple[int, ...],
    state: Mapping[str, Tensor],
    group: Mapping[str, Any],
    rank: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    basis: Any = None,
) -> Tensor:
    """The P (d x ``rank``) a saved layer of ``shape`` was projected with, rebuilt by its projector from the saved keys
    (``basis``: the optimizer's shared DCT bases; by default built here)."""

    def build(size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        return dct_basis(size, dtype=dtype, device=device)

    stand_in = torch.empty((), device=device).expand(shape)  # the projector reads only shape and device
    ctx = LayerContext(0, 0, rank, dict(group), basis or build, dtype)
    on_device = {k: t if k == "proj_seed" else t.to(device) for k, t in state.items()}
    return PROJECTOR_CLASSES[group["projector"]]().matrix(stand_in, on_device, ctx).to(dtype)


def low_rank_shape(state: Mapping[str, Tensor], rule: str) -> tuple[int, int] | None:
    """The (a, b) shape of a projected layer's low-rank gradient, read from its buffers (None: it keeps none)."""
    shapes = {key: shape for key in rules.MOMENT_KEYS[rule] if (shape := stored_shape(state, key)) is not None}
    if "row_var" in shapes and "col_var" in shapes:
        return shapes["row_var"][0], shapes["col_var"][-1]
    full = [s for s in shapes.values() if len(s) == 2 and 1 not in s] or [s for s in shapes.values() if len(s) == 2]
    return full[0] if full else None


def moments_side(low: tuple[int, int], rank: int) -> bool:
    """Whether P acts on the left for a low-rank gradient of shape ``low`` at ``rank``: (r, n) on the left, (m, r) on
    the right (``projection.is_left``: a square weight goes right, so (r, r) is the right side's)."""
    a, b = low
    if b == rank:
        return False
    if a == rank:
        return True
    raise ValueError(f"a projected state of shape {low} has no axis of its rank {rank}")


def full_shape(low: tuple[int, int], left: bool, d: int) -> tuple[int, int]:
    return (d, low[1]) if left else (low[0], d)


def fits(low: tuple[int, int], left: bool, rank: int, shape: tuple[int, ...], side: str = "auto") -> bool:
    """Whether a weight of ``shape`` has a low-rank gradient of shape ``low`` at ``rank`` on that side (``side``: the
    layer's option)."""
    return (
        len(shape) == 2
        and is_left(shape, side) == left
        and full_shape(low, left, projected_dim(shape, side)) == tuple(shape)
        and (rank <= min(shape))
    )
