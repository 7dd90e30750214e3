"""What torchcvt.set_weight_cache buys: CPU seconds a forward with derived weights kept vs made each call.

    PYTHONPATH=src python benchmarks/weight_cache.py [--model cvt_13] [--size 224] [--repeats 5]

CPU time (time.process_time) on one thread, the two settings alternating: on a shared machine the wall
clock measures the other processes, CPU time much less so.
"""

import argparse
import statistics
import time

import torch

import torchcvt

CASES = [("quick_gelu", 1, False), ("quick_gelu", 1, True), ("gelu", 1, False), ("quick_gelu", 8, False),
         ("quick_gelu", 8, True)]


def cpu_ms(model: torch.nn.Module, x: torch.Tensor, bf16: bool, cache: bool) -> float:
    torchcvt.set_weight_cache(cache)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        model(x)  # with the cache on, this call makes the kept weights
        start = time.process_time()
        model(x)
    return (time.process_time() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cvt_13")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| activation | batch | dtype | made each call (ms CPU) | kept (ms CPU) | saved |")
    print("|---|---|---|---|---|---|")
    for activation, batch, bf16 in CASES:
        torch.manual_seed(0)
        model = torchcvt.create_model(args.model, activation=activation).eval()
        x = torch.randn(batch, 3, args.size, args.size)
        times = {False: [], True: []}
        for _ in range(args.repeats):
            for cache in (False, True):
                times[cache].append(cpu_ms(model, x, bf16, cache))
        off, on = (statistics.median(times[cache]) for cache in (False, True))
        print(f"| {activation} | {batch} | {'bf16 autocast' if bf16 else 'fp32'} | {off:.0f} | {on:.0f} "
              f"| {100 * (1 - on / off):.0f}% |", flush=True)
    torchcvt.set_weight_cache(False)


if __name__ == "__main__":
    main()
