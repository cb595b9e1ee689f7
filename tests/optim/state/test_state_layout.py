"""Optimizer state classified by what the components that keep it declare (``state_layout``), never by key names."""

import itertools
import re
import warnings

import pytest
import torch
from torch import nn

from lightning_lowrank.memory.accounting import account_memory
from lightning_lowrank.optim import ProjectedOptimizer, layerwise
from lightning_lowrank.optim.budget import rank_budget
from lightning_lowrank.optim.budget.costs import projector_bytes
from lightning_lowrank.optim.layerwise import LOWRANK_GRAD, LayerwiseProjectedOptimizer
from lightning_lowrank.optim.options import OptimizerOptions
from lightning_lowrank.optim.projection.bases import PROJECTORS, projected_shape
from lightning_lowrank.optim.projection.projectors import PROJECTOR_CLASSES
from lightning_lowrank.optim.state import storage
from lightning_lowrank.optim.state.layout import MOMENTS, STATE_KINDS, UndeclaredStateError, merge_kinds
from lightning_lowrank.optim.update import residuals, rules
from lightning_lowrank.optim.update.residuals import RESIDUALS
from tests.optim.test_optimizer_api import package_lines_matching

TALL, WIDE, BIAS, RANK = (48, 16), (16, 48), (16,), 4
# Large enough that 8-bit storage quantizes the projected moments (rank x 512 elements), whatever its size threshold;
# small ones may stay under their own key.
BIG = dict(tall=(512, 32), wide=(32, 512), rank=16)
# The inner rules, as the torch optimizer a user writes plus the options that pick the projected rule.
RULES = {
    "adamw": (lambda ps: torch.optim.AdamW(ps, lr=1e-3), {}),
    "sgd": (lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9), {}),
    "adafactor": (lambda ps: torch.optim.Adafactor(ps, lr=1e-2), {}),
    "subset_norm": (lambda ps: torch.optim.AdamW(ps, lr=1e-3), {"projected_rule": "subset_norm"}),
    "sophia": (lambda ps: torch.optim.AdamW(ps, lr=1e-3), {"preconditioner": "lazy_hessian"}),
}
MATRIX_PROJECTORS = ("svd", "rsvd", "online_pca")  # the ones projector_bits quantizes


def _accepted(options):
    try:
        OptimizerOptions(**options)
    except ValueError:
        return False
    return True


COMBOS = [
    (projector, rule, residual, state_bits, projector_bits)
    for projector, rule, residual, state_bits in itertools.product(PROJECTORS, RULES, RESIDUALS, (None, 8))
    for projector_bits in ((None, 8) if projector in MATRIX_PROJECTORS else (None,))
    if _accepted(
        dict(projector=projector, residual=residual, state_bits=state_bits, projector_bits=projector_bits)
        | RULES[rule][1]
    )
]


def _stepped(projector="svd", rule="adamw", residual="none", state_bits=None, projector_bits=None, **options):
    """A tall and a wide weight (projected) and a bias (dense), two steps (each refreshes), and a curvature trace."""
    torch.manual_seed(0)
    shapes = {"tall": options.pop("tall", TALL), "wide": options.pop("wide", WIDE), "b": BIAS}
    params = {name: nn.Parameter(torch.randn(shape)) for name, shape in shapes.items()}
    make, rule_options = RULES[rule]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Adafactor keeps P-storing projections dense, with a warning
        opt = ProjectedOptimizer.from_optimizer(
            make(list(params.values())),
            {params["tall"]: "tall", params["wide"]: "wide"},
            update_gap=1,
            projector=projector,
            residual=residual,
            state_bits=state_bits,
            projector_bits=projector_bits,
            **{"rank": RANK, **rule_options, **options},
        )
    for _ in range(2):
        for p in params.values():
            p.grad = torch.randn_like(p)
        opt.step()
    projected = opt.projected_params()
    if rule == "sophia":
        opt.update_curvature({p: torch.rand(projected_shape(p.shape, opt.layer_rank(p))) for p in projected})
    opt.set_layer_curvature({p: 1.0 for p in projected})
    return opt, params


def _nbytes(t):
    return t.numel() * t.element_size()


def _bytes_by_kind(opt, p):
    out = dict.fromkeys(STATE_KINDS, 0)
    for key, kind in opt.state_kinds(p).items():
        out[kind] += _nbytes(opt.state[p][key])
    return out


def _report(opt, params):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # negative savings at these shapes are not the point here
        return account_memory([opt], params.values(), {p: n for n, p in params.items()})


