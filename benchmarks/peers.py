"""Builders for the optimizers the benchmarks compare: torch AdamW, the published low-rank optimizers ("peers") and
``lightning_lowrank``'s own ``ProjectedOptimizer`` in GaLore-comparable configurations.

Each builder takes the 2-D weights to optimize, a ``PeerConfig`` and the device, and returns a ``Built`` (the
optimizer and when it refreshes) or raises ``PeerUnavailable`` with the reason, which the benchmark prints as
"not run: <reason>". Peers are only called, never copied; they are installed by ``scripts/bench_env.sh`` with
``--no-deps``. Their packages' ``__init__`` files import bitsandbytes, wandb, gpustat and triton, and their optimizer
modules import ``transformers.utils.versions.require_version``: ``_import`` loads just the submodule that defines
the optimizer, with a no-op stand-in for ``require_version`` when transformers is absent. That happens here, when a
builder runs, never when ``lightning_lowrank`` is imported.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import importlib.metadata
import importlib.util
import io
import os
import platform
import subprocess
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer


class PeerUnavailable(RuntimeError):
    """This optimizer cannot run here; the message says why."""


@dataclass(frozen=True)
class PeerConfig:
    rank: int
    update_gap: int
    scale: float = 0.25  # GaLore's alpha; Fira's alpha; APOLLO's scale; ours ``scale``
    lr: float = 1e-3
    weight_decay: float = 0.0  # the peers' default; the same for every optimizer


@dataclass
class Built:
    optimizer: Optimizer
    # The optimizer refreshes at 0-based step i when (i + refresh_lag) % gap == 0 (and at its first step).
    # GaLore, Fira, APOLLO, Q-GaLore and ours test the completed-step count (lag 0); DCTAdamW counts the step it is
    # taking (``steps`` is incremented first), so it refreshes one step earlier in the cycle (lag 1).
    refresh_lag: int = 0
    quiet: bool = False  # True: silence the optimizer's prints (DCTAdamW prints a line per parameter)


Builder = Callable[[list[Tensor], PeerConfig, torch.device], Built]


# -- importing peers without their heavy package __init__ ----------------------------------------------------------


def _stub_transformers() -> None:
    """Galore, Fira and APOLLO import ``transformers.utils.versions.require_version`` only to check torch>=1.5."""
    if "transformers" in sys.modules or importlib.util.find_spec("transformers") is not None:
        return
    names = ("transformers", "transformers.utils", "transformers.utils.versions")
    modules = {name: types.ModuleType(name) for name in names}
    modules["transformers.utils.versions"].require_version = lambda *args, **kwargs: None
    modules["transformers"].utils = modules["transformers.utils"]
    modules["transformers.utils"].versions = modules["transformers.utils.versions"]
    sys.modules.update(modules)


def _import(package: str, module: str) -> types.ModuleType:
    """``package.module`` imported without executing ``package/__init__.py``."""
    if sys.modules.get(package) is None:
        spec = importlib.util.find_spec(package) if package not in sys.modules else None
        if spec is None or spec.submodule_search_locations is None:
            raise PeerUnavailable(f"{package} is not installed (scripts/bench_env.sh installs it)")
        shell = types.ModuleType(package)
        shell.__path__ = list(spec.submodule_search_locations)
        sys.modules[package] = shell
    _stub_transformers()
    try:
        return importlib.import_module(f"{package}.{module}")
    except ImportError as err:
        raise PeerUnavailable(f"import {package}.{module} failed: {err}") from err


def _lowrank_group(params: list[Tensor], cfg: PeerConfig, **keys: Any) -> list[dict[str, Any]]:
    return [{"params": params, "rank": cfg.rank, "update_proj_gap": cfg.update_gap, "proj_type": "std", **keys}]


# -- torch AdamW (the reference) -----------------------------------------------------------------------------------


def adamw(params: list[Tensor], cfg: PeerConfig, device: torch.device, impl: str = "foreach") -> Built:
    """torch.optim.AdamW with the multi-tensor (foreach), fused, or per-parameter (loop) implementation."""
    flags = {"foreach": {"foreach": True}, "fused": {"fused": True}, "loop": {"foreach": False}}[impl]
    try:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **flags)
    except RuntimeError as err:  # fused is not implemented for every device
        raise PeerUnavailable(f"AdamW({impl}=True) unsupported on {device.type}: {err}") from err
    return Built(opt)


# -- the peers -----------------------------------------------------------------------------------------------------


def galore(params: list[Tensor], cfg: PeerConfig, device: torch.device) -> Built:
    """GaLoreAdamW (galore-torch 1.0): full SVD every ``update_proj_gap`` steps, moments in the subspace."""
    mod = _import("galore_torch", "adamw")
    return Built(mod.AdamW(_lowrank_group(params, cfg, scale=cfg.scale), lr=cfg.lr, weight_decay=cfg.weight_decay))


def q_galore(params: list[Tensor], cfg: PeerConfig, device: torch.device) -> Built:
    """QGaLoreAdamW8bit (q-galore-torch 1.0) with the repo's defaults: INT4 projector, bnb 8-bit moments."""
    if device.type != "cuda":
        raise PeerUnavailable("needs CUDA (its step() calls torch.cuda.synchronize() for every parameter)")
    mod = _import("q_galore_torch", "q_galore_adamw8bit")  # imports bitsandbytes
    keys = dict(scale=cfg.scale, quant=True, quant_group_size=256, quant_n_bit=4)
    keys |= dict(cos_threshold=0.4, gamma_proj=2, queue_size=5)
    opt = mod.AdamW8bit(_lowrank_group(params, cfg, **keys), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return Built(opt)


def fira(params: list[Tensor], cfg: PeerConfig, device: torch.device) -> Built:
    """FiraAdamW (fira 1.0.2): GaLore plus the norm-scaled full-rank residual and its growth limiter."""
    mod = _import("fira", "fira_adamw")
    return Built(mod.AdamW(_lowrank_group(params, cfg, alpha=cfg.scale), lr=cfg.lr, weight_decay=cfg.weight_decay))


def apollo(params: list[Tensor], cfg: PeerConfig, device: torch.device) -> Built:
    """APOLLOAdamW (apollo-torch 1.0.3): seeded random projection, channel-wise scaling of the raw gradient."""
    mod = _import("apollo_torch", "apollo")
    groups = _lowrank_group(params, cfg, scale=cfg.scale, proj="random", scale_type="channel")
    return Built(mod.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay))


