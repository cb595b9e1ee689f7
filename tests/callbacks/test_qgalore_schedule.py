"""``rule="qgalore"`` against q-galore-torch 1.0's projector schedule, and the default lazy rule on known streams.

The reference is a transcription of ``GaLoreProjector.project`` (q-galore-torch 1.0) written here from its source:
per layer, refresh when there is no projection yet or ``iter % update_proj_gap == 0`` (iter: the layer's completed
updates); at every SVD after the first, queue the signed cosine of the old and new leading singular vectors (row 0
of Vh for a tall or square weight, column 0 of U for a wide one), dropping the oldest past ``queue_size``; when
the queue is full and its mean is >= ``cos_threshold``, ``update_proj_gap = int(update_proj_gap * gamma_proj)``.
The queue is never cleared and the gap has no cap. It is fed the same gradients; it shares no code with ours.
"""

import importlib.util
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lowrank import LowRankStrategy, SubspaceRefresh
from lightning_lowrank.optim import ProjectedAdamW
from lightning_lowrank.schedule import RefreshPolicy, RefreshSchedule
from tests.models import QUIET

SHAPES = {"tall": (40, 24), "wide": (24, 40)}  # right and left projection
KINDS = ("stable", "noisy", "drifting", "flipping")
RANK = 4


@pytest.fixture(autouse=True)
def one_thread():
    """These matrices are tiny: on a busy machine, thread hand-offs made the file ~15x slower than one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def stream(kind, shape, steps, seed=0, dtype=torch.float64):
    """Gradients G_0 .. G_{steps-1} of one layer: a strong rank-1 signal plus small noise, unless ``noisy``."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    U = torch.linalg.qr(torch.randn(m, 2, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, 2, generator=g, dtype=torch.float64)).Q
    fixed = 10 * torch.outer(U[:, 0], V[:, 0]) + 0.1 * torch.randn(m, n, generator=g, dtype=torch.float64)
    grads = []
    for t in range(steps):
        noise = 0.1 * torch.randn(m, n, generator=g, dtype=torch.float64)
        if kind == "stable":  # same leading direction, fresh noise: SVD signs may still flip between refreshes
            G = 10 * torch.outer(U[:, 0], V[:, 0]) + noise
        elif kind == "noisy":  # i.i.d.: unrelated directions at every step
            G = torch.randn(m, n, generator=g, dtype=torch.float64)
        elif kind == "drifting":  # both singular vectors rotate by 0.02 rad per step
            u = math.cos(0.02 * t) * U[:, 0] + math.sin(0.02 * t) * U[:, 1]
            v = math.cos(0.02 * t) * V[:, 0] + math.sin(0.02 * t) * V[:, 1]
            G = 10 * torch.outer(u, v) + noise
        elif kind == "flipping":  # G_t = (-1)^t G: one subspace, the sign of a singular vector alternates
            G = (-1) ** t * fixed
        else:
            raise ValueError(kind)
        grads.append(G.to(dtype))
    return grads


def qgalore_refresh_steps(grads, gap, cos_threshold=0.4, gamma_proj=2, queue_size=5):
    """The updates at which q-galore-torch 1.0 takes an SVD of this layer's gradient (transcribed, see above)."""
    steps, queue, past = [], [], None
    for it, G in enumerate(grads):
        if past is None or it % gap == 0:
            U, _, Vh = torch.linalg.svd(G, full_matrices=False)
            leading = Vh[0] if G.shape[0] >= G.shape[1] else U[:, 0]
            steps.append(it)
            if past is not None:
                if len(queue) == queue_size:
                    queue.pop(0)
                queue.append(F.cosine_similarity(past, leading, dim=0).item())
                if len(queue) == queue_size and sum(queue) / queue_size >= cos_threshold:
                    gap = int(gap * gamma_proj)
            past = leading.clone()
    return steps


def our_refresh_steps(grads, rule, field, **policy):
    """ProjectedAdamW + RefreshSchedule driven as the callback drives them: {layer: refresh steps}."""
    dtype = grads["tall"][0].dtype
    weights = {name: nn.Parameter(torch.zeros(shape, dtype=dtype)) for name, shape in SHAPES.items()}
    opt = ProjectedAdamW(list(weights.values()), rank=RANK, projector="svd", svd_signs="none")
    opt.external_schedule()
    schedule = RefreshSchedule(RefreshPolicy(adaptive=True, rule=rule, **policy))
    steps = {name: [] for name in SHAPES}
    for t in range(len(grads["tall"])):
        due = [w for name, w in weights.items() if "step" in opt.state[w] and schedule.is_due(name, t)]
        opt.request_refresh(due)
        for name, w in weights.items():
            w.grad = grads[name][t]
        opt.step()
        for name, w in weights.items():
            if w in opt.last_refreshes:
                info = opt.last_refreshes[w]
                steps[name].append(info.step)
                schedule.record(name, info.step, getattr(info, field), info.seconds)
    return steps


