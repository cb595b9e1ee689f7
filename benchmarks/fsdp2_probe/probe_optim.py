"""Shared by the FSDP2 probes: a stand-in for ``ProjectedOptimizer`` with the state layout the design needs.

Not a probe itself. For each 2-D weight (right projection, R = G P) its state holds, as ``ProjectedOptimizer`` would:

* ``exp_avg``: the projected first moment, (m, r) globally; a DTensor ``Shard(0)`` over the local rows built with
  ``DTensor.from_local`` (``local_moments=False``), or the plain local (m_local, r) tensor (``local_moments=True``);
* ``proj``: P (n x r), a plain tensor, the same on every rank;
* ``proj_idx``: r int64 indices (a DCT projector's state);
* ``step``: a CPU float32 scalar, as ``storage.py`` creates it;

and a dense parameter (a bias) keeps a DTensor ``exp_avg`` like torch's Adam. ``state_dict()`` adds the top-level key
``nonfinite_steps`` as ``ProjectedOptimizer.state_dict`` does. The update is a toy (momentum in the subspace, P drawn
from the step number so every rank has the same P): only the state's layout and values matter here. ``calls`` records
every ``step`` (lr, the gradient's sum of absolute values) and ``load_state_dict`` (what each value arrived as).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def describe(value: Any) -> str:
    if isinstance(value, DTensor):
        return f"DTensor{tuple(value.placements)} global {tuple(value.shape)} local {tuple(value.to_local().shape)}"
    if isinstance(value, torch.Tensor):
        return f"Tensor {tuple(value.shape)} {str(value.dtype)[6:]}"
    return f"{type(value).__name__} {value!r}"


class ProbeOptimizer(Optimizer):
    def __init__(self, params, lr: float = 0.1, rank: int = 4, local_moments: bool = False) -> None:
        super().__init__(params, {"lr": lr, "rank": rank, "lowrank_mask": None, "skipped": 0})
        self.local_moments = local_moments
        self.nonfinite_steps = 5
        self.calls: list[str] = []

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "nonfinite_steps": self.nonfinite_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        objects = [v for s in self.state.values() for v in s.values()]
        for key, entry in state_dict["state"].items():
            for name, value in entry.items():
                same = any(value is o for o in objects)
                self.calls.append(f"load_state_dict state[{key!r}][{name!r}]: {describe(value)}; live object: {same}")
        self.calls.append(f"load_state_dict top-level keys: {sorted(state_dict)}")
        self.nonfinite_steps = state_dict.get("nonfinite_steps", "<absent>")
        super().load_state_dict(state_dict)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, rank = group["lr"], group["rank"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = local(p.grad)
                self.calls.append(f"step lr={lr} grad {type(p.grad).__name__} sum|g|={g.abs().sum().item():.3g}")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    if p.ndim == 2:
                        moments = torch.zeros(g.shape[0], rank)
                        if not self.local_moments:
                            moments = DTensor.from_local(
                                moments, p.device_mesh, p.placements, shape=(p.shape[0], rank), stride=(rank, 1)
                            )
                        state["exp_avg"] = moments
                        state["proj"] = torch.zeros(p.shape[1], rank)
                        state["proj_idx"] = torch.zeros(rank, dtype=torch.int64)
                    else:
                        state["exp_avg"] = torch.zeros_like(p)
                state["step"] += 1
                step = int(state["step"])
                if p.ndim == 2:
                    gen = torch.Generator().manual_seed(step)
                    P = torch.linalg.qr(torch.randn(p.shape[1], rank, generator=gen)).Q
                    state["proj"].copy_(P)
                    state["proj_idx"].copy_(torch.arange(rank) * 2 + step % 2)
                    m = local(state["exp_avg"])
                    m.mul_(0.9).add_(g @ P, alpha=0.1)
                    local(p).sub_(lr * m @ P.T)
                else:
                    local(state["exp_avg"]).mul_(0.9).add_(g, alpha=0.1)
                    local(p).sub_(lr * local(state["exp_avg"]))
        return loss