def dct_adamw(params: list[Tensor], cfg: PeerConfig, device: torch.device) -> Built:
    """DCTAdamW (ista-daslab-optimizers 1.1.15): top-r columns of one shared DCT basis, matmul scoring, no scale."""
    mod = _import("ista_daslab_optimizers", "fft_low_rank.dct_adamw")
    opt = mod.DCTAdamW(
        params, lr=cfg.lr, weight_decay=cfg.weight_decay, rank=cfg.rank, proj="dct", update_proj_gap=cfg.update_gap
    )
    return Built(opt, refresh_lag=1, quiet=True)


# -- ours ----------------------------------------------------------------------------------------------------------


def ours(params: list[Tensor], cfg: PeerConfig, device: torch.device, **options: Any) -> Built:
    """lightning_lowrank's ProjectedOptimizer; ``options`` pick the projector, residual and state precision."""
    from lightning_lowrank.optim.projected import ProjectedOptimizer

    opt = ProjectedOptimizer(
        params,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        rank=cfg.rank,
        update_gap=cfg.update_gap,
        scale=cfg.scale,
        **options,
    )
    return Built(opt)


# Row order of the benchmark tables. The first entry is the reference every ratio divides by.
BUILDERS: dict[str, Builder] = {
    "adamw": adamw,
    "adamw-fused": partial(adamw, impl="fused"),
    "adamw-loop": partial(adamw, impl="loop"),
    "galore": galore,
    "q-galore": q_galore,
    "fira": fira,
    "apollo": apollo,
    "dct-adamw": dct_adamw,
    "ours-svd": partial(ours, projector="svd"),
    "ours-svd-8bit": partial(ours, projector="svd", state_bits=8),
    "ours-dct": partial(ours, projector="dct"),
    "ours-dct-fft": partial(ours, projector="dct", dct_scorer="fft"),
    "ours-dct-frugal": partial(ours, projector="dct", residual="frugal"),
    "ours-dct-fira": partial(ours, projector="dct", residual="fira"),
    "ours-apollo": partial(ours, residual="apollo"),  # APOLLO's own Gaussian projection (projector="gaussian")
}
REFERENCE = "adamw"


