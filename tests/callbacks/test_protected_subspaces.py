"""ProtectedSubspaces through the Trainer: the callback picks k per layer and decomposes, the optimizer confines.

Exactness is stated against float32 rounding: after a task, U_kᵀ W V_k equals diag(S_k) of the task's start to
2e-6 x S_1 (about 16 float32 epsilons of the largest singular value; measured ~3e-8), where an unprotected run moves
it by more than 1e-3 x S_1.
"""

import io
import math
import sys
from datetime import timedelta
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lowrank import LowRankDDPStrategy, LowRankFSDPStrategy, LowRankStrategy, ProtectedSubspaces
from tests.models import QUIET, TinyNet

LAYERS = ("attn", "mlp")  # TinyNet's targets by default (lm_head is a head); both 40 x 24 or 24 x 40: min 24
TOL = 2e-6


class GappedNet(TinyNet):
    """TinyNet whose targeted weights have a clear gap after their 12th singular value (2 .. 1, then 0.3 .. 0.1), so a
    short task cannot lift a complement direction above a protected one; AdamW with weight decay 0.1."""

    def __init__(self, lr=1e-3, **kwargs):
        super().__init__(lr=lr, scheduler=None, **kwargs)
        g = torch.Generator().manual_seed(1)
        for layer in (self.attn, self.mlp):
            m, n = layer.weight.shape
            U = torch.linalg.qr(torch.randn(m, 24, generator=g)).Q
            V = torch.linalg.qr(torch.randn(n, 24, generator=g)).Q
            S = torch.cat([torch.linspace(2, 1, 12), torch.linspace(0.3, 0.1, 12)])
            layer.weight.data.copy_(U @ torch.diag(S) @ V.T)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.1)


class Snapshots(Callback):
    """The targeted weights at the start of training (after the callback protected them) and at its end."""

    def on_train_start(self, trainer, pl_module):
        self.start = {n: pl_module.get_submodule(n).weight.detach().clone() for n in LAYERS}

    def on_train_end(self, trainer, pl_module):
        self.end = {n: pl_module.get_submodule(n).weight.detach().clone() for n in LAYERS}


def _fit(model, callbacks, strategy=None, max_steps=6, ckpt_path=None, **kwargs):
    strategy = strategy or LowRankStrategy(rank=8, memory_report=False)
    trainer = L.Trainer(strategy=strategy, max_steps=max_steps, callbacks=callbacks, **{**QUIET, **kwargs})
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer


def _core_error(start, end, k):
    """max |U_kᵀ W_end V_k - diag(S_k)| / S_1, with U, S, V from the start of the task (float64)."""
    U, S, Vh = torch.linalg.svd(start.double())
    core = U[:, :k].T @ end.double() @ Vh[:k].T
    return ((core - torch.diag(S[:k])).abs().max() / S[0]).item()


