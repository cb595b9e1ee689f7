"""The planner with protected subspaces (issue 25): ``plan(protect=ratio)`` counts the bases ``ProtectedSubspaces``
hands the optimizer at its first task, to the byte a real run measures; each side is stored as the smaller of the
basis and its complement, in float32 (float64 for a float64 weight)."""

import inspect
import re
import subprocess
import sys
from dataclasses import fields

import lightning as L
import pytest
import torch
from torch import nn

from lightning_lowrank import LowRankConfig, LowRankStrategy, ProjectedOptimizer, ProtectedSubspaces, plan
from lightning_lowrank.__main__ import main
from lightning_lowrank.memory import MemoryReport, account_memory
from lightning_lowrank.memory.protection import protected_rank
from lightning_lowrank.selection import drop_full_rank, select_lowrank_params
from tests import ROOT
from tests.models import QUIET, VOCAB, TinyNet

TINY = {"attn": (40, 24), "mlp": (24, 40)}  # TinyNet's targeted weights (lm_head is a head), m x n
RUNTIME = {"peak_allocated_bytes", "cpu_max_rss_bytes", "probe", "phases"}  # only a running process has these
HAS_BITS = "bits" in inspect.signature(ProjectedOptimizer.protect).parameters


def _stored(k: int, shapes, element: int = 4) -> int:
    """By hand: each side keeps k columns, or the m - k (n - k) of its complement when that is fewer."""
    return sum(element * (min(k, m - k) * m + min(k, n - k) * n) for m, n in shapes)


def _protected(report: MemoryReport) -> int:
    return report.state_by_kind["protected_bases"]


def _assert_same(planned: MemoryReport, measured: MemoryReport) -> None:
    for f in fields(MemoryReport):
        if f.name not in RUNTIME:
            assert getattr(planned, f.name) == getattr(measured, f.name), f.name
    assert planned.state_by_kind == measured.state_by_kind
    assert planned.layers == measured.layers


# -- the hand calculation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio,k", [(0.5, 12), (0.9, 21), (0.25, 6), (1.0, 24)])
def test_tinynet_bases_by_hand(ratio, k):
    """min(m, n) = 24 for both; at k = 21 the 40-row side keeps its 19-column complement, the 24 side 3 columns."""
    report = plan(TinyNet(scheduler=None), rank=4, protect=ratio).report
    assert _protected(report) == _stored(k, TINY.values())
    without = plan(TinyNet(scheduler=None), rank=4).report
    assert report.optimizer_state_bytes == without.optimizer_state_bytes + _stored(k, TINY.values())
    assert _protected(without) == 0


def test_tinynet_k21_spelled_out():
    # attn 40 x 24: left 40 - 21 = 19 < 21 -> complement 40 x 19; right 24 - 21 = 3 -> complement 24 x 3. mlp mirrored.
    assert _protected(plan(TinyNet(scheduler=None), rank=4, protect=0.9).report) == 2 * 4 * (40 * 19 + 24 * 3)


def _llama_60m_targets(layers: int = 8) -> list[tuple[int, int]]:
    """GaLore's 60M (hidden 512, intermediate 1376, 8 layers): q, k, v, o (512 x 512), gate, up (1376 x 512) and
    down (512 x 1376) per layer; embeddings, norms and lm_head are not targeted."""
    return layers * (4 * [(512, 512)] + 2 * [(1376, 512)] + [(512, 1376)])


@pytest.mark.parametrize(
    "ratio,k,dtype,element",
    [
        (0.5, 256, None, 4),
        (0.75, 384, None, 4),  # 512 - 384 = 128 < 384: the 512 sides keep their complement
        (0.5, 256, "bf16", 4),  # bf16 weights: float32 bases, as the callback's SVD
        (0.1, 51, torch.float64, 8),  # float64 weights: float64 bases
    ],
)
def test_60m_bases_by_hand(ratio, k, dtype, element):
    report = plan("60M", rank=128, dtype=dtype, protect=ratio).report
    assert _protected(report) == _stored(k, _llama_60m_targets(), element)