@pytest.mark.parametrize("kind", KINDS)
def test_qgalore_rule_refreshes_exactly_when_the_transcribed_reference_does(kind):
    # 300 updates: on the stable stream the gap grows 3 -> 192 (past our rule's cap of 16 x 3); on the drifting one
    # it stops at 96 once the queue holds cos(0.02 * 96) < 0; on the flipping one the tall weight's signed cosine
    # is -1 at every refresh, so its gap never grows, while the wide weight's is +1.
    grads = {name: stream(kind, shape, 300) for name, shape in SHAPES.items()}
    policy = dict(every=3, queue_size=3, cos_threshold=0.4, gamma_proj=2)
    expected = {name: qgalore_refresh_steps(grads[name], 3, 0.4, 2, 3) for name in SHAPES}
    assert our_refresh_steps(grads, "qgalore", "leading_cosine", **policy) == expected
    # The streams tell the two rules apart, so this is not a comparison that any schedule passes.
    if kind != "noisy":
        assert our_refresh_steps(grads, "lazy", "leading_similarity", **policy) != expected


def test_the_optimizer_reports_the_signed_leading_cosine():
    grads = {name: stream("flipping", shape, 4) for name, shape in SHAPES.items()}
    weights = {name: nn.Parameter(torch.zeros(shape, dtype=torch.float64)) for name, shape in SHAPES.items()}
    opt = ProjectedAdamW(list(weights.values()), rank=RANK, projector="svd", update_gap=1, svd_signs="none")
    for t in range(2):
        for name, w in weights.items():
            w.grad = grads[name][t]
        opt.step()
    for name, w in weights.items():
        U, _, Vh = torch.linalg.svd(grads[name][0], full_matrices=False)
        U1, _, Vh1 = torch.linalg.svd(grads[name][1], full_matrices=False)
        a, b = (Vh[0], Vh1[0]) if name == "tall" else (U[:, 0], U1[:, 0])
        info = opt.last_refreshes[w]
        assert info.leading_cosine == pytest.approx(float(a @ b), abs=1e-12)
        assert info.leading_similarity == pytest.approx(abs(float(a @ b)), abs=1e-12)


# -- through the Trainer: the callback's wiring, its defaults, and a resumed run ----------------------------------


class StreamNet(L.LightningModule):
    """One bias-free linear per stream, named like it, whose gradient at update t is exactly grads[name][t] (the
    loss is linear in W). t is the global step, so a resumed run (whose dataloader starts over) gets the same."""

    def __init__(self, grads):
        super().__init__()
        self.grads = grads
        for name, stream_ in grads.items():
            m, n = stream_[0].shape
            setattr(self, name, nn.Linear(n, m, bias=False))

    def training_step(self, batch, batch_idx):
        return sum((getattr(self, name).weight * grads[self.global_step]).sum() for name, grads in self.grads.items())

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(len(next(iter(self.grads.values()))))), batch_size=1)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class RefreshSteps(Callback):
    def __init__(self):
        self.steps = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        names = {p: n.split(".")[0] for n, p in pl_module.named_parameters()}
        for p, info in trainer.optimizers[0].last_refreshes.items():
            self.steps.setdefault(names[p], []).append(info.step)


def fit_stream(grads, refresh, ckpt_path=None, callbacks=(), **trainer_kwargs):
    """Train StreamNet(grads) in float64 under ``refresh``: {layer: refresh steps}."""
    log = RefreshSteps()
    trainer = L.Trainer(
        strategy=LowRankStrategy(rank=RANK, memory_report=False, target_modules=tuple(grads), svd_signs="none"),
        max_steps=len(next(iter(grads.values()))),
        callbacks=[refresh, log, *callbacks],
        precision="64-true",
        **{**QUIET, **trainer_kwargs},
    )
    trainer.fit(StreamNet(grads), ckpt_path=ckpt_path)
    return log.steps


def test_the_callback_with_rule_qgalore_matches_the_reference():
    # G_t = (-1)^t G: the SVD flips the sign of the tall weight's leading right singular vector with G's sign, so
    # its signed cosine is -1 at every refresh (gap odd) and its gap stays 3; the wide weight's gap grows.
    grads = {name: stream("flipping", shape, 100) for name, shape in SHAPES.items()}
    steps = fit_stream(grads, SubspaceRefresh(every=3, adaptive=True, rule="qgalore", queue_size=3))
    assert steps == {name: qgalore_refresh_steps(grads[name], 3, queue_size=3) for name in SHAPES}
    assert len(steps["tall"]) == 34 and steps["wide"] == [0, 3, 6, 9, 12, 24, 48, 96]


