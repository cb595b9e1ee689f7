"""Which weights of a model get a low-rank subspace.

Default: the 2-D ``weight`` of every ``nn.Linear`` except output heads: a Linear whose weight is tied to
an ``nn.Embedding``, whose own name is a usual head name (``lm_head``, ``head``, ``classifier``, ...), or
that is the model's last Linear and maps to an embedding's vocabulary size. ``target_modules`` and ``exclude`` are
patterns over qualified module names: a pattern matches a name when it is a glob (``fnmatch``) of the
whole name or of a substring, so ``"attn"`` selects ``blocks.0.attn.q_proj`` as in GaLore's scripts.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

from torch import Tensor, nn

from lightning_lowrank.optim.rank_zero import warn_rank_zero

HEAD_NAMES = frozenset({"lm_head", "head", "output", "output_layer", "classifier", "fc_out", "out_head"})


def matches(name: str, pattern: str) -> bool:
    """A glob of the whole name, or of any substring of it."""
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
    """Map each weight to project onto its module's qualified name.

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
            shown = ", ".join(sorted(names)[:20]) + (" ..." if len(names) > 20 else "")
            raise ValueError(
                f"{kind} pattern {pattern!r} matches no module with a 2-D weight. Patterns are globs over "
                f"qualified module names (or substrings of them); the candidates are: {shown or '(none)'}"
            )


def drop_full_rank(selected: dict[Tensor, str], rank: int | None) -> dict[Tensor, str]:
    """Weights whose smaller side is <= rank would store more than their dense optimizer; train them densely.
    ``rank=None`` (no low-rank state): none is projected."""
    if rank is None:
        return {}
    full = {p: name for p, name in selected.items() if rank >= min(p.shape)}
    if full:
        shown = ", ".join(f"{name} {tuple(p.shape)}" for p, name in list(full.items())[:8])
        warn_rank_zero(
            f"rank={rank} is not below the smaller side of {len(full)} selected weight(s): {shown}"
            f"{' ...' if len(full) > 8 else ''}. A projection would save nothing there, so they stay dense "
            "(the module's own optimizer); lower `rank` to project them.",
            stacklevel=3,
        )
    return {p: name for p, name in selected.items() if p not in full}