def test_60m_at_half_is_76_mib():
    # Per layer: 4 x (256 x 512 + 256 x 512) + 3 x (256 x 1376 + 256 x 512) floats; 8 layers; 4 bytes each.
    assert _protected(plan("60M", rank=128, protect=0.5).report) == 8 * 4 * (4 * 262144 + 3 * 483328) == 79953920


def test_targets_and_exclude_select_as_the_callback_does():
    only_q = plan("60M", rank=128, protect=0.5, protect_targets="q_proj").report  # a string is one pattern
    assert _protected(only_q) == 8 * 4 * 2 * 256 * 512
    some = plan("60M", rank=128, protect=0.5, protect_targets=["q_proj", "down_proj"], protect_exclude="layers.0.")
    assert _protected(some.report) == 7 * 4 * (2 * 256 * 512 + 256 * 512 + 256 * 1376)


def test_zero_ratio_protects_nothing():
    result = plan(TinyNet(scheduler=None), rank=4, protect=0.0)
    assert _protected(result.report) == 0
    assert "0 of 2 targeted layers" in "\n".join(result.verdict())


def test_k_is_the_callbacks_floor_with_slack():
    assert protected_rank(0.29, (100, 300)) == 29  # 0.29 x 100 is 28.999... in binary
    assert protected_rank(0.5, (40, 24)) == 12 and protected_rank(1.0, (7, 9)) == 7 and protected_rank(0.0, (5, 5)) == 0


# -- the plan equals what a real run measures --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lowrank,protect",
    [
        (dict(rank=4), dict(ratio=0.5)),
        (dict(rank=4), dict(ratio=0.9, target_modules="attn")),  # complements; one layer
        (dict(rank=None), dict(ratio=0.5)),  # the full-memory method: no projected layer
        (dict(rank=4, state_bits=8, projector="dct"), dict(ratio=0.3, exclude=["mlp"])),
    ],
)
def test_plan_equals_a_trainer_run_with_the_callback(lowrank, protect):
    torch.manual_seed(0)
    model = TinyNet(scheduler=None)
    planned = plan(
        model,
        protect=protect["ratio"],
        protect_targets=protect.get("target_modules"),
        protect_exclude=protect.get("exclude", ()),
        **lowrank,
    ).report
    callback = ProtectedSubspaces(schedule="uniform", **protect)
    strategy = LowRankStrategy(memory_report=False, **lowrank)
    L.Trainer(strategy=strategy, callbacks=[callback], max_steps=1, **QUIET).fit(model)
    measured = strategy.memory_report()
    assert _protected(measured) > 0
    _assert_same(planned, measured)
    k = protected_rank(protect["ratio"], (40, 24))
    assert set(callback.ranks.values()) == {k}
    assert _protected(planned) == _stored(k, [TINY[name] for name in callback.ranks])


def _real_step(model: TinyNet, ratio: float, bits: int | None) -> MemoryReport:
    """What the strategy builds, by hand: ``from_optimizer`` over the module's AdamW, real SVD bases handed to
    ``protect`` as ProtectedSubspaces does, one real step, and the strategy's ``account_memory`` call."""
    selected = drop_full_rank(select_lowrank_params(model), 4)
    optimizer = ProjectedOptimizer.from_optimizer(
        model.configure_optimizers(), selected, **LowRankConfig(rank=4).optimizer_options()
    )
    for layer in (model.attn, model.mlp):
        k = protected_rank(ratio, layer.weight.shape)
        U, _, Vh = torch.linalg.svd(layer.weight.detach(), full_matrices=False)
        bases = {layer.weight: (U[:, :k].contiguous(), Vh[:k].T.contiguous())}
        optimizer.protect(bases) if bits is None else optimizer.protect(bases, bits=bits)
    x = torch.randint(0, VOCAB, (16,))
    nn.functional.cross_entropy(model(x), x).backward()
    optimizer.step()
    return account_memory([optimizer], model.parameters(), selected, module=model)


