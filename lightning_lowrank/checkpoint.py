"""``to_dense_checkpoint``: a low-rank checkpoint that a plain torch optimizer (``strategy="auto"``) can resume.

A Lightning checkpoint holds each optimizer's ``state_dict()`` under ``"optimizer_states"``; a ``ProjectedOptimizer``'s
keeps projected moments (r x n or m x r), P or what rebuilds it, 8-bit codes and low-rank group keys, which torch's
AdamW cannot load. This rewrites those states as the torch optimizer the module configured would have written them:

* projected moments mapped back to full size with the saved P: first moments m ~= P m_low, second moments
  v ~= (P∘P) v_low (``optim.state_convert`` says what that approximates; the residual the subspace never saw is in
  neither, and the dense optimizer's moments grow it back within about 1 / (1 - beta2) steps);
* 8-bit moments decoded; projector keys (P, indices, seeds), per-layer ranks and residual norms dropped;
* the low-rank keys removed from the param groups (torch's own hyperparameters, ``initial_lr`` and any key of the
  user's are kept); step counters kept.

Plain torch: no Lightning import, the checkpoint is a dict. It is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import inspect
import os
import pickle
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_lowrank.optim.nonfinite import COUNT_KEY
from lightning_lowrank.optim.options import SUPPORTED_OPTIMIZERS, group_option_names
from lightning_lowrank.optim.projection.bases import is_left
from lightning_lowrank.optim.projection.refresh import has_subspace
from lightning_lowrank.optim.state.convert import (
    decode_moments,
    fits,
    full_shape,
    low_rank_shape,
    moments_side,
    out_of_subspace,
    resolved_group,
    saved_matrix,
    saved_rank,
)
from lightning_lowrank.optim.state.resume import LOWRANK_GROUP_KEYS
from lightning_lowrank.optim.state.storage import holds_quantized
from lightning_lowrank.optim.update.rules import MOMENT_KEYS, projected_rule

__all__ = ["to_dense_checkpoint"]
# Keys only a ProjectedOptimizer's groups hold (a torch optimizer's own are kept when its signature has them).
_OWN_KEYS = frozenset(LOWRANK_GROUP_KEYS | set(group_option_names()) | {COUNT_KEY})


def to_dense_checkpoint(
    path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    shapes: Mapping[int, Sequence[int]] | None = None,
) -> int:
    """Write ``out``: the Lightning checkpoint ``path`` with every low-rank optimizer state made dense, so that the
    module's own torch optimizer (``strategy="auto"``) resumes from it. Returns how many projected layers were mapped
    back to full size.

    ``shapes``: ``{optimizer parameter index: (m, n)}`` for a projected layer whose full shape the checkpoint cannot
    tell (only when its projector keeps no P, ``dct``/``random``/``gaussian``, and several of the model's weights fit
    its state; the error says which). Indices count the optimizer's parameters in param-group order, as its
    ``state_dict()`` numbers them.
    """
    if os.path.abspath(path) == os.path.abspath(out):
        raise ValueError(f"to_dense_checkpoint writes a new file: OUT must differ from CKPT ({path}), which it keeps")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} cannot be read with torch.load(weights_only=True), which runs no code from the file: {err}"
        ) from err
    states = checkpoint.get("optimizer_states") if isinstance(checkpoint, dict) else None
    if not states:
        raise ValueError(
            f"{path} holds no optimizer state ('optimizer_states'): it is not a Lightning training checkpoint"
        )
    weights = {k: tuple(t.shape) for k, t in checkpoint.get("state_dict", {}).items() if isinstance(t, Tensor)}
    lowrank = [
        i for i, s in enumerate(states) if any("lowrank_mask" in g or "projector" in g for g in s["param_groups"])
    ]
    if not lowrank:
        raise ValueError(
            f"{path} holds no low-rank optimizer state (no param group has low-rank keys): a plain torch optimizer "
            "resumes from it as it is"
        )
    converted = 0
    for i in lowrank:
        states[i], count = dense_state_dict(states[i], weights, shapes or {})
        converted += count
    torch.save(checkpoint, out)
    return converted


def dense_state_dict(
    state_dict: dict[str, Any], weights: Mapping[str, tuple[int, ...]], shapes: Mapping[int, Sequence[int]]
) -> tuple[dict[str, Any], int]:
    """A ``ProjectedOptimizer.state_dict()`` as its torch optimizer's (``weights``: the model's tensor shapes, for
    projected layers whose P is not stored). Returns it and the number of projected layers mapped back."""
    groups, group_of = [], {}
    for saved in state_dict["param_groups"]:
        group = resolved_group(saved, saved.get("rule", "adamw"))
        keep = _torch_keys(group)
        groups.append({k: v for k, v in saved.items() if k not in _OWN_KEYS or k in keep})
        group_of.update(dict.fromkeys(saved["params"], group))
    state, count = {}, 0
    for index, saved in state_dict["state"].items():
        group = group_of[index]
        projected = has_subspace(saved)
        rule = projected_rule(group) if projected else group["rule"]
        if projected and rule != group["rule"]:
            raise ValueError(
                f"optimizer parameter #{index} was projected with the inner rule {rule!r}, whose buffers "
                f"({', '.join(MOMENT_KEYS[rule])}) torch's {group['rule']!r} optimizer does not keep; "
                "to_dense_checkpoint converts projected layers of the module's own rule (projected_rule=None, "
                "no preconditioner)"
            )
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in saved.values()) else torch.float32
        if not projected and not holds_quantized(saved, rule):
            moments = {k: saved[k] for k in MOMENT_KEYS[rule] if k in saved}  # already torch's: kept as they are
        else:
            moments = decode_moments(saved, rule, group, dtype, "cpu")
        if projected and moments:
            shape = _layer_shape(index, saved, group, rule, weights, shapes)
            P = saved_matrix(shape, saved, group, saved_rank(saved, shape, group), dtype)
            out_of_subspace(moments, rule, P, is_left(shape, group["side"]))
        count += projected
        state[index] = {**({"step": saved["step"]} if "step" in saved else {}), **moments}
    return {**state_dict, "state": state, "param_groups": groups}, count


def _torch_keys(group: Mapping[str, Any]) -> set[str]:
    """The hyperparameters the group's torch optimizer takes (its signature), which stay in the group."""
    rule, decoupled = group["rule"], group.get("decoupled_weight_decay")
    for cls, (name, fixed) in SUPPORTED_OPTIMIZERS.items():
        if name == rule and (fixed is None or fixed == decoupled):
            return set(inspect.signature(cls.__init__).parameters)
    raise ValueError(
        f"a param group with rule {rule!r}: not one of {sorted({r for r, _ in SUPPORTED_OPTIMIZERS.values()})}"
    )


