"""An option's values are its ``Literal`` type, one tuple that the runtime check and LightningCLI both read; each
rule's param groups need only its own torch optimizer's hyperparameters (``rule_option_names``)."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import torch

from lightning_lowrank.config import LowRankConfig
from lightning_lowrank.optim.checks import field_choices, literal_choices
from lightning_lowrank.optim.option_help import docstring_args
from lightning_lowrank.optim.options import (
    GROUP_SECTIONS,
    PROJECTORS,
    SUPPORTED_OPTIMIZERS,
    TORCH_RULE_OPTIONS,
    WHOLE_OPTIMIZER_SECTIONS,
    OptimizerOptions,
    ProjectionOptions,
    RuleOptions,
    TorchRuleOptions,
    group_option_names,
    rule_option_names,
)
from lightning_lowrank.optim.update.muon import ADJUST_LR_FNS

SECTIONS = (*GROUP_SECTIONS, *WHOLE_OPTIMIZER_SECTIONS, LowRankConfig)
CHOICES = [(section, name, allowed) for section in SECTIONS for name, allowed in field_choices(section).items()]


def test_the_choices_are_the_literal_types_of_the_tuples():
    assert field_choices(ProjectionOptions)["projector"] == (None, *PROJECTORS)
    assert field_choices(RuleOptions)["projected_rule"] == (None, "subset_norm", "trion")
    assert field_choices(LowRankConfig)["inner"] == field_choices(RuleOptions)["projected_rule"]
    assert field_choices(TorchRuleOptions)["adjust_lr_fn"] == ADJUST_LR_FNS
    assert literal_choices(typing.Literal[2, 3]) == (2, 3) and literal_choices(int | None) is None


def test_no_option_with_a_fixed_set_of_values_is_a_plain_str():
    """A plain ``str`` would let LightningCLI through any value, refused only by the constructor (a traceback)."""
    for cls in (OptimizerOptions, LowRankConfig):
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            hint = hints[field.name]
            # compile: a bool or any torch.compile backend's name (``check_compile``); patterns: any module names
            if field.name not in ("compile", "target_modules", "exclude"):
                assert str not in (hint, *typing.get_args(hint)), field.name


@pytest.mark.parametrize(("section", "name", "allowed"), CHOICES, ids=[f"{s.__name__}.{n}" for s, n, _ in CHOICES])
def test_a_value_outside_the_type_is_refused_listing_the_type(section, name, allowed):
    with pytest.raises(ValueError, match=f"Unknown {name} 'bogus'; choose one of ") as error:
        section(**{name: "bogus"})
    listed = str(error.value).split("choose one of ")[1]
    shown = [a for a in allowed if not (name == "projector" and a is None)]  # None: chosen by the residual
    assert listed == ", ".join(map(repr, shown))
    for value in allowed:  # every value of the type passes the choice check (another rule may still refuse it)
        try:
            section(**{name: value})
        except ValueError as other:
            assert not str(other).startswith("Unknown"), (name, value, other)


def test_every_option_has_its_own_description():
    for section in (*SECTIONS, TorchRuleOptions):
        own = [f.name for f in dataclasses.fields(section) if f.name in vars(section).get("__annotations__", {})]
        documented = docstring_args(section.__doc__)
        assert set(own) - {"rank", "inner"} <= set(documented), section.__name__  # LowRankConfig: its bases' texts
    assert set(LowRankConfig.option_docs()) == {f.name for f in dataclasses.fields(LowRankConfig)}
    assert LowRankConfig.option_docs()["inner"] == docstring_args(RuleOptions.__doc__)["projected_rule"]


def test_the_args_block_reads_back_as_written():
    docs = LowRankConfig.option_docs()
    assert docstring_args(LowRankConfig.args_docstring()) == docs
    docstring_parser = pytest.importorskip("docstring_parser")  # what jsonargparse reads it with
    parsed = docstring_parser.parse(LowRankConfig.args_docstring()).params
    assert {p.arg_name: " ".join(p.description.split()) for p in parsed} == docs


@pytest.mark.parametrize("optimizer", list(SUPPORTED_OPTIMIZERS), ids=lambda c: c.__name__)
def test_a_rule_takes_exactly_the_torch_options_its_optimizer_has(optimizer):
    """What a param group of each rule needs of ``TorchRuleOptions``: the keys torch's own optimizer puts in its
    groups, no other (an AdamW group needs no ``momentum``, ``d`` or ``ns_coefficients``)."""
    rule = SUPPORTED_OPTIMIZERS[optimizer][0]
    torch_keys = set(optimizer([torch.nn.Parameter(torch.randn(4, 4))], lr=0.1).defaults)
    names = set(rule_option_names(rule))
    assert names & TORCH_RULE_OPTIONS == torch_keys & TORCH_RULE_OPTIONS
    assert names - TORCH_RULE_OPTIONS == set(group_option_names()) - TORCH_RULE_OPTIONS  # every low-rank option


def test_group_options_of_a_rule():
    options = OptimizerOptions(momentum=0.9)
    assert set(options.group_options()) == set(group_option_names())  # every rule's, as the groups hold them now
    assert not set(options.group_options("adamw")) & TORCH_RULE_OPTIONS
    assert options.group_options("sgd")["momentum"] == 0.9 and "d" not in options.group_options("sgd")
    assert {f.name for f in dataclasses.fields(TorchRuleOptions)} == {
        name for rule in ("adamw", "sgd", "adafactor", "muon") for name in rule_option_names(rule)
    } & TORCH_RULE_OPTIONS
    with pytest.raises(ValueError, match="Unknown rule 'lion'"):
        rule_option_names("lion")
