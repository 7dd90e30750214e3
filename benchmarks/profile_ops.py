"""Profile torchcvt's CPU inference: the slowest ops by self CPU time, as a markdown table.

    PYTHONPATH=src python benchmarks/profile_ops.py [--model cvt_13] [--batch 16] [--size 224]
        [--activation gelu] [--bf16] [--runs 2] [--weight-cache]

Runs on whichever torchcvt is importable, so the same command profiles an older checkout (before/after).
"""

import argparse
import statistics
import time

import torch
from bench import op_shares, profile_ops  # benchmarks/bench.py, beside this script

import torchcvt
from torchcvt import create_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cvt_13")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--activation", default="gelu", help="gelu (as the bench) or quick_gelu (official)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast instead of fp32")
    parser.add_argument("--runs", type=int, default=2, help="profiled forward passes")
    parser.add_argument("--optimized", action="store_true",
                        help="profile torchcvt.optimize_for_inference's model (bf16 with --bf16, "
                        "no autocast)")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = create_model(args.model, activation=args.activation).eval()
    x = torch.randn(args.batch, 3, args.size, args.size)
    autocast = args.bf16
    if args.optimized:
        model = torchcvt.optimize_for_inference(model, torch.bfloat16 if args.bf16 else None)
        autocast = False  # a bf16 model, bf16 input

    def forward() -> None:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(x)

    forward()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        forward()
        times.append(time.perf_counter() - start)
    ops = profile_ops(forward, runs=args.runs)
    total = sum(seconds for _, seconds, _ in ops)
    median = statistics.median(times)
    print(f"{args.model}, batch {args.batch}, {args.size} px, {'bf16 autocast' if args.bf16 else 'fp32'}: "
          f"median {median * 1000:.0f} ms a forward ({args.batch / median:.2f} img/s), "
          f"{total / args.runs * 1000:.0f} ms self CPU a forward profiled")
    print()
    print("| op | ms a forward | share | calls a forward |")
    print("|---|---|---|---|")
    for name, seconds, calls in ops[: args.top]:
        per_run = seconds / args.runs * 1000
        print(f"| {name} | {per_run:.1f} | {100 * seconds / total:.1f}% | {calls // args.runs} |")
    shares = op_shares(ops)
    print(f"| **outside matmul, attention, convolution** | | **{100 * shares['other']:.1f}%** | |")


if __name__ == "__main__":
    main()
