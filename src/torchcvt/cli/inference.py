"""`torchcvt predict`, `attention`, `export` and `embed`: a model and its weights applied to images."""

from __future__ import annotations

import argparse

from ..errors import TorchcvtError
from .common import add_model_arguments, image_size, make_predictor, report_unreadable, unreadable_summary


def _add_image_list_arguments(parser: argparse.ArgumentParser, quiet: str) -> None:
    """The model, the images and how they are read: the options predict and embed share."""
    add_model_arguments(parser)
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="processes decoding images (0: the main one)")
    parser.add_argument("--quiet", action="store_true", help=quiet)


def _check_workers(args: argparse.Namespace) -> None:
    if args.workers < 0:
        raise TorchcvtError(f"--workers must be 0 or more, got {args.workers}")


def add_predict_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "predict", help="classify image files and folders (top-k with class names)",
        description="Classify images with the model's own preprocessing. Folders are walked recursively. "
        "An unreadable file is reported (stderr and the reports) and the rest go on; the exit code is 0 "
        "only when every file was read.",
    )
    _add_image_list_arguments(parser, quiet="no table on stdout and no progress bar")
    parser.add_argument("--top-k", type=int, default=5, help="classes per image (default 5)")
    parser.add_argument("--json", help="write the JSON report here (a file, replaced whole; or streamed to a "
                        "device or pipe such as /dev/stdout)")
    parser.add_argument("--csv", help="write a CSV report here, one row per prediction (a file, replaced "
                        "whole; or streamed to a device or pipe such as /dev/stdout)")
    parser.set_defaults(run=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    from ..checks import check_output_file
    from ..reports import format_table, write_csv_report, write_json_report

    if args.top_k < 1:
        raise TorchcvtError(f"--top-k must be at least 1, got {args.top_k}")
    _check_workers(args)
    for option, path in (("--json", args.json), ("--csv", args.csv)):
        if path is not None:
            check_output_file(path, option, reads=[args.checkpoint, *args.paths], stream=True)
    predictor = make_predictor(args, args.batch_size)
    results = predictor.predict_files(args.paths, top_k=args.top_k, progress=False if args.quiet else None,
                                      on_error=report_unreadable("predict"), workers=args.workers)
    if args.json:
        write_json_report(results, args.json)
    if args.csv:
        write_csv_report(results, args.csv)
    if not args.quiet:
        print(format_table(results))
    return unreadable_summary("predict", results)


def add_attention_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "attention", help="attention maps of one image as a PNG overlay (per head and averaged)",
        description="Draw what a query attends to: by default the class token in the last block of the last "
        "stage with more than one key (a stage whose key grid is 1x1 at this input size would draw a uniform "
        "map); in a stage without a class token, the position given by --query (default: the image centre). "
        "Stages and blocks are numbered from 1, as in `torchcvt info`. Keys, subsampled by stride_kv, are "
        "placed at their true positions on the model's input view of the image.",
    )
    add_model_arguments(parser)
    parser.add_argument("image", help="image file")
    parser.add_argument("-o", "--output", required=True, help="PNG to write (a file, replaced whole; or "
                        "streamed to a device or pipe such as /dev/stdout)")
    parser.add_argument("--stage", type=int, help="stage, numbered from 1 as in `torchcvt info` "
                        "(default: the last with more than one key)")
    parser.add_argument("--block", type=int, help="block within the stage, from 1 (default: the last)")
    parser.add_argument("--query", type=float, nargs=2, metavar=("X", "Y"),
                        help="query pixel in the model's input (as drawn in the PNG), not the class token")
    parser.set_defaults(run=_run_attention)


