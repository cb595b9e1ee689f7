"""An ordinary optimizer step reads no more tensor values on the host than torch's own optimizer does.

Every read of a tensor's value from Python (``.item()``, ``int()``, ``bool()``, ``max(t, x)``) dispatches
``aten._local_scalar_dense``; on a GPU each one that touches device memory waits for the device. torch keeps its step
counters on the CPU and reads each once per parameter and step (Adafactor reads more). Ours reads nothing for a
projected layer (its step counter, seed and rank are read once per tensor, ``optim/state/host_ints.py``); dense
parameters go through torch's own Adam, which reads their CPU step counters as torch does. The non-finite check
(``nonfinite="skip"``, the default, or ``"raise"``) reads one flag per step, as a GradScaler does; ``"ignore"`` saves
it. Counted on the CPU, where every read shows up the same way, in a steady-state step (no refresh, no first step).
"""

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_lowrank.optim import ProjectedOptimizer


class ScalarReads(TorchDispatchMode):
    """Counts the host reads of tensor values made while it is active."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32), torch.nn.Linear(32, 32)
    )


def _reads_in_a_steady_step(make, steps=5):
    """Host reads in the last of ``steps`` steps (the first steps create state and refresh)."""
    model = _model()
    opt = make(model)
    x = torch.randn(8, 32)
    for step in range(steps):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        if step == steps - 1:
            with ScalarReads() as counter:
                opt.step()
            return counter.reads, opt
        opt.step()


TORCH = {
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3),
    "adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-3, weight_decay=0.01),
    "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9),
    "adafactor": lambda m: torch.optim.Adafactor(m.parameters(), lr=1e-3),
}

CASES = {
    "svd": ("adamw", dict()),
    "rsvd": ("adamw", dict(projector="rsvd")),
    "dct": ("adamw", dict(projector="dct")),
    "dct fft l1": ("adamw", dict(projector="dct", dct_scorer="fft", dct_norm="l1")),
    "random": ("adamw", dict(projector="random")),
    "online_pca": ("adamw", dict(projector="online_pca")),
    "projector_bits 8": ("adamw", dict(projector_bits=8)),
    "fira": ("adamw", dict(residual="fira")),
    "frugal": ("adamw", dict(residual="frugal")),
    "apollo": ("adamw", dict(residual="apollo")),
    "apollo-mini": ("adamw", dict(residual="apollo", rank=1, apollo_scale_type="tensor")),
    "8-bit state": ("adamw", dict(state_bits=8)),
    "subset_norm": ("adamw", dict(projected_rule="subset_norm")),
    "lazy_hessian": ("adamw", dict(preconditioner="lazy_hessian")),
    "memory_budget": ("adamw", dict(memory_budget=60_000, rank_by="residual")),
    "adam (L2)": ("adam", dict()),
    "sgd momentum": ("sgd", dict()),
    "adafactor": ("adafactor", dict(projector="random")),
    "adafactor 8-bit": ("adafactor", dict(projector="random", state_bits=8)),
}


@pytest.mark.parametrize("nonfinite", ["skip", "ignore"])
@pytest.mark.parametrize("name", list(CASES))
def test_no_more_host_reads_than_torchs_own_optimizer(name, nonfinite):
    base, options = CASES[name]
    torch_reads, _ = _reads_in_a_steady_step(TORCH[base])
    options = {"rank": 4, "update_gap": 1000, "nonfinite": nonfinite, **options}
    ours_reads, opt = _reads_in_a_steady_step(
        lambda m: ProjectedOptimizer.from_optimizer(TORCH[base](m), lambda p: p.ndim == 2, **options)
    )
    assert opt.projected_params(), "the case must project something"
    assert not opt.last_refreshes, "a steady-state step, not a refresh"
    assert ours_reads <= torch_reads + (nonfinite != "ignore"), (ours_reads, torch_reads)  # SGD reads nothing
    # Stronger than the bound: projected layers read nothing (counters, seeds and ranks are read once per tensor);
    # dense parameters at most their step counter, which torch's own Adam reads on the CPU; the non-finite check one
    # flag for the whole step.
    dense = sum(1 for p in opt.param_groups[0]["params"] if not opt.is_projected(p))
    assert ours_reads <= dense + (nonfinite != "ignore")


def test_step_counters_stay_on_the_cpu_after_a_resume():
    """torch keeps ``step`` on the CPU (reading it costs no device sync); a loaded checkpoint must keep it there."""
    model = _model()
    opt = ProjectedOptimizer.from_optimizer(torch.optim.AdamW(model.parameters()), lambda p: p.ndim == 2, rank=4)
    model(torch.randn(8, 32)).sum().backward()
    opt.step()
    fresh = ProjectedOptimizer.from_optimizer(torch.optim.AdamW(model.parameters()), lambda p: p.ndim == 2, rank=4)
    fresh.load_state_dict(opt.state_dict())
    devices = Counter(str(s["step"].device) for s in fresh.state.values())
    assert devices == Counter({"cpu": 6})
