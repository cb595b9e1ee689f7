"""Moments carried across a change of subspace (a refresh) or of rank (``memory_budget``).

Plain tensor functions: the optimizer calls ``move_moments`` after each refresh with the old and new P.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
from torch import Tensor

from lightning_lowrank.optim import rules

_META = torch.device("meta")


def move_moments(
    moments: dict[str, Tensor],
    keys: Iterable[str],
    rank_keys: Iterable[str],
    P_old: Tensor,
    P_new: Tensor,
    policy: str,
    left: bool,
) -> None:
    """Carry the rule's buffers ``keys`` across a change of basis (``rank_keys``: those with a rank axis).

    ``rotate`` maps first moments exactly into the new coordinates with R = P_old^T P_new (r_old x r_new). Second
    moments (and curvature diagonals) are per-coordinate, which no linear map carries exactly; they are mapped with
    R's elementwise square (v_new[j] = sum_i R_ij^2 v_old[i]), which keeps variances non-negative and is exact for
    (signed) permutations. ``keep`` leaves the coordinates alone (truncated, or padded with zeros, when the rank
    changed); ``reset`` zeroes every buffer. Per-channel buffers have no rank axis and are otherwise unaffected.
    """
    keys = [k for k in keys if k in moments]
    if policy == "reset":
        for key in keys:
            buffer = moments[key]
            if key in rank_keys:
                axis = 0 if left else buffer.dim() - 1
                moments[key] = buffer.new_zeros(with_size(buffer.shape, axis, P_new.shape[1]))
            else:
                buffer.zero_()
        return
    R = None
    for key in [k for k in keys if k in rank_keys]:
        buffer = moments[key]
        axis = 0 if left else buffer.dim() - 1
        if policy == "keep":
            moments[key] = resized(buffer, axis, P_new.shape[1])
            continue
        if R is None:
            work = torch.promote_types(P_old.dtype, torch.float32)  # half precision in float32, float64 kept
            R = P_old.T.to(work) @ P_new.to(work)
        M = (R if key in rules.FIRST_MOMENTS else R.pow(2)).to(buffer.dtype)
        moments[key] = M.T @ buffer if left else buffer @ M


def with_size(shape: torch.Size, axis: int, size: int) -> tuple[int, ...]:
    return tuple(size if i == axis else s for i, s in enumerate(shape))


def resized(buffer: Tensor, axis: int, size: int) -> Tensor:
    """The first ``size`` entries along ``axis``, zero-padded when growing; the buffer itself if unchanged."""
    if buffer.shape[axis] == size:
        return buffer
    if buffer.shape[axis] > size:
        return buffer.narrow(axis, 0, size).clone()
    out = buffer.new_zeros(with_size(buffer.shape, axis, size))
    out.narrow(axis, 0, buffer.shape[axis]).copy_(buffer)
    return out


@functools.cache  # asked at every refresh of every layer; the answer depends on the rule and the side only
def rank_axis_keys(rule: str, left: bool) -> frozenset[str]:
    """The rule's buffers that have an extent along the rank axis (the others are per channel).

    The rank axis is the first of R = P^T G (r, n) when P acts on the left and the last of R = G P (m, r) on the
    right, so the answer depends on the side: Adafactor's ``row_var`` carries the rank on the left, ``col_var`` on
    the right. Probed with two projected shapes of that side whose rank differs."""
    shapes = [(2, 7), (3, 7)] if left else [(7, 2), (7, 3)]
    a, b = (rules.init_state(rule, shape, torch.float32, _META) for shape in shapes)
    return frozenset(k for k in a if a[k].shape != b[k].shape)
