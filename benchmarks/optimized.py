"""What torchcvt.optimize_for_inference buys: CPU ms a forward of the model as it is (weights derived on each
call) vs its prepared copy, in fp32 and in bf16 (the model under autocast vs a bf16 copy).

    PYTHONPATH=src python benchmarks/optimized.py [--model cvt_13] [--size 224] [--repeats 5]

CPU time (time.process_time) on one thread, the two alternating: on a shared machine the wall clock
measures the other processes, CPU time much less so.
"""

import argparse
import statistics
import time

import torch

import torchcvt

CASES = [("quick_gelu", 1, False), ("quick_gelu", 1, True), ("gelu", 1, False), ("quick_gelu", 8, False),
         ("quick_gelu", 8, True)]


def cpu_ms(model: torch.nn.Module, x: torch.Tensor, autocast: bool) -> float:
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        model(x)
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
    print("| activation | batch | dtype | model as it is (ms CPU) | optimize_for_inference (ms CPU) "
          "| saved |")
    print("|---|---|---|---|---|---|")
    for activation, batch, bf16 in CASES:
        torch.manual_seed(0)
        model = torchcvt.create_model(args.model, activation=activation).eval()
        optimized = torchcvt.optimize_for_inference(model, torch.bfloat16 if bf16 else None)
        x = torch.randn(batch, 3, args.size, args.size)

        times: dict[str, list[float]] = {"as it is": [], "optimized": []}
        for _ in range(args.repeats):
            times["as it is"].append(cpu_ms(model, x, autocast=bf16))
            times["optimized"].append(cpu_ms(optimized, x, autocast=False))
        before, after = (statistics.median(times[key]) for key in ("as it is", "optimized"))
        print(f"| {activation} | {batch} | {'bf16' if bf16 else 'fp32'} | {before:.0f} | {after:.0f} "
              f"| {100 * (1 - after / before):.0f}% |", flush=True)


if __name__ == "__main__":
    main()
