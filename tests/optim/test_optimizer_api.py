"""The optimizer's public query API, and that nothing outside optim/ reaches into its private parts."""

import copy
import re

import pytest
import torch

from lightning_lowrank.optim import ProjectedOptimizer
from tests import ROOT

PACKAGE = ROOT / "lightning_lowrank"


def _opt():
    w, v, b = (
        torch.nn.Parameter(torch.randn(8, 12)),
        torch.nn.Parameter(torch.randn(12, 6)),
        torch.nn.Parameter(torch.zeros(6)),
    )
    return [w, v, b], ProjectedOptimizer([{"params": [w, v]}, {"params": [b], "rank": None}], rank=2, update_gap=3)


def _step(params, opt, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()


def test_queries_answer_per_parameter_and_follow_the_schedule():
    params, opt = _opt()
    w, v, b = params
    assert [opt.is_projected(p) for p in params] == [True, True, False]
    assert opt.projection_mask(opt.param_groups[0]) == [True, True] and opt.projection_mask(opt.param_groups[1]) == [
        False
    ]
    due = []
    for step in range(7):
        due.append(opt.refreshes_at_next_step(w))
        assert not opt.refreshes_at_next_step(b)
        _step(params, opt, step)
        assert opt.completed_steps(w) == step + 1
    assert due == [True, False, False, True, False, False, True]  # the first subspace, then every update_gap
    assert opt.projection_matrix(w).shape == (8, 2) and opt.projection_matrix(v).shape == (6, 2)


def test_queries_survive_a_state_dict_round_trip_and_new_groups():
    params, opt = _opt()
    _step(params, opt, 0)
    fresh_params, fresh = _opt()
    fresh.load_state_dict(opt.state_dict())  # installs new group dicts: the parameter map is rebuilt
    w = fresh_params[0]
    torch.testing.assert_close(fresh.projection_matrix(w), opt.projection_matrix(params[0]))
    assert fresh.completed_steps(w) == 1 and fresh.is_projected(w)
    extra = torch.nn.Parameter(torch.randn(4, 9))
    fresh.add_param_group({"params": [extra]})
    assert fresh.is_projected(extra) and fresh.completed_steps(extra) == 0


def test_nothing_uses_a_private_name_of_the_optimizer_or_a_projector_from_outside():
    """The optimizer's own code says ``self._...``; every other module (resume.py, nonfinite.py, the strategies and
    callbacks, ...) goes through public names, reading or writing."""
    private = re.compile(r"\b(?:opt|optimizer|projector|self\.optimizer|trainer\.optimizers\[\d\])\._(?!_)\w+")
    offenders = package_lines_matching(private)
    assert not offenders, offenders


def package_lines_matching(pattern: re.Pattern, skip: tuple[str, ...] = ()) -> list[str]:
    """``path:line: text`` of every line of the package's code that ``pattern`` finds, but in the files ``skip`` names
    (paths inside the package)."""
    return [
        f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.relative_to(PACKAGE).as_posix() not in skip
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]


def test_a_refresh_is_timed_on_this_rank():
    params, opt = _opt()
    _step(params, opt, 0)
    info = opt.last_refreshes[params[0]]
    assert info.computed_here and info.timer is not None and info.seconds > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_refresh_is_timed_with_events_read_only_when_asked():
    w = torch.nn.Parameter(torch.randn(64, 96, device="cuda"))
    opt = ProjectedOptimizer([w], rank=8)
    w.grad = torch.randn_like(w)
    opt.step()
    info = opt.last_refreshes[w]
    assert info.timer._seconds is None  # nothing waited for the device during the step
    assert info.seconds > 0


def test_a_checkpoint_from_before_the_newer_options_resumes_with_their_defaults():
    params, opt = _opt()
    _step(params, opt, 0)
    saved = copy.deepcopy(opt.state_dict())  # as from a file: torch's state_dict shares the live step tensors
    newer = ("adam_form", "dct_norm", "dct_type", "fira_complement", "hessian_bias_correction")
    for group in saved["param_groups"]:
        for key in newer:
            del group[key]
    fresh_params, fresh = _opt()
    with torch.no_grad():
        for a, b in zip(params, fresh_params):
            b.copy_(a)
    fresh.load_state_dict(saved)
    assert all(g[k] == fresh.defaults[k] for g in fresh.param_groups for k in newer)
    _step(params, opt, 1)
    _step(fresh_params, fresh, 1)
    for a, b in zip(params, fresh_params):
        assert torch.equal(a, b)