@pytest.mark.parametrize(("projector", "rule", "residual", "state_bits", "projector_bits"), COMBOS)
def test_every_key_has_a_kind_and_the_kinds_add_up(projector, rule, residual, state_bits, projector_bits):
    opt, params = _stepped(projector, rule, residual, state_bits, projector_bits)
    total = dict.fromkeys(STATE_KINDS, 0)
    for name, p in params.items():
        kinds = opt.state_kinds(p)
        assert set(kinds) == set(opt.state[p]) and set(kinds.values()) <= set(STATE_KINDS), name
        by_kind = _bytes_by_kind(opt, p)
        for kind, n in by_kind.items():
            total[kind] += n
        if not opt.is_projected(p):  # the bias, and Adafactor weights kept dense
            assert set(kinds.values()) <= {"dense_moments", "scalars"}, kinds
            continue
        group = opt.param_groups[0]
        assert by_kind["projection"] == projector_bytes(p, group, opt.layer_rank(p)), kinds  # costs.py's prediction
        assert by_kind["residual"] == (4 if residual in ("fira", "apollo") else 0), kinds
        assert by_kind["curvature"] > 0 and by_kind["projected_moments"] > 0 and by_kind["dense_moments"] == 0
    bases = sum(_nbytes(b) for b in opt.dct_bases().values())
    total["projection"] += bases
    report = _report(opt, params)
    assert report.state_by_kind == total
    everything = sum(_nbytes(t) for state in opt.state.values() for t in state.values()) + bases
    assert sum(report.state_by_kind.values()) == report.optimizer_state_bytes == everything


def test_dct_adamw_by_hand():
    opt, params = _stepped("dct")
    for name, shape in (("tall", (TALL[0], RANK)), ("wide", (RANK, WIDE[1]))):
        p, state = params[name], opt.state[params[name]]
        assert opt.state_kinds(p) == {
            "step": "scalars",
            "exp_avg": "projected_moments",
            "exp_avg_sq": "projected_moments",
            "proj_idx": "projection",
            "curvature_trace": "curvature",
        }
        assert state["exp_avg"].shape == state["exp_avg_sq"].shape == shape
        by_kind = _bytes_by_kind(opt, p)
        assert by_kind["projection"] == 8 * RANK  # RANK int64 indices
        assert by_kind["projected_moments"] == 2 * RANK * max(shape) * 4
    dense = {"step": "scalars", "exp_avg": "dense_moments", "exp_avg_sq": "dense_moments"}
    assert opt.state_kinds(params["b"]) == dense
    layers = {layer.name: layer for layer in _report(opt, params).layers}
    assert layers["wide"].projector_bytes == layers["wide"].state_by_kind["projection"] == 8 * RANK


def test_residual_quantized_p_and_sophia_by_hand():
    opt, params = _stepped("svd", residual="fira", projector_bits=8)
    kinds = opt.state_kinds(params["wide"])
    assert kinds["residual_norm"] == "residual" and opt.state[params["wide"]]["residual_norm"].shape == ()
    assert {k: v for k, v in kinds.items() if v == "projection"} == dict.fromkeys(
        ("proj_codes", "proj_scale", "proj_zero"), "projection"
    )
    own = [_bytes_by_kind(opt, params[name])["projection"] for name in ("tall", "wide")]
    saving = _report(opt, params).quantization_saving_bytes  # against P in float32
    assert saving == sum(16 * RANK * 4 - n for n in own) and saving > 0
    opt, params = _stepped("random", rule="sophia")
    kinds = opt.state_kinds(params["tall"])
    assert kinds == {
        "step": "scalars",
        "exp_avg": "projected_moments",
        "hessian": "curvature",
        "hessian_updates": "curvature",
        "proj_seed": "projection",
        "curvature_trace": "curvature",
    }
    assert _bytes_by_kind(opt, params["tall"])["projection"] == 8  # an int64 seed


@pytest.mark.parametrize("rule", list(RULES))
def test_8bit_buffers_take_their_buffers_kind(rule):
    residual = "none" if rule == "subset_norm" else "fira"  # Subset-Norm updates the complement itself
    opt, params = _stepped("dct", rule, residual, state_bits=8, **BIG)
    buffers = {"exp_avg", "exp_avg_sq", "momentum_buffer", "row_var", "col_var", "variance", "sum_sq", "hessian"}
    for name in ("tall", "wide"):
        kinds, projected = opt.state_kinds(params[name]), opt.is_projected(params[name])
        state = opt.state[params[name]]
        if rule != "adafactor":  # its factored moments are small; and it keeps these weights dense
            assert projected and any(storage.is_quantized(state, k) for k in buffers), kinds  # quantized moments
        stored = {k: base for base in buffers for q in (False, True) for k in storage.stored_keys(base, q)}
        for key, kind in kinds.items():
            if key in stored:
                moments = "projected_moments" if projected else "dense_moments"
                assert kind == ("curvature" if stored[key] == "hessian" else moments), key
    bias = opt.state_kinds(params["b"])  # quantized, or kept under its own key when small: dense moments either way
    assert set(bias.values()) == {"dense_moments", "scalars"} and bias["step"] == "scalars"
    report = _report(opt, params)
    everything = sum(_nbytes(t) for state in opt.state.values() for t in state.values())
    assert sum(report.state_by_kind.values()) == everything + report.shared_basis_bytes


