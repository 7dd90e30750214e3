"""The torchcvt command: parse arguments, call the library, print. No logic of its own."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager


class CliError(Exception):
    """A user error reported as one line on stderr with exit code 2, never a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchcvt", description="CvT: Convolutional vision Transformers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in (add_info_command, add_train_command, add_eval_command, add_convert_command,
                        add_predict_command, add_attention_command, add_export_command, add_embed_command,
                        add_bench_command):
        add_command(sub)
    return parser


def add_train_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "train",
        help="train or fine-tune a CvT (the paper's recipe); with no data, on the embedded digits",
        description="Train from a YAML experiment (configs/*.yaml) with dotted KEY=VALUE overrides. "
        "With neither --config nor --data it trains cvt_digits on scikit-learn's digits. "
        "Runs on N processes under `torchrun --nproc-per-node N -m torchcvt train ...`.",
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. train.epochs=10 optim.lr=1e-3 model.freeze_stages=1")
    parser.add_argument("--config", action="append", help="YAML experiment file (one; override its keys "
                        "with KEY=VALUE)")
    parser.add_argument("--output", help="run folder for checkpoints, metrics and curves (train.output)")
    parser.add_argument("--data", help="ImageFolder root holding train/ and val/ (data.train, data.val)")
    parser.add_argument("--resume", help="checkpoint or run folder to resume from (default: OUTPUT/last.pth "
                        "if present)")
    parser.add_argument("--no-resume", action="store_true", help="start afresh: a previous run in OUTPUT is "
                        "moved to OUTPUT/previous-N")
    parser.add_argument("--strict", action="store_true", help="stop at the first unreadable image")
    parser.add_argument("--quiet", action="store_true", help="plain log lines instead of progress bars")
    parser.add_argument("--dry-run", action="store_true",
                        help="read no images, train nothing: print the resolved config, then one JSON line "
                        "with the batch, LR per epoch, precision and transforms")
    parser.add_argument("--world-size", type=int,
                        help="with --dry-run: the number of processes to plan for (default 1)")
    parser.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from .engine import TrainingDiverged, dry_run, load_config, train

    if args.world_size is not None and not args.dry_run:
        raise CliError("--world-size only applies to --dry-run (torchrun sets the real one)")

    values = {"train.output": args.output, "train.resume": args.resume}
    if args.data:
        root = Path(args.data)
        values.update({"data.train": str(root / "train"), "data.val": str(root / "val")})
    values = {key: value for key, value in values.items() if value is not None}
    if args.config and len(args.config) > 1:
        raise CliError(f"--config given {len(args.config)} times ({', '.join(args.config)}); give one "
                       "experiment file and change its keys with KEY=VALUE overrides")
    values.update({"train.auto_resume": False} if args.no_resume else {})
    values.update({"data.strict": True} if args.strict else {})
    values.update({"train.quiet": True} if args.quiet else {})
    config = args.config[0] if args.config else None
    if args.dry_run:
        import json

        import yaml

        cfg = load_config(config, args.overrides, values)
        plan = dry_run(cfg, 1 if args.world_size is None else args.world_size)
        print(yaml.safe_dump(cfg, sort_keys=False).rstrip())
        print(json.dumps(plan))
        return 0
    try:
        summary = train(load_config(config, args.overrides, values))
    except TrainingDiverged as error:
        raise CliError(str(error)) from None
    if os.environ.get("RANK", "0") == "0":
        print(f"best val top-1 {100 * summary['best_val_top1']:.2f}% "
              f"(top-5 {100 * summary['best_val_top5']:.2f}%), "
              f"final {100 * summary['final_val_top1']:.2f}%, {summary['epochs']} epochs in "
              f"{summary['wall_seconds']:.1f} s ({summary['images_per_second']:.0f} img/s)")
        print(f"checkpoint: {summary['checkpoint']}\ncurves:     {summary['curves']}\n"
              f"report:     {summary['summary']}\nmetrics:    {summary['metrics']}")
    return 0


