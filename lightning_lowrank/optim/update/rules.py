"""Inner update rules: what runs on a gradient (full, or projected into the subspace).

Each rule is two plain functions over tensors: ``init_state`` makes its buffers for a gradient shape, and
``direction`` updates them in place and returns ``(direction, step_size)``; the caller applies
``param -= step_size * direction`` (after mapping the direction back to the full shape when projected).
With a full identity basis each rule reproduces its torch optimizer: ``adamw`` = torch.optim.AdamW/Adam,
``sgd`` = torch.optim.SGD with momentum, ``adafactor`` = torch.optim.Adafactor, ``muon`` = torch.optim.Muon
(tested). ``sophia`` is the lazy-Hessian rule: its curvature diagonal is not built from gradients here but folded in
by ``fold_curvature_`` whenever a probe measures it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_lowrank.optim.projection.bases import is_left
from lightning_lowrank.optim.update import muon

RULES = ("adamw", "sgd", "adafactor", "muon", "subset_norm", "sophia", "trion")
BASE_RULES = RULES[:4]  # those of a torch optimizer (a group's ``rule``); the others replace it on projected weights
# Two ways to write Adam(W). "torch": torch.optim.AdamW, eps added after the bias correction of sqrt(v), decoupled
# decay before the update. "hf": transformers' AdamW, which the GaLore, Fira and APOLLO reference code copy: eps added
# to sqrt(v) itself, both bias corrections folded into the step size lr * sqrt(1 - beta2^t) / (1 - beta1^t), and
# decoupled decay after the update. They differ where sqrt(v) is comparable to eps, and Fira's and APOLLO's scale
# factors read the direction m / (sqrt(v) + eps), which differs between the two by sqrt(1 - beta2^t).
ADAM_FORMS = ("torch", "hf")
# Buffers that may be stored in 8 bits, with whether they are signed (first moments) or non-negative (variances).
MOMENT_KEYS: dict[str, dict[str, bool]] = {
    "adamw": {"exp_avg": True, "exp_avg_sq": False},
    "sgd": {"momentum_buffer": True},
    "muon": {"momentum_buffer": True},
    "trion": {"momentum_buffer": True},  # the whole m x n buffer with error feedback (``trion.py``)
    "adafactor": {"row_var": False, "col_var": False, "variance": False},
    "subset_norm": {"exp_avg": True, "sum_sq": False},
    "sophia": {"exp_avg": True, "hessian": True},  # a Hutchinson diagonal can be negative
}
# Buffers that hold curvature, not gradient moments (the memory report's "curvature", ``state_layout``).
CURVATURE_KEYS = frozenset({"hessian"})
# Buffers that are linear in the gradient: a change of basis maps them with R, the others (variances, curvature
# diagonals) with R's elementwise square.
FIRST_MOMENTS = frozenset({"exp_avg", "momentum_buffer"})


def adam_form(group: dict[str, Any]) -> str:
    """The group's Adam form: as set, or by default "hf" for Fira and APOLLO (as their code) and "torch" otherwise."""
    form = group.get("adam_form")
    if form is not None:
        return form
    return "hf" if group.get("residual") in ("fira", "apollo") else "torch"


def decays_after_update(rule: str, group: dict[str, Any]) -> bool:
    """Whether decoupled weight decay is applied after the update (transformers' AdamW) rather than before."""
    return rule == "adamw" and group["decoupled_weight_decay"] and adam_form(group) == "hf"


def weight_decay_(param: Tensor, grad: Tensor, lr: float, weight_decay: float, decoupled: bool) -> Tensor:
    """Decoupled decay (AdamW, Adafactor) shrinks the weight in place; L2 (Adam, SGD) adds to the gradient."""
    if weight_decay == 0:
        return grad
    if decoupled:
        param.mul_(1 - lr * weight_decay)
        return grad
    return grad.add(param, alpha=weight_decay)


