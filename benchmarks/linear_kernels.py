"""Which linear kernel is faster on this CPU: MKL (F.linear) or oneDNN's fused linear, for CvT's shapes.

    PYTHONPATH=src python benchmarks/linear_kernels.py [--batch 16] [--dtype fp32|bf16]

Prints GFLOP/s for cvt_13's matrix products at 224 px: F.linear (MKL in fp32), F.linear then an in-place
exact GELU, and torch.ops.mkldnn._linear_pointwise without and with GELU fused in. torchcvt's default
(TORCHCVT_FUSED=auto) follows what this showed on the CPUs measured: see docs/benchmarks.md.
"""

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F


def best_seconds(fn: Callable[[], object], repeats: int = 10) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def kernels(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> tuple[Callable[[], object], ...]:
    """The four ways to run one product, in the table's column order."""
    pointwise = torch.ops.mkldnn._linear_pointwise
    return (
        lambda: F.linear(x, weight, bias),
        lambda: torch.ops.aten.gelu_(F.linear(x, weight, bias)),
        lambda: pointwise(x, weight, bias, "none", [], ""),
        lambda: pointwise(x, weight, bias, "gelu", [], "none"),
    )


def shapes(batch: int) -> list[tuple[str, int, int, int]]:
    """(what, rows, in, out) of cvt_13's products at 224 px: stage widths 64/192/384, q on 56/28/14 grids."""
    cases = []
    for stage, (dim, side) in enumerate(((64, 56), (192, 28), (384, 14))):
        rows = batch * (side * side + (stage == 2))
        cases += [(f"stage {stage} q / proj", rows, dim, dim), (f"stage {stage} fc1", rows, dim, 4 * dim),
                  (f"stage {stage} fc2", rows, 4 * dim, dim)]
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args()
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    print(f"torch {torch.__version__}, ATen CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads, {args.dtype}, batch {args.batch}; GFLOP/s")
    print()
    print("| product | rows x in x out | F.linear | F.linear + gelu_ | oneDNN | oneDNN + GELU fused |")
    print("|---|---|---|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for what, rows, k, n in shapes(args.batch):
            x, weight, bias = (torch.randn(*size, generator=generator).to(dtype)
                               for size in ((rows, k), (n, k), (n,)))
            flop = 2 * rows * k * n / 1e9
            speeds = " | ".join(f"{flop / best_seconds(kernel):.0f}" for kernel in kernels(x, weight, bias))
            print(f"| {what} | {rows} x {k} x {n} | {speeds} |")

if __name__ == "__main__":
    main()