# -- construction and setup errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(ratio=-0.1), r"ratio must be a number in \[0, 1\], got -0.1"),
        (dict(ratio=1.5), r"ratio must be a number in \[0, 1\], got 1.5"),
        (dict(ratio=True), r"ratio must be a number in \[0, 1\], got True"),
        (dict(ratio="0.5"), r"ratio must be a number in \[0, 1\], got '0.5'"),
        (dict(schedule="cosine"), r"schedule must be one of 'uniform', 'progressive', 'adaptive', got 'cosine'"),
        (dict(progressive_step=2), r"progressive_step must be a number in \[0, 1\], got 2"),
        (dict(min_ratio=0.6, target_ratio=0.5), r"min_ratio \(0.6\) must not exceed target_ratio \(0.5\)"),
        (dict(target_ratio=-1), r"target_ratio must be a number in \[0, 1\]"),
        (dict(importance_batches=0), r"importance_batches must be an int >= 1, got 0"),
        (dict(importance_batches=2.0), r"importance_batches must be an int >= 1, got 2.0"),
        (dict(target_modules=[]), r"target_modules must name at least one pattern"),
        (dict(exclude=[""]), r"exclude entries must be non-empty strings"),
        (dict(bits=16), r"bits must be None \(float32 bases\), 8 or 4, got 16"),
        (dict(bits=8.0), r"bits must be None \(float32 bases\), 8 or 4, got 8.0"),
        (dict(bits=True), r"bits must be None \(float32 bases\), 8 or 4, got True"),
    ],
)
def test_bad_arguments_are_refused_when_built(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ProtectedSubspaces(**kwargs)


def test_a_pattern_that_matches_nothing_names_the_candidates():
    candidates = r"the candidates are: attn, embed, lm_head, mlp$"
    with pytest.raises(
        ValueError, match=r"ProtectedSubspaces target_modules pattern 'q_proj' matches no.*" + candidates
    ):
        _fit(TinyNet(scheduler=None), [ProtectedSubspaces(target_modules=["q_proj"])])
    with pytest.raises(ValueError, match=r"ProtectedSubspaces exclude pattern 'ffn' matches no module"):
        _fit(TinyNet(scheduler=None), [ProtectedSubspaces(exclude="ffn")])


def test_an_optimizer_that_cannot_confine_is_refused_at_fit_start():
    with pytest.raises(ValueError, match=r"attn, mlp are not in one.*LowRankStrategy\(rank=None\)"):
        _fit(TinyNet(scheduler=None), [ProtectedSubspaces()], strategy="auto")


def test_sharded_strategies_and_layerwise_are_refused_at_setup():
    trainer = SimpleNamespace(strategy=LowRankFSDPStrategy())  # FSDP2 needs GPUs to run; setup is what refuses
    with pytest.raises(ValueError, match=r"does not support LowRankFSDPStrategy yet.*'lowrank_ddp'"):
        ProtectedSubspaces().setup(trainer, TinyNet(), "fit")
    with pytest.raises(ValueError, match=r"does not support layerwise=True yet"):
        _fit(TinyNet(scheduler=None), [ProtectedSubspaces()], LowRankStrategy(rank=8, layerwise=True))


# -- k per schedule --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "schedule,ranks",
    [
        ("uniform", [12, 12, 12]),  # floor(0.5 x 24)
        ("progressive", [12, 13, 15]),  # floor((0.5 + 0.07 t) x 24): 12, 13.68, 15.36
    ],
)
def test_ranks_over_three_fits(schedule, ranks):
    torch.manual_seed(0)
    model, callback = TinyNet(scheduler=None), ProtectedSubspaces(ratio=0.5, schedule=schedule)
    for task, k in enumerate(ranks):
        trainer = _fit(model, [callback], max_steps=2)
        assert callback.task == task
        assert callback.ranks == dict.fromkeys(LAYERS, k)
        opt = trainer.optimizers[0]
        assert [opt.protected_rank(getattr(model, n).weight) for n in LAYERS] == [k, k]
        assert opt.protected_rank(model.lm_head.weight) == 0  # the head trains as usual
    assert callback.state_dict()["task"] == 2 and callback.state_dict()["in_task"] is False


def _rotation(d, degrees):
    """Rotates each coordinate pair by ``degrees``: cos(x, Rx) = cos(degrees) for every x."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return torch.block_diag(*[torch.tensor([[c, -s], [s, c]])] * (d // 2))


class KnownSimilarity(L.LightningModule):
    """Layers whose input-output cosine similarity is known for any input: a (identity) 1, b (60 degrees) 0.5,
    c (90 degrees) 0, d (8 -> 4, the first 4 coordinates) 1 on its first min(m, n) = 4 coordinates. lr=0: the
    weights, and with them the similarities, stay as built."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (nn.Linear(8, 8, bias=False) for _ in range(3))
        self.d = nn.Linear(8, 4, bias=False)
        for layer, weight in ((self.a, torch.eye(8)), (self.b, _rotation(8, 60)), (self.c, _rotation(8, 90))):
            layer.weight.data.copy_(weight)
        self.d.weight.data.copy_(torch.eye(8)[:4])

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.d(self.c(self.b(self.a(x)))).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(32, 8, generator=torch.Generator().manual_seed(0))), batch_size=4)