@pytest.mark.parametrize("ratio", [0.5, 0.9])
def test_plan_equals_a_real_step_with_svd_bases(ratio):
    torch.manual_seed(0)
    model = TinyNet(scheduler=None)
    planned = plan(model, rank=4, protect=ratio).report
    measured = _real_step(model, ratio, None)
    _assert_same(planned, measured)
    assert _protected(measured) == _stored(protected_rank(ratio, (40, 24)), TINY.values())


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_bases_are_planned_as_stored(bits):
    if not HAS_BITS:
        pytest.skip("ProjectedOptimizer.protect has no bits argument in this version")
    torch.manual_seed(0)
    model = TinyNet(scheduler=None)
    planned = plan(model, rank=4, protect=0.5, protect_bits=bits)
    _assert_same(planned.report, _real_step(model, 0.5, bits))
    assert 0 < _protected(planned.report) < _stored(12, TINY.values())
    assert f"{bits}-bit" in "\n".join(planned.verdict())


# -- the verdict ---------------------------------------------------------------------------------------------------


def test_the_verdict_says_what_the_bases_take_and_that_it_is_the_first_task():
    result = plan("60M", rank=128, protect=0.5)
    note = next(line for line in result.verdict() if line.startswith("protected bases"))
    assert "76.25 MiB" in note and "56 of 56 targeted layers" in note and "k from 256 to 256" in note
    assert "first task" in note and "progressive" in note
    assert not any("protected bases" in line for line in plan("60M", rank=128).verdict())
    frozen = "\n".join(plan(TinyNet(scheduler=None), rank=4, protect=1.0).verdict())
    assert "2 frozen" in frozen


# -- errors ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [-0.1, 1.5, True, "0.5", float("nan")])
def test_ratio_outside_0_1_is_refused(ratio):
    with pytest.raises(ValueError, match=r"plan\(protect=...\) is ProtectedSubspaces' ratio.*\[0, 1\]"):
        plan(TinyNet(), rank=4, protect=ratio)


def test_layerwise_and_fsdp_are_refused_as_by_the_callback():
    with pytest.raises(ValueError, match="with layerwise=True: ProtectedSubspaces refuses it"):
        plan(TinyNet(), rank=4, protect=0.5, layerwise=True)
    with pytest.raises(ValueError, match=r"with fsdp=2 \(lowrank_fsdp, FSDP2\): ProtectedSubspaces refuses it"):
        plan("60M", rank=128, protect=0.5, fsdp=2)


def test_a_target_matching_nothing_names_the_planner_and_the_candidates():
    with pytest.raises(ValueError, match=r"plan\(protect=...\) as ProtectedSubspaces: target_modules pattern 'nope'"):
        plan(TinyNet(), rank=4, protect=0.5, protect_targets=["nope"])
    with pytest.raises(ValueError, match="exclude pattern 'nope'.*attn"):
        plan(TinyNet(), rank=4, protect=0.5, protect_exclude="nope")
    with pytest.raises(ValueError, match=r"plan\(protect_targets=...\) must name at least one pattern"):
        plan(TinyNet(), rank=4, protect=0.5, protect_targets=[])
    with pytest.raises(ValueError, match=r"plan\(protect_exclude=...\) entries must be non-empty strings"):
        plan(TinyNet(), rank=4, protect=0.5, protect_exclude=["mlp", ""])


@pytest.mark.parametrize(
    "options,named",
    [
        (dict(protect_targets=["attn"]), "protect_targets=['attn']"),
        (dict(protect_exclude="mlp"), "protect_exclude='mlp'"),
        (dict(protect_bits=8), "protect_bits=8"),
    ],
)
def test_protect_options_need_protect(options, named):
    with pytest.raises(ValueError, match=rf"plan\(\) got {re.escape(named)} without protect=RATIO"):
        plan(TinyNet(), rank=4, **options)


