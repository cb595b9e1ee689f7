"""The options tree: each option defined once (options.py), checked at construction, the same for every user."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from lightning_lowrank import LowRankConfig, ProjectedOptimizer
from lightning_lowrank.optim.options import (
    GROUP_SECTIONS,
    BudgetOptions,
    LowRankOptions,
    OptimizerOptions,
    ProjectionOptions,
    ResidualOptions,
    RuleOptions,
    StateOptions,
    StepOptions,
    TorchRuleOptions,
    group_option_names,
    rule_option_names,
)


def _names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def test_each_option_belongs_to_exactly_one_section():
    sections = (
        ProjectionOptions,
        RuleOptions,
        TorchRuleOptions,
        ResidualOptions,
        StateOptions,
        BudgetOptions,
        StepOptions,
    )
    names = [n for s in sections for n in _names(s)]
    assert len(names) == len(set(names))
    assert sorted(names) == sorted(_names(OptimizerOptions))
    # a strategy sets every option but the torch optimizer's own hyperparameters, which it takes from the module's
    assert set(_names(LowRankOptions)) == set(names) - set(_names(TorchRuleOptions))
    # the strategies name projected_rule `inner` (one name in their signatures and LightningCLI)
    expected = set(_names(LowRankOptions)) - {"projected_rule"} | {"inner", "target_modules", "exclude"}
    assert set(_names(LowRankConfig)) == expected


def test_a_param_group_carries_exactly_the_group_options():
    w = torch.nn.Parameter(torch.randn(6, 4))
    opt = ProjectedOptimizer([w], rank=2)
    group = opt.param_groups[0]
    torch_keys = {"params", "lr", "betas", "eps", "weight_decay", "decoupled_weight_decay", "rule", "lowrank_mask"}
    assert set(group) == torch_keys | set(rule_option_names("adamw"))
    # an AdamW group holds none of SGD's, Adafactor's or Muon's hyperparameters
    assert not {"momentum", "nesterov", "dampening", "beta2_decay", "d", "ns_coefficients", "ns_steps"} & set(group)
    # one budget and one non-finite policy per optimizer, not per group
    assert not set(group) & set(_names(BudgetOptions) + _names(StepOptions))
    assert len(GROUP_SECTIONS) == 5


@pytest.mark.parametrize(
    "make, rule",
    [
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), "sgd"),
        (lambda ps: torch.optim.Adafactor(ps, lr=0.01), "adafactor"),
        (lambda ps: torch.optim.Muon(ps, lr=0.02), "muon"),
    ],
)
def test_a_taken_over_group_carries_its_own_rules_options_only(make, rule):
    w = torch.nn.Parameter(torch.randn(6, 4))
    group = ProjectedOptimizer.from_optimizer(make([w]), lambda p: True, rank=2).param_groups[0]
    own = set(rule_option_names(rule))
    foreign = set(group_option_names()) - own
    assert own <= set(group) and not foreign & set(group), sorted(foreign & set(group))


def test_a_group_of_another_rule_than_the_optimizers_gets_that_rules_options():
    a, b = torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(6, 4))
    opt = ProjectedOptimizer([{"params": [a]}, {"params": [b], "rule": "sgd"}], rank=2, momentum=0.9)
    assert "momentum" not in opt.param_groups[0] and opt.param_groups[1]["momentum"] == 0.9


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (dict(rank=0), "rank must be a positive int"),
        (dict(projector="pca"), "Unknown projector 'pca'; choose one of 'svd'"),
        (dict(update_gap=0), "update_gap.*int >= 1"),
        (dict(residual="fira", projected_rule="subset_norm"), "subset_norm.*residual='none'"),
        (dict(preconditioner="lazy_hessian", projected_rule="subset_norm"), "itself the projected rule"),
        (dict(memory_budget=-1), "memory_budget"),
        (dict(rank_by="size"), "Unknown rank_by"),
        (dict(state_bits=4), "Unknown state_bits 4"),
        (dict(momentum=1.0), "momentum.*\\[0, 1\\)"),
        (dict(nonfinite="zero"), "Unknown nonfinite 'zero'; choose one of 'skip', 'raise', 'ignore'"),
    ],
)
def test_bad_values_fail_at_construction_everywhere(options, match):
    """The optimizer, the options tree and (where the option is the strategy's) the config give the same error."""
    w = torch.nn.Parameter(torch.randn(6, 4))
    with pytest.raises(ValueError, match=match):
        ProjectedOptimizer([w], **options)
    with pytest.raises(ValueError, match=match):
        OptimizerOptions(**options)
    if set(options) <= set(_names(LowRankConfig)) and options.get("rank", 1) != 0:
        with pytest.raises(ValueError, match=match):
            LowRankConfig(**options)


def test_an_unknown_keyword_is_refused_by_name():
    w = torch.nn.Parameter(torch.randn(6, 4))
    with pytest.raises(TypeError, match="rnak"):
        ProjectedOptimizer([w], rnak=2)


def test_a_bad_group_override_is_refused_when_the_group_is_added():
    a, b = torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(6, 4))
    with pytest.raises(ValueError, match="Unknown residual 'fria'"):
        ProjectedOptimizer([{"params": [a]}, {"params": [b], "residual": "fria"}], rank=2)


def test_inner_is_the_strategy_name_of_projected_rule():
    assert LowRankConfig(inner="subset_norm").optimizer_options()["projected_rule"] == "subset_norm"
    assert "inner" not in LowRankConfig().optimizer_options()
    with pytest.raises(ValueError, match="projected_rule='subset_norm' \\(the strategy's inner\\) updates"):
        LowRankConfig(inner="subset_norm", residual="fira")  # checked by the optimizer's name, as the optimizer does


def test_projected_rule_is_a_deprecated_alias_of_inner():
    """Configs written with the optimizer's name still load, with a warning naming `inner`."""
    with pytest.warns(DeprecationWarning, match="projected_rule='subset_norm' is deprecated.*inner='subset_norm'"):
        config = LowRankConfig(projected_rule="subset_norm")
    assert config == LowRankConfig(inner="subset_norm")
    assert config.optimizer_options()["projected_rule"] == "subset_norm"
    assert "projected_rule" in LowRankConfig.field_names() and "projected_rule" not in LowRankConfig.option_names()
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="name the same option; give inner only"):
        LowRankConfig(inner="subset_norm", projected_rule="trion")
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="Unknown projected_rule 'adamw'"):
        LowRankConfig(projected_rule="adamw")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dataclasses.replace(config, side="auto")  # (lowrank_fsdp's) no warning: the alias is not a field


def test_a_budget_with_quantized_state_is_refused_when_the_strategy_is_built():
    """The options reference (docs/reference/options.md) promises option errors at construction: memory_budget with
    8-bit state or P fails there, not at fit."""
    from lightning_lowrank import LowRankStrategy

    for key, value in (("state_bits", 8), ("projector_bits", 4)):
        with pytest.raises(ValueError, match=f"memory_budget.*{key}={value}"):
            LowRankStrategy(rank=4, memory_budget=10**6, **{key: value})
