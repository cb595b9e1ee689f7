"""Layer importance for ``ProtectedSubspaces(schedule="adaptive")``: how much each layer keeps its input.

Sculpting Subspaces' measure: the mean cosine similarity between a layer's input and output activations (for a
layer whose sides differ, the first min(m, n) coordinates of each), normalised to mean 1 over the layers. A layer
that passes its input through nearly unchanged scores high and gets more of its directions protected. Plain torch.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_lowrank.optim.rank_zero import warn_rank_zero


def normalise(measured: dict[str, float]) -> dict[str, float]:
    """Importances scaled to mean 1 over the layers; all 1 (with a warning) when their mean is not positive, where
    no scale would make it 1."""
    mean = sum(measured.values()) / len(measured)
    if not mean > 0 or not math.isfinite(mean):
        warn_rank_zero(
            f"ProtectedSubspaces: the layers' mean input-output cosine similarity is {mean:.3g}, not positive, so it "
            "cannot be normalised to mean 1; every layer gets target_ratio this task."
        )
        return dict.fromkeys(measured, 1.0)
    return {name: value / mean for name, value in measured.items()}


class LayerSimilarity:
    """Forward hooks that record each layer's input-output cosine similarity, summed per training batch, over the last
    ``batches`` batches (``end_batch`` closes one). Modules in eval mode (validation inside a fit) are skipped. Sums
    stay on the device (no host sync per batch); token counts are host ints, read off shapes."""

    def __init__(self, batches: int) -> None:
        self.names: list[str] = []
        self.window: deque[tuple[Tensor, list[int]]] = deque(maxlen=batches)
        self._handles: list[Any] = []
        self._sums: dict[str, Tensor] = {}
        self._counts: dict[str, int] = {}

    def attach(self, modules: dict[str, nn.Module]) -> None:
        """Hook these modules (by name); a window recorded on other layers is dropped."""
        self.detach()
        if list(modules) != self.names:
            self.names, self.window = list(modules), deque(maxlen=self.window.maxlen)
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._sums, self._counts = [], {}, {}

    def clear(self) -> None:
        self.window.clear()

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if not module.training or not args or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
                return
            with torch.no_grad():
                d = min(args[0].shape[-1], output.shape[-1])
                cos = F.cosine_similarity(args[0][..., :d].float(), output[..., :d].float(), dim=-1)
                self._sums[name] = self._sums[name] + cos.sum() if name in self._sums else cos.sum()
                self._counts[name] = self._counts.get(name, 0) + cos.numel()

        return hook

    def end_batch(self) -> None:
        if not self._sums:
            return
        zero = torch.zeros((), device=next(iter(self._sums.values())).device)
        sums = torch.stack([self._sums.get(n, zero) for n in self.names])
        self.window.append((sums, [self._counts.get(n, 0) for n in self.names]))
        self._sums, self._counts = {}, {}

    def mean(self, names: list[str], group: Any = None, device: Any = None) -> dict[str, float] | None:
        """Each layer's mean similarity over the window, and over the ranks of ``group`` (one all-reduce on ``device``,
        which every rank joins even with nothing recorded); None when nothing was recorded on these layers. A layer
        that never ran gets the others' mean, with a warning."""
        window = list(self.window) if names == self.names else []
        if window:
            device = device if device is not None else window[-1][0].device  # a restored window is on the CPU
            sums = torch.stack([s.to(device) for s, _ in window]).sum(0)
            counts = [float(sum(c)) for c in zip(*(c for _, c in window))]
        else:
            sums, counts = torch.zeros(len(names), device=device), [0.0] * len(names)
        total = torch.cat([sums.float(), torch.tensor(counts, device=sums.device)])
        if group is not None:
            dist.all_reduce(total, group=group)
        values = total.tolist()
        seen = {n: s / c for n, s, c in zip(names, values[: len(names)], values[len(names) :]) if c > 0}
        if not seen:
            return None
        if len(seen) < len(names):
            warn_rank_zero(
                f"ProtectedSubspaces: {', '.join(n for n in names if n not in seen)} never ran in the measured "
                "batches; they get the average importance."
            )
        fill = sum(seen.values()) / len(seen)
        return {n: seen.get(n, fill) for n in names}

    def state_dict(self) -> dict[str, Any]:
        return {
            "window_names": list(self.names),
            "window_sums": [s.detach().cpu() for s, _ in self.window],
            "window_counts": [list(c) for _, c in self.window],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.names = list(state["window_names"])
        self.window = deque(zip(state["window_sums"], state["window_counts"]), maxlen=self.window.maxlen)