def _full_state():
    return LowRankStrategy(rank=None, memory_report=False)  # 8 x 8 layers: nothing worth projecting


def test_adaptive_ranks_follow_the_measured_similarity():
    model = KnownSimilarity()
    callback = ProtectedSubspaces(ratio=0.5, schedule="adaptive", min_ratio=0.1, target_ratio=0.5, importance_batches=3)
    _fit(model, [callback], _full_state(), max_steps=8)
    assert callback.ranks == {"a": 4, "b": 4, "c": 4, "d": 2}  # the first task: the uniform ratio
    assert len(callback.state_dict()["window_sums"]) == 3  # the last 3 batches
    buffer = io.BytesIO()
    torch.save(callback.state_dict(), buffer)
    buffer.seek(0)
    callback = ProtectedSubspaces(schedule="adaptive", min_ratio=0.1, target_ratio=0.5)  # as in a new process
    callback.load_state_dict(torch.load(buffer, weights_only=True))
    trainer = _fit(model, [callback], _full_state(), max_steps=2)
    # raw (1, 0.5, 0, 1), mean 0.625 -> I = (1.6, 0.8, 0, 1.6); ratio 0.1 + 0.4 I = (0.74, 0.42, 0.1, 0.74)
    assert callback.importance == pytest.approx({"a": 1.6, "b": 0.8, "c": 0.0, "d": 1.6}, abs=1e-5)
    assert callback.ranks == {"a": 5, "b": 3, "c": 0, "d": 2}  # floor of 5.92, 3.36, 0.8, 2.96
    opt = trainer.optimizers[0]
    assert [opt.protected_rank(getattr(model, n).weight) for n in "abcd"] == [5, 3, 0, 2]


def test_adaptive_without_a_measured_task_raises_at_fit_start():
    model, uniform = KnownSimilarity(), ProtectedSubspaces(schedule="uniform")
    _fit(model, [uniform], _full_state(), max_steps=2)
    adaptive = ProtectedSubspaces(schedule="adaptive")
    adaptive.load_state_dict(uniform.state_dict())  # task 0 ran, but nothing measured it
    with pytest.raises(ValueError, match=r"task 1's ranks from each layer's importance.*none were recorded"):
        _fit(model, [adaptive], _full_state(), max_steps=2)


def test_a_layer_whose_k_reaches_min_side_warns_and_is_frozen():
    torch.manual_seed(0)
    model, snap = TinyNet(scheduler=None), Snapshots()
    with pytest.warns(UserWarning, match=r"task 0 protects every direction of attn \(40, 24\), mlp \(24, 40\).*frozen"):
        _fit(model, [ProtectedSubspaces(ratio=1.0), snap], max_steps=3)
    for name in LAYERS:
        assert torch.equal(snap.start[name], snap.end[name]), name


# -- exactness, with and without low-rank state ----------------------------------------------------------------------


@pytest.mark.parametrize("rank", [8, None])
@pytest.mark.parametrize("protect", [True, False])
def test_protected_singular_triples_are_unchanged(rank, protect):
    torch.manual_seed(0)
    model, snap = GappedNet(), Snapshots()
    callbacks = [ProtectedSubspaces(ratio=0.5), snap] if protect else [snap]
    trainer = _fit(model, callbacks, LowRankStrategy(rank=rank, memory_report=False), max_steps=10)
    assert len(trainer.optimizers[0].projected_params()) == (2 if rank else 0)
    for name in LAYERS:
        start, end, k = snap.start[name], snap.end[name], 12
        assert (end - start).norm() > 1e-2 * start.norm(), "the weight trained"
        if not protect:  # the control: what the check below would see without protection
            assert _core_error(start, end, k) > 1e-3
            continue
        assert _core_error(start, end, k) < TOL, name
        U0, S0, Vh0 = torch.linalg.svd(start.double())
        U1, S1, Vh1 = torch.linalg.svd(end.double())
        assert ((S1[:k] - S0[:k]).abs() / S0[:k]).max() < 1e-5  # still the top k, with their values
        assert (1 - (U1[:, :k] * U0[:, :k]).sum(0).abs()).max() < 1e-6  # and their vectors, up to sign
        assert (1 - (Vh1[:k] * Vh0[:k]).sum(1).abs()).max() < 1e-6


