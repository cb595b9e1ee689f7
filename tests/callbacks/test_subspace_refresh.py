"""SubspaceRefresh through the Trainer: it decides when, the optimizer refreshes, the report counts."""

from dataclasses import replace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_lowrank import LowRankStrategy, SubspaceRefresh
from tests.models import QUIET, RecordingLogger, TinyNet
from tests.strategies.test_strategy import LossHistory


class RefreshLog(Callback):
    """Which layer refreshed at which of its steps."""

    def __init__(self):
        self.steps = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        names = {p: n for n, p in pl_module.named_parameters()}
        for p, info in trainer.optimizers[0].last_refreshes.items():
            self.steps.setdefault(names[p], []).append(info.step)


def _fit(strategy, callbacks, max_steps=8, model=None, **kwargs):
    torch.manual_seed(0)
    model = model or TinyNet(scheduler=None)
    trainer = L.Trainer(strategy=strategy, max_steps=max_steps, callbacks=callbacks, **{**QUIET, **kwargs})
    trainer.fit(model)
    return model, trainer


def test_fixed_gap_refreshes_are_counted_in_the_report_and_logged():
    log, logger = RefreshLog(), RecordingLogger()
    refresh = SubspaceRefresh(every=3)
    _, trainer = _fit(
        LowRankStrategy(rank=4, update_gap=1000, memory_report=False, log_layers=True),
        [refresh, log],
        logger=logger,
        log_every_n_steps=1,
    )
    assert log.steps == {"attn.weight": [0, 3, 6], "mlp.weight": [0, 3, 6]}  # the callback's gap, not update_gap
    report = trainer.strategy.memory_report()
    assert [(layer.refreshes, layer.skipped, layer.gap) for layer in report.layers] == [(3, 0, 3), (3, 0, 3)]
    assert all(layer.refresh_seconds >= 0 for layer in report.layers)
    assert logger.metrics["lowrank/refreshes/attn"] == 3  # per layer: log_layers=True
    assert logger.metrics["lowrank/refresh/total"] == 6  # the report's total
    assert logger.metrics["lowrank/refreshes"] == 6  # logged by the callback on refresh steps


@pytest.mark.parametrize("rule", ["lazy", "qgalore"])
def test_per_layer_overrides_and_warmup(rule):
    log = RefreshLog()
    refresh = SubspaceRefresh(every=5, overrides={"attn": 2}, warmup=2, warmup_every=1, rule=rule)
    _fit(LowRankStrategy(rank=4, memory_report=False), [refresh, log], max_steps=9)
    # Warm-up refreshes at 0 and 1; the regular schedule starts with a refresh at step 2 (= warmup).
    assert log.steps == {"attn.weight": [0, 1, 2, 4, 6, 8], "mlp.weight": [0, 1, 2, 7]}


@pytest.mark.parametrize(
    "options,moments",
    [
        (dict(projector="svd"), "keep"),
        (dict(projector="svd"), "reset"),
        (dict(projector="svd"), "rotate"),
        (dict(projector="rsvd"), "rotate"),
        (dict(projector="dct"), "keep"),
        (dict(projector="dct", dct_scorer="fft"), "rotate"),
        (dict(projector="random"), "reset"),
        (dict(projector="online_pca"), "keep"),
        (dict(projector="svd", projector_bits=4), "keep"),
        (dict(projector="online_pca", projector_bits=8), "rotate"),
    ],
)
def test_every_projector_and_moment_policy_trains_from_the_trainer(options, moments):
    history = LossHistory()
    strategy = LowRankStrategy(rank=4, memory_report=False, **options)
    model, trainer = _fit(strategy, [SubspaceRefresh(every=3, moments=moments), history], max_steps=12)
    opt = trainer.optimizers[0]
    assert opt.param_groups[0]["moments"] == moments and opt.param_groups[0]["projector"] == options["projector"]
    assert sum(history.losses[-3:]) < sum(history.losses[:3])


