"""Resuming after a change: another rank or projector, a dense checkpoint, and back to dense (issue 15).

Every expected number is computed here with plain dense torch math from the checkpoint's own tensors (P, m, v), not
by the code under test.
"""

import copy
import math
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_lowrank import LowRankStrategy, ProjectedAdamW, to_dense_checkpoint
from lightning_lowrank.__main__ import main
from tests.models import QUIET, TinyNet

ATTN, MLP = 1, 3  # optimizer indices of attn.weight (64 x 24: P on the right) and mlp.weight (24 x 64: on the left)


class FirstStep(Callback):
    """The optimizer's state and groups at the first step of a fit, before its update (after the restore), and the
    losses of every step."""

    def __init__(self):
        self.state, self.groups, self.losses = None, None, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.state is None:
            params = list(pl_module.parameters())
            self.state = [{k: v.detach().clone() for k, v in optimizer.state[p].items()} for p in params]
            self.groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def _fit(strategy, max_steps, root, ckpt_path=None, save=False):
    torch.manual_seed(0)
    model, first = TinyNet(scheduler="step", width=24, hidden=64), FirstStep()
    callbacks = [first]
    if save:
        callbacks.append(ModelCheckpoint(dirpath=root, every_n_train_steps=4, save_top_k=-1, filename="{step}"))
    trainer = L.Trainer(
        strategy=strategy,
        max_steps=max_steps,
        callbacks=callbacks,
        default_root_dir=root,
        **{**QUIET, "enable_checkpointing": save},
    )
    trainer.fit(model, ckpt_path=ckpt_path)
    return first, trainer


def _saved(path):
    return torch.load(path, weights_only=True)["optimizer_states"][0]


@pytest.fixture(scope="module")
def rank8_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("rank8")
    _fit(LowRankStrategy(rank=8, memory_report=False), 4, root, save=True)
    return root / "step=4.ckpt"


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    _fit("auto", 4, root, save=True)
    return root / "step=4.ckpt"


def _span(P):
    """The orthogonal projector onto P's columns: equal for two bases of one subspace, whatever their signs."""
    return P @ P.T


def _top_singular(G, r, left):
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return (U[:, :r] if left else Vh[:r].T).float()


def _dct2(n):
    """The orthonormal DCT-II basis (columns), from its formula."""
    j, k = torch.arange(n, dtype=torch.float64)[:, None], torch.arange(n, dtype=torch.float64)[None, :]
    B = math.sqrt(2 / n) * torch.cos(math.pi * k * (2 * j + 1) / (2 * n))
    B[:, 0] /= math.sqrt(2)
    return B.float()


def _close(a, b, tol=1e-5):
    assert a.shape == b.shape, (a.shape, b.shape)
    assert (a - b).norm() <= tol * (1 + b.norm()), (a - b).norm()


@pytest.mark.parametrize("rank,what", [(4, "truncated to rank 4"), (16, "zero-padded to rank 16")])
def test_a_changed_rank_resumes_in_it_with_the_moments_truncated_or_padded(tmp_path, rank8_ckpt, rank, what):
    saved = _saved(rank8_ckpt)
    with pytest.warns(UserWarning, match=rf"rank 8 -> {rank} \(2 layer\(s\): attn.weight, mlp.weight\)") as seen:
        first, trainer = _fit(LowRankStrategy(rank=rank, memory_report=False), 6, tmp_path, ckpt_path=rank8_ckpt)
    assert any(what in str(w.message) and "moments='keep'" in str(w.message) for w in seen)
    keep = min(rank, 8)
    for index, left in ((ATTN, False), (MLP, True)):
        old, new = saved["state"][index], first.state[index]
        m_old = old["exp_avg"][:keep] if left else old["exp_avg"][:, :keep]
        m_new = new["exp_avg"][:keep] if left else new["exp_avg"][:, :keep]
        assert new["exp_avg"].shape == ((rank, 64) if left else (64, rank))
        assert torch.equal(m_new, m_old)  # moments='keep': the coordinates as they were, cut or zero-padded
        assert not (new["exp_avg"][keep:] if left else new["exp_avg"][:, keep:]).any()
        assert new["proj"].shape == (24, rank) and torch.equal(new["step"], old["step"])
        G = old["proj"] @ old["exp_avg"] if left else old["exp_avg"] @ old["proj"].T  # the saved momentum, full size
        if rank < 8:  # chosen from it: its top singular subspace
            _close(_span(new["proj"]), _span(_top_singular(G, rank, left)))
        else:  # it holds all of the saved subspace
            _close(_span(new["proj"]) @ old["proj"], old["proj"])
    # torch's hyperparameters from the checkpoint (StepLR stepped 4 times), the low-rank ones from the strategy.
    assert first.groups[0]["lr"] == saved["param_groups"][0]["lr"] == pytest.approx(1e-2 * 0.8**2)
    assert first.groups[0]["rank"] == rank == trainer.optimizers[0].layer_rank(trainer.lightning_module.attn.weight)
    assert len(first.losses) == 2 and all(math.isfinite(x) for x in first.losses)


