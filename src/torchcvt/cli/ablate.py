"""`torchcvt ablate`: the paper's ablation studies (Tables 5-8) on the embedded digits or a user's data."""

from __future__ import annotations

import argparse

from ..errors import TorchcvtError
from .common import add_suite_options


def add_ablate_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "ablate",
        help="run the paper's ablation studies (Tables 5-8) and write a report",
        description="Train every row of the chosen studies (position-embedding, token-embedding, kv-stride, "
        "projection) with one recipe, seed list and budget; each row x seed is an ordinary `torchcvt train` "
        "run under OUTPUT/runs. Rerun the same command to resume; share OUTPUT between workers with --shard. "
        "With neither --config nor --data it runs on the embedded digits task (docs/ablations.md).",
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="recipe overrides for every run, e.g. train.epochs=50")
    parser.add_argument("--study", action="append", help="a study to run (repeatable; default: all four)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per row, from the recipe's train.seed "
                        "(default 3)")
    parser.add_argument("--data", help="ImageFolder root holding train/ and val/, or a Hugging Face dataset "
                        "(hf:OWNER/NAME[:CONFIG], a save_to_disk or parquet folder)")
    parser.add_argument("--config", help="YAML recipe (configs/*.yaml); its model is the one ablated")
    parser.add_argument("--output", default="runs/ablate", help="suite folder (default runs/ablate)")
    add_suite_options(parser)
    parser.add_argument("--report-only", action="store_true", help="train nothing; rebuild the report in "
                        "OUTPUT from the runs finished so far")
    parser.add_argument("--dry-run", action="store_true", help="train nothing: print each row's settings, "
                        "parameters and GFLOPs beside the paper's, then one JSON line")
    parser.set_defaults(run=_run_ablate)


def _run_ablate(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from .. import ablate
    from ..checks import check_output_folder
    from ..suite import parse_launcher, parse_shard

    studies = ablate.select_studies(args.study)
    root = Path(args.output)
    if args.report_only:
        plan = ablate.suite_plan(root, studies if args.study else ())
        check_output_folder(root, "--output")  # the report is written there
        paths = ablate.write_report(root, plan)
        print(f"report: {paths['report']}\nplot:   {paths['plot']}\njson:   {paths['json']}")
        return 0
    if not 1 <= args.seeds <= ablate.MAX_SEEDS:
        raise TorchcvtError(f"--seeds must be 1 to {ablate.MAX_SEEDS}, got {args.seeds}")
    shard = parse_shard(args.shard)
    launcher = parse_launcher(args.launcher)
    config, recipe = ablate.prepare(args.config, args.overrides, args.data)
    seeds = [recipe.seed + i for i in range(args.seeds)]
    if args.dry_run:
        from ..data import is_folder_tree, source_classes

        known = recipe.train_dir is not None and (
            Path(recipe.train_dir).is_dir() or not is_folder_tree(recipe.train_dir))
        classes = len(source_classes(recipe.train_dir)) if known else 1000
        plan = ablate.build_plan(recipe, studies, seeds, classes)
        print(ablate.format_dry_run(plan))
        print(json.dumps({"rows": ablate.dry_run_rows(plan)}))
        return 0
    if recipe.train_dir is None or recipe.val_dir is None:
        raise TorchcvtError("the recipe names no data: give --data DIR (holding train/ and val/) or set "
                       "data.train and data.val")
    check_output_folder(root, "--output")
    fingerprint = ablate.data_fingerprint(recipe.train_dir, recipe.val_dir)
    plan = ablate.build_plan(recipe, studies, seeds, fingerprint["train"]["classes"])
    ablate.open_suite(root, recipe.settings, fingerprint, [s.name for s in studies], seeds)
    # The report covers every study and seed suite.json holds when it is written, including those another
    # worker added after this one started.
    def report() -> dict[str, Path]:
        return ablate.write_report(root, ablate.suite_plan(root))

    try:
        progress = ablate.run_suite(plan, root, config, shard, launcher, after_each=report)
    except ablate.RunFailed as error:
        raise TorchcvtError(str(error)) from None
    paths = report()
    print(progress.line(shard))
    print(f"report: {paths['report']}\nplot:   {paths['plot']}\njson:   {paths['json']}")
    return 0
