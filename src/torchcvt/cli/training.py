"""`torchcvt train` and `torchcvt eval`."""

from __future__ import annotations

import argparse

from ..errors import TorchcvtError
from .common import (
    add_ema_option,
    add_model_option,
    add_pretrained_argument,
    model_overrides,
    resolve_weights,
)


def add_train_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "train",
        help="train or fine-tune a CvT (the paper's recipe); with no data, on the embedded digits",
        description="Train from a YAML experiment (configs/*.yaml) with dotted KEY=VALUE overrides. "
        "With --data and no --config it picks a recipe for the job (fine-tuning with --pretrained, else "
        "from scratch sized for the data) and says which; with neither it trains cvt_digits on "
        "scikit-learn's digits. Runs on N processes under "
        "`torchrun --nproc-per-node N -m torchcvt train ...`.",
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. train.epochs=10 optim.lr=1e-3 model.freeze_stages=1")
    parser.add_argument("--config", action="append", help="YAML experiment file (one; override its keys "
                        "with KEY=VALUE)")
    parser.add_argument("--output", help="run folder for checkpoints, metrics and curves (train.output)")
    parser.add_argument("--data", help="ImageFolder root holding train/ and val/, or a Hugging Face dataset "
                        "(hf:OWNER/NAME[:CONFIG], a save_to_disk or parquet folder): data.train, data.val")
    parser.add_argument("--pretrained", metavar="TAG",
                        help="fine-tune released weights, e.g. cvt_13_384.ms_in22k_ft_in1k, from the Hugging "
                        "Face Hub cache (model.pretrained; sets model.name to the tag's variant)")
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

    from ..engine import TrainingDiverged, dry_run, train
    from ..engine.reporting import accuracy_text
    from ..engine.resolve import resolve_config

    if args.world_size is not None and not args.dry_run:
        raise TorchcvtError("--world-size only applies to --dry-run (torchrun sets the real one)")

    if args.no_resume and args.resume is not None:
        raise TorchcvtError("--no-resume and --resume both given: give one (--no-resume starts afresh, "
                            "--resume continues from a checkpoint)")
    if args.pretrained is not None and not args.pretrained.strip():
        raise TorchcvtError('--pretrained "" names no weights: give a tag (e.g. cvt_13.ms_in1k), or leave '
                            "--pretrained out to train from scratch")
    if args.config and len(args.config) > 1:
        raise TorchcvtError(f"--config given {len(args.config)} times ({', '.join(args.config)}); give one "
                            "experiment file and change its keys with KEY=VALUE overrides")
    values = {"train.output": args.output, "train.resume": args.resume,
              "train.auto_resume": False if args.no_resume else None,
              "data.strict": True if args.strict else None, "train.quiet": True if args.quiet else None}
    resolved = resolve_config(
        args.config[0] if args.config else None, args.overrides,
        {key: value for key, value in values.items() if value is not None},
        data=args.data, pretrained=args.pretrained,
    )
    cfg = resolved.config
    line = resolved.recipe_line()
    if line is not None and os.environ.get("RANK", "0") == "0":
        print(line, flush=True)
    if args.dry_run:
        import json

        import yaml

        plan = dry_run(cfg, 1 if args.world_size is None else args.world_size)
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())
        print(json.dumps(plan))
        return 0
    try:
        summary = train(cfg)
    except TrainingDiverged as error:
        raise TorchcvtError(str(error)) from None
    if os.environ.get("RANK", "0") == "0":
        best = accuracy_text(summary["best_val_top1"], summary["best_val_top5"], summary.get("classes"),
                             " (top-5 {:.2f}%)")
        print(f"best val {best}, "
              f"final {100 * summary['final_val_top1']:.2f}%{_ema_scores(summary)}, "
              f"{summary['epochs']} epochs in {summary['wall_seconds']:.1f} s "
              f"({summary['images_per_second']:.0f} img/s)")
        print(f"checkpoint: {summary['checkpoint']}\ncurves:     {summary['curves']}\n"
              f"report:     {summary['summary']}\nmetrics:    {summary['metrics']}")
    return 0


def _ema_scores(summary: dict) -> str:
    """The EMA model's final scores, for a run with train.ema."""
    if summary.get("ema_final_val_top1") is None:
        return ""
    from ..engine.reporting import accuracy_text

    scores = accuracy_text(summary["ema_final_val_top1"], summary["ema_final_val_top5"],
                           summary.get("classes"), ", top-5 {:.2f}%")
    return f" (EMA: final {scores.removeprefix('top-1 ')}; use it with --ema)"


def add_eval_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("eval", help="top-1, top-5 and loss of a checkpoint on an ImageFolder tree",
                            description="Evaluate with the checkpoint's class list; writes a JSON "
                            "report and, for up to 100 classes, a confusion-matrix PNG.")
    add_model_option(parser)
    parser.add_argument("--checkpoint", help="official, transformers or torchcvt checkpoint")
    add_pretrained_argument(parser)
    add_ema_option(parser)
    parser.add_argument("--data", required=True, help="ImageFolder tree DIR/<class>/<image>, or a Hugging "
                        "Face dataset split (SOURCE#SPLIT; a whole dataset: its validation split)")
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
    from ..engine import evaluate_checkpoint
    from ..engine.reporting import accuracy_text

    if args.pretrained and args.output is None:
        args.output = "."  # not next to the weights, inside the Hugging Face cache
    resolve_weights(args, required=True)
    report = evaluate_checkpoint(
        args.model, args.checkpoint, args.data, output=args.output, batch_size=args.batch_size,
        workers=args.workers, real_labels=args.real_labels, device=args.device, strict=args.strict,
        overrides=model_overrides(args.model_overrides),
    )
    scores = accuracy_text(report["top1"], report["top5"], report["classes"], "  top-5 {:.2f}%")
    print(f"{scores}  loss {report['loss']:.4f}  "
          f"({report['images']} images, {report['classes']} classes)")
    if "real_top1" in report:
        print(f"ReaL top-1 {100 * report['real_top1']:.2f}%  ReaL top-5 {100 * report['real_top5']:.2f}%")
    if report["unreadable"]:
        print(f"{report['unreadable']} unreadable image(s) not scored (listed in the report)")
    print(f"report: {report['report_json']}")
    if "confusion_png" in report:
        print(f"confusion matrix: {report['confusion_png']}")
    return 0
