"""Which weights of a model get a low-rank subspace.

Default: the 2-D ``weight`` of every ``nn.Linear`` except output heads: a Linear whose weight is tied to
an ``nn.Embedding``, whose own name is a usual head name (``lm_head``, ``head``, ``classifier``, ...), or
that is the model's last Linear and maps to an embedding's vocabulary size. ``target_modules`` and ``exclude`` are
patterns over qualified module names: a pattern matches a name when it is a glob (``fnmatch``) of the
whole name or of a substring, so ``"attn"`` selects ``blocks.0.attn.q_proj`` as in GaLore's scripts. Names are
matched without the ``_orig_mod`` parts ``torch.compile`` inserts (``net._orig_mod.blocks.0`` is matched as
``net.blocks.0``), so the same patterns work on a compiled model.

``dense_selection_note`` says, at setup, what a selection leaves dense that a user may have expected projected, and
``warn_user`` emits a warning at the user's own line (outside this package, Lightning and torch).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Sequence
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import Tensor, nn

from lightning_lowrank.optim.rank_zero import is_rank_zero

HEAD_NAMES = frozenset({"lm_head", "head", "output", "output_layer", "classifier", "fc_out", "out_head"})
COMPILED = "_orig_mod"  # the part torch.compile's OptimizedModule puts in front of the compiled module's names
LIBRARIES = ("lightning_lowrank", "lightning", "pytorch_lightning", "lightning_fabric")  # warn_user skips their frames
MAX_SHOWN = 8  # modules named in a warning before the list is cut to "... and N more"


def plain_name(name: str) -> str:
    """``name`` without ``torch.compile``'s ``_orig_mod`` parts: ``net._orig_mod.blocks.0`` -> ``net.blocks.0``."""
    return ".".join(part for part in name.split(".") if part != COMPILED)


def matches(name: str, pattern: str) -> bool:
    """A glob of the whole name, or of any substring of it (the name without ``_orig_mod`` parts: ``plain_name``)."""
    name = plain_name(name)
    return fnmatchcase(name, pattern) or fnmatchcase(name, f"*{pattern}*")


def _is_head(name: str, module: nn.Linear, embeddings: list[nn.Embedding], last: nn.Module | None) -> bool:
    return (
        name.rsplit(".", 1)[-1] in HEAD_NAMES
        or any(module.weight is e.weight for e in embeddings)
        or (module is last and any(module.out_features == e.num_embeddings for e in embeddings))
    )


def select_lowrank_params(
    model: nn.Module,
    target_modules: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
) -> dict[Tensor, str]:
    """Map each weight to project onto its module's qualified name (as ``named_modules`` gives it; patterns are
    matched against it without ``torch.compile``'s ``_orig_mod`` parts).

    Raises ValueError when a pattern matches no candidate module, naming the candidates.
    """
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    if target_modules is None:
        linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        last = list(linears.values())[-1] if linears else None
        candidates = {name: m for name, m in linears.items() if not _is_head(name, m, embeddings, last)}
    else:
        owners = {name: m for name, m in model.named_modules() if isinstance(getattr(m, "weight", None), nn.Parameter)}
        owners = {name: m for name, m in owners.items() if m.weight.ndim == 2}
        _check_patterns("target_modules", target_modules, owners)
        candidates = {n: m for n, m in owners.items() if any(matches(n, p) for p in target_modules)}
    _check_patterns("exclude", exclude, candidates)
    selected: dict[Tensor, str] = {}
    for name, module in candidates.items():
        if any(matches(name, p) for p in exclude) or not module.weight.requires_grad:
            continue
        selected.setdefault(module.weight, name)
    return selected


def _check_patterns(kind: str, patterns: Sequence[str], names: dict[str, nn.Module]) -> None:
    for pattern in patterns:
        if not any(matches(name, pattern) for name in names):
            plain = sorted({plain_name(name) for name in names})
            shown = ", ".join(plain[:20]) + (" ..." if len(plain) > 20 else "")
            raise ValueError(
                f"{kind} pattern {pattern!r} matches no module with a 2-D weight. Patterns are globs over "
                f"qualified module names (or substrings of them, without torch.compile's '_orig_mod.'); the "
                f"candidates are: {shown or '(none)'}"
            )


def drop_full_rank(selected: dict[Tensor, str], rank: int | None) -> dict[Tensor, str]:
    """Weights whose smaller side is <= rank would store more than their dense optimizer; train them densely.
    ``rank=None`` (no low-rank state): none is projected."""
    if rank is None:
        return {}
    full = {p: name for p, name in selected.items() if rank >= min(p.shape)}
    if full:
        shown = ", ".join(f"{name} {tuple(p.shape)}" for p, name in list(full.items())[:8])
        warn_user(
            f"rank={rank} is not below the smaller side of {len(full)} selected weight(s): {shown}"
            f"{' ...' if len(full) > 8 else ''}. A projection would save nothing there, so they stay dense "
            "(the module's own optimizer); lower `rank` to project them."
        )
    return {p: name for p, name in selected.items() if p not in full}


def strategy_selection(
    model: nn.Module, target_modules: Sequence[str] | None, exclude: Sequence[str], rank: int | None
) -> dict[Tensor, str]:
    """The weights a strategy projects, by module name (``select_lowrank_params``, then ``drop_full_rank``), with a
    warning where the selection leaves dense what a user may have expected projected (``dense_selection_note``)."""
    selected = select_lowrank_params(model, target_modules, exclude)
    note = None if rank is None else dense_selection_note(model, selected, target_modules, exclude)
    if note:
        warn_user(note)
    return drop_full_rank(selected, rank)


