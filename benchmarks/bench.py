"""`make bench`: speed and memory of torchcvt beside transformers' CvtForImageClassification on one set of
weights, written into docs/benchmarks.md.

    python benchmarks/bench.py [--model cvt_13] [--output docs/benchmarks.md] [--quick] [--repeats N]
        [--no-memory] [--threads N] [--bf16] [--inductor] [--onnxruntime] [--cases MODE:BATCH:SIZE,...]

torchcvt's inference runs the model from torchcvt.optimize_for_inference (in bf16 for the bf16 case, no
autocast); transformers runs its model as its users do (under autocast for bf16). --inductor adds a third
contender to each inference case: torch.compile with freezing on torchcvt's model in the case's dtype;
--onnxruntime a fourth to the largest fp32 batch: the ONNX file `torchcvt export` writes, in ONNX Runtime.

Tooling, not part of the installed package: it needs transformers (`pip install torchcvt[bench]`).

Each case runs in a fresh process holding both models, so that no case inherits the heap an earlier one
left; there timing alternates torchcvt, transformers, torchcvt, ... after warm-up so that load on a
shared machine hits both alike, and the median of each side is reported. Peak memory is the peak
resident set size during one steady-state step above the RSS at its start, measured in a fresh process
per model with glibc's mmap threshold fixed low, so that every freed tensor goes back to the OS and RSS
follows live tensors.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from torchcvt.export import export_onnx
from torchcvt.factory import create_model
from torchcvt.flops import count_flops
from torchcvt.fused import fused_linear_enabled
from torchcvt.inference import optimize_for_inference
from torchcvt.weights import save_hf

logger = logging.getLogger(__name__)

MODES = ("fp32", "bf16", "train", "train_ckpt")
TRAINING = ("train", "train_ckpt")
TOP_OPS = 8  # ops listed in the report's profile of each inference mode

# The CPU inference targets, checked in every report: overhead share of the bf16 forward, share of the matmul
# peak reached by fp32 and bf16 inference at batch 16, and the speed ratio against transformers.
TARGET_OVERHEAD = 0.10
TARGET_PEAK = {"fp32": 0.80, "bf16": 0.50}
TARGET_RATIO = 1.5
TARGET_INDUCTOR = 0.95  # torchcvt's eager speed against torch.compile with freezing, same model and dtype
TARGET_ONNXRUNTIME = 0.95  # fp32: against ONNX Runtime on the exported model, same weights


@dataclass
class Case:
    """One measurement: mode is 'fp32' or 'bf16' (autocast) inference, or 'train' (fwd + bwd + AdamW);
    'train_ckpt' is that step with torchcvt's activation checkpointing on."""

    mode: str
    batch: int
    img_size: int


@dataclass
class CaseResult:
    case: Case
    torchcvt_ips: float
    hf_ips: float
    gflop_per_image: float
    torchcvt_mem_mb: float | None = None
    hf_mem_mb: float | None = None
    op_shares: dict[str, float] | None = None  # torchcvt's profiled self CPU time by op kind (inference)
    top_ops: list[tuple[str, float, int]] | None = None  # (op, share of self CPU time, calls per call)
    first_call_s: tuple[float, float] | None = None  # fresh process: torchcvt (optimize included), hf
    inductor_ips: float | None = None  # torch.compile with freezing, when asked for (--inductor)
    onnxruntime_ips: float | None = None  # ONNX Runtime on the exported model (--onnxruntime, fp32)

    @property
    def ratio(self) -> float:
        return self.torchcvt_ips / self.hf_ips