def test_adaptive_schedule_resumes_mid_schedule_bit_for_bit(tmp_path):
    def run(ckpt_path=None, callbacks=()):
        refresh = SubspaceRefresh(every=1, adaptive=True, queue_size=1, cos_threshold=0.0, max_gap=8)
        model, trainer = (
            _fit(
                LowRankStrategy(rank=4, memory_report=False),
                [refresh, *callbacks],
                max_steps=12,
                model=TinyNet(scheduler=None, batch_size=32),
                enable_checkpointing=bool(callbacks),
                default_root_dir=tmp_path,
            )
            if ckpt_path is None
            else _resume(refresh, ckpt_path)
        )
        return model, refresh

    def _resume(refresh, ckpt_path):
        torch.manual_seed(0)
        model = TinyNet(scheduler=None, batch_size=32)
        trainer = L.Trainer(
            strategy=LowRankStrategy(rank=4, memory_report=False), max_steps=12, callbacks=[refresh], **QUIET
        )
        trainer.fit(model, ckpt_path=ckpt_path)
        return model, trainer

    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1, filename="{step}")
    full, full_refresh = run(callbacks=[ckpt])
    # Gap doubles after every refresh: refreshes at steps 0, 1, 3, 7; the checkpoint at step 4 is mid-gap.
    assert full_refresh.schedule.layers["attn"].refreshes == 4 and full_refresh.schedule.layers["attn"].gap == 8
    resumed, resumed_refresh = run(ckpt_path=str(tmp_path / "step=4.ckpt"))

    def untimed(schedule):  # wall-clock seconds differ between runs; everything else must not
        return {name: replace(layer, seconds=0.0) for name, layer in schedule.layers.items()}

    assert untimed(resumed_refresh.schedule) == untimed(full_refresh.schedule)
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_report_counts_the_bytes_quantization_saves():
    strategy = LowRankStrategy(rank=4, projector="svd", projector_bits=4, proj_group_size=32, memory_report=False)
    _, trainer = _fit(strategy, [], max_steps=2)
    report = trainer.strategy.memory_report()
    # P is 24 x 4 for both weights: fp32 would be 384 bytes; 4-bit codes 48 bytes + 3 groups x (scale, zero) fp32.
    assert [layer.projector_bytes for layer in report.layers] == [48 + 24, 48 + 24]
    assert [layer.projector for layer in report.layers] == ["svd/int4", "svd/int4"]
    assert report.quantization_saving_bytes == 2 * (384 - 72)


def test_needs_the_low_rank_strategy():
    with pytest.raises(ValueError, match="SubspaceRefresh needs a low-rank optimizer.*lowrank"):
        _fit("auto", [SubspaceRefresh(every=2)], max_steps=1)


def test_unknown_override_pattern_names_the_layers():
    with pytest.raises(ValueError, match="'attention' matches no projected layer.*attn, mlp"):
        _fit(LowRankStrategy(rank=4), [SubspaceRefresh(overrides={"attention": 5})], max_steps=1)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(every=0), "every"),
        (dict(similarity="cosine"), "similarity"),
        (dict(rule="galore"), "rule must be one of 'lazy', 'qgalore'"),
        (dict(rule="qgalore", similarity="principal"), "similarity='principal' contradicts rule='qgalore'"),
        (dict(rule="qgalore", max_gap=3200), "max_gap=3200 contradicts rule='qgalore'"),
        (dict(moments="rotate_both"), "moments"),
        (dict(overrides={"attn": 0}), "overrides"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SubspaceRefresh(**kwargs)


def test_rule_and_similarity_defaults_and_a_checkpoint_of_another_measure():
    assert SubspaceRefresh().similarity == "leading"  # |cos|: adapts on a stable gradient at any rank
    assert SubspaceRefresh(rule="qgalore").similarity == "signed"
    old = SubspaceRefresh(every=5, adaptive=True, similarity="principal")
    old.schedule.record("attn", 0, None, 0.0)
    old.schedule.record("attn", 5, 0.3, 0.0)
    state = old.state_dict()
    assert state["rule"] == "lazy" and state["similarity"] == "principal"
    same = SubspaceRefresh(every=5, adaptive=True, similarity="principal")
    same.load_state_dict(state)
    assert same.schedule.layers["attn"].history == [0.3]
    # The queue holds principal-angle values; a run that queues signed cosines starts it over, keeping the rest.
    other = SubspaceRefresh(every=5, adaptive=True, rule="qgalore")
    with pytest.warns(UserWarning, match="queues start over"):
        other.load_state_dict(state)
    assert other.schedule.layers["attn"].history == [] and other.schedule.layers["attn"].refreshes == 2


def test_rotating_moments_on_apollos_gaussian_basis_is_refused_at_fit_start():
    with pytest.raises(ValueError, match="moments='rotate'.*gaussian.*not orthonormal"):
        _fit(LowRankStrategy(rank=4, residual="apollo"), [SubspaceRefresh(every=3, moments="rotate")], max_steps=2)
