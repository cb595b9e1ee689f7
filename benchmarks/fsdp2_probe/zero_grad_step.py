"""The step ``torch.distributed.checkpoint.state_dict._init_optim_state`` makes an optimizer with empty state take
before a DCP save or load (docs/fsdp2-design.md, fact 1): zero gradients on every parameter, every group's lr set to
0.0, ``step(closure=None)``. Single process, the real ``ProjectedAdamW`` on plain tensors, every projector with and
without Fira's residual: does it leave the parameters alone and create finite state? Then what a DCP load does
next: it writes the saved values *in place* into the tensors of that fresh state (the template) and hands the same
objects to ``load_state_dict``; does ``completed_steps`` (``host_ints.read_int``, cached by tensor identity) see it?

    .venv/bin/python benchmarks/fsdp2_probe/zero_grad_step.py
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_lowrank.optim import ProjectedAdamW
from lightning_lowrank.optim.projection.bases import PROJECTORS

for projector in PROJECTORS:
    for residual in ("none", "fira"):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(16, 13), nn.Tanh(), nn.Linear(13, 8))
        before = [p.detach().clone() for p in net.parameters()]
        opt = ProjectedAdamW(net.parameters(), lr=1e-2, rank=4, projector=projector, residual=residual)
        for p in net.parameters():  # what _init_optim_state does
            p.grad = torch.zeros_like(p)
        for group in opt.param_groups:
            group["lr"] = 0.0
        opt.step(closure=None)
        unchanged = all(torch.equal(a, p) for a, p in zip(before, net.parameters()))
        finite = all(t.isfinite().all() for s in opt.state.values() for t in s.values() if t.is_floating_point())
        keys = sorted(opt.state[net[0].weight])
        print(f"{projector:10s} {residual:4s} params unchanged {unchanged}, state finite {finite}, keys {keys}")

net = nn.Linear(16, 13)
opt = ProjectedAdamW(net.parameters(), lr=1e-2, rank=4, projector="dct")
net.weight.grad, net.bias.grad = torch.zeros_like(net.weight), torch.zeros_like(net.bias)
opt.step()
print(f"after the zero-gradient step: completed_steps {opt.completed_steps(net.weight)}")
template = opt.state_dict()  # holds the live state tensors, as get_optimizer_state_dict's does
step = template["state"][0]["step"]
step.fill_(7.0)  # dcp.load writes the saved step into the template's tensor
opt.load_state_dict(template)
live, done = opt.state[net.weight]["step"] is step, opt.completed_steps(net.weight)
print(f"after load_state_dict: same tensor {live}, it holds {int(step)}, completed_steps {done}")
