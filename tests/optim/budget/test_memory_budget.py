"""memory_budget: ranks chosen per layer so the optimizer state fits, moved toward curvature at refreshes."""

import pytest
import torch

from lightning_lowrank.optim import ProjectedOptimizer
from lightning_lowrank.optim.budget.allocate import LayerCost, allocate_ranks, min_budget


def _state_bytes(opt):
    """Measured: every tensor in the optimizer's state, plus the shared DCT bases."""
    total = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return total + sum(b.numel() * b.element_size() for b in opt.dct_bases().values())


def test_ranks_are_proportional_to_the_weights_within_the_budget():
    costs = [LayerCost(fixed=10, per_rank=100, max_rank=50)] * 3
    # 3000 bytes of rank at 100 each = 30 ranks, split 3:2:1 by the weights
    assert allocate_ranks([3.0, 2.0, 1.0], costs, budget=30 + 3000) == [15, 10, 5]
    # clamped layers give their share to the others
    capped = [LayerCost(10, 100, 6), LayerCost(10, 100, 50), LayerCost(10, 100, 50)]
    ranks = allocate_ranks([10.0, 1.0, 1.0], capped, budget=30 + 3000)
    assert ranks[0] == 6 and ranks[1] == ranks[2] == 12
    # unequal costs: proportional ranks, and the leftover bytes are used without crossing the budget
    mixed = [LayerCost(0, 64, 100), LayerCost(0, 32, 100)]
    ranks = allocate_ranks([1.0, 1.0], mixed, budget=1000)
    assert (
        64 * ranks[0] + 32 * ranks[1] <= 1000
        and abs(ranks[0] - ranks[1]) <= 1
        and 1000 - 64 * ranks[0] - 32 * ranks[1] < 32
    )
    # no weight at all: an even split; negative weights count as zero and get the minimum
    assert allocate_ranks([0.0, 0.0], costs[:2], budget=20 + 1000) == [5, 5]
    assert allocate_ranks([-5.0, 1.0], costs[:2], budget=20 + 1000)[0] == 1


def test_minimum_ranks_are_kept_and_the_rest_follows_the_weights():
    costs = [LayerCost(fixed=10, per_rank=100, max_rank=50)] * 3
    assert allocate_ranks([10.0, 1.0, 0.0], costs, budget=30 + 3000, min_ranks=[5, 5, 5]) == [
        20,
        5,
        5,
    ]  # 10 lam + 5 + 5 = 30
    with pytest.raises(ValueError, match="minimum ranks"):
        allocate_ranks([1.0, 1.0, 1.0], costs, budget=30 + 3000, min_ranks=[11, 10, 10])


def test_a_budget_below_rank_one_everywhere_is_refused():
    costs = [LayerCost(10, 100, 50)] * 2
    assert min_budget(costs, other_bytes=5) == 5 + 2 * 110
    with pytest.raises(ValueError, match="cannot hold every layer at rank 1"):
        allocate_ranks([1.0, 1.0], costs, budget=219)