def _layer_shape(
    index: int,
    state: Mapping[str, Tensor],
    group: Mapping[str, Any],
    rule: str,
    weights: Mapping[str, tuple[int, ...]],
    shapes: Mapping[int, Sequence[int]],
) -> tuple[int, int]:
    """The full (m, n) of a projected layer: given, from its stored P, from its param name, or the one weight of the
    model whose shape fits its state."""
    low = low_rank_shape(state, rule)
    if index in shapes:
        return tuple(int(s) for s in shapes[index])
    rank = min(low)  # r <= min(m, n): the rank axis is the smaller one
    left = moments_side(low, rank) if group["side"] == "auto" else group["side"] == "left"
    if "proj" in state:
        return full_shape(low, left, state["proj"].shape[0])
    names = group.get("param_names")
    if names:
        position = list(group["params"]).index(index)
        if names[position] in weights:
            return tuple(weights[names[position]])
    fitting = sorted({s for s in weights.values() if fits(low, left, rank, s, group["side"])})
    if len(fitting) == 1:
        return fitting[0]
    found = ", ".join(map(str, fitting)) or "none"
    raise ValueError(
        f"cannot tell the full shape of optimizer parameter #{index} (projected state {low[0]}x{low[1]} at rank "
        f"{rank}, projector {group['projector']!r}, which keeps no P): the checkpoint's weights that fit it are "
        f"{found}. Pass shapes={{{index}: (m, n)}} (command line: --shape {index}=MxN)"
    )