def _quantized_bytes(elements: int, bits: int) -> int:
    """One side's bytes in ``bits``, written out: groups of min(256, elements), the last padded; 1 or 1/2 byte a code,
    a float32 scale and zero a group."""
    group = min(256, elements)
    groups = math.ceil(elements / group)
    return groups * group * bits // 8 + groups * 8


@pytest.mark.parametrize("bits", [8, 4])
def test_bits_reach_the_optimizer_and_shrink_the_reported_bases(bits):
    reported = {}
    for b in (None, bits):
        torch.manual_seed(0)
        model = GappedNet()
        trainer = _fit(model, [ProtectedSubspaces(ratio=0.5, bits=b)], max_steps=2)
        opt = trainer.optimizers[0]
        for name in LAYERS:
            state = opt.state[getattr(model, name).weight]
            assert opt.protected_rank(getattr(model, name).weight) == 12
            assert ("protect_u_codes" in state and "protect_u" not in state) == (b is not None), name
        reported[b] = trainer.strategy.memory_report().state_by_kind["protected_bases"]
    # Each of attn (40 x 24) and mlp (24 x 40) keeps a 40 x 12 and a 24 x 12 basis (k = 12, less than half a side).
    assert reported[None] == 2 * (40 + 24) * 12 * 4
    assert reported[bits] == 2 * (_quantized_bytes(40 * 12, bits) + _quantized_bytes(24 * 12, bits) + 8)  # + k
    assert reported[bits] < (0.35 if bits == 8 else 0.2) * reported[None]  # 34.6%, 18.0%: small sides pad a group


# -- tasks, checkpoints ----------------------------------------------------------------------------------------------


class CountDecompositions(ProtectedSubspaces):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.decompositions = 0

    def _decompose(self, weight, k):
        self.decompositions += 1
        return super()._decompose(weight, k)


def test_a_resumed_task_keeps_its_bases_bit_for_bit(tmp_path):
    torch.manual_seed(0)
    whole = GappedNet()
    _fit(whole, [ProtectedSubspaces(schedule="progressive")], max_steps=8)

    torch.manual_seed(0)
    first = GappedNet()
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)
    _fit(first, [ProtectedSubspaces(schedule="progressive"), saver], max_steps=4, enable_checkpointing=True)
    (ckpt,) = tmp_path.glob("*step=4.ckpt")
    saved = torch.load(ckpt, weights_only=True)  # the bases are tensors in the optimizer state, the rest primitives
    assert saved["callbacks"]["ProtectedSubspaces"]["in_task"] is True

    torch.manual_seed(0)
    resumed, callback = GappedNet(), CountDecompositions(schedule="progressive")
    trainer = _fit(resumed, [callback], max_steps=8, ckpt_path=str(ckpt))
    assert callback.decompositions == 0 and callback.task == 0  # the same task, its bases from the checkpoint
    assert [trainer.optimizers[0].protected_rank(getattr(resumed, n).weight) for n in LAYERS] == [12, 12]
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(a, b)  # a recomputed decomposition would differ at rounding level

    # A checkpoint written after the task ended starts the next task (the progression goes on) ...
    trainer.save_checkpoint(tmp_path / "done.ckpt")
    after = CountDecompositions(schedule="progressive")
    _fit(GappedNet(), [after], max_steps=10, ckpt_path=str(tmp_path / "done.ckpt"))
    assert after.task == 1 and after.ranks == dict.fromkeys(LAYERS, 13) and after.decompositions == 2
    # ... and so does a mid-task one after start_task().
    again = CountDecompositions(schedule="progressive")
    again.start_task()
    _fit(GappedNet(), [again], max_steps=6, ckpt_path=str(ckpt))
    assert again.task == 1 and again.decompositions == 2