def test_a_model_without_targets_or_with_an_unowned_target_is_refused():
    with pytest.raises(ValueError, match="found no weight to protect"):
        plan(nn.Sequential(nn.Embedding(8, 4), nn.LayerNorm(4)), protect=0.5)

    def norms_only(params):  # an optimizer that does not hold the targeted weights
        return torch.optim.AdamW([p for p in params if p.ndim == 1])

    with pytest.raises(ValueError, match="attn, mlp are not in one"):
        plan(TinyNet(), norms_only, rank=None, protect=0.5)


@pytest.mark.skipif(HAS_BITS, reason="ProjectedOptimizer.protect takes bits in this version")
def test_bits_without_support_say_so():
    with pytest.raises(ValueError, match="has no bits argument"):
        plan(TinyNet(), rank=4, protect=0.5, protect_bits=8)


# -- the command line ------------------------------------------------------------------------------------------------


def test_cli_plans_protection(capsys):
    assert main(["plan", "--preset", "60M", "--rank", "128", "--protect", "0.5"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "protect=0.5" in out and "protected bases" in out and "76.25 MiB" in out and "first task" in out


def test_cli_protect_targets_and_exclude(capsys):
    argv = ["plan", "--preset", "60M", "--rank", "128", "--protect", "0.5", "--protect-target", "q_proj", "down_proj"]
    assert main([*argv, "--protect-exclude", "layers.0."]) == 0
    out = " ".join(capsys.readouterr().out.split())  # the note wraps at the console's width
    # 7 layers x (q_proj 512 x 512 + down_proj 512 x 1376) at k = 256, float32: 20873216 B
    assert "14 of 14 targeted layers" in out and "19.91 MiB" in out


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--protect", "1.5"], "a number in [0, 1], got 1.5"),
        (["--protect-target", "q_proj"], "without protect=RATIO"),
        (["--protect", "0.5", "--layerwise"], "ProtectedSubspaces refuses it"),
        (["--protect", "0.5", "--protect-target", "nope"], "pattern 'nope' matches no module"),
        (["--protect", "0.5", "--protect-bits", "3"], "invalid choice"),
    ],
)
def test_cli_protect_errors(extra, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--preset", "60M", "--rank", "128", *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_protect_bits(capsys):
    code = None
    try:
        code = main(["plan", "--preset", "60M", "--rank", "128", "--protect", "0.5", "--protect-bits", "8"])
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    if HAS_BITS:
        assert code == 0 and "8-bit" in out
    else:
        assert code == 2 and "has no bits argument" in err


def test_planning_protection_does_not_load_lightning():
    """The planner reads the callback's options itself rather than importing it (which would load Lightning)."""
    code = (
        "import sys\nfrom lightning_lowrank import plan\n"
        "plan('60M', rank=128, protect=0.5, protect_targets='q_proj')\n"
        "print(sorted(m for m in sys.modules if m == 'lightning' or m.startswith('lightning.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True, text=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("schedule, bits", [("uniform", None), ("progressive", 8)])
def test_the_strategys_memory_plan_counts_the_callbacks_bases(schedule, bits):
    """``LowRankStrategy(memory_plan=True)`` with a ``ProtectedSubspaces`` plans the bases its first task hands over:
    the planned "protected bases" are what the first step measures."""
    strategy = LowRankStrategy(rank=4, memory_plan=True, memory_report=False, memory_json=False)
    callback = ProtectedSubspaces(ratio=0.3, schedule=schedule, bits=bits)
    L.Trainer(strategy=strategy, max_steps=1, callbacks=[callback], **QUIET).fit(TinyNet())
    planned = strategy.planned.report.state_by_kind.get("protected_bases", 0)
    assert planned > 0
    assert planned == strategy.memory_report().state_by_kind["protected_bases"]