def dense_selection_note(
    model: nn.Module,
    selected: dict[Tensor, str],
    target_modules: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
) -> str | None:
    """What to say at setup about the weights ``selected`` (``select_lowrank_params``' answer, before the full-rank
    drop) leaves dense, or None: with nothing selected, each weight that was considered and why it was left out
    (an output head, an embedding, a convolution's kernel, frozen, ...); with the default selection, the trainable
    weights of more than two dimensions (convolution kernels), which are never projected."""
    chosen = {id(p) for p in selected}
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    last = linears[-1] if linears else None
    reasons: list[str] = []
    kernels: list[str] = []
    flat = 0
    seen: set[int] = set()
    for name, module in model.named_modules():
        for param_name, p in module.named_parameters(recurse=False):
            if id(p) in seen or id(p) in chosen:
                continue
            seen.add(id(p))
            if p.dim() < 2:
                flat += 1
                continue
            label = plain_name(f"{name}.{param_name}" if param_name != "weight" or not name else name)
            label += f" ({type(module).__name__} {'x'.join(map(str, p.shape))}"
            if p.dim() > 2 and p.requires_grad:
                kernels.append(label + ")")
            why = _left_out(name, module, param_name, p, target_modules, exclude, embeddings, last)
            reasons.append(f"{label}: {why})")
    if selected:
        if target_modules is not None or not kernels:
            return None
        more = f" and {len(kernels) - MAX_SHOWN} more" if len(kernels) > MAX_SHOWN else ""
        return (
            f"{len(kernels)} weight(s) of more than two dimensions stay dense, with the module's own optimizer state "
            f"in full: {', '.join(kernels[:MAX_SHOWN])}{more}. Convolution kernels are not projected (only 2-D "
            f"weights are); {len(selected)} 2-D weight(s) are selected for a low-rank subspace."
        )
    if not reasons:
        return None
    which = "the default: every nn.Linear but output heads" if target_modules is None else "target_modules"
    more = f"; and {len(reasons) - MAX_SHOWN} more" if len(reasons) > MAX_SHOWN else ""
    ones = f"; {flat} one-dimensional weight(s) (norms, biases), which are never projected" if flat else ""
    return (
        f"No weight was selected for a low-rank subspace ({which}), so training runs the module's own optimizer "
        f"with its full dense state. Considered: {'; '.join(reasons[:MAX_SHOWN])}{more}{ones}. Name modules with "
        "a 2-D weight in target_modules to project them, or train with the Trainer's own strategy."
    )


def _left_out(
    name: str,
    module: nn.Module,
    param_name: str,
    p: Tensor,
    target_modules: Sequence[str] | None,
    exclude: Sequence[str],
    embeddings: list[nn.Embedding],
    last: nn.Module | None,
) -> str:
    """Why ``select_lowrank_params`` did not select ``p``, a parameter of ``module`` of at least two dimensions."""
    if p.dim() > 2:
        return f"a {p.dim()}-D kernel; only 2-D weights are projected"
    if param_name != "weight":
        return "not a module's weight"
    if target_modules is not None and not any(matches(name, pattern) for pattern in target_modules):
        return "not in target_modules"
    if any(matches(name, pattern) for pattern in exclude):
        return "excluded"
    if not p.requires_grad:
        return "frozen"
    if target_modules is not None:
        return "not selected"
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return "an embedding, not projected by default"
    if not isinstance(module, nn.Linear):
        return "not an nn.Linear"
    leaf = name.rsplit(".", 1)[-1]
    if leaf in HEAD_NAMES:
        return f"an output head (named {leaf!r})"
    if any(module.weight is e.weight for e in embeddings):
        return "an output head (its weight is an embedding's)"
    return f"an output head (the last nn.Linear, {module.out_features} outputs: an embedding's vocabulary)"


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` on rank 0, attributed to the first frame outside this package, Lightning and torch: the
    user's own line that led here (``trainer.fit(...)``, ``plan(...)``), never a line inside a library; where the
    whole stack is library code, to no file (``sys``)."""
    if not is_rank_zero():
        return
    frame, level = sys._getframe(1), 2  # stacklevel 2: warn_user's caller
    while frame is not None and library_file(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def library_file(filename: str) -> bool:
    """Whether ``filename`` is a file of this package, of Lightning (those loaded) or of torch."""
    loaded = (sys.modules.get(name) for name in LIBRARIES)
    files = (getattr(module, "__file__", None) for module in loaded)
    dirs = (*(os.path.dirname(f) for f in files if f), os.path.dirname(torch.__file__))
    return filename.startswith(tuple(d + os.sep for d in dirs))


def warn_once(said: set[str], message: str, category: type[Warning] = UserWarning) -> None:
    """``warn_user(message)`` unless ``message`` is in ``said`` (a strategy's warnings of one fit), and note it."""
    if message not in said:
        said.add(message)
        warn_user(message, category)


def warnings_once(said: set[str], fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, each of its warnings said once (``said``): ours at the user's line (``warn_user``),
    another library's where it was, under the user's filters. A strategy's planner repeats the selection's warnings,
    and the report at the end of training the plan's: the user reads each once."""
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            return fn(*args, **kwargs)
    finally:
        for w in caught:
            if str(w.message) in said:
                continue
            if library_file(w.filename):
                said.add(str(w.message))
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
            else:
                warn_once(said, str(w.message), w.category)