class SwitchData(Callback):
    def __init__(self, protected, at):
        self.protected, self.at = protected, at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            self.protected.start_task()
            self.start = {n: pl_module.get_submodule(n).weight.detach().clone() for n in LAYERS}


def test_start_task_inside_a_fit_protects_the_current_weights():
    torch.manual_seed(0)
    model, snap = GappedNet(lr=1e-4), Snapshots()
    callback = ProtectedSubspaces(ratio=0.25, schedule="progressive", progressive_step=0.25)
    switch = SwitchData(callback, at=3)
    _fit(model, [callback, switch, snap], max_steps=6)
    assert callback.task == 1 and callback.ranks == dict.fromkeys(LAYERS, 12)  # floor(0.5 x 24)
    for name in LAYERS:
        assert _core_error(switch.start[name], snap.end[name], 12) < TOL
        assert not torch.equal(switch.start[name], snap.start[name])  # new bases, from the weights at the switch


# -- DDP -------------------------------------------------------------------------------------------------------------


class FlipOnRankOne(ProtectedSubspaces):
    """Rank 1's decompositions come out with flipped signs (a valid SVD too): ranks agree only if one rank's result
    reaches the other."""

    def _decompose(self, weight, k):
        U, V = super()._decompose(weight, k)
        return (-U, -V) if self._trainer.global_rank == 1 else (U, V)


class SaveRankState(Callback):
    """Each worker writes the targets' optimizer state at both task starts' ends of training, and what the callback
    decided; the test compares the ranks' files."""

    def __init__(self, out_dir, protected):
        self.out_dir, self.protected = out_dir, protected

    def _state(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        return {n: {k: v.clone() for k, v in opt.state[getattr(pl_module, n).weight].items()} for n in LAYERS}

    def on_train_start(self, trainer, pl_module):
        self.start = self._state(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        record = {"start": self.start, "end": self._state(trainer, pl_module), "importance": self.protected.importance}
        torch.save({**record, "ranks": self.protected.ranks}, f"{self.out_dir}/rank{trainer.global_rank}.pt")


@pytest.mark.skipif(sys.platform == "win32", reason="fork start method")
def test_ddp_ranks_hold_the_same_bases_and_importance(tmp_path):
    """Two tasks in one fit (start_task at step 3), adaptive: each rank measures its own shard of the data, so only the
    all-reduce makes the importances, and with them the ranks, agree; the flipped signs, only the broadcast."""
    torch.manual_seed(0)
    strategy = LowRankDDPStrategy(rank=8, start_method="fork", timeout=timedelta(seconds=120), memory_report=False)
    protected = FlipOnRankOne(schedule="adaptive", importance_batches=2, min_ratio=0.0, target_ratio=0.2)
    callbacks = [protected, SwitchData(protected, at=3), SaveRankState(str(tmp_path), protected)]
    trainer = L.Trainer(strategy=strategy, max_steps=5, callbacks=callbacks, **{**QUIET, "devices": 2})
    trainer.fit(TinyNet(scheduler=None, n=128))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["importance"].keys() == set(LAYERS) and r0["importance"] == r1["importance"]
    assert r0["ranks"] == r1["ranks"] and r0["ranks"]["attn"] > 0  # (mlp's similarity is negative: k = 0)
    for when in ("start", "end"):  # task 0: attn decomposed on rank 0, mlp on rank 1; task 1: attn on rank 0
        for name in LAYERS:
            assert r0[when][name].keys() == r1[when][name].keys()
            for key in r0[when][name]:
                assert torch.equal(r0[when][name][key], r1[when][name][key]), (when, name, key)