def native_bf16() -> bool:
    """Whether oneDNN runs bf16 matmuls and convolutions natively on this CPU (AVX512-BF16 or AMX)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def default_cases(quick: bool, bf16: bool | None = None) -> list[Case]:
    """The benchmark's cases; the full run times bf16 only where the CPU has it natively (bf16=None),
    since emulated bf16 runs about 20x slower than fp32 and takes tens of minutes."""
    if quick:
        return [Case("fp32", 1, 64), Case("fp32", 2, 64), Case("bf16", 2, 64), Case("train", 2, 64),
                Case("train_ckpt", 2, 64),
                Case("fp32", 2, 96)]
    cases = [Case("fp32", 1, 224), Case("fp32", 16, 224), Case("bf16", 16, 224), Case("train", 16, 224),
             Case("train_ckpt", 16, 224),
             Case("fp32", 4, 224), Case("fp32", 4, 384), Case("fp32", 4, 512)]
    if bf16 if bf16 is not None else native_bf16():
        return cases
    logger.warning("this CPU has no native bf16 (oneDNN would emulate it): the bf16 case is left out; "
                   "`benchmarks/bench.py --bf16` times it anyway")
    return [case for case in cases if case.mode != "bf16"]


def matmul_peak_gflops(
    dtype: torch.dtype, size: int = 2048, repeats: int = 5, budget_s: float = 1.0
) -> float:
    """Best achieved GFLOP/s (2 n^3 per product) of a square matrix product: the machine's own peak.

    The side grows from 256 to `size` while a product takes under budget_s / 8, so that a dtype the CPU
    only emulates (bfloat16 without AVX-512 or AMX: a few GFLOP/s) is measured in seconds, not minutes.
    """
    n = 256
    while True:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        product = functools.partial(torch.matmul, a, b)
        product()
        seconds = min(_timed(product) for _ in range(2))
        if n >= size or seconds * 8 > budget_s:
            break
        n *= 2
    best = min([seconds, *(_timed(product) for _ in range(repeats))])
    return 2 * n**3 / best / 1e9


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# Self-CPU time of these ops is the model's products; everything else (casts, copies, cat, norms,
# elementwise) is overhead that the CPU inference target keeps below 10% of the bf16 forward.
_OP_KINDS = {
    "matmul": ("mkldnn::_linear_pointwise", "aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm",
               "aten::matmul", "aten::linear"),
    # softmax: the only one in CvT inference is attention's, split out of the fused kernel by bf16's
    # blocked attention (torchcvt.fused.attention), whose two products count as matmul.
    "attention": ("aten::_scaled_dot_product", "aten::_softmax"),
    "convolution": ("aten::mkldnn_convolution", "aten::_slow_conv2d", "aten::thnn_conv", "aten::convolution",
                    "aten::_convolution", "aten::conv2d"),
}


def op_kind(name: str) -> str:
    """'matmul', 'attention', 'convolution' or 'other' for a profiler op name."""
    return next((kind for kind, prefixes in _OP_KINDS.items() if name.startswith(prefixes)), "other")


def profile_ops(step: Callable[[], Any], runs: int = 1) -> list[tuple[str, float, int]]:
    """(op, self CPU seconds, calls) of `runs` calls of step under torch.profiler, slowest first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(runs):
            step()
    ops = [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages()]
    return sorted(ops, key=lambda op: -op[1])


def op_shares(ops: list[tuple[str, float, int]]) -> dict[str, float]:
    """Fraction of the profiled self CPU time in each op kind of op_kind."""
    total = sum(seconds for _, seconds, _ in ops) or 1.0
    shares = dict.fromkeys((*_OP_KINDS, "other"), 0.0)
    for name, seconds, _ in ops:
        shares[op_kind(name)] += seconds / total
    return shares


def build_pair(name: str, directory: Path, **overrides: Any) -> tuple[nn.Module, nn.Module]:
    """torchcvt's model (exact GELU, as in transformers' port) and transformers' CvT with its weights."""
    import warnings

    from transformers import CvtForImageClassification

    torch.manual_seed(0)
    model = create_model(name, **{"activation": "gelu", **overrides})
    short = [i for i, depth in enumerate(model.config.depth) if depth <= i]
    if short:
        # transformers' CvtStage indexes its drop-path rates by stage and fails unless depth[i] > i.
        raise ValueError(f"transformers' CvT cannot build {name}: stage {short[0]} has depth "
                         f"{model.config.depth[short[0]]} and it needs depth[i] > i; bench another model")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layer_norm_eps notice: transformers' LayerNorms use 1e-5 as we do
        save_hf(model, directory / "hf")
    hf = CvtForImageClassification.from_pretrained(directory / "hf")
    return model, hf


