"""``SubspaceRefresh``: owns *when* each layer's subspace is refreshed; the optimizer does the refresh."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_lowrank.optim import ProjectedOptimizer
from lightning_lowrank.optim.options import MOMENT_POLICIES
from lightning_lowrank.schedule import RefreshPolicy, RefreshSchedule
from lightning_lowrank.selection import matches

# similarity name -> the RefreshInfo field it reads
SIMILARITIES = {"leading": "leading_similarity", "principal": "similarity", "signed": "leading_cosine"}


class SubspaceRefresh(Callback):
    """Schedule subspace refreshes per layer.

    Args:
        every: updates between refreshes of a layer.
        warmup: for this many first updates refresh every ``warmup_every`` updates instead.
        overrides: ``{module-name pattern: every}`` per-layer gaps (first matching pattern wins).
        adaptive: Q-GaLore's lazy rule: a layer whose subspace keeps coming back nearly unchanged refreshes less.
        cos_threshold: that rule's threshold on the mean of the queue (Q-GaLore's 0.4).
        queue_size: how many comparisons the queue holds (5).
        gamma_proj: what a layer's gap is multiplied by when the queue's mean reaches the threshold (2).
        max_gap: the cap on a layer's gap (None: 16 x every; ``rule="lazy"`` only).
        rule: ``"lazy"`` (ours: next refresh ``gap`` after the last, queue cleared after a growth, gap capped) or
            ``"qgalore"`` (q-galore-torch 1.0's schedule step for step: refresh at multiples of the gap, queue kept,
            signed leading cosine, no cap; so it refuses ``max_gap`` and any ``similarity`` but ``"signed"``).
        similarity: what the queue holds (None: ``"leading"`` for ``rule="lazy"``, ``"signed"`` for ``"qgalore"``).
            ``"leading"``: |cos| of the old and new leading directions; it tracks the dominant direction, so a
            stable gradient reads ~1 even at rank > 1. ``"signed"``: the same cosine with its sign, as Q-GaLore
            queues it (an SVD's signs are arbitrary, so a stable direction can read -1). ``"principal"``: mean
            squared cosine of the principal angles, which the r - 1 noise directions of a rank-1 signal keep near
            1/r, so below the default threshold.
        moments: what Adam's moments do at a refresh: ``keep``, ``reset`` or ``rotate`` (None: the strategy's).
    """

    def __init__(
        self,
        every: int = 200,
        *,
        warmup: int = 0,
        warmup_every: int = 1,
        overrides: Mapping[str, int] | None = None,
        adaptive: bool = False,
        cos_threshold: float = 0.4,
        queue_size: int = 5,
        gamma_proj: float = 2.0,
        max_gap: int | None = None,
        rule: str = "lazy",
        similarity: str | None = None,
        moments: str | None = None,
    ) -> None:
        self.policy = RefreshPolicy(
            every, warmup, warmup_every, adaptive, cos_threshold, queue_size, gamma_proj, max_gap, rule=rule
        )
        if similarity is not None and similarity not in SIMILARITIES:
            raise ValueError(
                f"similarity must be one of {', '.join(map(repr, SIMILARITIES))} or None, got {similarity!r}"
            )
        if rule == "qgalore" and similarity not in (None, "signed"):
            raise ValueError(
                f"similarity={similarity!r} contradicts rule='qgalore', which queues the signed leading cosine "
                "(similarity='signed' or None); use rule='lazy' for another measure"
            )
        if moments is not None and moments not in MOMENT_POLICIES:
            raise ValueError(f"moments must be one of {', '.join(map(repr, MOMENT_POLICIES))} or None, got {moments!r}")
        self.overrides = dict(overrides or {})
        for pattern, gap in self.overrides.items():
            if isinstance(gap, bool) or not isinstance(gap, int) or gap < 1:
                raise ValueError(f"overrides[{pattern!r}] must be an int >= 1 (updates), got {gap!r}")
        self.similarity = similarity or ("signed" if rule == "qgalore" else "leading")
        self.moments = moments
        self.schedule = RefreshSchedule(self.policy)
        self._names: dict[Tensor, str] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every=self.policy.every, adaptive=self.policy.adaptive)

    def _optimizers(self, trainer: pl.Trainer) -> list[ProjectedOptimizer]:
        return [opt for opt in trainer.strategy.optimizers if isinstance(opt, ProjectedOptimizer)]

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = self._optimizers(trainer)
        if not optimizers:
            raise ValueError(
                "SubspaceRefresh needs a low-rank optimizer: use strategy='lowrank' / 'lowrank_ddp' (or "
                "LowRankStrategy(...)), or return a lightning_lowrank.ProjectedOptimizer from configure_optimizers."
            )
        if self.moments == "rotate" and any(
            g["projector"] == "gaussian" and any(opt.projection_mask(g)) for opt in optimizers for g in opt.param_groups
        ):
            raise ValueError(
                "SubspaceRefresh(moments='rotate') maps moments through P_old^T P_new, which needs orthonormal bases, "
                "and projector='gaussian' (APOLLO's, the default with residual='apollo') is not orthonormal; use "
                "moments='keep' (APOLLO's) or 'reset', or an orthonormal projector"
            )
        names = getattr(trainer.strategy, "lowrank_layer_names", None)
        by_param = names() if callable(names) else {}
        param_names = {p: n for n, p in pl_module.named_parameters()}
        self._names = {
            p: by_param.get(p, param_names.get(p, "?")) for opt in optimizers for p in opt.projected_params()
        }
        for pattern in self.overrides:
            if not any(matches(name, pattern) for name in self._names.values()):
                raise ValueError(
                    f"SubspaceRefresh overrides pattern {pattern!r} matches no projected layer; the layers are: "
                    f"{', '.join(sorted(self._names.values()))}"
                )
        self.schedule.base_gaps = {
            name: next((gap for pattern, gap in self.overrides.items() if matches(name, pattern)), self.policy.every)
            for name in self._names.values()
        }
        for opt in optimizers:
            opt.external_schedule()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After the checkpoint's optimizer state is restored (which would overwrite param groups set earlier).
        if self.moments is not None:
            for opt in self._optimizers(trainer):
                for group in opt.param_groups:
                    group["moments"] = self.moments

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        for opt in self._optimizers(trainer):
            due = [
                p
                for p in opt.projected_params()
                if "step" in opt.state[p] and self.schedule.is_due(self._names[p], opt.completed_steps(p))
            ]
            opt.request_refresh(due)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        counted = 0
        for opt in self._optimizers(trainer):
            for p, info in opt.last_refreshes.items():
                similarity = getattr(info, SIMILARITIES[self.similarity])
                counted += self.schedule.record(self._names[p], info.step, similarity, info.seconds)
        if counted:
            layers = self.schedule.layers.values()
            pl_module.log("lowrank/refreshes", float(sum(s.refreshes for s in layers)), on_step=True, on_epoch=False)
            pl_module.log("lowrank/mean_gap", sum(s.gap for s in layers) / len(layers), on_step=True, on_epoch=False)

    def layer_stats(self, trainer: pl.Trainer) -> dict[str, dict[str, float]]:
        """Per layer name: refreshes done, refreshes the adaptive rule skipped, seconds refreshing, current gap."""
        steps = {
            self._names[p]: opt.completed_steps(p)
            for opt in self._optimizers(trainer)
            for p in opt.projected_params()
            if "step" in opt.state[p]
        }
        return {
            name: {
                "refreshes": layer.refreshes,
                "skipped": self.schedule.skipped(name, steps.get(name, 0)),
                "seconds": layer.seconds,
                "gap": layer.gap,
            }
            for name, layer in self.schedule.layers.items()
        }

    def state_dict(self) -> dict[str, Any]:
        return {**self.schedule.state_dict(), "rule": self.policy.rule, "similarity": self.similarity}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state_dict)
        # Checkpoints from before ``rule`` existed used our rule and, by default, the principal-angle measure.
        saved = (state_dict.get("rule", "lazy"), state_dict.get("similarity", "principal"))
        if saved != (self.policy.rule, self.similarity) and any(s.history for s in self.schedule.layers.values()):
            rank_zero_warn(
                f"SubspaceRefresh: the checkpoint's queues hold (rule, similarity) = {saved}, this run uses "
                f"{(self.policy.rule, self.similarity)}; the queues start over (gaps and counts are kept)."
            )
            for layer in self.schedule.layers.values():
                layer.history = []
