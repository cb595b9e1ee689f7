"""Each low-rank option's help text and choices, from one source (the options' docstrings and ``Literal`` types), in
LightningCLI's ``--help`` and in ``python -m lightning_lowrank plan --help``."""

from __future__ import annotations

import dataclasses

import pytest
from lightning.pytorch.cli import LightningCLI

from lightning_lowrank import LowRankDDPStrategy, LowRankStrategy
from lightning_lowrank.__main__ import build_parser, main
from lightning_lowrank.config import LowRankConfig
from tests.models import TinyNet

STRATEGIES = (LowRankStrategy, LowRankDDPStrategy)
# The strategies' ``__init__`` carries every option's description once ``declare_signature`` (strategies/mixin.py)
# attaches ``LowRankConfig.args_docstring()`` to it; jsonargparse reads the parameters' help there.


class Model(TinyNet):
    def __init__(self, lr: float = 1e-2):
        super().__init__(lr=lr, scheduler=None)


def _words(text: str) -> str:
    return " ".join(text.replace("``", "").split())


def _strategy_help(cls: type, capsys: pytest.CaptureFixture[str]) -> str:
    path = f"lightning_lowrank.{cls.__name__}"
    with pytest.raises(SystemExit):
        LightningCLI(Model, run=False, args=[f"--trainer.strategy.help={path}"])
    return _words(capsys.readouterr().out)


def _check_every_option(printed: str) -> None:
    docs = LowRankConfig.option_docs()
    for field in dataclasses.fields(LowRankConfig):
        start = " ".join(_words(docs[field.name]).split()[:8])
        assert start in printed, (field.name, start)
    assert "--trainer.strategy.moments {keep,reset,rotate}" in printed
    assert "Literal['svd', 'rsvd', 'dct', 'random', 'gaussian', 'online_pca']" in printed


@pytest.mark.parametrize("cls", STRATEGIES)
def test_jsonargparse_reads_the_options_args_block(cls, capsys, monkeypatch):
    """The ``Args:`` block ``LowRankConfig.args_docstring()`` builds is a form jsonargparse (docstring_parser) reads:
    attached to the strategy's ``__init__``, ``--help`` shows each option's description and choices."""
    pytest.importorskip("docstring_parser")
    monkeypatch.setattr(cls.__init__, "__doc__", LowRankConfig.args_docstring())
    _check_every_option(_strategy_help(cls, capsys))


@pytest.mark.parametrize("cls", STRATEGIES)
def test_the_strategies_help_describes_every_option(cls, capsys):
    pytest.importorskip("docstring_parser")
    _check_every_option(_strategy_help(cls, capsys))


def test_plan_help_describes_every_option_with_its_choices(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["plan", "--help"])
    printed = _words(capsys.readouterr().out)
    docs = LowRankConfig.option_docs()
    for field in dataclasses.fields(LowRankConfig):
        start = " ".join(_words(docs[field.name]).split()[:8])
        assert start in printed, (field.name, start)
        assert f"(default: {field.default!r})" in printed or field.name in ("target_modules", "exclude")
    for flag in ("--projector {svd,rsvd,dct,random,gaussian,online_pca}", "--inner {subset_norm,trion}"):
        assert flag in printed
    assert "--projector-bits {4,8}" in printed and "--dct-type {2,3}" in printed


def test_plan_refuses_a_bad_choice_as_the_strategy_does(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--preset", "60M", "--residual", "lora"])
    assert "Unknown residual 'lora'; choose one of 'none', 'frugal', 'fira', 'apollo'" in capsys.readouterr().err