def test_budget_state_by_hand():
    opt, params = _stepped("svd", memory_budget=20_000, rank_by="residual")
    kinds = opt.state_kinds(params["tall"])
    assert kinds["rank"] == "scalars" and kinds["residual_energy"] == "curvature" and kinds["proj"] == "projection"


def test_a_key_no_component_declares_raises():
    opt, params = _stepped("dct")
    opt.state[params["wide"]]["mystery"] = torch.zeros(3)
    with pytest.raises(UndeclaredStateError, match="mystery"):
        opt.state_kinds(params["wide"])
    with pytest.raises(UndeclaredStateError, match="mystery"):
        _report(opt, params)
    del opt.state[params["wide"]]["mystery"]
    # Declared, but by a component a dense parameter does not have (the budget's rank, another projector's P).
    for key in ("rank", "proj", "residual_norm"):
        opt.state[params["b"]][key] = torch.zeros(())
        with pytest.raises(UndeclaredStateError, match=key):
            opt.state_kinds(params["b"])
        del opt.state[params["b"]][key]
    opt.state[params["wide"]]["proj"] = torch.zeros(32, RANK)  # svd's key under the dct projector
    with pytest.raises(UndeclaredStateError, match="'proj'"):
        opt.state_kinds(params["wide"])


def test_conflicting_or_unknown_declarations_raise():
    with pytest.raises(ValueError, match="declare state 'x' as scalars and residual"):
        merge_kinds([("a", {"x": "scalars"}), ("b", {"x": "residual"})])
    with pytest.raises(ValueError, match="not one of"):
        merge_kinds([("a", {"x": "moments"})])


def test_layerwise_declares_its_window_gradient():
    w = nn.Parameter(torch.randn(WIDE))
    w.grad = torch.randn(WIDE)
    for cls in (ProjectedOptimizer, LayerwiseProjectedOptimizer):
        opt = cls([w], rank=RANK)
        ProjectedOptimizer.step(opt)
        opt.state[w][LOWRANK_GRAD] = torch.zeros(RANK, WIDE[1])
        if cls is ProjectedOptimizer:
            with pytest.raises(UndeclaredStateError):
                opt.state_kinds(w)
        else:
            assert opt.state_kinds(w)[LOWRANK_GRAD] == "projected_moments"


def test_foreign_optimizer_state_is_dense():
    w = nn.Parameter(torch.randn(WIDE))
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    adam = torch.optim.AdamW([b := nn.Parameter(torch.randn(BIAS))], lr=0.1)
    w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
    opt.step()
    adam.step()
    report = _report(opt, {"w": w})
    assert report.state_by_kind["dense_moments"] == _nbytes(w) and sum(report.state_by_kind.values()) == _nbytes(w)
    report = account_memory([adam], [b], {})
    assert report.state_by_kind["dense_moments"] == 2 * _nbytes(b) and report.state_by_kind["scalars"] == 4


def test_every_component_declares_its_state_keys_under_one_name():
    """``STATE_KEYS``: key -> kind, one dict per variant where a component has variants (``state_layout``)."""
    declarations = {
        **{f"storage {rule}": keys for rule, keys in storage.STATE_KEYS.items()},
        **{f"residual {name}": keys for name, keys in residuals.STATE_KEYS.items()},
        **{f"projector {name}": cls.STATE_KEYS for name, cls in PROJECTOR_CLASSES.items()},
        "budget": rank_budget.STATE_KEYS,
        "layerwise": layerwise.STATE_KEYS,
    }
    for owner, keys in declarations.items():
        assert isinstance(keys, dict) and set(keys.values()) <= {*STATE_KINDS, MOMENTS}, owner
    assert set(storage.STATE_KEYS) == set(rules.RULES)
    assert set(residuals.STATE_KEYS) == set(RESIDUALS) and set(PROJECTOR_CLASSES) == set(PROJECTORS)
    old = re.compile(r"\b(KEY_KINDS|COUNTER_KINDS|QUANTIZED_SUFFIXES|quantized_keys)\b|\.state_keys\b")
    offenders = package_lines_matching(old, skip=("optim/state/storage.py",))  # QUANTIZED_SUFFIXES is its own
    assert not offenders, offenders


def test_only_storage_knows_the_8bit_layout():
    """The 8-bit key suffixes are storage.py's (and the codec's): every other module asks ``storage`` (``stored_keys``,
    ``is_quantized``, ``decoded_buffers``, ``stored_shape``, ``buffer_bytes``, ``host_key``)."""
    buffers = "|".join(sorted({k for keys in rules.MOMENT_KEYS.values() for k in keys}))
    layout = re.compile(
        r"[\"'}]_(codes|absmax|shape)\b"  # "_codes", f"{key}_codes", endswith("_shape")
        rf"|\b({buffers})_(codes|absmax|shape)\b"  # exp_avg_codes, hessian_shape, ...
        r"|_absmax"
    )
    offenders = package_lines_matching(layout, skip=("optim/state/storage.py", "optim/state/moments8bit.py"))
    assert not offenders, offenders