def add_eval_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("eval", help="top-1, top-5 and loss of a checkpoint on an ImageFolder tree",
                            description="Evaluate with the checkpoint's class list; writes a JSON "
                            "report and, for up to 100 classes, a confusion-matrix PNG.")
    parser.add_argument("--model", required=True, help="registered variant, e.g. cvt_13 (or cvt_13.ms_in1k)")
    parser.add_argument("--checkpoint", help="official, transformers or torchcvt checkpoint")
    _add_pretrained_argument(parser)
    parser.add_argument("--data", required=True, help="ImageFolder tree: DIR/<class>/<image>")
    parser.add_argument("--output", help="folder for the report (default: the checkpoint's folder; with "
                        "--pretrained the current one)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--real-labels", help="ImageNet-ReaL real.json, for ReaL top-1/top-5 on ImageNet val")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--strict", action="store_true", help="stop at the first unreadable image")
    parser.add_argument("--set", dest="model_overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="model config field the checkpoint does not record, e.g. --set depth=[1,2,4]")
    parser.set_defaults(run=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from .engine import evaluate_checkpoint

    if args.pretrained and args.output is None:
        args.output = "."  # not next to the weights, inside the Hugging Face cache
    _resolve_weights(args, required=True)
    report = evaluate_checkpoint(
        args.model, args.checkpoint, args.data, output=args.output, batch_size=args.batch_size,
        workers=args.workers, real_labels=args.real_labels, device=args.device, strict=args.strict,
        overrides=_model_overrides(args.model_overrides),
    )
    print(f"top-1 {100 * report['top1']:.2f}%  top-5 {100 * report['top5']:.2f}%  loss {report['loss']:.4f}  "
          f"({report['images']} images, {report['classes']} classes)")
    if "real_top1" in report:
        print(f"ReaL top-1 {100 * report['real_top1']:.2f}%  ReaL top-5 {100 * report['real_top5']:.2f}%")
    if report["unreadable"]:
        print(f"{report['unreadable']} unreadable image(s) not scored (listed in the report)")
    print(f"report: {report['report_json']}")
    if "confusion_png" in report:
        print(f"confusion matrix: {report['confusion_png']}")
    return 0


def add_convert_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "convert", help="convert a checkpoint between the official, transformers and torchcvt formats",
        description="Read SRC in any supported format (detected by content) and write it to DST: 'official' "
        "writes a .pth state dict, 'hf' a directory for transformers' "
        "CvtForImageClassification.from_pretrained, 'torchcvt' a directory (or a .safetensors file) with "
        "model.safetensors and config.json.",
    )
    parser.add_argument("paths", nargs="+", metavar="[SRC] DST",
                        help="SRC: checkpoint file or directory (not with --pretrained); DST: a .pth file "
                        "(official), a directory (hf, torchcvt) or a .safetensors file (torchcvt)")
    parser.add_argument("--to", required=True, choices=("hf", "official", "torchcvt"), help="output format")
    parser.add_argument("--model", help="registered variant, e.g. cvt_13; required unless SRC is a torchcvt "
                        "checkpoint, which records its variant")
    parser.add_argument("--activation", choices=("quick_gelu", "gelu"),
                        help="activation of the converted model (default: the source's, gelu for hf)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DST (never SRC)")
    parser.add_argument("--set", dest="model_overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="model config override for a source without a config, e.g. --set depth=[1,2,4]")
    parser.add_argument("--pretrained", action="store_true",
                        help="convert the released weights of --model (e.g. cvt_13.ms_in1k) from the Hugging "
                        "Face Hub instead of SRC; as QuickGELU weights unless --activation says otherwise")
    parser.set_defaults(run=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    import warnings

    from .checkpoints import convert_checkpoint
    from .factory import pretrained_weights

    if len(args.paths) > 2:
        raise CliError(f"convert takes SRC and DST, got {len(args.paths)} paths: {' '.join(args.paths)}")
    if args.pretrained:
        if len(args.paths) != 1 or args.model is None:
            raise CliError("--pretrained takes --model NAME and DST, without SRC")
        args.model, args.src = pretrained_weights(args.model)
        # The Hub mirrors the official weights, trained with QuickGELU, in transformers' format.
        args.activation = args.activation or "quick_gelu"
    elif len(args.paths) != 2:
        raise CliError("give SRC and DST, or --pretrained --model NAME and DST")
    else:
        args.src = args.paths[0]
    args.dst = args.paths[-1]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = convert_checkpoint(args.src, args.dst, args.to, args.model, args.activation, args.overwrite,
                                   _model_overrides(args.model_overrides))
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
    parser.add_argument("--img-size", type=_image_size, metavar="N|HxW",
                        help="input size (default: the variant's, 224 or 384)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.set_defaults(run=_run_info)


def _image_size(text: str) -> int | tuple[int, int]:
    try:
        sides = [int(side) for side in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}") from None
    if len(sides) > 2 or min(sides) < 1:
        raise argparse.ArgumentTypeError(f"expected N or HxW with positive sides, got {text!r}")
    return sides[0] if len(sides) == 1 else (sides[0], sides[1])


def _run_info(args: argparse.Namespace) -> int:
    import json

    from .flops import format_model_info, model_info

    info = model_info(args.name, args.img_size)
    print(json.dumps(info) if args.json else format_model_info(info))
    return 0


def _add_model_arguments(parser: argparse.ArgumentParser, checkpoint_required: bool = False) -> None:
    parser.add_argument("--model", required=True, help="registered variant, e.g. cvt_13 (or cvt_13.ms_in1k)")
    parser.add_argument("--checkpoint", required=checkpoint_required,
                        help="official, transformers or torchcvt checkpoint (its class list is used)")
    _add_pretrained_argument(parser)
    parser.add_argument("--num-classes", type=int, help="head size (default: the checkpoint's, else 1000)")
    parser.add_argument("--set", dest="model_overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="model config override, e.g. --set depth=[1,2,4] (repeatable)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")


def _add_pretrained_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pretrained", action="store_true",
                        help="the released weights of --model from the Hugging Face Hub (cache, HF_HOME and "
                        "HF_HUB_OFFLINE apply), with the ImageNet class names")


def _resolve_weights(args: argparse.Namespace, required: bool = False) -> None:
    """--pretrained becomes --checkpoint (the local weights file) and --model its architecture."""
    from timm.models import split_model_name_tag

    from .factory import pretrained_weights

    if args.pretrained:
        if args.checkpoint:
            raise CliError("--pretrained and --checkpoint exclude each other")
        args.model, args.checkpoint = pretrained_weights(args.model)
    elif required and not args.checkpoint:
        raise CliError("give --checkpoint CKPT or --pretrained")
    args.model = split_model_name_tag(args.model)[0]


def _model_overrides(items: Sequence[str]) -> dict:
    import yaml

    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"--set expects FIELD=VALUE, got {item!r}")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def _predictor(args: argparse.Namespace, batch_size: int = 32):
    from .checks import resolve_device
    from .predict import Predictor

    resolve_device(args.device)
    _resolve_weights(args)
    return Predictor.create(args.model, args.checkpoint, num_classes=args.num_classes, device=args.device,
                            batch_size=batch_size, **_model_overrides(args.model_overrides))


def _report_unreadable(command: str):
    from tqdm import tqdm

    def report(result) -> None:
        tqdm.write(f"torchcvt {command}: {result.path}: {result.error}", file=sys.stderr)

    return report


def _unreadable_summary(command: str, results: Sequence) -> int:
    failed = sum(result.error is not None for result in results)
    if failed:
        print(f"torchcvt {command}: {failed} of {len(results)} file(s) could not be read or classified",
              file=sys.stderr)
    return 1 if failed else 0


def add_predict_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "predict", help="classify image files and folders (top-k with class names)",
        description="Classify images with the model's own preprocessing. Folders are walked recursively. "
        "An unreadable file is reported (stderr and the reports) and the rest go on; the exit code is 0 "
        "only when every file was read.",
    )
    _add_model_arguments(parser)
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    parser.add_argument("--top-k", type=int, default=5, help="classes per image (default 5)")
    parser.add_argument("--json", help="write the JSON report here")
    parser.add_argument("--csv", help="write a CSV report here (one row per prediction)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="processes decoding images (0: the main one)")
    parser.add_argument("--quiet", action="store_true", help="no table on stdout and no progress bar")
    parser.set_defaults(run=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    from .checks import check_output_file
    from .predict import format_table, write_csv_report, write_json_report

    if args.top_k < 1:
        raise CliError(f"--top-k must be at least 1, got {args.top_k}")
    if args.workers < 0:
        raise CliError(f"--workers must be 0 or more, got {args.workers}")
    for option, path in (("--json", args.json), ("--csv", args.csv)):
        if path is not None:
            check_output_file(path, option)
    predictor = _predictor(args, args.batch_size)
    results = predictor.predict_files(args.paths, top_k=args.top_k, progress=False if args.quiet else None,
                                      on_error=_report_unreadable("predict"), workers=args.workers)
    if args.json:
        write_json_report(results, args.json)
    if args.csv:
        write_csv_report(results, args.csv)
    if not args.quiet:
        print(format_table(results))
    return _unreadable_summary("predict", results)


def add_attention_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "attention", help="attention maps of one image as a PNG overlay (per head and averaged)",
        description="Draw what a query attends to: by default the class token of the last stage; in a stage "
        "without one, the position given by --query (default: the image centre). Keys, subsampled by "
        "stride_kv, are placed at their true positions on the model's input view of the image.",
    )
    _add_model_arguments(parser)
    parser.add_argument("image", help="image file")
    parser.add_argument("-o", "--output", required=True, help="PNG to write")
    parser.add_argument("--stage", type=int, default=-1, help="stage index, 0-based (default: the last)")
    parser.add_argument("--block", type=int, default=-1, help="block within the stage (default: the last)")
    parser.add_argument("--query", type=float, nargs=2, metavar=("X", "Y"),
                        help="query pixel in the model's input (as drawn in the PNG), not the class token")
    parser.set_defaults(run=_run_attention)


def _run_attention(args: argparse.Namespace) -> int:
    from .attention import attention_map, denormalize, png_path, render_attention
    from .checks import check_output_file

    check_output_file(png_path(args.output), "-o")
    predictor = _predictor(args, 1)
    x = predictor.preprocess(args.image)
    amap = attention_map(predictor.model, x[None].to(predictor.device), args.stage, args.block, args.query)
    picture = denormalize(x, predictor.data_config["mean"], predictor.data_config["std"])
    written = render_attention(picture, amap, args.output)
    what = "class token" if amap.query is None else f"query at ({amap.query[0]:.0f}, {amap.query[1]:.0f})"
    print(f"wrote {written} (stage {amap.stage}, block {amap.block}, {what}, "
          f"{amap.weights.shape[1]} head(s), {amap.weights.shape[2]}x{amap.weights.shape[3]} keys)")
    return 0


def add_export_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "export", help="export to ONNX, TorchScript or a torch.export program (dynamic batch and size)",
        description="Export the model in eval mode. All formats take any batch size and image size "
        "(the exported program checks the smallest size its graph supports).",
    )
    _add_model_arguments(parser)
    parser.add_argument("--format", required=True, choices=("onnx", "torchscript", "exported"))
    parser.add_argument("-o", "--output", required=True, help="file to write (.onnx, .pt, .pt2)")
    parser.add_argument("--img-size", type=_image_size, metavar="N|HxW",
                        help="size of the example input (default: the model's input size)")
    parser.set_defaults(run=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from .checks import check_output_file
    from .export import describe_sizes, example_size, export_model, supported_sizes

    check_output_file(args.output, "-o")
    model = _predictor(args).model
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
    _add_model_arguments(parser)
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    parser.add_argument("-o", "--output", required=True, help="OUT.safetensors or OUT.npy")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="processes decoding images (0: the main one)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=_run_embed)


def _run_embed(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .checks import check_output_file
    from .predict import save_embeddings

    if args.workers < 0:
        raise CliError(f"--workers must be 0 or more, got {args.workers}")
    if Path(args.output).suffix not in (".safetensors", ".npy"):
        raise CliError(f"-o must end in .safetensors or .npy, got {args.output!r}")
    check_output_file(args.output, "-o")
    predictor = _predictor(args, args.batch_size)
    features, results = predictor.embed_files(args.paths, progress=False if args.quiet else None,
                                              on_error=_report_unreadable("embed"), workers=args.workers)
    files = [result.path for result in results if result.error is None]
    written = save_embeddings(args.output, features, files)
    print(f"wrote {', '.join(map(str, written))} ({features.shape[0]} x {features.shape[1]} features)")
    return _unreadable_summary("embed", results)


def add_bench_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "bench", help="speed and memory against transformers' CvT on the same weights",
        description="Time torchcvt and transformers' CvtForImageClassification side by side (fp32 and bf16 "
        "inference, a training step, resolutions 224/384/512) and write a markdown table.",
    )
    parser.add_argument("--model", default="cvt_13", help="registered variant (default: cvt_13)")
    parser.add_argument("--output", default="docs/benchmarks.md", help="markdown file to write")
    parser.add_argument("--quick", action="store_true", help="small inputs and one repeat: a smoke run")
    parser.add_argument("--repeats", type=int, help="timed runs per side (default 5, 1 with --quick)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--bf16", action="store_true", default=None,
                        help="time bf16 inference even on a CPU without native bf16 (tens of minutes there)")
    parser.set_defaults(run=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    from .bench import format_markdown, run_benchmark, write_report

    if args.repeats is not None and args.repeats < 1:
        raise CliError(f"--repeats must be at least 1, got {args.repeats}")
    if args.threads is not None:
        if args.threads < 1:
            raise CliError(f"--threads must be at least 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    report = run_benchmark(args.model, quick=args.quick, memory=not args.no_memory, repeats=args.repeats,
                           bf16=args.bf16)
    print(format_markdown(report), end="")
    print(f"wrote {write_report(report, args.output)}")
    return 0


# Commands whose stdout carries their result (a table of predictions): their notices go to stderr.
_RESULT_ON_STDOUT = ("predict", "embed")


class _Console(logging.Handler):
    """The library's log records as the command's output: notices on stdout, warnings on stderr."""

    def __init__(self, command: str):
        super().__init__(logging.INFO)
        self.command = command

    def emit(self, record: logging.LogRecord) -> None:
        # sys.stdout/sys.stderr looked up per record: they may be replaced (tests, tqdm) while running.
        if record.levelno >= logging.WARNING:
            _stderr_line(f"torchcvt {self.command}: warning: {record.getMessage()}")
        elif self.command in _RESULT_ON_STDOUT:
            _stderr_line(f"torchcvt {self.command}: {record.getMessage()}")
        else:
            print(record.getMessage(), flush=True)


def _stderr_line(text: str) -> None:
    """text and its newline in one write: lines from several processes (torchrun's ranks) sharing a
    stderr then never run into each other, as print's separate newline write let them."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


@contextmanager
def _console_logging(command: str) -> Iterator[None]:
    logger = logging.getLogger("torchcvt")
    handler, level = _Console(command), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@contextmanager
def hold_interrupt() -> Iterator[None]:
    """Hold a Ctrl-C until the block is done: some libraries swallow KeyboardInterrupt while importing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "paths") and not any(item.startswith("-") for item in extra):
        args.paths += extra  # `convert SRC --to hf DST`: argparse takes positionals in one run only
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        with _console_logging(args.command):
            return int(args.run(args) or 0)
    except (CliError, ValueError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
            FileExistsError) as error:
        _stderr_line(f"torchcvt {args.command}: error: {error}")
        return 2
    except KeyboardInterrupt:
        _stderr_line(f"torchcvt {args.command}: interrupted")
        return 130
    except BrokenPipeError:
        # The reader went away (`torchcvt info cvt_13 | head`): stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception:
        # Not a user error: a bug. Show where it happened instead of hiding it behind one line.
        traceback.print_exc()
        _stderr_line(f"torchcvt {args.command}: internal error: this is a bug in torchcvt; please report it "
                     "with the traceback above")
        return 1
