"""LightningCLI sets every low-rank option from the command line and from YAML (a real LightningCLI)."""

import dataclasses
import inspect

import pytest
import yaml
from lightning.pytorch.cli import LightningCLI

from lightning_lowrank import LowRankDDPStrategy, LowRankStrategy
from lightning_lowrank.config import LowRankConfig
from lightning_lowrank.optim import ProjectedOptimizer
from tests.models import TinyNet


class Model(TinyNet):
    def __init__(self, lr: float = 1e-2):
        super().__init__(lr=lr, scheduler=None)


def _cli(args, tmp_path):
    return LightningCLI(
        Model,
        run=False,
        save_config_callback=None,
        args=[
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.enable_checkpointing=false",
            f"--trainer.default_root_dir={tmp_path}",
            *args,
        ],
    )


def test_every_option_is_in_the_strategies_signatures():
    for cls in (LowRankStrategy, LowRankDDPStrategy):
        params = inspect.signature(cls).parameters
        for field in dataclasses.fields(LowRankConfig):
            assert params[field.name].default == field.default, (cls.__name__, field.name)
            assert params[field.name].kind is inspect.Parameter.KEYWORD_ONLY
    assert "low_rank_comm" in inspect.signature(LowRankDDPStrategy).parameters
    assert "find_unused_parameters" not in inspect.signature(LowRankStrategy).parameters


def test_options_from_the_command_line_reach_the_optimizer(tmp_path):
    cli = _cli(
        [
            "--trainer.strategy=lightning_lowrank.LowRankStrategy",
            "--trainer.strategy.rank=8",
            "--trainer.strategy.projector=dct",
            "--trainer.strategy.residual=fira",
            "--trainer.strategy.target_modules=[attn, mlp]",
            "--trainer.strategy.memory_report=false",
            "--trainer.max_steps=2",
        ],
        tmp_path,
    )
    config = cli.trainer.strategy.lowrank_config
    assert (config.rank, config.projector, config.residual, config.target_modules) == (
        8,
        "dct",
        "fira",
        ("attn", "mlp"),
    )
    cli.trainer.fit(cli.model)
    opt = cli.trainer.optimizers[0]
    assert isinstance(opt, ProjectedOptimizer)
    assert [opt.layer_rank(p) for p in opt.projected_params()] == [8, 8]
    assert {g["projector"] for g in opt.param_groups} == {"dct"}


def test_options_from_yaml_init_args(tmp_path):
    config = {
        "trainer": {
            "strategy": {
                "class_path": "lightning_lowrank.LowRankDDPStrategy",
                "init_args": {"rank": 6, "residual": "apollo", "low_rank_comm": False, "find_unused_parameters": True},
            }
        }
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    strategy = _cli([f"--config={path}"], tmp_path).trainer.strategy
    assert isinstance(strategy, LowRankDDPStrategy)
    assert (strategy.lowrank_config.rank, strategy.lowrank_config.residual) == (6, "apollo")
    assert strategy._ddp_kwargs["find_unused_parameters"] is True  # DDP's own keywords pass through


def test_layerwise_ddp_from_the_cli_is_not_refused_for_ddp_defaults(tmp_path):
    """LightningCLI passes every DistributedDataParallel keyword with its default; layer-wise mode (no DDP wrapper)
    refuses only keywords set to something else."""
    args = ["--trainer.strategy=lightning_lowrank.LowRankDDPStrategy", "--trainer.strategy.layerwise=true"]
    strategy = _cli(args, tmp_path).trainer.strategy
    assert strategy.layerwise and "bucket_cap_mb" in strategy._ddp_kwargs and strategy._syncs_buffers()
    with pytest.raises(ValueError, match="find_unused_parameters"):
        _cli([*args, "--trainer.strategy.find_unused_parameters=true"], tmp_path)


def _yaml(tmp_path, init_args):
    strategy = {"class_path": "lightning_lowrank.LowRankStrategy", "init_args": init_args}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"trainer": {"strategy": strategy}}))
    return f"--config={path}"


@pytest.mark.parametrize("source", ["command line", "yaml"])
def test_a_bad_choice_is_refused_at_parse_time_with_the_choices(tmp_path, capsys, source):
    """The choices are ``Literal`` types: jsonargparse refuses another value while parsing, with a message that
    lists them, not a traceback printing the whole Namespace from the constructor."""
    strategy = "--trainer.strategy=lightning_lowrank.LowRankStrategy"
    args = (
        [strategy, "--trainer.strategy.projector=pca"]
        if source == "command line"
        else [_yaml(tmp_path, {"projector": "pca"})]
    )
    with pytest.raises(SystemExit) as error:
        _cli(args, tmp_path)
    err = capsys.readouterr().err
    assert error.value.code == 2  # argparse's usage error
    assert 'Parser key "projector"' in err
    assert "Expected a typing.Literal['svd', 'rsvd', 'dct', 'random', 'gaussian', 'online_pca']" in err
    assert "Traceback" not in err and "Namespace(" not in err


def test_inner_is_the_one_name_of_the_projected_rule(tmp_path, capsys):
    for cls in (LowRankStrategy, LowRankDDPStrategy):
        params = inspect.signature(cls).parameters
        assert "inner" in params and "projected_rule" not in params
    strategy = "--trainer.strategy=lightning_lowrank.LowRankStrategy"
    with pytest.raises(SystemExit):
        _cli([strategy, "--trainer.strategy.inner=subset_norm", "--print_config"], tmp_path)
    printed = capsys.readouterr().out
    assert "inner: subset_norm" in printed and "projected_rule" not in printed
    cli = _cli([strategy, "--trainer.strategy.inner=subset_norm"], tmp_path)
    assert cli.trainer.strategy.lowrank_config.optimizer_options()["projected_rule"] == "subset_norm"


def test_the_old_name_still_works_in_python_with_a_deprecation_warning():
    for cls in (LowRankStrategy, LowRankDDPStrategy):
        with pytest.warns(DeprecationWarning, match="pass inner='subset_norm'"):
            strategy = cls(projected_rule="subset_norm")
        assert strategy.lowrank_config.inner == "subset_norm"
