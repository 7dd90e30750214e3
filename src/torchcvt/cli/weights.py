"""`torchcvt convert` and `torchcvt info`."""

from __future__ import annotations

import argparse
import sys

from ..errors import TorchcvtError
from ..hf_notes import APPROXIMATION
from .common import add_ema_option, image_size, model_overrides, select_ema


def add_convert_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "convert", help="convert a checkpoint between the official, transformers and torchcvt formats",
        description="Read SRC in any supported format (detected by content) and write it to DST: 'official' "
        "writes a .pth state dict, 'hf' a directory for transformers' "
        "CvtForImageClassification.from_pretrained, 'torchcvt' a directory (or a .safetensors file) with "
        "model.safetensors and config.json. transformers' CvT always runs exact GELU, so the hf copy of a "
        "QuickGELU model (the released weights and everything fine-tuned from them) is an approximation: "
        + APPROXIMATION,
    )
    parser.add_argument("paths", nargs="+", metavar="[SRC] DST",
                        help="SRC: checkpoint file or directory (not with --pretrained); DST: a .pth file "
                        "(official), a directory (hf, torchcvt) or a .safetensors file (torchcvt)")
    parser.add_argument("--to", required=True, choices=("hf", "official", "torchcvt"), help="output format")
    parser.add_argument("--model", help="registered variant, e.g. cvt_13; required unless SRC is a torchcvt "
                        "checkpoint, which records its variant")
    parser.add_argument("--activation", choices=("quick_gelu", "gelu"),
                        help="activation of the converted model (default: the one the source records; a "
                        "transformers folder that records none gets quick_gelu, with a notice)")
    parser.add_argument("--remote-code", action="store_true",
                        help="with --to hf: also write modeling_torchcvt.py, transformers' CvT with the "
                        "model's activation, which transformers runs exactly when loaded with "
                        "trust_remote_code=True (pipeline(..., trust_remote_code=True)); loading with "
                        "trust_remote_code runs code from the folder, so it is never the default")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DST (never SRC)")
    parser.add_argument("--set", dest="model_overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="model config override for a source without a config, e.g. --set depth=[1,2,4]")
    add_ema_option(parser)
    parser.add_argument("--pretrained", action="store_true",
                        help="convert the released weights of --model (e.g. cvt_13.ms_in1k) from the Hugging "
                        "Face Hub instead of SRC; as the QuickGELU weights they are unless --activation says "
                        "otherwise")
    parser.set_defaults(run=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    import warnings

    from ..factory import convert_checkpoint, pretrained_checkpoint

    if len(args.paths) > 2:
        raise TorchcvtError(f"convert takes SRC and DST, got {len(args.paths)} paths: {' '.join(args.paths)}")
    if args.pretrained:
        if len(args.paths) != 1 or args.model is None:
            raise TorchcvtError("--pretrained takes --model NAME and DST, without SRC")
        select_ema(None, args.ema, "SRC")
        args.model, args.src = pretrained_checkpoint(args.model)  # with the activation they were trained with
    elif len(args.paths) != 2:
        raise TorchcvtError("give SRC and DST, or --pretrained --model NAME and DST")
    else:
        args.src = select_ema(args.paths[0], args.ema, "SRC")
    args.dst = args.paths[-1]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = convert_checkpoint(args.src, args.dst, args.to, args.model, args.activation, args.overwrite,
                                   model_overrides(args.model_overrides), args.remote_code)
    for warning in caught:
        print(f"torchcvt convert: warning: {warning.message}", file=sys.stderr)
    print(f"wrote {args.dst} ({args.to} format, {model.pretrained_cfg['architecture']}, "
          f"{model.num_classes} classes, activation {model.config.activation})")
    return 0


def add_info_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "info", help="parameters, GFLOPs and stage layout of a registered model",
        description="Count parameters and FLOPs as the CvT paper does (one multiply-add = one FLOP) and show "
        "each stage's token grid, width, heads and depth, and the model's data config.",
    )
    parser.add_argument("name", help="registered variant, e.g. cvt_13 (see torchcvt.list_models())")
    parser.add_argument("--img-size", type=image_size, metavar="N|HxW",
                        help="input size (default: the variant's, 224 or 384)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.set_defaults(run=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    import json

    from ..flops import format_model_info, model_info

    info = model_info(args.name, args.img_size)
    print(json.dumps(info) if args.json else format_model_info(info))
    return 0
