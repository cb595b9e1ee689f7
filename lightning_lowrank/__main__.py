"""``python -m lightning_lowrank plan ...``: the memory report of low-rank training, before any training; ``to-dense``:
a low-rank checkpoint rewritten for the module's plain torch optimizer (``lightning_lowrank.to_dense_checkpoint``).

Examples::

    python -m lightning_lowrank plan --preset 1B --rank 512 --projector dct --state-bits 8 --gpu 24 --dtype bf16
    python -m lightning_lowrank plan --model examples.byte_lm:ByteLM --rank 32 --residual fira
    python -m lightning_lowrank plan --preset 7B --rank 128 --fsdp 8 --gpu 24   # per rank, FSDP2 on 8 ranks
    python -m lightning_lowrank plan --preset 60M --rank 128 --protect 0.5   # + ProtectedSubspaces(ratio=0.5)'s bases
    python -m lightning_lowrank to-dense lowrank.ckpt dense.ckpt   # resumable by the plain torch optimizer

Every ``LowRankConfig`` field is an option (``--update-gap``, ``--projector-bits``, ``--target-modules`` ...), checked
by ``LowRankConfig`` as the strategy checks it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import typing
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

import torch
from torch import nn

from lightning_lowrank.config import LowRankConfig
from lightning_lowrank.memory.plan import DTYPES, OPTIMIZERS, Plan, plan
from lightning_lowrank.memory.presets import PRESETS
from lightning_lowrank.optim.checks import literal_choices


def _value_type(hint: Any) -> type:
    """The type a command-line value is parsed as: ``int | None`` -> int (the field's hint, without None)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _parse_bool(text: str) -> bool:
    """``true``/``false`` (argparse's ``type=bool`` would read any non-empty text as True)."""
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() == "true"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lightning_lowrank", description="lightning_lowrank tools")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser(
        "plan",
        help="print the memory report of low-rank training before any training",
        description="Plan parameters + gradients + optimizer state with and without low-rank state (exactly what "
        "LowRankStrategy's memory report measures after the first step) and say whether it fits a GPU. "
        "Activations are not planned.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=list(PRESETS), help="a LLaMA size from GaLore's configs (vocab 32000)")
    source.add_argument(
        "--model",
        metavar="MODULE:FACTORY",
        help="import path of a callable returning an nn.Module (built on the meta device when it allows)",
    )
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="parameter dtype (default: the model's; fp32)")
    p.add_argument(
        "--optimizer",
        choices=list(OPTIMIZERS),
        default=None,
        help="the module's optimizer (default: a LightningModule's configure_optimizers(), else adamw)",
    )
    p.add_argument("--momentum", type=float, default=None, help="SGD momentum (SGD keeps no state without it)")
    p.add_argument("--gpu", type=float, default=None, metavar="GIB", help="GPU memory in GiB: say whether it fits")
    p.add_argument("--all-layers", action="store_true", help="one table row per layer even for large models")
    p.add_argument(
        "--layerwise",
        action="store_true",
        help="plan the strategy's layerwise=True (per-layer updates in backward): gradients are the largest single one",
    )
    p.add_argument(
        "--fsdp",
        type=int,
        default=None,
        metavar="N",
        help="plan lowrank_fsdp (FSDP2) on N ranks: per rank (rows sharded N ways, P replicated) and in total",
    )
    _add_protect(p)
    _add_lowrank_options(p)
    _add_to_dense(commands)
    return parser


def _add_lowrank_options(p: argparse.ArgumentParser) -> None:
    """Every ``LowRankConfig`` field as ``--name-with-dashes``, with its description (the options' docstrings, as
    LightningCLI's ``--help`` shows it), its choices (its ``Literal`` type) and its default. Values are checked by
    ``LowRankConfig`` in ``main``, as the strategy checks them."""
    lowrank = p.add_argument_group("low-rank options (LowRankConfig fields; defaults as the strategy's)")
    hints = typing.get_type_hints(LowRankConfig)
    docs = LowRankConfig.option_docs()
    for f in fields(LowRankConfig):
        flag = "--" + f.name.replace("_", "-")
        text = docs.get(f.name, "").replace("``", "").replace("%", "%%")  # argparse formats help with %
        help_ = f"{text} (default: {f.default!r})".strip()
        choices = [c for c in literal_choices(hints[f.name]) or () if c is not None]
        if f.name in ("target_modules", "exclude"):
            lowrank.add_argument(flag, nargs="+", default=argparse.SUPPRESS, metavar="PATTERN", help=help_)
        elif choices:  # shown, and checked by LowRankConfig (the strategy's message), not by argparse
            kind = type(choices[0])  # str, or int (projector_bits, dct_type, state_bits)
            metavar = "{" + ",".join(map(str, choices)) + "}"
            lowrank.add_argument(flag, type=kind, default=argparse.SUPPRESS, metavar=metavar, help=help_)
        else:
            kind = _value_type(hints[f.name])
            kind = _parse_bool if kind is bool else kind
            lowrank.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help_)