def _two_layers(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(32, 16, bias=False), torch.nn.Linear(32, 16, bias=False)


def _budget_for(total_rank, shape=(16, 32)):
    """AdamW with P stored (svd): per rank 2 * 32 moments + 16 of P, float32; 64 bytes of scalars per layer."""
    m, n = shape
    return 2 * 64 + total_rank * (2 * n + m) * 4


# Bytes per unit of rank for a 16 x 32 float32 weight under AdamW: two 32-wide moment rows, plus what P stores
# (16 floats for svd, an int64 index for dct, nothing for random's seed); dct also shares one 16 x 16 basis.
PER_RANK = {"svd": (2 * 32 + 16) * 4, "dct": 2 * 32 * 4 + 8, "random": 2 * 32 * 4}
SHARED = {"svd": 0, "dct": 16 * 16 * 4, "random": 0}


@pytest.mark.parametrize("projector", ["svd", "dct", "random"])
def test_measured_state_never_exceeds_the_budget_and_ranks_follow_curvature(projector):
    a, b = _two_layers()
    budget = _budget_for(12)
    total_rank = (budget - SHARED[projector] - 2 * 64) // PER_RANK[projector]  # what fits: 12 for svd
    opt = ProjectedOptimizer(
        [a.weight, b.weight], lr=1e-3, rank=15, update_gap=3, projector=projector, memory_budget=budget
    )
    x = torch.randn(64, 32)
    ranks = []
    for step in range(1, 19):
        opt.zero_grad()
        (a(x).pow(2).mean() + b(x).pow(2).mean()).backward()
        opt.step()
        assert _state_bytes(opt) <= budget, step
        ranks.append((opt.layer_rank(a.weight), opt.layer_rank(b.weight)))
        if step == 6:
            opt.set_layer_curvature({a.weight: 9.0, b.weight: 1.0})
        if step == 12:
            opt.set_layer_curvature({a.weight: 1.0, b.weight: 3.0})
    # before any trace: gradient energy; every rank the budget holds is handed out
    assert ranks[0][0] + ranks[0][1] == total_rank
    # the refresh after step 6 (update 7) moves rank to the high-curvature layer, the one after step 12 moves it back
    ra, rb = ranks[8]
    assert ra > 2 * rb and ra + rb == total_rank
    assert rb >= int(0.5 * (total_rank // 2))  # the floor: half of what an even split gives
    ra, rb = ranks[14]
    assert rb > 2 * ra and ra + rb == total_rank
    # ranks change only at refreshes (updates 1, 4, 7, ...)
    for step in range(1, 18):
        if step % 3 != 0:
            assert ranks[step] == ranks[step - 1], step


def test_a_shrinking_layer_keeps_its_leading_coordinates_and_a_growing_one_pads_with_zeros():
    a, b = _two_layers()
    opt = ProjectedOptimizer([a.weight, b.weight], lr=1e-3, rank=15, update_gap=2, memory_budget=_budget_for(12))
    x = torch.randn(64, 32)
    for step in range(1, 4):
        opt.zero_grad()
        (a(x).pow(2).mean() + b(x).pow(2).mean()).backward()
        if step == 3:
            before = {p: opt.state[p]["exp_avg"].clone() for p in (a.weight, b.weight)}
            opt.set_layer_curvature({a.weight: 1.0, b.weight: 5.0})
        opt.step()
    # moments="keep" (the default): the first min(r_old, r_new) rows carry over; the step then updates them
    ra, rb = opt.layer_rank(a.weight), opt.layer_rank(b.weight)
    assert rb > before[b.weight].shape[0] and ra < before[a.weight].shape[0]
    assert opt.state[a.weight]["exp_avg"].shape == (ra, 32) and opt.state[b.weight]["exp_avg"].shape == (rb, 32)


def test_an_impossible_budget_is_refused_when_the_optimizer_is_built():
    a, b = _two_layers()
    with pytest.raises(ValueError, match="needs at least"):
        ProjectedOptimizer([a.weight, b.weight], rank=8, memory_budget=_budget_for(2) - 1)
    ProjectedOptimizer([a.weight, b.weight], rank=8, memory_budget=_budget_for(2))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(memory_budget=0), "Invalid memory_budget"),
        (dict(memory_budget=1.5e6), "Invalid memory_budget"),
        (dict(memory_budget=10**6, rank_by="trace"), "Unknown rank_by"),
        (dict(memory_budget=10**6, state_bits=8), "does not support state_bits"),
        (dict(memory_budget=10**6, projector_bits=8), "does not support projector_bits"),
    ],
)
def test_bad_budget_options(kwargs, match):
    a, _ = _two_layers()
    with pytest.raises(ValueError, match=match):
        ProjectedOptimizer([a.weight], rank=4, **kwargs)
