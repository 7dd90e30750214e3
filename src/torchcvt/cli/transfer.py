"""`torchcvt transfer`: the paper's transfer experiment (Table 4) by ViT's protocol, or its offline proof."""

from __future__ import annotations

import argparse

from ..errors import TorchcvtError
from .common import add_suite_options


def add_transfer_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "transfer",
        help="fine-tune released weights on CIFAR, Pets and Flowers by ViT's protocol (Table 4)",
        description="For each weights x data set: a run per learning rate on the training split less a "
        "held-out development split (2%% CIFAR, 10%% Pets and Flowers), scored there; then the best rate on "
        "the whole training split, its last weights scored once on the test split. Each run is an ordinary "
        "`torchcvt train` under OUTPUT/runs; rerun the same command to resume, share OUTPUT between workers "
        "with --shard or a SLURM array. With neither --pretrained nor --dataset: the offline proof "
        "(cvt_digits pre-trained on digits 0-4, transferred to digits 5-9; docs/transfer.md).",
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides for every run")
    parser.add_argument("--pretrained", nargs="+", metavar="TAG", help="released weights (default with "
                        "--dataset: the three ImageNet-22k tags of Table 4)")
    parser.add_argument("--dataset", nargs="+", metavar="NAME", help="cifar10 cifar100 pets flowers102 (the "
                        "table's Hub ids and splits), or hf:OWNER/NAME or a dataset folder with --config "
                        "(default with --pretrained: all four)")
    parser.add_argument("--table4", action="store_true", help="the whole of Table 4: the three 22k weights "
                        "x the four data sets")
    parser.add_argument("--grid", nargs="+", type=float, metavar="LR", help="learning rates to choose from "
                        "(default ViT's 0.001 0.003 0.01 0.03; the proof's 0.01 0.03 0.1)")
    parser.add_argument("--seeds", type=int, default=1, help="final runs per pair, from seed 0 (default 1)")
    parser.add_argument("--steps", type=int, help="steps of every run instead of the recipe's (a tenth "
                        "warm-up); for trying the suite out, not for the paper's figures")
    parser.add_argument("--pretrain-epochs", type=int, help="the proof's pre-training length (default: "
                        "the digits recipe's 30 epochs)")
    parser.add_argument("--config", help="one recipe for every data set (default: each one's "
                        "configs/transfer-*.yaml)")
    parser.add_argument("--output", default="runs/transfer", help="suite folder (default runs/transfer)")
    add_suite_options(parser)
    parser.add_argument("--report-only", action="store_true", help="train nothing; rebuild the report from "
                        "the runs finished so far (give the same suite arguments)")
    parser.add_argument("--dry-run", action="store_true", help="train nothing: list every run, then one "
                        "JSON line")
    parser.set_defaults(run=_run_transfer)


def _run_transfer(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from .. import transfer
    from ..checks import check_output_folder
    from ..suite import RunFailed, parse_launcher, parse_shard

    if args.seeds < 1:
        raise TorchcvtError(f"--seeds must be at least 1, got {args.seeds}")
    for name, value, least in (("--steps", args.steps, 2), ("--pretrain-epochs", args.pretrain_epochs, 1)):
        if value is not None and value < least:
            raise TorchcvtError(f"{name} must be at least {least}, got {value}")
    if args.grid and any(lr <= 0 for lr in args.grid):
        raise TorchcvtError(f"--grid takes positive learning rates, got {args.grid}")
    root = Path(args.output)
    seeds = list(range(args.seeds))
    pretrain = None
    tags = args.pretrained or (list(transfer.TABLE4_WEIGHTS) if args.dataset or args.table4 else None)
    names = args.dataset or (list(transfer.TABLE) if tags else None)
    if tags:
        grid = args.grid or transfer.GRID
        plan = transfer.table_plan(tags, names, grid, seeds, args.overrides, args.config, args.steps)
    else:
        plan, pretrain = transfer.proof_plan(root, args.grid, seeds, args.overrides, args.steps,
                                             args.pretrain_epochs)
    if args.dry_run:
        rows = transfer.dry_run_rows(plan, root)
        print(transfer.format_dry_run(rows))
        print(json.dumps({"runs": rows}))
        return 0
    if args.report_only:
        check_output_folder(root, "--output")  # the report is written there
        paths = transfer.write_report(root, plan)
        print(f"report: {paths['report']}\nplot:   {paths['plot']}\njson:   {paths['json']}")
        return 0
    shard = parse_shard(args.shard)
    launcher = parse_launcher(args.launcher)
    check_output_folder(root, "--output")
    transfer.open_transfer_suite(root, plan)
    try:
        progress = transfer.run_suite(plan, root, shard, launcher, pretrain)
    except RunFailed as error:
        raise TorchcvtError(str(error)) from None
    paths = transfer.write_report(root, plan)
    print(progress.line(shard))
    print(f"report: {paths['report']}\nplot:   {paths['plot']}\njson:   {paths['json']}")
    return 0