def build(name: str, params: list[Tensor], cfg: PeerConfig, device: torch.device) -> Built:
    """The optimizer ``name`` over ``params`` (raises ``PeerUnavailable``)."""
    if name not in BUILDERS:
        raise KeyError(f"unknown optimizer {name!r}; choose from {', '.join(BUILDERS)}")
    return BUILDERS[name](params, cfg, device)


@contextlib.contextmanager
def maybe_quiet(quiet: bool):
    """Swallow a peer's prints (DCTAdamW announces every parameter it initialises)."""
    if not quiet:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield


# -- what an optimizer holds ---------------------------------------------------------------------------------------


def _tensors_in(value: Any) -> list[Tensor]:
    """Tensors in ``value`` itself or directly inside a list, tuple or dict."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, Tensor)]
    if isinstance(value, dict):
        return [v for v in value.values() if isinstance(v, Tensor)]
    return []


def _object_tensors(obj: Any) -> list[Tensor]:
    """Tensors among a Python object's attributes (one level: GaLore's ``projector.ortho_matrix``)."""
    attrs = getattr(obj, "__dict__", None)
    if attrs is None or isinstance(obj, (Tensor, types.ModuleType)):
        return []
    return [t for v in attrs.values() for t in _tensors_in(v)]


def state_tensors(optimizer: Optimizer) -> list[Tensor]:
    """Every tensor an optimizer keeps between steps, each once.

    Counted: tensors in ``optimizer.state[p]`` (also inside lists/dicts there); tensors held as attributes of Python
    objects stored in the state (GaLore/Fira/APOLLO projectors' ``ortho_matrix``, DCTAdamW's index vectors); tensors
    held as attributes of the optimizer itself or in dicts among them (DCTAdamW's shared ``Q``, our ``_dct_bases``).
    Not counted: parameters, gradients, Python scalars (GaLore's int ``step``), temporaries inside ``step()``.
    """
    found: list[Tensor] = []
    for per_param in optimizer.state.values():
        for value in per_param.values():
            found += _tensors_in(value) or _object_tensors(value)
    skip = {"state", "param_groups", "defaults"}
    for name, value in vars(optimizer).items():
        if name not in skip:
            found += _tensors_in(value)
    unique: dict[tuple[int, int], Tensor] = {}
    for t in found:
        unique.setdefault((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()), t)
    return list(unique.values())


def state_bytes(optimizer: Optimizer, logical: bool = False) -> int:
    """Bytes the optimizer keeps alive: the storages behind ``state_tensors``, so a view counts the whole storage it
    holds (GaLore's P is a slice of the full SVD factor). ``logical``: numel x element size of the tensors instead."""
    if logical:
        return sum(t.numel() * t.element_size() for t in state_tensors(optimizer))
    return sum(t.untyped_storage().nbytes() for t in state_tensors(optimizer))


def projector_fingerprint(optimizer: Optimizer) -> float:
    """A number that changes when any layer's subspace changes: sums of the projector tensors (our ``proj*`` keys,
    tensors inside peers' projector objects). Used to check that refreshes happen on the steps the benchmark
    times as refresh steps."""
    total = 0.0
    for per_param in optimizer.state.values():
        for key, value in per_param.items():
            tensors = [value] if isinstance(value, Tensor) and str(key).startswith("proj") else _object_tensors(value)
            for i, t in enumerate(tensors):
                if t.numel():
                    total += (i + 1) * float(t.double().abs().sum() + t.reshape(-1)[0].double())
    return total


# -- where a benchmark ran ----------------------------------------------------------------------------------------


def machine_info(packages: tuple[str, ...], device: torch.device | None = None) -> dict[str, Any]:
    """Where a benchmark ran: platform, torch, the peers' installed versions and the commit measured."""
    device = device or torch.device("cpu")
    versions = {}
    for pkg in packages:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "peer_versions": versions,
        "git": _git_state(),
    }


def _git_state() -> str | None:
    """The commit measured, with "+dirty" when the working tree had changes."""
    root = Path(__file__).resolve().parents[1]
    try:
        run = partial(subprocess.run, cwd=root, capture_output=True, text=True, check=True)
        commit = run(["git", "rev-parse", "--short", "HEAD"]).stdout.strip()
        dirty = run(["git", "status", "--porcelain", "--untracked-files=no"]).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")