def test_a_changed_projector_rotates_the_moments_into_the_new_subspace(tmp_path, rank8_ckpt):
    saved = _saved(rank8_ckpt)
    strategy = LowRankStrategy(rank=8, projector="dct", moments="rotate", memory_report=False)
    with pytest.warns(UserWarning, match=r"projector 'svd' -> 'dct' \(2 layer\(s\).*moments='rotate'"):
        first, _ = _fit(strategy, 6, tmp_path, ckpt_path=rank8_ckpt)
    B = _dct2(24)
    for index, left in ((ATTN, False), (MLP, True)):
        old, new = saved["state"][index], first.state[index]
        assert "proj" not in new and new["proj_idx"].shape == (8,)
        P_old, P_new = old["proj"], B[:, new["proj_idx"]]
        R = P_old.T @ P_new
        if left:
            _close(new["exp_avg"], R.T @ old["exp_avg"])
            _close(new["exp_avg_sq"], R.square().T @ old["exp_avg_sq"])
        else:
            _close(new["exp_avg"], old["exp_avg"] @ R)
            _close(new["exp_avg_sq"], old["exp_avg_sq"] @ R.square())
        # The 8 DCT columns that hold the most of the saved momentum's energy.
        G = P_old @ old["exp_avg"] if left else old["exp_avg"] @ P_old.T
        energy = (B.T @ G).square().sum(1) if left else (G @ B).square().sum(0)
        assert set(new["proj_idx"].tolist()) == set(energy.topk(8).indices.tolist())
    assert all(math.isfinite(x) for x in first.losses)


def test_a_dense_adamw_checkpoint_resumes_with_its_moments_projected(tmp_path, dense_ckpt):
    saved = _saved(dense_ckpt)
    assert "rank" not in saved["param_groups"][0]
    with pytest.warns(UserWarning, match=r"dense -> rank 4, projector 'svd' \(2 layer\(s\): attn.weight, mlp.weight"):
        first, trainer = _fit(LowRankStrategy(rank=4, memory_report=False), 8, tmp_path, ckpt_path=dense_ckpt)
    for index, left in ((ATTN, False), (MLP, True)):
        m, v, new = saved["state"][index]["exp_avg"], saved["state"][index]["exp_avg_sq"], first.state[index]
        P = new["proj"]
        _close(_span(P), _span(_top_singular(m, 4, left)))  # the first subspace: the momentum's top singular one
        _close(new["exp_avg"], P.T @ m if left else m @ P)
        _close(new["exp_avg_sq"], P.square().T @ v if left else v @ P.square())
        assert torch.equal(new["step"], saved["state"][index]["step"])
    for index in (0, 2, 7):  # dense parameters: as saved
        assert all(torch.equal(first.state[index][k], saved["state"][index][k]) for k in saved["state"][index])
    assert first.groups[0]["rank"] == 4 and first.groups[0]["projector"] == "svd"
    assert len(first.losses) == 4 and all(math.isfinite(x) for x in first.losses)
    assert trainer.optimizers[0].state[trainer.lightning_module.attn.weight]["exp_avg"].shape == (64, 4)


