"""The edge of stability of gradient descent, per param group: ``lr * top eigenvalue`` of the group's Hessian block,
and the warning when it passes 2."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from torch import Generator, Tensor
from torch.optim import Optimizer

from lightning_lowrank.curvature import top_eigenvalues

EDGE_OF_STABILITY = 2.0  # gradient descent on a quadratic diverges along directions with lr * eigenvalue > 2


@dataclass(frozen=True)
class ParamBlock:
    """Param group ``group`` of optimizer ``optimizer``, restricted to the probed params (``indices`` into them)."""

    optimizer: int
    group: int
    lr: float
    indices: tuple[int, ...]
    numel: int
    several_optimizers: bool = False

    @property
    def label(self) -> str:
        return f"optimizer{self.optimizer}/group{self.group}" if self.several_optimizers else f"group{self.group}"


def param_blocks(optimizers: Sequence[Optimizer], params: Sequence[Tensor]) -> list[ParamBlock]:
    """Each param group that holds probed params; its Hessian block is the curvature its own learning rate meets."""
    position = {id(p): i for i, p in enumerate(params)}
    blocks = []
    for j, opt in enumerate(optimizers):
        for i, group in enumerate(opt.param_groups):
            indices = tuple(position[id(p)] for p in group["params"] if id(p) in position)
            if indices:
                numel = sum(params[k].numel() for k in indices)
                blocks.append(ParamBlock(j, i, float(group["lr"]), indices, numel, len(optimizers) > 1))
    return blocks


def edge_of_stability_message(block: ParamBlock, product: float) -> str:
    """The warning text: the figures first, then what they mean."""
    eigenvalue = product / block.lr
    where = f"param group {block.group}" + (f" of optimizer {block.optimizer}" if block.several_optimizers else "")
    return (
        f"lr * top eigenvalue = {product:.4g} > {EDGE_OF_STABILITY:g} for {where} (lr={block.lr:.4g}, top Hessian "
        f"eigenvalue={eigenvalue:.4g}, {len(block.indices)} param tensors, {block.numel} elements): plain gradient "
        "descent at this lr is past the edge of stability; expect the loss to oscillate or spike unless the "
        f"curvature comes down, or keep lr below 2 / eigenvalue = {EDGE_OF_STABILITY / eigenvalue:.4g}. For "
        "Adam-like optimizers the threshold is on the preconditioned Hessian, so there this is only a hint."
    )


def eigenvalue_figures(
    optimizers: Sequence[Optimizer],
    grads: Sequence[Tensor],
    params: Sequence[Tensor],
    top_k: int,
    generator: Generator,
    max_iter: int,
    tol: float,
    keep: Callable[[Iterable[Tensor]], None],
) -> tuple[dict[str, float], list[ParamBlock]]:
    """The ``"top_eigenvalues"`` estimator: the ``top_k`` eigenvalues (``eigenvalue_{i}``) and, for each param group's
    block, ``lr * top eigenvalue`` (``lr_x_eigenvalue/{label}``): the global one for a block of every probed param,
    else one more power iteration on the block's own Hessian. ``keep`` is handed the eigenvectors (the probe's cost)."""
    eig = top_eigenvalues(grads, params, top_k, generator, max_iter, tol)
    keep(t for v in eig.eigenvectors for t in v)
    figures = {f"eigenvalue_{i}": v for i, v in enumerate(eig.eigenvalues)}
    blocks = param_blocks(optimizers, params)
    for block in blocks:
        if len(block.indices) == len(params):  # the group is the whole probed model
            top = max(eig.eigenvalues)
        else:  # H restricted to the group: differentiate its gradients w.r.t. its params only
            sub = [grads[i] for i in block.indices], [params[i] for i in block.indices]
            block_eig = top_eigenvalues(*sub, 1, generator, max_iter, tol)
            keep(block_eig.eigenvectors[0])
            top = block_eig.eigenvalues[0]
        figures[f"lr_x_eigenvalue/{block.label}"] = block.lr * top
    return figures, blocks