def subset_axis(shape: torch.Size | tuple[int, ...]) -> int | None:
    """Subset-Norm's subsets: the channels the projection keeps, i.e. one accumulator per column when P acts on the
    left (rows the smaller side) and per row otherwise, square included (``projection.is_left``); the sums run over
    the other axis. The rule holds for the full shape and for its projected shape alike, (r, n) and (m, r), so the
    projected state and the full gradient's accumulator agree; a vector is one subset."""
    if len(shape) < 2:
        return None
    return 0 if is_left(shape) else 1


def init_state(rule: str, shape: torch.Size | tuple[int, ...], dtype: torch.dtype, device: torch.device) -> dict:
    def zeros(*s: int) -> Tensor:
        return torch.zeros(s, dtype=dtype, device=device)

    if rule == "adamw":
        return {"exp_avg": zeros(*shape), "exp_avg_sq": zeros(*shape)}
    if rule in ("sgd", "muon", "trion"):
        return {"momentum_buffer": zeros(*shape)}
    if rule == "adafactor":
        if len(shape) >= 2:
            return {"row_var": zeros(*shape[:-1], 1), "col_var": zeros(*shape[:-2], 1, shape[-1])}
        return {"variance": zeros(*shape)}
    if rule == "subset_norm":
        axis = subset_axis(shape)
        acc_shape = (1,) if axis is None else tuple(1 if i == axis else s for i, s in enumerate(shape))
        return {"exp_avg": zeros(*shape), "sum_sq": zeros(*acc_shape)}
    if rule == "sophia":
        return {"exp_avg": zeros(*shape), "hessian": zeros(*shape)}
    raise ValueError(f"Unknown rule {rule!r}; choose one of {', '.join(RULES)}")