def _lowrank_to_dense_round_trip(tmp_path, convert):
    _fit(LowRankStrategy(rank=4, memory_report=False), 4, tmp_path / "lowrank", save=True)
    lowrank = tmp_path / "lowrank" / "step=4.ckpt"
    dense = tmp_path / "dense.ckpt"
    convert(lowrank, dense)
    saved, converted = _saved(lowrank), _saved(dense)  # weights_only=True loads it
    assert not {"rank", "projector", "lowrank_mask", "rule", "moments", "nonfinite_steps"} & set(
        converted["param_groups"][0]
    )
    assert converted["param_groups"][0]["lr"] == saved["param_groups"][0]["lr"]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*size.*")
        first, trainer = _fit("auto", 6, tmp_path / "resumed", ckpt_path=dense)
    assert type(trainer.optimizers[0]) is torch.optim.AdamW
    for index, left in ((ATTN, False), (MLP, True)):
        old, new = saved["state"][index], first.state[index]
        P = old["proj"]
        assert set(new) == {"step", "exp_avg", "exp_avg_sq"}
        _close(new["exp_avg"], P @ old["exp_avg"] if left else old["exp_avg"] @ P.T)
        _close(new["exp_avg_sq"], P.square() @ old["exp_avg_sq"] if left else old["exp_avg_sq"] @ P.square().T)
        assert torch.equal(new["step"], old["step"])
    for index in (0, 2, 7):
        assert all(torch.equal(first.state[index][k], saved["state"][index][k]) for k in saved["state"][index])
    assert len(first.losses) == 2 and all(math.isfinite(x) for x in first.losses)


def test_to_dense_checkpoint_resumes_in_plain_adamw(tmp_path):
    _lowrank_to_dense_round_trip(tmp_path, lambda src, out: to_dense_checkpoint(src, out))


def test_the_to_dense_command_writes_the_same_checkpoint(tmp_path, capsys):
    def convert(src, out):
        assert main(["to-dense", str(src), str(out)]) == 0
        assert "2 projected layer(s) mapped back" in capsys.readouterr().out

    _lowrank_to_dense_round_trip(tmp_path, convert)
    for argv, message in [
        (["to-dense", str(tmp_path / "dense.ckpt"), str(tmp_path / "again.ckpt")], "no low-rank optimizer state"),
        (["to-dense", str(tmp_path / "dense.ckpt"), str(tmp_path / "dense.ckpt")], "OUT must differ from CKPT"),
        (["to-dense", "a.ckpt", "b.ckpt", "--shape", "3=12by4"], "INDEX=MxN"),
    ]:
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err


# -- ProjectedOptimizer on its own: 8-bit state, projectors that keep no P, an unchanged resume ------------------


def _run(weights, steps=3, dense=(), **options):
    """A few steps of a projected optimizer over ``weights`` (those named in ``dense`` in a group of their own with
    ``rank=None``) with the same gradients each call."""
    projected = [w for name, w in weights.items() if name not in dense]
    groups = [{"params": projected}] + ([{"params": [weights[n] for n in dense], "rank": None}] if dense else [])
    opt = ProjectedAdamW(groups, lr=1e-2, rank=48, update_gap=2, **options)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for w in weights.values():
            w.grad = torch.randn(w.shape, generator=gen)
        opt.step()
    return opt


def _weights(*shapes):
    gen = torch.Generator().manual_seed(0)
    return {f"w{i}.weight": torch.nn.Parameter(torch.randn(s, generator=gen)) for i, s in enumerate(shapes)}


def _checkpoint(path, weights, opt):
    torch.save(
        {"state_dict": {k: w.detach() for k, w in weights.items()}, "optimizer_states": [opt.state_dict()]}, path
    )


def test_to_dense_decodes_8bit_state(tmp_path):
    shapes = ((80, 96), (96, 72), (70, 64))  # 48 x 96, 96 x 48 and the dense 70 x 64 moments: stored in 8 bits
    weights, twins = _weights(*shapes), _weights(*shapes)
    opt = _run(weights, dense=("w2.weight",), state_bits=8)
    reference = _run(twins, dense=("w2.weight",))  # the same gradients in full precision: the same subspaces
    assert all("exp_avg_codes" in opt.state[w] for w in weights.values())
    _checkpoint(tmp_path / "8bit.ckpt", weights, opt)
    assert to_dense_checkpoint(tmp_path / "8bit.ckpt", tmp_path / "dense.ckpt") == 2
    state = _saved(tmp_path / "dense.ckpt")["state"]
    for i, w in enumerate(twins.values()):
        low, left = reference.state[w], w.shape[0] < w.shape[1]
        assert set(state[i]) == {"step", "exp_avg", "exp_avg_sq"} and state[i]["exp_avg"].shape == w.shape
        for key, first in (("exp_avg", True), ("exp_avg_sq", False)):
            expected = low[key]
            if reference.is_projected(w):
                P = reference.projection_matrix(w) if first else reference.projection_matrix(w).square()
                expected = P @ expected if left else expected @ P.T
            assert (state[i][key] - expected).norm() < 0.05 * expected.norm()  # 8-bit rounding only