def test_the_default_adaptive_rule_adapts_on_a_stable_gradient_and_not_on_noise():
    # Rank 4 on a rank-1 signal: the leading direction is stable, the 3 others are noise. A fixed gap of 5 does 40
    # refreshes in 200 updates. The default (|cos| of the leading directions, queue 5, threshold 0.4) doubles the
    # stable layer's gap at its refreshes 25, 75 and 175: 16 refreshes. On i.i.d. gradients |cos| ~ 0.1: 40.
    grads = {kind: stream(kind, SHAPES["tall"], 200) for kind in ("stable", "noisy")}
    grads["stable_wide"] = stream("stable", SHAPES["wide"], 200)
    refresh = SubspaceRefresh(every=5, adaptive=True)
    counts = {name: len(steps) for name, steps in fit_stream(grads, refresh).items()}
    assert counts == {"stable": 16, "noisy": 40, "stable_wide": 16}
    assert refresh.schedule.layers["stable"].gap == 40 and refresh.schedule.layers["noisy"].gap == 5


def test_principal_angles_do_not_adapt_on_a_rank_one_signal_at_rank_four():
    # Why "leading" became the default: the mean squared cosine of all 4 principal angles stays near 1/4 + noise.
    grads = {"stable": stream("stable", SHAPES["tall"], 200)}
    steps = fit_stream(grads, SubspaceRefresh(every=5, adaptive=True, similarity="principal"))
    assert len(steps["stable"]) == 40


@pytest.mark.parametrize("rule", ["lazy", "qgalore"])
def test_a_resumed_run_continues_the_same_schedule(rule, tmp_path):
    grads = {name: stream("stable", shape, 60) for name, shape in SHAPES.items()}

    def refresh():
        return SubspaceRefresh(every=2, adaptive=True, rule=rule, queue_size=2)

    def untimed(callback):  # wall-clock seconds differ between runs; nothing else may
        state = callback.state_dict()
        return {**state, "layers": {name: {**layer, "seconds": 0.0} for name, layer in state["layers"].items()}}

    full = refresh()
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=10, save_top_k=-1, filename="{step}")
    steps = fit_stream(grads, full, callbacks=[ckpt], enable_checkpointing=True, default_root_dir=tmp_path)
    saved = torch.load(tmp_path / "step=10.ckpt", weights_only=False)["callbacks"]
    saved = next(state for key, state in saved.items() if key.startswith("SubspaceRefresh"))
    assert saved["rule"] == rule and any(layer["history"] for layer in saved["layers"].values())  # mid-queue
    resumed = refresh()
    rest = fit_stream(grads, resumed, ckpt_path=str(tmp_path / "step=10.ckpt"))
    assert rest == {name: [s for s in steps[name] if s >= 10] for name in SHAPES}
    assert untimed(resumed) == untimed(full)
    if rule == "qgalore":
        assert steps == {name: qgalore_refresh_steps(grads[name], 2, queue_size=2) for name in SHAPES}


# -- the real q-galore-torch, where it is installed (it is not a dependency) -------------------------------------


def _qgalore_projector_class():
    """q-galore-torch's ``GaLoreProjector``, loaded from its file: the package's __init__ needs bitsandbytes."""
    spec = importlib.util.find_spec("q_galore_torch")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("q-galore-torch is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "q_galore_projector.py"
    if not path.is_file():
        pytest.skip(f"q-galore-torch has no {path.name}")
    module_spec = importlib.util.spec_from_file_location("_q_galore_projector", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.GaLoreProjector


@pytest.mark.parametrize("kind", KINDS)
def test_rule_qgalore_matches_q_galore_torch_itself(kind):
    GaLoreProjector = _qgalore_projector_class()
    # float32: q-galore-torch takes its SVD in float32 whatever the gradient's dtype.
    grads = {name: stream(kind, shape, 300, dtype=torch.float32) for name, shape in SHAPES.items()}
    expected = {}
    for name in SHAPES:
        projector = GaLoreProjector(RANK, update_proj_gap=3, cos_threshold=0.4, gamma_proj=2, queue_size=3)
        expected[name] = []
        for it, G in enumerate(grads[name]):
            count = projector.svd_count
            projector.project(G, it)
            if projector.svd_count > count:
                expected[name].append(it)
    assert our_refresh_steps(grads, "qgalore", "leading_cosine", every=3, queue_size=3) == expected
