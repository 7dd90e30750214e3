"""Arguments and helpers shared by the commands: model and weights options, KEY=VALUE items."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import TorchcvtError


def add_model_arguments(parser: argparse.ArgumentParser, checkpoint_required: bool = False) -> None:
    add_model_option(parser)
    parser.add_argument("--checkpoint", required=checkpoint_required,
                        help="official, transformers or torchcvt checkpoint (its class list is used)")
    add_pretrained_argument(parser)
    add_ema_option(parser)
    parser.add_argument("--num-classes", type=int, help="head size (default: the checkpoint's, else 1000)")
    parser.add_argument("--set", dest="model_overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="model config override, e.g. --set depth=[1,2,4] (repeatable)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")


def add_suite_options(parser: argparse.ArgumentParser) -> None:
    """--shard and --launcher, as every suite of runs (ablate, transfer) takes them."""
    parser.add_argument("--shard", metavar="I/N",
                        help="train only every N-th run from the I-th; I is 0-based (0/4 ... 3/4), so a "
                        "1-based task id (SLURM's --array=1-4) is given as ID-1/N; default: "
                        "SLURM_ARRAY_TASK_ID/COUNT when set, else all")
    parser.add_argument("--launcher", help="run each training as `LAUNCHER -m torchcvt train ...`, e.g. "
                        "'torchrun --nproc-per-node 8' (default: in this process)")


def add_model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="registered variant, e.g. cvt_13 (or cvt_13.ms_in1k); "
                        "default: the one --checkpoint records")


def add_pretrained_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pretrained", action="store_true",
                        help="the released weights of --model from the Hugging Face Hub (cache, HF_HOME and "
                        "HF_HUB_OFFLINE apply), with the ImageNet class names")


def add_ema_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ema", action="store_true",
                        help="the checkpoint's EMA weights (a `torchcvt train` run with train.ema=true; "
                        "timm's state_dict_ema) instead of its plain ones")


def select_ema(checkpoint: Any, ema: bool, option: str = "--checkpoint") -> Any:
    """--ema: the checkpoint (a path, or one already read) with its EMA weights; else it unchanged."""
    from ..weights import read_checkpoint

    if not ema:
        return checkpoint
    if not checkpoint:
        raise TorchcvtError(f"--ema selects a checkpoint's EMA weights: give {option} (released weights, "
                            "--pretrained, have none)")
    return (read_checkpoint(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint).ema_weights()


def resolve_weights(args: argparse.Namespace, required: bool = False) -> None:
    """--pretrained becomes --checkpoint (the released weights, read, with what the catalogue knows of
    them) and --model its architecture; --ema selects the checkpoint's EMA weights; without --model, the
    checkpoint is read and --model is the variant it records."""
    from timm.models import split_model_name_tag

    from ..config import VARIANTS
    from ..factory import pretrained_checkpoint
    from ..weights import checkpoint_variant, read_checkpoint

    if args.pretrained:
        if args.checkpoint:
            raise TorchcvtError("--pretrained and --checkpoint exclude each other")
        if args.model is None:
            raise TorchcvtError("--pretrained needs --model NAME, e.g. --model cvt_13.ms_in1k")
        select_ema(None, args.ema)
        args.model, args.checkpoint = pretrained_checkpoint(args.model)
    elif required and not args.checkpoint:
        raise TorchcvtError("give --checkpoint CKPT or --pretrained")
    args.checkpoint = select_ema(args.checkpoint, args.ema)
    if args.model is None:
        if not args.checkpoint:
            raise TorchcvtError("give --model NAME (or a --checkpoint that records its variant)")
        if isinstance(args.checkpoint, (str, Path)):
            args.checkpoint = read_checkpoint(args.checkpoint)
        args.model = checkpoint_variant(args.checkpoint)
        if args.model is None:
            raise TorchcvtError(f"{args.checkpoint.path} does not record which variant it holds: pass "
                           f"--model NAME (one of {', '.join(sorted(VARIANTS))})")
    args.model = split_model_name_tag(args.model)[0]


def model_overrides(items: Sequence[str]) -> dict:
    """--set FIELD=VALUE items as CvtConfig overrides, read by the parser that reads training overrides."""
    from ..config import CvtConfig
    from ..typed import parse_assignment, set_path

    overrides: dict = {}
    for item in items:
        key, value = parse_assignment(item, "--set", example="depth=[1,2,4]", key_name="FIELD")
        set_path(CvtConfig, overrides, key, value, origin="--set", noun="config field")
    return overrides


def make_predictor(args: argparse.Namespace, batch_size: int = 32):
    from ..checks import resolve_device
    from ..predict import Predictor

    resolve_device(args.device)
    resolve_weights(args)
    return Predictor.create(args.model, args.checkpoint, num_classes=args.num_classes, device=args.device,
                            batch_size=batch_size, **model_overrides(args.model_overrides))


def report_unreadable(command: str):
    from tqdm import tqdm

    def report(result) -> None:
        tqdm.write(f"torchcvt {command}: {result.path}: {result.error}", file=sys.stderr)

    return report


def unreadable_summary(command: str, results: Sequence) -> int:
    failed = sum(result.error is not None for result in results)
    if failed:
        print(f"torchcvt {command}: {failed} of {len(results)} file(s) could not be read or classified",
              file=sys.stderr)
    return 1 if failed else 0


def image_size(text: str) -> int | tuple[int, int]:
    try:
        sides = [int(side) for side in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}") from None
    if len(sides) > 2 or min(sides) < 1:
        raise argparse.ArgumentTypeError(f"expected N or HxW with positive sides, got {text!r}")
    return sides[0] if len(sides) == 1 else (sides[0], sides[1])