@pytest.mark.parametrize("projector", ["random", "dct"])
def test_to_dense_finds_the_shape_of_a_projector_that_keeps_no_matrix(tmp_path, projector):
    weights = _weights((80, 96), (96, 72), (90, 96))
    opt = _run(weights, projector=projector)
    _checkpoint(tmp_path / "low.ckpt", weights, opt)
    # (80, 96) and (90, 96) both fit a 48 x 96 state: the converter asks which.
    with pytest.raises(ValueError, match=r"optimizer parameter #0 .* \(80, 96\), \(90, 96\).*--shape 0=MxN"):
        to_dense_checkpoint(tmp_path / "low.ckpt", tmp_path / "dense.ckpt")
    to_dense_checkpoint(tmp_path / "low.ckpt", tmp_path / "dense.ckpt", shapes={0: (80, 96), 2: (90, 96)})
    state = _saved(tmp_path / "dense.ckpt")["state"]
    for i, w in enumerate(weights.values()):
        low, P = opt.state[w], opt.projection_matrix(w)
        left = w.shape[0] < w.shape[1]
        _close(state[i]["exp_avg"], P @ low["exp_avg"] if left else low["exp_avg"] @ P.T)
        _close(state[i]["exp_avg_sq"], P.square() @ low["exp_avg_sq"] if left else low["exp_avg_sq"] @ P.square().T)


def test_an_unchanged_resume_warns_nothing_and_continues_bit_for_bit():
    weights, twins = _weights((80, 96), (96, 72)), _weights((80, 96), (96, 72))
    opt, fresh = _run(weights, steps=3), ProjectedAdamW(list(twins.values()), lr=1e-2, rank=48, update_gap=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh.load_state_dict(opt.state_dict())
    for w, t in zip(weights.values(), twins.values()):
        assert opt.state[w].keys() == fresh.state[t].keys()
        assert all(torch.equal(opt.state[w][k], fresh.state[t][k]) for k in opt.state[w])


def test_a_torch_sgd_checkpoint_resumes_low_rank_with_its_buffers_projected():
    """torch's SGD keeps no step counter, only momentum buffers: they are projected, and its dense ones continue."""
    weights, twins = _weights((80, 96), (96,)), _weights((80, 96), (96,))
    sgd = torch.optim.SGD(list(weights.values()), lr=1e-2, momentum=0.9)
    _steps = [
        [torch.randn(w.shape, generator=torch.Generator().manual_seed(i)) for w in weights.values()] for i in range(4)
    ]
    for grads in _steps[:3]:
        for w, g in zip(weights.values(), grads):
            w.grad = g.clone()
        sgd.step()
    saved = copy.deepcopy(sgd.state_dict())  # as from a file: torch's state_dict shares the live buffers
    w, bias = twins.values()
    opt = ProjectedAdamW.from_optimizer(torch.optim.SGD([w, bias], lr=1e-2, momentum=0.9), {w}, rank=16)
    with torch.no_grad():
        for a, b in zip(weights.values(), twins.values()):
            b.copy_(a)
    with pytest.warns(UserWarning, match=r"dense -> rank 16, projector 'svd' \(1 layer\(s\)"):
        opt.load_state_dict(saved)
    buf, P = saved["state"][0]["momentum_buffer"], opt.projection_matrix(w)
    _close(_span(P), _span(_top_singular(buf, 16, left=True)))
    _close(opt.state[w]["momentum_buffer"], P.T @ buf)
    for p, g in zip((*weights.values(), w, bias), _steps[3] * 2):
        p.grad = g.clone()
    sgd.step()
    opt.step()
    assert torch.equal(bias, list(weights.values())[1])  # the dense bias goes on exactly as under torch's SGD
    assert torch.isfinite(w).all()