def _images(case: Case) -> torch.Tensor:
    """The case's input batch, the same in every contender."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(case.batch, 3, case.img_size, case.img_size, generator=generator)


def _step_fn(model: nn.Module, case: Case, hf: bool, inductor: bool = False) -> Callable[[], Any]:
    """A closure running one case on model: inference under no_grad, or a full AdamW training step.

    torchcvt infers with optimize_for_inference's model (bf16 for the bf16 case), transformers under
    autocast; inductor: torchcvt's model in the case's dtype through torch.compile with freezing."""
    x = _images(case)
    bf16 = case.mode == "bf16"
    if not hf:
        model.set_grad_checkpointing(case.mode == "train_ckpt")
    if case.mode not in TRAINING and not hf:
        dtype = torch.bfloat16 if bf16 else torch.float32
        if inductor:
            from torch._inductor import config as inductor_config

            inductor_config.freezing = True  # a child process of its own: nothing to restore
            model = torch.compile(model.eval().to(dtype))
        else:
            model = optimize_for_inference(model, dtype)
        x = x.to(dtype)

        def infer_ours() -> None:
            with torch.no_grad():
                model(x)

        return infer_ours

    def logits() -> torch.Tensor:
        return model(x).logits if hf else model(x)

    if case.mode not in TRAINING:
        model.eval()

        def infer() -> None:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits()

        return infer
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    labels = torch.arange(case.batch) % 10

    def train() -> None:
        optimizer.zero_grad()
        F.cross_entropy(logits(), labels).backward()
        optimizer.step()

    return train


def _onnxruntime_fn(model: nn.Module, case: Case, directory: Path) -> Callable[[], Any]:
    """One inference call of torchcvt's model exported by `torchcvt.export.export_onnx` (BatchNorm folded,
    dynamic sizes) in ONNX Runtime's CPU provider, with as many intra-op threads as torch uses."""
    import onnxruntime

    if case.mode != "fp32":
        raise ValueError(f"--onnxruntime times fp32 inference only, not {case.mode}")
    path = export_onnx(model.eval(), directory / f"torchcvt-{os.getpid()}.onnx")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    image = _images(case).numpy()

    def infer() -> None:
        session.run(None, {"image": image})

    return infer


def time_alternating(fns: dict[str, Callable[[], Any]], warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds of each function, run in turn (a, b, c, a, b, c, ...) after warm-up of each."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_timed(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def max_logit_difference(model: nn.Module, hf: nn.Module, img_size: int) -> float:
    """Largest |logit difference| between the two models on one random batch in fp32 eval."""
    x = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(1))
    model.eval()
    hf.eval()
    with torch.no_grad():
        return (model(x) - hf(x).logits).abs().max().item()


def measure_peak_memory(directory: Path, which: str, case: Case) -> float | None:
    """Peak RSS (MB) of one steady-state step above its starting RSS, in a fresh process; None off Linux."""
    if not Path("/proc/self/clear_refs").exists():
        return None
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    args = [sys.executable, __file__, "--memory-child", str(directory), which,
            case.mode, str(case.batch), str(case.img_size)]
    done = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory measurement of {which} failed: {done.stderr.strip().splitlines()[-1:]}")
    return float(done.stdout.strip().splitlines()[-1])


def _load(directory: Path, which: str) -> nn.Module:
    """The pair build_pair saved in directory: 'hf' (transformers) or 'torchcvt'."""
    if which == "hf":
        from transformers import CvtForImageClassification

        return CvtForImageClassification.from_pretrained(directory / "hf")
    return torch.load(directory / "torchcvt.pt", weights_only=False)


