"""`torchcvt bench`: torchcvt against transformers' CvT."""

from __future__ import annotations

import argparse

from .errors import CliError


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
    from ..bench import format_markdown, run_benchmark, write_report

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