def _run_attention(args: argparse.Namespace) -> int:
    import sys

    from ..attention_maps import (
        attention_map,
        default_stage,
        denormalize,
        key_grid,
        png_path,
        render_attention,
    )
    from ..checks import check_output_file
    from ..inputs import UnreadableImageError

    check_output_file(png_path(args.output), "-o", reads=[args.checkpoint, args.image], stream=True)
    predictor = make_predictor(args, 1)
    model = predictor.model
    stages = model.config.num_stages
    if args.stage is not None and not 1 <= args.stage <= stages:
        raise TorchcvtError(f"--stage {args.stage} does not exist: the model has stages 1..{stages}")
    try:
        x = predictor.preprocess(args.image)
    except UnreadableImageError as error:
        raise TorchcvtError(f"{args.image}: {error}") from None
    height, width = x.shape[-2:]
    stage = default_stage(model.config, height, width) if args.stage is None else args.stage - 1
    depth = len(model.stages[stage].blocks)
    if args.block is not None and not 1 <= args.block <= depth:
        raise TorchcvtError(f"--block {args.block} does not exist: stage {stage + 1} has blocks 1..{depth}")
    block = -1 if args.block is None else args.block - 1
    amap = attention_map(model, x[None].to(predictor.device), stage, block, args.query)
    if args.stage is None and stage != stages - 1:
        print(f"drawing stage {stage + 1}: the last stage's key grid is 1x1 at {width}x{height} (one key, a "
              f"uniform map); --stage {stages} draws it anyway")
    elif amap.single_key:
        others = [str(i + 1) for i in range(stages) if key_grid(model.config, i, height, width) != (1, 1)]
        hint = f"; stages with more keys: {', '.join(others)}" if others else ""
        print(f"torchcvt attention: warning: stage {stage + 1}'s key grid is 1x1 at {width}x{height}: "
              f"every query sees one key, so the map is uniform{hint}", file=sys.stderr)
    picture = denormalize(x, predictor.data_config["mean"], predictor.data_config["std"])
    written = render_attention(picture, amap, args.output)
    what = "class token" if amap.query is None else f"query at ({amap.query[0]:.0f}, {amap.query[1]:.0f})"
    print(f"wrote {written} (stage {stage + 1} of {stages}, block {amap.block + 1} of {depth}, {what}, "
          f"{amap.weights.shape[1]} head(s), {amap.weights.shape[2]}x{amap.weights.shape[3]} keys)")
    return 0


def add_export_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "export", help="export to ONNX, TorchScript or a torch.export program (dynamic batch and size)",
        description="Export the model in eval mode. All formats take any batch size and image size "
        "(the exported program checks the smallest size its graph supports).",
    )
    add_model_arguments(parser)
    parser.add_argument("--format", required=True, choices=("onnx", "torchscript", "exported"))
    parser.add_argument("-o", "--output", required=True, help="file to write (.onnx, .pt, .pt2), replaced "
                        "whole; not a device or pipe")
    parser.add_argument("--img-size", type=image_size, metavar="N|HxW",
                        help="size of the example input (default: the model's input size)")
    parser.set_defaults(run=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from ..checks import check_output_file
    from ..export import describe_sizes, example_size, export_model, supported_sizes

    check_output_file(args.output, "-o", reads=[args.checkpoint])
    model = make_predictor(args).model
    size = args.img_size if isinstance(args.img_size, tuple) else (args.img_size, args.img_size)
    path = export_model(model, args.output, args.format, *size)
    sizes = "height and width" if args.format == "torchscript" else describe_sizes(
        supported_sizes(model, *example_size(model, *size)))
    print(f"wrote {path} ({args.format}, dynamic batch, {sizes})")
    return 0


def add_embed_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "embed", help="pre-logits features of images, one row per image, with the file list",
        description="Write the features the classifier sees (for retrieval and linear probing) to a "
        ".safetensors file (file list in its metadata) or a .npy file (file list in OUT.files.json). "
        "Unreadable files are reported and left out; the exit code is 0 only when every file was read.",
    )
    _add_image_list_arguments(parser, quiet="no progress bar")
    parser.add_argument("-o", "--output", required=True, help="OUT.safetensors or OUT.npy (with "
                        "OUT.files.json), replaced whole; not a device or pipe")
    parser.set_defaults(run=_run_embed)


def _run_embed(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..checks import check_output_file
    from ..reports import save_embeddings

    _check_workers(args)
    if Path(args.output).suffix not in (".safetensors", ".npy"):
        raise TorchcvtError(f"-o must end in .safetensors or .npy, got {args.output!r}")
    from ..reports import embedding_list_path

    outputs = [args.output] + ([embedding_list_path(args.output)] if args.output.endswith(".npy") else [])
    for output in outputs:
        check_output_file(output, "-o", reads=[args.checkpoint, *args.paths])
    predictor = make_predictor(args, args.batch_size)
    features, results = predictor.embed_files(args.paths, progress=False if args.quiet else None,
                                              on_error=report_unreadable("embed"), workers=args.workers)
    files = [result.path for result in results if result.error is None]
    written = save_embeddings(args.output, features, files)
    print(f"wrote {', '.join(map(str, written))} ({features.shape[0]} x {features.shape[1]} features)")
    return unreadable_summary("embed", results)