def time_case(directory: Path, case: Case, warmup: int, repeats: int, inductor: bool = False,
              onnxruntime: bool = False) -> dict[str, Any]:
    """Time one case on both models in a fresh process (each case starts from the same heap, not from
    what earlier cases, training ones above all, left behind); inference cases are also profiled."""
    args = [sys.executable, __file__, "--case-child", str(directory), case.mode, str(case.batch),
            str(case.img_size), str(warmup), str(repeats), str(torch.get_num_threads()), str(int(inductor)),
            str(int(onnxruntime))]
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"timing {case} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _case_child(directory: Path, case: Case, warmup: int, repeats: int, inductor: bool,
                onnxruntime: bool) -> dict[str, Any]:
    # The first call of a fresh process, torchcvt's with optimize_for_inference's preparation in it.
    started = time.perf_counter()
    ours = _step_fn(_load(directory, "torchcvt"), case, hf=False)
    ours()
    first_ours = time.perf_counter() - started
    started = time.perf_counter()
    theirs = _step_fn(_load(directory, "hf"), case, hf=True)
    theirs()
    first_hf = time.perf_counter() - started
    fns = {"torchcvt": ours, "hf": theirs}
    if inductor and case.mode not in TRAINING:
        fns["inductor"] = _step_fn(_load(directory, "torchcvt"), case, hf=False, inductor=True)
        fns["inductor"]()  # compiles
    if onnxruntime:
        fns["onnxruntime"] = _onnxruntime_fn(_load(directory, "torchcvt"), case, directory)
    seconds = time_alternating(fns, warmup, repeats)
    measured: dict[str, Any] = {f"{name}_s": t for name, t in seconds.items()}
    measured["first_call_s"] = (first_ours, first_hf)
    if case.mode not in TRAINING:
        measured["ops"] = profile_ops(ours)
    return measured


def _memory_child(directory: Path, which: str, case: Case) -> float:
    model = _load(directory, which)
    step = _step_fn(model, case, hf=which == "hf")
    step()
    step()
    start = _rss_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak RSS, to the current RSS
    step()
    return (_rss_kb("VmHWM") - start) / 1024


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def run_benchmark(
    name: str = "cvt_13", cases: list[Case] | None = None, quick: bool = False, memory: bool = True,
    warmup: int | None = None, repeats: int | None = None, bf16: bool | None = None, peak_size: int = 2048,
    inductor: tuple[str, ...] = (), onnxruntime: bool = False, **overrides: Any,
) -> dict[str, Any]:
    """Run every case on both implementations; returns the results and the machine description.

    peak_size is the largest side of the square products that measure the matmul peak; inductor names the
    inference modes whose largest batch is also timed through torch.compile with freezing; onnxruntime
    also times the largest fp32 batch in ONNX Runtime.
    """
    cases = cases or default_cases(quick, bf16)
    warmup = warmup if warmup is not None else 1
    repeats = repeats if repeats is not None else (1 if quick else 5)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        model, hf = build_pair(name, directory, **overrides)
        torch.save(model, directory / "torchcvt.pt")
        peaks = {"fp32": matmul_peak_gflops(torch.float32, peak_size),
                 "bf16": matmul_peak_gflops(torch.bfloat16, peak_size)}
        difference = max_logit_difference(model, hf, cases[0].img_size)
        results = []
        for case in tqdm(cases, desc="bench", disable=not sys.stderr.isatty()):
            # Compiling takes minutes: inductor runs beside the largest batch of each inference mode only.
            largest = max(c.batch for c in cases if c.mode == case.mode)
            compiled = case.mode in inductor and case.batch == largest
            in_onnxruntime = onnxruntime and case.mode == "fp32" and case.batch == largest
            measured = time_case(directory, case, warmup, repeats, compiled, in_onnxruntime)
            # The peak is the best seen over the run: a shared or throttled machine is slower at times,
            # and a peak taken only at the start would let later cases exceed 100%.
            key, dtype = ("bf16", torch.bfloat16) if case.mode == "bf16" else ("fp32", torch.float32)
            peaks[key] = max(peaks[key], matmul_peak_gflops(dtype, peak_size))
            result = CaseResult(case, case.batch / measured["torchcvt_s"], case.batch / measured["hf_s"],
                                2 * count_flops(model.config, case.img_size) / 1e9,
                                first_call_s=tuple(measured["first_call_s"]))
            if "inductor_s" in measured:
                result.inductor_ips = case.batch / measured["inductor_s"]
            if "onnxruntime_s" in measured:
                result.onnxruntime_ips = case.batch / measured["onnxruntime_s"]
            if case.mode not in TRAINING:
                ops = [tuple(op) for op in measured["ops"]]
                total = sum(seconds for _, seconds, _ in ops) or 1.0
                result.op_shares = op_shares(ops)
                result.top_ops = [(name, seconds / total, calls) for name, seconds, calls in ops[:TOP_OPS]]
            if memory and case.mode in TRAINING:
                result.torchcvt_mem_mb = measure_peak_memory(directory, "torchcvt", case)
                result.hf_mem_mb = measure_peak_memory(directory, "hf", case)
            results.append(result)
    return {"model": name, "overrides": overrides, "results": results, "peaks": peaks,
            "max_logit_difference": difference, "machine": machine_description(),
            "native_bf16": native_bf16()}


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    load = ", load average {:.1f} / {:.1f} / {:.1f}".format(*os.getloadavg())
    paths = ", ".join(f"{name} {'oneDNN fused' if fused_linear_enabled(dtype) else 'plain'}"
                      for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)))
    return (f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}{load}; ATen CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}, linear layers: {paths}")