def _add_protect(p: argparse.ArgumentParser) -> None:
    protect = p.add_argument_group(
        "protected subspaces (ProtectedSubspaces, Sculpting Subspaces)",
        "Plan the bases ProtectedSubspaces(ratio=RATIO, schedule='uniform') hands the optimizer at its first task "
        "(every task's with 'uniform'; 'progressive' protects more later). Not with --layerwise or --fsdp.",
    )
    protect.add_argument(
        "--protect",
        type=float,
        default=None,
        metavar="RATIO",
        help="protect each targeted weight's top k = floor(RATIO x min(m, n)) singular directions (RATIO in [0, 1])",
    )
    protect.add_argument(
        "--protect-target",
        nargs="+",
        default=None,
        metavar="GLOB",
        help="module-name globs of the weights to protect (default: every nn.Linear but output heads)",
    )
    protect.add_argument("--protect-exclude", nargs="+", default=(), metavar="GLOB", help="never protect these")
    protect.add_argument(
        "--protect-bits",
        type=int,
        choices=(8, 4),
        default=None,
        help="store the bases in 8 or 4 bits (ProjectedOptimizer.protect(bits=...)); default float32",
    )


def _add_to_dense(commands: Any) -> None:
    p = commands.add_parser(
        "to-dense",
        help="write a checkpoint that the module's plain torch optimizer (strategy='auto') can resume",
        description="Map a low-rank checkpoint's projected moments back to full size (m ~= P m_low, "
        "v ~= (P*P) v_low), decode 8-bit state and drop the low-rank keys, so that the module's own torch "
        "optimizer resumes from OUT (lightning_lowrank.to_dense_checkpoint).",
    )
    p.add_argument("ckpt", metavar="CKPT", help="the low-rank Lightning checkpoint (kept as it is)")
    p.add_argument("out", metavar="OUT", help="where to write the dense checkpoint")
    p.add_argument(
        "--shape",
        action="append",
        default=[],
        metavar="INDEX=MxN",
        help="full shape of optimizer parameter INDEX, where the checkpoint cannot tell it (the error says so)",
    )


def _to_dense(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from lightning_lowrank.checkpoint import to_dense_checkpoint

    shapes = {}
    for text in args.shape:
        index, _, shape = text.partition("=")
        sides = shape.lower().split("x")
        if not index.isdigit() or len(sides) != 2 or not all(side.isdigit() for side in sides):
            parser.error(f"--shape must look like INDEX=MxN (e.g. 3=1024x4096), got {text!r}")
        shapes[int(index)] = (int(sides[0]), int(sides[1]))
    try:
        count = to_dense_checkpoint(args.ckpt, args.out, shapes=shapes)
    except (ValueError, OSError) as err:
        parser.error(str(err))
    print(f"Wrote {args.out}: {count} projected layer(s) mapped back to full size.")
    print("Resume it with the module's own torch optimizer (strategy='auto').")
    return 0


def load_model(spec: str) -> nn.Module:
    """``package.module:factory`` -> ``factory()``; built under ``torch.device("meta")`` when the factory allows it,
    so no weights are allocated."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--model must look like package.module:factory, got {spec!r}")
    factory = importlib.import_module(module_name)
    for part in attr.split("."):
        factory = getattr(factory, part)
    try:
        with torch.device("meta"):
            model = factory()
    except Exception:  # an init that reads values: build it for real (the plan still runs on a meta twin)
        model = factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"{spec} returned {type(model).__name__}, not an nn.Module")
    return model


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "to-dense":
        return _to_dense(args, parser)
    options = {f.name: getattr(args, f.name) for f in fields(LowRankConfig) if hasattr(args, f.name)}
    optimizer_options = {} if args.momentum is None else {"momentum": args.momentum}
    if optimizer_options and args.optimizer != "sgd":
        parser.error("--momentum is for --optimizer sgd")
    try:
        model = args.preset if args.preset else load_model(args.model)
        optimizer = args.optimizer or ("adamw" if args.preset else None)
        result: Plan = plan(
            model,
            optimizer,
            optimizer_options=optimizer_options,
            dtype=args.dtype,
            gpu_gib=args.gpu,
            layerwise=args.layerwise,
            fsdp=args.fsdp,
            protect=args.protect,
            protect_targets=args.protect_target,
            protect_exclude=args.protect_exclude,
            protect_bits=args.protect_bits,
            **options,
        )
    except (ValueError, TypeError, ImportError, AttributeError, RuntimeError) as err:
        parser.error(str(err))
    title = (
        (f"preset {args.preset}" if args.preset else args.model)
        + (f", FSDP2 on {args.fsdp} ranks" if args.fsdp else "")
        + (f", protect={args.protect:g}" if args.protect is not None else "")
    )
    print(f"Plan for {title}: {', '.join(f'{k}={v!r}' for k, v in options.items()) or 'default options'}")
    result.render(**({"collapse": False} if args.all_layers else {}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
