"""Every low-rank option, defined once: typed dataclasses, each section validating its own fields.

``OptimizerOptions`` is the flat union of the sections, the keywords ``ProjectedOptimizer`` accepts; the strategy's
``LowRankConfig`` adds what only a strategy decides (which modules to project). Each param group carries these
options as keys (torch's convention); ``validate_group`` checks a group by building the sections from it, so an
option's name, type, default and rule live here and nowhere else.

An option with a few values is typed ``Literal[CHOICES]``, CHOICES the one tuple of them, which ``check_choices``
and LightningCLI (at parse time) both read. Each section's ``Args:`` block is the one help text of its fields
(``option_help.py``). Plain torch: this module builds no optimizer and imports nothing of Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch
import torch.optim

from lightning_lowrank.optim.checks import (
    check_choice,
    check_choices,
    check_compile,
    check_fraction,
    check_int,
    check_positive,
)
from lightning_lowrank.optim.projection.bases import PROJECTORS, SIDES, SVD_SIGNS
from lightning_lowrank.optim.update.muon import ADJUST_LR_FNS, NS_DTYPES
from lightning_lowrank.optim.update.residuals import APOLLO_SCALE_TYPES, FIRA_COMPLEMENTS, FRUGAL_RULES, RESIDUALS
from lightning_lowrank.optim.update.rules import ADAM_FORMS, BASE_RULES
from lightning_lowrank.optim.update.trion import SCALINGS as TRION_SCALINGS

# The torch optimizer each rule reproduces, with whether its weight decay is decoupled (None: read the group).
SUPPORTED_OPTIMIZERS: dict[type[torch.optim.Optimizer], tuple[str, bool | None]] = {
    torch.optim.AdamW: ("adamw", True),
    torch.optim.Adam: ("adamw", None),
    torch.optim.SGD: ("sgd", False),
    torch.optim.Adafactor: ("adafactor", True),
    torch.optim.Muon: ("muon", True),
}
# The values of the options that take one of a few: their ``Literal`` types (``| None`` where None is one too).
MOMENT_POLICIES = ("keep", "reset", "rotate")
PROJECTOR_BITS = (4, 8)
DCT_SCORERS = ("matmul", "fft")
DCT_NORMS = ("l2", "l1")
DCT_TYPES = (2, 3)
PROTECTED_REFRESH = ("gradient", "complement")
PROJECTED_RULES = ("subset_norm", "trion")
PRECONDITIONERS = ("lazy_hessian",)
STATE_BITS = (8,)
RANK_BY = ("curvature", "residual")
NONFINITE_POLICIES = ("skip", "raise", "ignore")
STATE_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
HALF_DTYPES = (torch.bfloat16, torch.float16)


def supported_names() -> str:
    return ", ".join(f"torch.optim.{c.__name__}" for c in SUPPORTED_OPTIMIZERS)


@dataclass(frozen=True)
class ProjectionOptions:
    """Which subspace each projected weight's state lives in, and when it changes.

    Args:
        rank: subspace rank r; None makes a group dense. Clamped per layer to min(m, n).
        projector: ``svd``, ``rsvd``, ``dct``, ``random``, ``gaussian`` (APOLLO's) or ``online_pca``
            (``projectors.py``); None: ``gaussian`` with ``residual="apollo"``, else ``svd``.
        update_gap: refresh every this many updates of a layer (unless a scheduler owns the schedule).
        scale: multiplies the projected-back update (GaLore's alpha).
        moments: at a refresh ``keep`` the moments (GaLore), ``reset`` them, or ``rotate`` them into the new basis.
        projector_bits: store P quantized to 8 or 4 bits (group-wise, Q-GaLore); None keeps it in full precision.
        proj_group_size: elements per quantization group of P.
        seed: base seed for random sketches and stochastic rounding (mixed with layer index and step).
        rsvd_oversample: randomized SVD's extra sketch columns.
        rsvd_niter: randomized SVD's power iterations.
        dct_scorer: ``matmul`` (shared d x d basis) or ``fft`` (Makhoul's FFT, no basis kept).
        dct_norm: ``l2`` ranks DCT columns by the energy they capture; ``l1`` as DCT-AdamW's code.
        dct_type: 2 (DCT-II columns) or 3 (DCT-AdamW's matmul basis, whose columns are DCT-III vectors).
        pca_lr: online PCA's step size on P.
        side: which side P multiplies the gradient G (m x n) from: ``auto`` (GaLore's: the smaller side, P^T G for
            m < n, G P otherwise, so P is min(m, n) x r), ``right`` (G P always: moments m x r, P n x r; what FSDP2
            needs, as it shards rows) or ``left`` (P^T G always).
        protected_refresh: for a weight with protected subspaces (``ProtectedSubspaces``), the gradient a refresh
            chooses P from: ``complement`` ((I - U Uᵀ) G (I - V Vᵀ), the part of it the protection lets through, so
            no rank is spent on directions the confinement removes; better with SVD in docs/benchmarks.md's
            continual study, the same with the DCT) or ``gradient`` (as it is).
        svd_signs: the sign of each column of an SVD-derived P (``svd``, ``rsvd``, ``online_pca``'s refresh):
            ``max_abs`` (each column's largest entry positive: gradients that differ by rounding, as under
            ``lowrank_ddp`` and ``lowrank_fsdp``, give the same P, and moments kept across a refresh keep their
            meaning; convergence unchanged in docs/benchmarks.md's frontier study) or ``none`` (as the decomposition
            returns them: galore-torch's and q-galore-torch's, which their step-for-step parity needs).
    """

    rank: int | None = 128
    projector: Literal[PROJECTORS] | None = None
    update_gap: int = 200
    scale: float = 1.0
    moments: Literal[MOMENT_POLICIES] = "keep"
    projector_bits: Literal[PROJECTOR_BITS] | None = None
    proj_group_size: int = 256
    seed: int = 0
    rsvd_oversample: int = 8
    rsvd_niter: int = 2
    dct_scorer: Literal[DCT_SCORERS] = "matmul"
    dct_norm: Literal[DCT_NORMS] = "l2"
    dct_type: Literal[DCT_TYPES] = 2
    pca_lr: float = 0.1
    side: Literal[SIDES] = "auto"
    protected_refresh: Literal[PROTECTED_REFRESH] = "complement"
    svd_signs: Literal[SVD_SIGNS] = "max_abs"

    def __post_init__(self) -> None:
        rank = self.rank
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
            raise ValueError(f"Invalid rank: {rank!r}: rank must be a positive int, or None for a dense group")
        if self.projector is not None:  # None: chosen by the residual (add_param_group), so not listed as a choice
            check_choice("projector", self.projector, PROJECTORS)
        check_choices(self, ProjectionOptions)
        if self.moments == "rotate" and self.projector == "gaussian":
            raise ValueError(
                "moments='rotate' maps moments through P_old^T P_new, which needs orthonormal bases, and "
                "projector='gaussian' (APOLLO's) is not orthonormal; use moments='keep' (APOLLO's) or 'reset'"
            )
        if self.dct_type == 3 and self.dct_scorer != "matmul":
            raise ValueError(
                "dct_type=3 (DCT-AdamW's matmul basis) scores with the shared basis: use dct_scorer='matmul'"
            )
        for key, low in (("update_gap", 1), ("proj_group_size", 1), ("rsvd_oversample", 0), ("rsvd_niter", 0)):
            check_int(key, getattr(self, key), low)
        check_int("seed", self.seed, 0)
        check_positive("scale", self.scale)
        check_positive("pca_lr", self.pca_lr)


@dataclass(frozen=True)
class RuleOptions:
    """The inner update that runs in the subspace (its base rule is the module's optimizer: AdamW/Adam, SGD,
    Adafactor, Muon). The strategies call ``projected_rule`` ``inner``.

    Args:
        adam_form: ``torch`` (torch.optim.AdamW) or ``hf`` (transformers' AdamW, which the GaLore, Fira and APOLLO
            code use: eps on sqrt(v), bias corrections in the step size, decay after the update); None: ``hf`` with
            ``residual="fira"``/``"apollo"`` (so they match their reference code), else ``torch``.
        projected_rule: a rule for projected weights other than the module optimizer's: ``subset_norm``
            (Subspace-Momentum with Subset-Norm step sizes: momentum in the subspace, SGD on the complement,
            AdaGrad-Norm step per channel) or ``trion`` (for torch.optim.Muon: Trion's update, Muon on the DCT columns
            that carry most of a whole momentum buffer, chosen every step, with error feedback; no P and no refresh,
            and no state saved against Muon: the saving is the Newton-Schulz on r x n). None: the rule of the
            module's optimizer.
        preconditioner: ``lazy_hessian`` replaces the projected rule by Sophia's clipped Newton step in the
            subspace, clip(m / max(rho * h, eps), 1), with h the curvature diagonal in P's coordinates that a probe
            folds in through ``update_curvature``, reused between probes.
        rho: Sophia's clipping scale (``preconditioner="lazy_hessian"``).
        hessian_beta: the factor of the curvature diagonal's EMA over probes (``preconditioner="lazy_hessian"``).
        hessian_bias_correction: bias-correct that EMA; False: Sophia's own plain EMA from zero.
        ns_dtype: the dtype Muon's Newton-Schulz iteration runs in: ``bfloat16`` (torch.optim.Muon's), ``float32``
            or ``float64``.
        trion_scaling: Trion's lr factor by shape (``kj``, ``none``, ``kimi``, ``dion``; ``trion.py``); None: the one
            of Muon's ``adjust_lr_fn`` (``kj`` for ``original``, ``kimi`` for ``match_rms_adamw``).
    """

    adam_form: Literal[ADAM_FORMS] | None = None
    projected_rule: Literal[PROJECTED_RULES] | None = None
    preconditioner: Literal[PRECONDITIONERS] | None = None
    rho: float = 0.04
    hessian_beta: float = 0.99
    hessian_bias_correction: bool = True
    ns_dtype: Literal[tuple(NS_DTYPES)] = "bfloat16"
    trion_scaling: Literal[TRION_SCALINGS] | None = None

    def __post_init__(self) -> None:
        check_choices(self, RuleOptions)
        if self.preconditioner and self.projected_rule:
            raise ValueError(
                f"preconditioner={self.preconditioner!r} is itself the projected rule; drop "
                f"projected_rule={self.projected_rule!r} (the strategy's `inner`) or the preconditioner"
            )
        check_choice("hessian_bias_correction", self.hessian_bias_correction, (True, False))
        check_fraction("hessian_beta", self.hessian_beta)
        check_positive("rho", self.rho)


def _of(*rules: str, default: Any) -> Any:
    """A ``TorchRuleOptions`` field that belongs to the torch optimizers of ``rules`` (``rule_option_names``)."""
    return field(default=default, metadata={"rules": rules})


@dataclass(frozen=True)
class TorchRuleOptions:
    """Hyperparameters of the torch optimizer a rule reproduces. A strategy takes them from the module's optimizer
    (its param groups); they are options only of a ``ProjectedOptimizer`` built directly. Each belongs to the rules
    its field names (``rule_option_names``).

    Args:
        momentum: as torch.optim.SGD's and torch.optim.Muon's (``from_optimizer`` takes Muon's own, 0.95).
        dampening: as torch.optim.SGD's.
        nesterov: as torch.optim.SGD's and torch.optim.Muon's (Muon's own: True).
        beta2_decay: as torch.optim.Adafactor's.
        d: as torch.optim.Adafactor's (the clipping threshold).
        ns_coefficients: as torch.optim.Muon's (the Newton-Schulz coefficients a, b, c).
        ns_steps: as torch.optim.Muon's (Newton-Schulz iterations).
        adjust_lr_fn: as torch.optim.Muon's (None, ``original`` or ``match_rms_adamw``).
    """

    momentum: float = _of("sgd", "muon", default=0.0)
    dampening: float = _of("sgd", default=0.0)
    nesterov: bool = _of("sgd", "muon", default=False)
    beta2_decay: float = _of("adafactor", default=-0.8)
    d: float = _of("adafactor", default=1.0)
    ns_coefficients: tuple[float, float, float] = _of("muon", default=(3.4445, -4.7750, 2.0315))
    ns_steps: int = _of("muon", default=5)
    adjust_lr_fn: Literal[ADJUST_LR_FNS] = _of("muon", default=None)

    def __post_init__(self) -> None:
        check_choice("nesterov", self.nesterov, (True, False))
        check_choices(self, TorchRuleOptions)
        coefficients = self.ns_coefficients
        if not isinstance(coefficients, (tuple, list)) or len(coefficients) != 3:
            raise ValueError(f"Invalid ns_coefficients: {coefficients!r} (must be three numbers a, b, c)")
        if isinstance(self.ns_steps, bool) or not isinstance(self.ns_steps, int) or not 1 <= self.ns_steps < 100:
            raise ValueError(f"Invalid ns_steps: {self.ns_steps!r} (must be an int in [1, 100), as torch's Muon)")
        check_fraction("momentum", self.momentum)
        check_positive("d", self.d)


@dataclass(frozen=True)
class ResidualOptions:
    """What happens to the gradient outside the subspace (``residuals.py``).

    Args:
        residual: ``none`` (GaLore), ``frugal`` (state-free ``frugal_rule`` step, FRUGAL), ``fira`` (Fira's scaled
            residual with its norm-growth limiter) or ``apollo`` (APOLLO's scaled raw gradient).
        frugal_rule: FRUGAL's state-free rule on the residual: ``signsgd`` or ``sgd``.
        residual_lr_scale: multiplies the residual's step.
        limiter_gamma: Fira's and APOLLO's norm-growth limiter: the residual's norm grows at most this factor a step.
        fira_complement: Fira's residual: ``scaled`` (G - scale P Pᵀ G, Fira's code) or ``exact`` (G - P Pᵀ G).
        apollo_scale_type: APOLLO's scale of the raw gradient: per ``channel`` or per ``tensor`` (APOLLO-Mini).
    """

    residual: Literal[RESIDUALS] = "none"
    frugal_rule: Literal[FRUGAL_RULES] = "signsgd"
    residual_lr_scale: float = 1.0
    limiter_gamma: float = 1.01
    fira_complement: Literal[FIRA_COMPLEMENTS] = "scaled"
    apollo_scale_type: Literal[APOLLO_SCALE_TYPES] = "channel"

    def __post_init__(self) -> None:
        check_choices(self, ResidualOptions)
        check_positive("residual_lr_scale", self.residual_lr_scale)
        check_positive("limiter_gamma", self.limiter_gamma)


@dataclass(frozen=True)
class StateOptions:
    """How the optimizer state is stored.

    Args:
        state_bits: 8 stores the rule's moments blockwise in 8 bits; buffers of fewer than 4096 elements stay in full
            precision (``storage.MIN_QUANTIZED_NUMEL``). None: full precision.
        state_block_size: elements per block of 8-bit moments (``state_bits=8``).
        state_dtype: dtype of a *projected* weight's moments and P (``float32``, ``float64``, ``bfloat16``,
            ``float16``). None: float32 for bf16/fp16 weights (an EMA with beta2 = 0.999 stalls in bf16's 8 bits;
            GaLore's SVD runs in float too), the weight's dtype otherwise. Dense parameters keep their state in their
            own dtype, as the torch optimizer they reproduce does.
    """

    state_bits: Literal[STATE_BITS] | None = None
    state_block_size: int = 256
    state_dtype: Literal[tuple(STATE_DTYPES)] | None = None

    def __post_init__(self) -> None:
        check_choices(self, StateOptions)
        check_int("state_block_size", self.state_block_size, 1)


@dataclass(frozen=True)
class BudgetOptions:
    """One memory budget for the whole optimizer (not per group).

    Args:
        memory_budget: bytes for this optimizer's whole state (dense part, projected moments, projectors). Each
            projected layer then gets its own rank, at most ``rank``, chosen at its refreshes (``allocate.py``); a
            layer grows only into bytes free at that moment, so the state never exceeds the budget. Needs
            full-precision state and P. None: no budget.
        rank_by: what a budget's ranks follow: ``curvature`` (each layer's curvature trace, fed by
            ``set_layer_curvature``; until the first one arrives, as ``residual``) or ``residual`` (the gradient
            energy outside the current subspace).
    """

    memory_budget: int | None = None
    rank_by: Literal[RANK_BY] = "curvature"

    def __post_init__(self) -> None:
        budget = self.memory_budget
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0):
            raise ValueError(f"Invalid memory_budget: {budget!r} (must be a positive int of bytes, or None)")
        check_choices(self, BudgetOptions)


@dataclass(frozen=True)
class StepOptions:
    """How one ``step()`` runs (the whole optimizer, not per group).

    Args:
        nonfinite: what a step does when any gradient holds an inf or NaN: ``skip`` (default): nothing is updated
            (parameters, moments, subspaces, step counters), a warning is given the first time and
            ``nonfinite_steps`` counts it; ``raise``: a ``FloatingPointError`` naming the first such layer and its
            step, with nothing applied; ``ignore``: no check (the update runs on whatever the gradient holds, as
            torch's AdamW does). The check is one multi-tensor kernel and one read of its flag per step.
        compile: ``True`` runs the Adam(W) update of the projected layers of the multi-tensor pass (no residual,
            full-precision moments) as one ``torch.compile``-d function per layer (``compiled.py``), compiled once
            per layer shape and dtype, never again as the step count or the learning rate change; a string names
            another ``torch.compile`` backend (``aot_eager``, ``cudagraphs``, ...). The other updates, refreshes
            and bookkeeping run eagerly.
    """

    nonfinite: Literal[NONFINITE_POLICIES] = "skip"
    compile: bool | str = False

    def __post_init__(self) -> None:
        check_choices(self, StepOptions)
        check_compile(self.compile)


GROUP_SECTIONS = (ProjectionOptions, RuleOptions, TorchRuleOptions, ResidualOptions, StateOptions)
WHOLE_OPTIMIZER_SECTIONS = (BudgetOptions, StepOptions)  # one value per optimizer, never a group key


@dataclass(frozen=True)
class LowRankOptions(StepOptions, BudgetOptions, StateOptions, ResidualOptions, RuleOptions, ProjectionOptions):
    """The low-rank options a strategy sets (flat: ``rank=``, ``projector=``, ...), checked together."""

    def __post_init__(self) -> None:
        for section in (ProjectionOptions, RuleOptions, ResidualOptions, StateOptions, BudgetOptions, StepOptions):
            section.__post_init__(self)
        check_cross_options(self)
        for key in ("state_bits", "projector_bits"):
            if self.memory_budget is not None and getattr(self, key) is not None:
                raise ValueError(
                    f"memory_budget allocates ranks for full-precision state; it does not support {key}="
                    f"{getattr(self, key)!r} yet. Use one or the other."
                )


@dataclass(frozen=True)
class OptimizerOptions(TorchRuleOptions, LowRankOptions):
    """Every keyword of ``ProjectedOptimizer`` besides torch's own: the low-rank options and the rule's."""

    def __post_init__(self) -> None:
        LowRankOptions.__post_init__(self)
        TorchRuleOptions.__post_init__(self)

    def group_options(self, rule: str | None = None) -> dict[str, Any]:
        """The per-group keys (every section's field but the budget's and the step's), with their values; with
        ``rule``, only those a group of that rule reads (``rule_option_names``)."""
        names = group_option_names() if rule is None else rule_option_names(rule)
        return {name: getattr(self, name) for name in names}


def check_cross_options(o: Any) -> None:
    """Rules that span sections (``o``: an ``OptimizerOptions`` or anything with its attributes)."""
    if o.projected_rule == "subset_norm" and o.residual != "none":
        raise ValueError(
            "projected_rule='subset_norm' (the strategy's inner) updates the complement itself; use residual='none' "
            "with it"
        )
    if o.projected_rule == "subset_norm" and o.side != "auto":
        raise ValueError(
            f"projected_rule='subset_norm' (the strategy's inner) keeps one accumulator per channel of the smaller "
            f"side; it supports side='auto' only, got side={o.side!r}"
        )


def group_option_names() -> tuple[str, ...]:
    """Every option a param group may carry (every rule's)."""
    return tuple(f.name for section in GROUP_SECTIONS for f in fields(section))


def rule_option_names(rule: str) -> tuple[str, ...]:
    """The options a param group of ``rule`` (``adamw``, ``sgd``, ``adafactor``, ``muon``) reads: every low-rank
    one, and of the torch optimizers' hyperparameters (``TorchRuleOptions``) only its own; an AdamW group has none
    of SGD's ``momentum`` or Adafactor's ``d``."""
    check_choice("rule", rule, BASE_RULES)
    own = tuple(f.name for f in fields(TorchRuleOptions) if rule in f.metadata["rules"])
    return tuple(name for name in group_option_names() if name not in TORCH_RULE_OPTIONS or name in own)


TORCH_RULE_OPTIONS = frozenset(f.name for f in fields(TorchRuleOptions))
WHOLE_OPTIMIZER_OPTIONS = tuple(f.name for section in WHOLE_OPTIMIZER_SECTIONS for f in fields(section))