def format_markdown(report: dict[str, Any]) -> str:
    """The results as a markdown section: one table, the peaks and how things were measured."""
    peaks = report["peaks"]
    lines = [
        f"Model: `{report['model']}` {report['overrides'] or ''} with exact GELU (transformers' port has no "
        f"QuickGELU), same weights in both; max |logit difference| {report['max_logit_difference']:.2e}.",
        "",
        f"Machine: {report['machine']}. Matrix-multiply peak (the best measured in this run, at the start "
        "and after every case in its dtype): "
        f"{peaks['fp32']:.0f} GFLOP/s fp32, {peaks['bf16']:.0f} GFLOP/s bf16.",
        "",
        "| case | batch | size | torchcvt img/s | transformers img/s | ratio | torchcvt GFLOP/s (% peak) "
        "| transformers GFLOP/s (% peak) | peak mem torchcvt / transformers (MB) | mem ratio "
        "| torchcvt time outside matmul/attention/conv "
        "| first call s, fresh process (torchcvt / transformers) | inductor img/s (torchcvt / inductor) "
        "| ONNX Runtime img/s (torchcvt / ONNX Runtime) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        c = r.case
        # A training step costs about three forward passes (forward, and two products per layer backward).
        work = r.gflop_per_image * (3 if c.mode in TRAINING else 1)
        peak = peaks["bf16" if c.mode == "bf16" else "fp32"]
        mode = {"fp32": "inference fp32",
                "bf16": "inference bf16 (torchcvt bf16 model, transformers autocast)", "train": "train step",
                "train_ckpt": "train step, torchcvt checkpointing"}[c.mode]
        mem = mem_ratio = "-"
        if r.torchcvt_mem_mb is not None and r.hf_mem_mb:
            mem = f"{r.torchcvt_mem_mb:.0f} / {r.hf_mem_mb:.0f}"
            mem_ratio = f"{r.torchcvt_mem_mb / r.hf_mem_mb:.2f}x"
        other = "-" if r.op_shares is None else f"{100 * r.op_shares['other']:.1f}%"
        first = "-" if r.first_call_s is None else f"{r.first_call_s[0]:.1f} / {r.first_call_s[1]:.1f}"
        inductor = "-" if r.inductor_ips is None else (
            f"{r.inductor_ips:.2f} ({r.torchcvt_ips / r.inductor_ips:.2f}x)")
        onnx = "-" if r.onnxruntime_ips is None else (
            f"{r.onnxruntime_ips:.2f} ({r.torchcvt_ips / r.onnxruntime_ips:.2f}x)")
        lines.append(
            f"| {mode} | {c.batch} | {c.img_size} | {r.torchcvt_ips:.2f} | {r.hf_ips:.2f} | {r.ratio:.2f}x "
            f"| {work * r.torchcvt_ips:.0f} ({100 * work * r.torchcvt_ips / peak:.0f}%) "
            f"| {work * r.hf_ips:.0f} ({100 * work * r.hf_ips / peak:.0f}%) | {mem} | {mem_ratio} "
            f"| {other} | {first} | {inductor} | {onnx} |"
        )
    lines += ["", *format_targets(report), "", *format_profiles(report)]
    lines += [
        "",
        "GFLOP/s counts 2 FLOPs per multiply-add of `torchcvt.flops.count_flops` (convolutions, linears, "
        "attention products); a training step is counted as 3 forward passes "
        "(also with checkpointing, whose recomputed forward is overhead, not work). Times are medians of "
        "alternating torchcvt / transformers runs after warm-up, in a fresh process for each case. "
        "Peak memory: peak RSS during one "
        "steady-state training step (after two warm-up steps, so AdamW state exists) above the RSS at "
        "its start, in a fresh process per model with `MALLOC_MMAP_THRESHOLD_=65536` so freed tensors "
        "leave the RSS; it covers activations, gradients and optimizer temporaries. The last column is the "
        "share of torchcvt's self CPU time (torch.profiler, one inference call) outside matrix products, "
        "attention and convolutions: casts, copies, concatenation, LayerNorm and elementwise ops. torchcvt "
        "infers with `torchcvt.optimize_for_inference(model, dtype)` (bf16 weights for the bf16 case, no "
        "autocast), transformers under autocast; the first call is timed in the case's fresh process, "
        "torchcvt's with the preparation in it; inductor is `torch.compile` with freezing on torchcvt's "
        "model in the same dtype (`--inductor`), compiled before timing; ONNX Runtime (`--onnxruntime`, fp32 "
        "only) runs the file `torchcvt.export.export_onnx` writes from the same model, with torch's thread "
        "count as its intra-op threads and every graph optimisation on.",
    ]
    return "\n".join(lines) + "\n"


def _largest_batch(report: dict[str, Any], mode: str) -> CaseResult | None:
    """The report's inference result in mode with the largest batch (16 in the full run)."""
    found = [r for r in report["results"] if r.case.mode == mode]
    return max(found, key=lambda r: (r.case.batch, -r.case.img_size), default=None)


def format_targets(report: dict[str, Any]) -> list[str]:
    """The CPU inference targets against this run's numbers, one line each: met, not met, or not measured."""
    lines = ["CPU inference targets, from this run:", ""]

    def line(text: str, value: float | None, goal: float, unit: str, above: bool = True) -> None:
        if value is None:
            lines.append(f"- {text}: not measured in this run")
            return
        met = value >= goal if above else value < goal
        lines.append(f"- {text}: {value:{unit}} ({'met' if met else 'not met'}; target "
                     f"{'at least' if above else 'below'} {goal:{unit}})")

    if not report.get("native_bf16", True):
        lines.append("- bf16: this CPU has no native bf16 (neither AVX512-BF16 nor AMX): oneDNN would "
                     "emulate it, so the bf16 targets are not measured here (`--bf16` times it anyway)")
    for mode in ("fp32", "bf16"):
        result = _largest_batch(report, mode)
        share = ratio = against_inductor = against_onnxruntime = None
        if result is not None:
            peak = report["peaks"][mode]
            share = result.gflop_per_image * result.torchcvt_ips / peak
            ratio = result.ratio
            against_inductor = result.inductor_ips and result.torchcvt_ips / result.inductor_ips
            against_onnxruntime = result.onnxruntime_ips and result.torchcvt_ips / result.onnxruntime_ips
        name = f"{mode} inference, batch {result.case.batch if result else 16}"
        line(f"{name}: share of the {mode} matmul peak", share, TARGET_PEAK[mode], ".0%")
        line(f"{name}: speed against transformers", ratio, TARGET_RATIO, ".2f")
        line(f"{name}: speed against torch.compile with freezing", against_inductor, TARGET_INDUCTOR, ".2f")
        if mode == "fp32":
            line(f"{name}: speed against ONNX Runtime", against_onnxruntime, TARGET_ONNXRUNTIME, ".2f")
    bf16 = _largest_batch(report, "bf16")
    overhead = None if bf16 is None or bf16.op_shares is None else bf16.op_shares["other"]
    line("bf16 inference: time outside matmul, attention and convolution", overhead, TARGET_OVERHEAD, ".1%",
         above=False)
    return lines


def format_profiles(report: dict[str, Any]) -> list[str]:
    """torchcvt's most expensive ops (self CPU time) for each inference mode at its largest batch."""
    lines = []
    for mode in ("fp32", "bf16"):
        result = _largest_batch(report, mode)
        if result is None or not result.top_ops:
            continue
        c = result.case
        lines += [f"torchcvt's profile, {mode} inference, batch {c.batch}, {c.img_size} px (self CPU time):",
                  "", "| op | share | calls |", "|---|---|---|"]
        lines += [f"| {name} | {100 * share:.1f}% | {calls} |" for name, share, calls in result.top_ops]
        lines.append("")
    return lines[:-1]


BEGIN, END = "<!-- torchcvt bench: begin -->", "<!-- torchcvt bench: end -->"


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    """Write the report to path between the BEGIN and END markers, keeping what the file has around
    them (notes written by hand); a file without the markers gets a new one with a title."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    section = f"{BEGIN}\n{format_markdown(report)}{END}\n"
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    if BEGIN in old and END in old.split(BEGIN, 1)[1]:
        before, rest = old.split(BEGIN, 1)
        text = before + section + rest.split(END, 1)[1].removeprefix("\n")
    else:
        text = "# Benchmarks: torchcvt vs transformers' CvT\n\n" + section
    path.write_text(text, encoding="utf-8")
    return path


def parse_cases(text: str) -> list[Case]:
    """Cases from 'MODE:BATCH:SIZE,...' (--cases)."""
    cases = []
    for item in text.split(","):
        parts = item.split(":")
        if len(parts) != 3 or parts[0] not in MODES or not all(p.isdigit() and int(p) > 0 for p in parts[1:]):
            raise ValueError(f"--cases: {item!r} is not MODE:BATCH:SIZE with MODE one of {', '.join(MODES)}")
        cases.append(Case(parts[0], int(parts[1]), int(parts[2])))
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Time torchcvt and transformers' CvtForImageClassification side by side (fp32 and bf16 "
        "inference, a training step, resolutions 224/384/512) and write a markdown table.")
    parser.add_argument("--model", default="cvt_13", help="registered variant (default: cvt_13)")
    parser.add_argument("--output", default="docs/benchmarks.md", help="markdown file to write")
    parser.add_argument("--quick", action="store_true", help="small inputs and one repeat: a smoke run")
    parser.add_argument("--repeats", type=int, help="timed runs per side (default 5, 1 with --quick)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--inductor", nargs="?", const="fp32,bf16", default="", metavar="MODES",
                        help="also time torch.compile with freezing at the largest batch of each inference "
                        "mode named (default both: fp32,bf16); compiling takes minutes")
    parser.add_argument("--onnxruntime", action="store_true",
                        help="also time the largest fp32 batch in ONNX Runtime (torchcvt.export's file)")
    parser.add_argument("--cases", help="comma-separated MODE:BATCH:SIZE (modes: " + ", ".join(MODES)
                        + "), instead of the default cases")
    parser.add_argument("--bf16", action="store_true", default=None,
                        help="time bf16 inference even on a CPU without native bf16 (tens of minutes there)")
    args = parser.parse_args(argv)
    try:
        if args.repeats is not None and args.repeats < 1:
            raise ValueError(f"--repeats must be at least 1, got {args.repeats}")
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads must be at least 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        report = run_benchmark(args.model, cases=parse_cases(args.cases) if args.cases else None,
                               quick=args.quick, memory=not args.no_memory, repeats=args.repeats,
                               bf16=args.bf16, inductor=tuple(filter(None, args.inductor.split(","))),
                               onnxruntime=args.onnxruntime)
    except ValueError as error:
        print(f"bench: error: {error}", file=sys.stderr)
        return 2
    print(format_markdown(report), end="")
    print(f"wrote {write_report(report, args.output)}")
    return 0


if __name__ == "__main__" and len(sys.argv) == 7 and sys.argv[1] == "--memory-child":
    _, _, folder, kind, mode, batch, size = sys.argv
    print(_memory_child(Path(folder), kind, Case(mode, int(batch), int(size))))
elif __name__ == "__main__" and len(sys.argv) == 11 and sys.argv[1] == "--case-child":
    _, _, folder, mode, batch, size, warmup_runs, timed_runs, threads, compiled, in_onnxruntime = sys.argv
    torch.set_num_threads(int(threads))
    print(json.dumps(_case_child(Path(folder), Case(mode, int(batch), int(size)), int(warmup_runs),
                                 int(timed_runs), compiled == "1", in_onnxruntime == "1")))
elif __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="bench: %(message)s")
    sys.exit(main())
