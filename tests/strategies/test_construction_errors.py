"""Every error the options reference (docs/reference/options.md) promises is raised where it says: at
``LowRankStrategy(...)`` / ``Trainer(...)`` / the
callback's construction when the arguments alone decide it, else at setup, before the first training step. Each
message names the bad value and what is allowed."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy

from lightning_lowrank import CurvatureProbe, LowRankDDPStrategy, LowRankStrategy, SubspaceRefresh, plan
from lightning_lowrank.callbacks.memory_phases import MemoryPhases
from lightning_lowrank.strategies import LowRankMixin
from tests.models import QUIET, ManualNet, RMSpropNet, TinyNet

STRATEGIES = [LowRankStrategy, LowRankDDPStrategy]

BAD_OPTIONS = [
    (dict(rank=0), r"rank must be a positive int, got 0"),
    (dict(rank=True), r"rank must be a positive int, got True"),
    (dict(projector="fft"), r"Unknown projector 'fft'; choose one of 'svd', 'rsvd', 'dct'"),
    (dict(moments="zero"), r"Unknown moments 'zero'; choose one of 'keep', 'reset', 'rotate'"),
    (dict(moments="rotate", projector="gaussian"), r"moments='rotate'.*'gaussian'.*not orthonormal.*'keep'"),
    (dict(update_gap=0), r"Invalid update_gap: 0 \(must be an int >= 1\)"),
    (dict(scale=-1), r"Invalid scale: -1 \(must be a number > 0\)"),
    (dict(projector_bits=3), r"Unknown projector_bits 3; choose one of None, 4, 8"),
    (dict(dct_type=3, dct_scorer="fft"), r"dct_type=3.*use dct_scorer='matmul'"),
    (dict(residual="lora"), r"Unknown residual 'lora'; choose one of 'none', 'frugal', 'fira', 'apollo'"),
    (dict(state_bits=4), r"Unknown state_bits 4; choose one of None, 8"),
    (dict(state_dtype="int8"), r"Unknown state_dtype 'int8'; choose one of None, 'float32'"),
    (dict(inner="adam"), r"Unknown inner 'adam'; choose one of None, 'subset_norm'"),
    (dict(inner="subset_norm", projected_rule=None, residual="fira"), r"subset_norm.*use residual='none'"),
    (dict(preconditioner="newton"), r"Unknown preconditioner 'newton'; choose one of None, 'lazy_hessian'"),
    (dict(preconditioner="lazy_hessian", inner="subset_norm"), r"is itself the projected rule; drop"),
    (dict(hessian_beta=1.0), r"Invalid hessian_beta: 1.0 \(must be in \[0, 1\)\)"),
    (dict(memory_budget=0), r"Invalid memory_budget: 0 \(must be a positive int of bytes, or None\)"),
    (dict(memory_budget=10**6, state_bits=8), r"does not support state_bits=8 yet\. Use one or the other"),
    (dict(memory_budget=10**6, projector_bits=8), r"does not support projector_bits=8 yet\. Use one or the other"),
    (dict(rank_by="norm"), r"Unknown rank_by 'norm'; choose one of 'curvature', 'residual'"),
    (dict(nonfinite="zero"), r"Unknown nonfinite 'zero'; choose one of 'skip', 'raise', 'ignore'"),
    (dict(target_modules=[]), r"target_modules must name at least one pattern; pass None"),
    (dict(exclude=[""]), r"exclude entries must be non-empty strings \(globs over module names\), got ''"),
    (dict(fallback="ignore"), r"fallback must be 'error' or 'dense', got 'ignore'"),
    (dict(memory_report="no"), r"memory_report must be True or False, got 'no'"),
    (dict(memory_plan=1), r"memory_plan must be True or False, got 1"),
    (dict(layerwise="yes"), r"layerwise must be True or False, got 'yes'"),
    (dict(memory_json=3), r"memory_json must be True .*, False .* or a file path, got 3"),
    (dict(memory_json=""), r"memory_json must be True .*, False .* or a file path, got ''"),
    (dict(layerwise=True, memory_budget=10**6), r"layerwise=True does not support memory_budget.*Drop one of them"),
]


@pytest.mark.parametrize("cls", STRATEGIES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("kwargs,match", BAD_OPTIONS, ids=lambda v: str(v)[:40] if isinstance(v, dict) else "")
def test_a_bad_option_raises_when_the_strategy_is_built(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_a_misspelt_keyword_names_the_closest_option_and_the_allowed_ones():
    with pytest.raises(TypeError, match=r"Unknown option\(s\) \['rnak'\] for LowRankStrategy\. Did you mean 'rank'\?"):
        LowRankStrategy(rnak=4)
    with pytest.raises(TypeError, match=r"Low-rank options: .*update_gap.*; other keywords: .*precision_plugin"):
        LowRankStrategy(rnak=4)
    with pytest.raises(ValueError, match=r"\['projectr'\] for LowRankDDPStrategy\. Did you mean 'projector'\?"):
        LowRankDDPStrategy(projectr="dct")


def test_memory_json_takes_a_path_object(tmp_path):
    """A ``pathlib.Path`` was silently ignored (only a ``str`` counted as a path)."""
    assert LowRankStrategy(memory_json=tmp_path / "m.json").memory_json == str(tmp_path / "m.json")


def test_ddp_options_raise_when_the_strategy_is_built():
    hook = lambda state, bucket: None  # noqa: E731
    refusals = [
        (
            dict(low_rank_comm=True, residual="fira"),
            r"low_rank_comm=True .* residual='fira' .* Use low_rank_comm=False",
        ),
        (dict(low_rank_comm=True, inner="subset_norm"), r"inner='subset_norm' .* Use low_rank_comm=False, or drop"),
        (dict(low_rank_comm=True, projector="online_pca"), r"projector='online_pca' .* Use low_rank_comm=False"),
        (dict(low_rank_comm=True, projector_bits=4), r"projector_bits=4 .* Use low_rank_comm=False"),
        (dict(low_rank_comm=True, ddp_comm_hook=hook), r"registers its own DDP communication hook.*drop ddp_comm_hook"),
        (dict(layerwise=True, low_rank_comm=True), r"layerwise=True already all-reduces.*Drop low_rank_comm"),
        (dict(layerwise=True, ddp_comm_hook=hook), r"ddp_comm_hook would never run.*use layerwise=False"),
        (dict(layerwise=True, find_unused_parameters=True), r"\['find_unused_parameters'\] would do nothing.*Of DDP"),
    ]
    for kwargs, match in refusals:
        with pytest.raises(ValueError, match=match):
            LowRankDDPStrategy(rank=4, **kwargs)


def test_low_rank_comm_must_be_a_bool():
    with pytest.raises(ValueError, match=r"low_rank_comm must be True or False, got 'yes'"):
        LowRankDDPStrategy(rank=4, low_rank_comm="yes")


def test_layerwise_with_another_parallel_strategy_is_refused():
    class OtherParallel(LowRankMixin, DDPStrategy):  # a parallel strategy that cannot average in the hooks
        pass

    with pytest.raises(ValueError, match=r"not supported with OtherParallel.*LowRankDDPStrategy, or layerwise=False"):
        OtherParallel(layerwise=True)


def _scaler_plugin():
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))


def test_layerwise_with_a_grad_scaler_is_refused_when_the_trainer_is_built():
    with pytest.raises(ValueError, match=r"does not support a GradScaler.*Use precision='bf16-mixed'"):
        L.Trainer(strategy=LowRankStrategy(rank=4, layerwise=True), plugins=[_scaler_plugin()], **QUIET)
    with pytest.raises(ValueError, match=r"does not support a GradScaler"):
        LowRankStrategy(rank=4, layerwise=True, precision_plugin=_scaler_plugin())
    trainer = L.Trainer(strategy=LowRankStrategy(rank=4), plugins=[_scaler_plugin()], **QUIET)  # fine without
    assert trainer.strategy.precision_plugin.scaler is not None


def test_trainer_level_refusals_at_trainer_construction():
    with pytest.raises(ValueError, match=r"strategy='lowrank_deepspeed' is not supported yet.*'lowrank_fsdp'"):
        L.Trainer(strategy="lowrank_deepspeed")
    with pytest.raises(ValueError, match=r"runs on one device, but the Trainer asked for 2.*or devices=1"):
        L.Trainer(strategy=LowRankStrategy(rank=4, layerwise=True), accelerator="cpu", devices=2)


BAD_PROBES = [
    (dict(every=0), r"every must be an int >= 1 \(optimizer steps\), got 0"),
    (dict(estimators=()), r"estimators must be a non-empty subset of \('trace'"),
    (dict(estimators=("hessian",)), r"estimators must be a non-empty subset of .*got \('hessian',\)"),
    (dict(estimators="trace"), r"estimators must be a tuple of names from .*got the string 'trace'"),
    (dict(samples=0), r"samples must be an int >= 1, got 0"),
    (dict(top_k=1.5), r"top_k must be an int >= 1, got 1.5"),
    (dict(max_iter=0), r"max_iter must be an int >= 1, got 0"),
    (dict(tol=-1e-3), r"tol must be a number >= 0 .*got -0.001"),
    (dict(tol="1e-3"), r"tol must be a number >= 0 .*got '1e-3'"),
    (dict(seed=0.5), r"seed must be an int >= 0, got 0.5"),
    (dict(diagonal_beta=1.0), r"diagonal_beta must be in \[0, 1\) or None, got 1.0"),
    (dict(diagonal_beta="0.9"), r"diagonal_beta must be in \[0, 1\) or None, got '0.9'"),
]


@pytest.mark.parametrize("kwargs,match", BAD_PROBES, ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_curvature_probe_arguments_raise_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CurvatureProbe(**kwargs)


BAD_REFRESHES = [
    (dict(every=0), r"every must be an int >= 1, got 0"),
    (dict(warmup=-1), r"warmup must be an int >= 0 \(steps\), got -1"),
    (dict(warmup_every=0), r"warmup_every must be an int >= 1, got 0"),
    (dict(queue_size=0), r"queue_size must be an int >= 1, got 0"),
    (dict(cos_threshold=1.5), r"cos_threshold must be in \[0, 1\] \(a similarity\), got 1.5"),
    (dict(gamma_proj=1.0), r"gamma_proj must be > 1 .*got 1.0"),
    (dict(every=10, max_gap=5), r"max_gap must be >= every \(10\), got 5"),
    (dict(rule="galore"), r"rule must be one of 'lazy', 'qgalore', got 'galore'"),
    (dict(rule="qgalore", max_gap=400), r"max_gap=400 contradicts rule='qgalore'.*use rule='lazy'"),
    (dict(rule="qgalore", similarity="leading"), r"similarity='leading' contradicts rule='qgalore'.*'signed'"),
    (dict(similarity="cosine"), r"similarity must be one of 'leading', 'principal', 'signed' or None, got 'cosine'"),
    (dict(moments="zero"), r"moments must be one of 'keep', 'reset', 'rotate' or None, got 'zero'"),
    (dict(overrides={"attn": 0}), r"overrides\['attn'\] must be an int >= 1 \(updates\), got 0"),
]


@pytest.mark.parametrize("kwargs,match", BAD_REFRESHES, ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_subspace_refresh_arguments_raise_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SubspaceRefresh(**kwargs)


def test_memory_phases_and_plan_refuse_bad_values_when_built():
    with pytest.raises(ValueError, match=r"every must be an int >= 1 \(optimizer steps\), got 0"):
        MemoryPhases(every=0)
    with pytest.raises(ValueError, match=r"Unknown projector 'fft'; choose one of"):
        plan(TinyNet(), projector="fft")


# -- what only the model or the Trainer's other arguments decide: at setup, before the first training step ---------


class Batches(Callback):
    def __init__(self):
        self.started = 0

    def on_train_batch_start(self, *args):
        self.started += 1


class AmsgradNet(TinyNet):
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3, amsgrad=True)


class TwoOptimizersNet(ManualNet):
    def configure_optimizers(self):
        return [torch.optim.AdamW(self.attn.parameters()), torch.optim.AdamW(self.mlp.parameters())]


SETUP_REFUSALS = [
    ("lowrank", RMSpropNet, {}, [], TypeError, r"can project torch.optim.AdamW, .*RMSprop.*fallback='dense'"),
    ("lowrank", AmsgradNet, {}, [], ValueError, r"does not support amsgrad=True; set amsgrad=False"),
    (dict(target_modules=["attention"]), TinyNet, {}, [], ValueError, r"'attention' matches no module.*attn"),
    (dict(memory_budget=1), TinyNet, {}, [], ValueError, r"memory_budget=1 bytes cannot hold.*needs at least"),
    (dict(memory_budget=10**6), TwoOptimizersNet, {}, [], ValueError, r"one budget for one optimizer.*returned 2"),
    (dict(preconditioner="lazy_hessian"), TinyNet, {}, [], ValueError, r"lazy_hessian.*add CurvatureProbe\("),
    (dict(layerwise=True), TinyNet, {"gradient_clip_val": 1.0}, [], ValueError, r"cannot clip gradients.*layerwise"),
    (dict(layerwise=True), ManualNet, {}, [], ValueError, r"manual optimization.*use layerwise=False"),
    ({}, ManualNet, {}, [CurvatureProbe(every=1)], ValueError, r"CurvatureProbe re-runs training_step.*automatic"),
    (
        dict(projector="gaussian"),
        TinyNet,
        {},
        [SubspaceRefresh(every=2, moments="rotate")],
        ValueError,
        r"moments='rotate'.*gaussian.*'keep'",
    ),
    (
        {},
        TinyNet,
        {},
        [SubspaceRefresh(every=2, overrides={"attention": 1})],
        ValueError,
        r"'attention' matches no .*attn",
    ),
    (
        "auto",
        TinyNet,
        {},
        [SubspaceRefresh(every=2)],
        ValueError,
        r"needs a low-rank optimizer: use strategy='lowrank'",
    ),
]


@pytest.mark.parametrize("strategy,make,trainer_kwargs,callbacks,error,match", SETUP_REFUSALS)
def test_what_the_model_decides_is_refused_before_the_first_step(
    strategy, make, trainer_kwargs, callbacks, error, match
):
    if isinstance(strategy, dict):
        strategy = LowRankStrategy(rank=4, memory_report=False, **strategy)
    batches = Batches()
    trainer = L.Trainer(strategy=strategy, max_steps=2, callbacks=[batches, *callbacks], **QUIET, **trainer_kwargs)
    with pytest.raises(error, match=match):
        trainer.fit(make())
    assert batches.started == 0
