"""The user's low-rank settings, validated once when the strategy is constructed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

from lightning_lowrank.optim.projected import validate_options


@dataclass(frozen=True)
class LowRankConfig:
    """What the strategy applies to every projected weight (see ``ProjectedOptimizer`` for each option).

    A weight whose smaller side is <= ``rank`` stays dense (with a warning at setup): projecting it saves nothing.
    """

    rank: int = 128
    projector: str | None = None  # None: "gaussian" with residual="apollo", else "svd"
    update_gap: int = 200
    scale: float = 1.0
    moments: str = "keep"
    projector_bits: int | None = None
    proj_group_size: int = 256
    seed: int = 0
    rsvd_oversample: int = 8
    rsvd_niter: int = 2
    dct_scorer: str = "matmul"
    dct_norm: str = "l2"
    dct_type: int = 2
    pca_lr: float = 0.1
    inner: str | None = None  # ProjectedOptimizer's projected_rule
    adam_form: str | None = None
    residual: str = "none"
    frugal_rule: str = "signsgd"
    residual_lr_scale: float = 1.0
    limiter_gamma: float = 1.01
    fira_complement: str = "scaled"
    apollo_scale_type: str = "channel"
    state_bits: int | None = None
    state_block_size: int = 256
    preconditioner: str | None = None
    rho: float = 0.04
    hessian_beta: float = 0.99
    hessian_bias_correction: bool = True
    memory_budget: int | None = None
    rank_by: str = "curvature"
    target_modules: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"rank must be a positive int, got {self.rank!r}")
        if not isinstance(self.scale, (int, float)) or isinstance(self.scale, bool) or not self.scale > 0:
            raise ValueError(f"scale must be a number > 0, got {self.scale!r}")
        validate_options(**self.optimizer_options())
        object.__setattr__(self, "target_modules", _patterns("target_modules", self.target_modules))
        object.__setattr__(self, "exclude", _patterns("exclude", self.exclude) or ())

    @classmethod
    def field_names(cls) -> frozenset[str]:
        return frozenset(f.name for f in fields(cls))

    def optimizer_options(self) -> dict:
        """The keyword arguments for ``ProjectedOptimizer``."""
        options = asdict(self)
        del options["target_modules"], options["exclude"]
        options["projected_rule"] = options.pop("inner")
        return options


def _patterns(kind: str, value: Sequence[str] | str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = (value,)
    value = tuple(value)
    if kind == "target_modules" and not value:
        raise ValueError("target_modules must name at least one pattern; pass None for the default selection")
    for pattern in value:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"{kind} entries must be non-empty strings (globs over module names), got {pattern!r}")
    return value