def direction(
    rule: str,
    grad: Tensor,
    state: dict[str, Tensor],
    step: int,
    group: dict[str, Any],
    param_rms: float | Tensor = 0.0,
    full_grad: Tensor | None = None,
    shape: torch.Size | tuple[int, ...] | None = None,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, float | Tensor]:
    """Update ``state`` with ``grad`` (the step-th update, from 1) and return (direction, step size); the step size is
    a Python number, or for Adafactor a 0-d device tensor.

    ``param_rms`` (RMS of the full weight before weight decay) is only used by Adafactor's relative step;
    ``full_grad`` (the unprojected gradient) by Subset-Norm, whose step sizes follow the full gradient's norms;
    ``shape`` (the full weight's, by default the gradient's) by Muon's learning-rate adjustment, ``reduce`` (a sum
    over the ranks holding the gradient's other rows) by its Newton-Schulz.
    """
    lr = float(group["lr"])
    if rule == "adamw":
        beta1, beta2 = group["betas"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        if adam_form(group) == "hf":
            return m / v.sqrt().add_(group["eps"]), lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
        denom = (v.sqrt() / math.sqrt(1 - beta2**step)).add_(group["eps"])
        return m / denom, lr / (1 - beta1**step)
    if rule == "sgd":
        momentum = group["momentum"]
        if momentum == 0:  # plain SGD keeps no buffer (the optimizer does not create one)
            return grad, lr
        buf = state["momentum_buffer"]
        if step == 1:
            buf.copy_(grad)
        else:
            buf.mul_(momentum).add_(grad, alpha=1 - group["dampening"])
        return (grad.add(buf, alpha=momentum) if group["nesterov"] else buf), lr
    if rule == "adafactor":
        return _adafactor(grad, state, step, group, lr, param_rms)
    if rule == "muon":  # torch.optim.Muon's, on whatever basis the gradient is in (``muon.py``)
        return muon.direction(grad, state["momentum_buffer"], group, grad.shape if shape is None else shape, reduce)
    if rule == "subset_norm":
        # Subspace-Momentum's momentum (the caller adds the complement as plain SGD) with Subset-Norm step sizes:
        # AdaGrad-Norm over each subset, lr / sqrt(sum of the subset's squared gradient norms so far).
        beta1 = group["betas"][0]
        m, acc = state["exp_avg"], state["sum_sq"]
        if step == 1:
            m.copy_(grad)
        else:
            m.mul_(beta1).add_(grad, alpha=1 - beta1)
        full = grad if full_grad is None else full_grad
        axis = subset_axis(full.shape)
        acc.add_(full.pow(2).sum() if axis is None else full.pow(2).sum(dim=axis, keepdim=True))
        return m * subset_norm_scale(state, group["eps"]), lr
    if rule == "sophia":
        # Sophia: clip(m / max(rho * h, eps), 1) elementwise, h the lazily refreshed curvature diagonal. Where h is
        # zero (no probe yet) or negative (non-convex direction) the step is a clipped sign step of size lr.
        m = state["exp_avg"]
        m.mul_(group["betas"][0]).add_(grad, alpha=1 - group["betas"][0])
        denom = (state["hessian"] * group["rho"]).clamp_(min=group["eps"])
        return (m / denom).clamp_(-1.0, 1.0), lr
    raise ValueError(f"Unknown rule {rule!r}; choose one of {', '.join(RULES)}")


def fold_curvature_(hessian: Tensor, estimate: Tensor, updates: int, beta: float, bias_correction: bool = True) -> None:
    """Fold the ``updates``-th curvature estimate into ``hessian``: an EMA with factor ``beta``.

    ``bias_correction=True`` (default) builds Adam's bias correction in: the stored value is the bias-corrected
    average itself (the first estimate is taken whole), so it can be used as it is between probes and rotated like
    any other diagonal at a refresh. Without it h starts ~(1 - beta) times too small, so the clipped step stays a
    sign step for the first ~1 / (1 - beta) probes. ``False`` is the plain EMA h <- beta h + (1 - beta) estimate from
    h = 0 of SophiaG (sophia-opt 0.2.2) and pytorch_optimizer's SophiaH.
    """
    weight = (1 - beta) / (1 - beta**updates) if bias_correction else 1 - beta
    hessian.lerp_(estimate.to(hessian.dtype), weight)


def subset_norm_scale(state: dict[str, Tensor], eps: float) -> Tensor:
    """1 / (sqrt(accumulator) + eps), broadcastable to the gradient: Subset-Norm's per-subset step size."""
    return 1.0 / (state["sum_sq"].sqrt() + eps)


def _adafactor(
    grad: Tensor, state: dict[str, Tensor], step: int, group: dict[str, Any], lr: float, param_rms: float | Tensor
) -> tuple[Tensor, Tensor]:
    """torch.optim.Adafactor's rule: factored second moment (row and column means of G^2), relative step size."""
    eps1, eps2 = group["eps"] if isinstance(group["eps"], (tuple, list)) else (None, 1e-3)
    if eps1 is None:
        eps1 = torch.finfo(grad.dtype).eps
    one_minus_beta2 = step ** group["beta2_decay"]
    # As torch's Adafactor, but without its two host reads: the relative step and the update's RMS clip stay 0-d
    # tensors on the device, so the step size is one (torch computes the same in float64 on the host).
    wide = torch.float32 if grad.device.type == "mps" else torch.float64  # MPS has no float64
    alpha = torch.as_tensor(param_rms, dtype=wide, device=grad.device).clamp(min=eps2) * min(lr, 1 / math.sqrt(step))
    if grad.dim() > 1:
        row_var, col_var = state["row_var"], state["col_var"]
        row_var.lerp_(grad.norm(dim=-1, keepdim=True).square_().div_(grad.size(-1)), one_minus_beta2)
        col_var.lerp_(grad.norm(dim=-2, keepdim=True).square_().div_(grad.size(-2)), one_minus_beta2)
        var = (row_var @ col_var).div_(row_var.mean(dim=-2, keepdim=True).clamp_(min=eps1))
    else:
        state["variance"].lerp_(grad * grad, one_minus_beta2)
        var = state["variance"].clone()
    update = var.clamp_(min=eps1 * eps1).rsqrt_().mul_(grad)
    denom = (update.norm(2, dtype=wide) / (math.sqrt(update.numel()) * group["d"])).clamp(min=1.0)
    return update, alpha / denom


def projected_rule(group: Mapping[str, Any]) -> str:
    """The inner rule of a group's projected weights."""
    if group["preconditioner"] == "lazy_hessian":
        return "sophia"
    return group["projected_rule"] or group["rule"]
