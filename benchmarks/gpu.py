"""GPU figures in one run: torchcvt beside transformers' CvT on the same weights, training steps, the input
pipeline and a short `torchcvt train` run, within one time budget; writes gpu-bench.md and gpu-bench.json.

    PYTHONPATH=src python3 benchmarks/gpu.py --out OUT      # about 7.5 minutes on one GPU
    PYTHONPATH=src python3 benchmarks/gpu.py --smoke --out OUT   # tiny sizes, any device (the test runs it)

Cases run in priority order (eager first, compilation last); each has a time cap, and when the budget is spent
the rest are listed as not run. The compiled cases are few and chosen (torchcvt's training step with and
without checkpointing, inference of the first model at the largest batch), and their caps are reserved out of
the budget: the eager cases share what is left, so a slow eager case cannot starve them. The generated
dataset is written before the budget's clock starts; a training step's peak memory is that case's alone
(every other model freed and the peak statistics reset first). Results are written after every case, so a
killed run leaves what it had.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_data  # noqa: E402  (benchmarks/ is tooling, not a package)
import gpu_report  # noqa: E402

import torchcvt  # noqa: E402

logger = logging.getLogger("torchcvt.gpu_bench")
ROOT = Path(__file__).resolve().parents[1]
OFFICIAL_CONFIG = ROOT / "configs" / "cvt-13-224.yaml"

# Vendor datasheet peaks for dense (not 2:4 sparse) bf16 tensor-core work, TFLOP/s, matched in order against
# torch.cuda.get_device_name(); the first match is used and named in the report.
BF16_PEAKS: list[tuple[str, float, str]] = [
    (r"H100.*PCIe", 756.0, "H100 PCIe"),
    (r"H[12]00 NVL", 835.0, "H100/H200 NVL"),
    (r"GH200", 989.0, "GH200"),
    (r"H100", 989.0, "H100 SXM"),
    (r"H200", 989.0, "H200 SXM"),
    (r"B200", 2250.0, "B200"),
    (r"A100", 312.0, "A100"),
    (r"L40S", 362.0, "L40S"),
    (r"\bA10\b", 125.0, "A10"),
    (r"\bL4\b", 121.0, "L4"),
]


def bf16_peak(device_name: str) -> tuple[float, str] | None:
    """The vendor's dense bf16 peak (TFLOP/s) and the table entry used, or None for an unknown device."""
    for pattern, tflops, label in BF16_PEAKS:
        if re.search(pattern, device_name):
            return tflops, label
    return None


@dataclass(frozen=True)
class Settings:
    """Sizes, repeats and time caps of one run: full() for a GPU, smoke() for a few seconds anywhere."""

    smoke: bool
    budget_s: float
    models: tuple[str, ...] = ("cvt_13", "cvt_21", "cvt_13_384")
    overrides: dict[str, Any] = field(default_factory=dict)  # architecture changes (smoke: a narrow CvT)
    img_size: int | None = None  # None: each variant's own size
    batches: tuple[int, ...] = (256, 1)
    train_batch: int = 128
    rounds: int = 7  # alternating timing rounds per measurement
    round_s: float = 0.25  # each round runs about this long
    compile_backend: str = "inductor"
    caps: dict[str, float] = field(
        default_factory=lambda: {
            "inference": 20,
            "inference-compiled": 60,
            "train": 30,
            "train-compiled": 75,
            "pipeline": 30,
            "train-run": 100,
        }
    )
    pipeline_seconds: float = 15.0
    data: gpu_data.DataShape = gpu_data.DataShape()
    config: Path = OFFICIAL_CONFIG  # the recipe of the pipeline and `torchcvt train` cases
    run_model: str = "cvt_13"  # the `torchcvt train` model
    run_batch: int = 256  # the official per-GPU batch
    run_epochs: int = 15  # 15 epochs of 20 steps: 300 optimizer steps

    @classmethod
    def full(cls, budget_s: float = 450.0) -> Settings:
        return cls(smoke=False, budget_s=budget_s)

    @classmethod
    def smoke_run(cls, budget_s: float = 240.0) -> Settings:
        narrow = {"embed_dim": [16, 32, 48], "num_heads": [1, 2, 3], "depth": [1, 2, 3]}
        return cls(
            smoke=True,
            budget_s=budget_s,
            models=("cvt_13",),
            overrides=narrow,
            img_size=32,
            batches=(2,),
            train_batch=2,
            rounds=2,
            round_s=0.0,
            # aot_eager: inductor's graph capture and partitioner (which does not replay BatchNorm's
            # statistics updates in a checkpointed block) without its C++ compilation.
            compile_backend="aot_eager" if not torch.cuda.is_available() else "inductor",
            pipeline_seconds=1.0,
            data=gpu_data.DataShape.smoke(),
            run_model="cvt_digits",
            run_batch=4,
            run_epochs=2,
            # A smoke run checks the script, not the device: caps loose enough for a loaded CPU.
            caps={"inference": 120, "inference-compiled": 120, "train": 120, "train-compiled": 120,
                  "pipeline": 60, "train-run": 240},
        )


@dataclass
class Case:
    """One measurement: kind (a key of Settings.caps), its parameters, and what became of it."""

    kind: str
    params: dict[str, Any]
    status: str = "not run: overall budget"
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.kind + "".join(f" {key}={value}" for key, value in self.params.items())


class CaseTimeout(Exception):
    """Raised inside a case when its time cap (or the budget) runs out."""


@contextlib.contextmanager
def time_cap(seconds: float) -> Iterator[None]:
    """Raise CaseTimeout in the main thread after `seconds`; the previous alarm handler is restored."""

    def expire(signum: int, frame: Any) -> None:
        raise CaseTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def torch_flags(tf32: bool) -> Iterator[None]:
    """TF32 matmuls and convolutions on or off, cuDNN autotuning on; the caller's settings restored after."""
    saved = (
        torch.get_float32_matmul_precision(),
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.benchmark,
    )
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved[1], saved[2]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn: Callable[[], Any], calls: int, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / calls


def time_alternating(fns: dict[str, Callable[[], Any]], s: Settings, device: torch.device) -> dict[str, Any]:
    """Per function: seconds of its first call (compilation), then the median and range of seconds per call
    over s.rounds rounds that alternate between the functions after two warm-up calls each."""
    first = {name: seconds_per_call(fn, 1, device) for name, fn in fns.items()}
    warm = {name: seconds_per_call(fn, 2, device) for name, fn in fns.items()}
    calls = {name: max(1, min(200, round(s.round_s / warm[name]))) for name in fns}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(s.rounds):
        for name, fn in fns.items():
            times[name].append(seconds_per_call(fn, calls[name], device))
    return {
        name: {
            "first_call_s": first[name],
            "calls_per_round": calls[name],
            "median_s": statistics.median(t),
            "min_s": min(t),
            "max_s": max(t),
        }
        for name, t in times.items()
    }


class Bench:
    """Runs the cases of one benchmark on one device, sharing models and generated data between them."""

    def __init__(self, s: Settings, device: torch.device, workdir: Path, data: Path | None = None):
        self.s, self.device, self.workdir, self.data = s, device, workdir, data
        self.pairs: dict[str, tuple[torch.nn.Module, torch.nn.Module, dict[str, Any]]] = {}
        self.folders: dict[str, Path] = {}  # each model's checkpoint in both formats, written once
        self.peak = bf16_peak(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
        self.matmul_tflops: float | None = None

    def pair(self, name: str) -> tuple[torch.nn.Module, torch.nn.Module, dict[str, Any]]:
        """torchcvt's model (exact GELU, as transformers' port has) and transformers' CvT with the same
        weights, moved through torchcvt's own checkpoint conversion; with their fp32 logit difference."""
        if name not in self.pairs:
            model, hf = self.load(name, "torchcvt"), self.load(name, "transformers")
            model, hf = model.to(self.device).eval(), hf.to(self.device).eval()
            size = model.config.img_size
            x = torch.randn(2, 3, size, size, device=self.device)
            with torch.no_grad(), torch_flags(tf32=False):
                difference = (model(x) - hf(x).logits).abs().max().item()
            info = {
                "img_size": size,
                "forward_gflops": 2 * torchcvt.count_flops(model.config) / 1e9,
                "max_logit_difference": difference,
            }
            self.pairs[name] = (model, hf, info)
        return self.pairs[name]

    def load(self, name: str, implementation: str) -> torch.nn.Module:
        """A fresh CPU copy of model `name` (the same weights every time) from torchcvt or transformers."""
        from transformers import CvtForImageClassification

        if name not in self.folders:
            torch.manual_seed(0)
            size = {"img_size": self.s.img_size} if self.s.img_size else {}
            model = torchcvt.create_model(name, activation="gelu", **self.s.overrides, **size)
            folder = Path(tempfile.mkdtemp(dir=self.workdir))
            torchcvt.save_checkpoint(model, folder / "torchcvt")
            torchcvt.convert_checkpoint(folder / "torchcvt", folder / "hf", to="hf")
            self.folders[name] = folder
        folder = self.folders[name]
        if implementation == "transformers":
            return CvtForImageClassification.from_pretrained(folder / "hf")
        return torchcvt.create_model(name, checkpoint=folder / "torchcvt", activation="gelu",
                                     **self.s.overrides)

    def release(self) -> None:
        """Free every cached model, so that the next case's peak memory is its own."""
        self.pairs.clear()
        self.drop_compiled()

    def drop_compiled(self) -> None:
        torch._dynamo.reset()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def measure_matmul(self) -> None:
        """The bf16 matrix-product rate this device reaches on random data (a ceiling beside the vendor's)."""
        if self.device.type != "cuda":
            return
        n = 8192
        a, b = (torch.randn(n, n, device=self.device, dtype=torch.bfloat16) for _ in range(2))
        seconds_per_call(lambda: a @ b, 3, self.device)
        seconds = seconds_per_call(lambda: a @ b, 10, self.device)
        self.matmul_tflops = 2 * n**3 / seconds / 1e12

    def inference(self, model_name: str, batch: int, precision: str) -> dict[str, Any]:
        model, hf, info = self.pair(model_name)
        x = torch.randn(batch, 3, info["img_size"], info["img_size"], device=self.device)
        compiled = precision == "compiled bf16"
        runners = {"torchcvt": model, "transformers": hf}
        if compiled:
            runners = {
                key: torch.compile(m, backend=self.s.compile_backend, dynamic=False)
                for key, m in runners.items()
            }
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=precision != "fp32")

        def call(key: str) -> Callable[[], Any]:
            def run() -> None:
                with torch.no_grad(), autocast:
                    runners[key](x)

            return run

        with torch_flags(tf32=True):
            timing = time_alternating({key: call(key) for key in runners}, self.s, self.device)
        result = {**info, "batch": batch}
        for key, t in timing.items():
            result[key] = {**t, "images_per_s": batch / t["median_s"]}
        result["ratio"] = result["transformers"]["median_s"] / result["torchcvt"]["median_s"]
        result["torchcvt_tflops"] = info["forward_gflops"] * result["torchcvt"]["images_per_s"] / 1e3
        return result

    def train_step(self, implementation: str, compiled: bool, checkpointing: bool) -> dict[str, Any]:
        """Forward, backward and AdamW on a batch in bf16 autocast: images/s, peak memory, model FLOP use.

        The case runs alone: cached models are freed and the peak statistics reset before its own model is
        made, so the peak is this model's weights, gradients, AdamW state and activations, nothing else.
        """
        name = self.s.models[0]
        self.release()
        start = 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            start = torch.cuda.memory_allocated(self.device)
        module = self.load(name, implementation).to(self.device)
        if checkpointing:
            module.set_grad_checkpointing(True)
        config = torchcvt.variant_config(name, **self.s.overrides,
                                         **({"img_size": self.s.img_size} if self.s.img_size else {}))
        info = {"img_size": config.img_size, "forward_gflops": 2 * torchcvt.count_flops(config) / 1e9}
        module.train()
        runner = torch.compile(module, backend=self.s.compile_backend) if compiled else module
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, weight_decay=0.05)
        generator = torch.Generator(device=self.device).manual_seed(0)
        size, batch = info["img_size"], self.s.train_batch
        x = torch.randn(batch, 3, size, size, device=self.device, generator=generator)
        labels = torch.randint(0, 1000, (batch,), device=self.device, generator=generator)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                out = runner(x)
                loss = F.cross_entropy(out if implementation == "torchcvt" else out.logits, labels)
            loss.backward()
            optimizer.step()

        try:
            first = seconds_per_call(step, 1, self.device)
            seconds_per_call(step, 2, self.device)
            seconds = statistics.median(
                seconds_per_call(step, 3 if not self.s.smoke else 1, self.device)
                for _ in range(self.s.rounds)
            )
            peak = None
            if self.device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(self.device) - start
        finally:
            self.drop_compiled()  # the model, its optimizer and its graphs go with this call's frame
        images_per_s = batch / seconds
        # A training step does three forwards' work; a checkpointed block's recomputed forward is overhead.
        tflops = 3 * info["forward_gflops"] * images_per_s / 1e3
        result = {
            "batch": batch,
            "img_size": size,
            "first_step_s": first,
            "images_per_s": images_per_s,
            "peak_memory_gib": None if peak is None else peak / 2**30,
            "model_tflops": tflops,
        }
        if self.peak:
            result["mfu"] = tflops / self.peak[0]
        if self.matmul_tflops:
            result["share_of_measured_matmul"] = tflops / self.matmul_tflops
        return result

    def pipeline(self, seconds: float) -> dict[str, Any]:
        return gpu_data.pipeline_speed(
            self.generated() / "train",
            self.s.config,
            self.s.run_model,
            self.s.run_batch,
            gpu_data.cpu_cores(),
            self.device.type == "cuda",
            seconds,
        )

    def generated(self) -> Path:
        if self.data is None:
            raise RuntimeError("the dataset is written by run() before the budget's clock starts")
        return self.data

    def train_run(self, seconds: float) -> dict[str, Any]:
        root = self.generated()
        self.release()  # the run is a separate process: leave it the device's memory
        overrides = [
            f"train.epochs={self.s.run_epochs}",
            f"train.batch_size={self.s.run_batch}",
            f"data.workers={gpu_data.cpu_cores()}",
            "sched.warmup_epochs=1",
            "train.log_every_steps=10",
        ]
        if self.s.run_model != "cvt_13":
            overrides.append(f"model.name={self.s.run_model}")
        return gpu_data.train_run(self.s.config, root, self.workdir / "run", overrides, seconds)

    def run_case(self, case: Case, seconds: float) -> dict[str, Any]:
        p = case.params
        if case.kind in ("inference", "inference-compiled"):
            return self.inference(p["model"], p["batch"], p["precision"])
        if case.kind in ("train", "train-compiled"):
            return self.train_step(p["implementation"], case.kind == "train-compiled", p["checkpointing"])
        if case.kind == "train-run":
            return self.train_run(seconds)
        return self.pipeline(min(seconds / 2, self.s.pipeline_seconds))


def plan(s: Settings, only: set[str] | None = None) -> list[Case]:
    """Every case, in the order they run: eager ones first, the costly compilations last."""
    cases = [
        Case("inference", {"model": m, "batch": b, "precision": p})
        for m in s.models
        for p in ("fp32", "bf16")
        for b in s.batches
    ]
    cases += [Case("train", {"implementation": "torchcvt", "checkpointing": c}) for c in (False, True)]
    cases += [Case("train", {"implementation": "transformers", "checkpointing": False})]
    cases += [Case("pipeline", {}), Case("train-run", {})]
    cases += [
        Case("train-compiled", {"implementation": "torchcvt", "checkpointing": c}) for c in (False, True)
    ]
    # Compilation costs a minute or more a case: one chosen inference case, the first model at the
    # largest batch, beside the two training ones.
    cases += [Case("inference-compiled", {"model": s.models[0], "batch": max(s.batches),
                                          "precision": "compiled bf16"})]
    return [case for case in cases if only is None or case.kind in only]


def compiled_reserve(s: Settings, cases: list[Case]) -> float:
    """Seconds of the budget kept for the compiled cases: their caps added up, at most half the budget."""
    return min(s.budget_s / 2, sum(s.caps[c.kind] for c in cases if c.kind.endswith("compiled")))


def _failure(case: Case, error: Exception, cap: float, s: Settings) -> str:
    """The status of a case that raised: stopped at its cap (or the budget's end), out of memory, failed."""
    if _timed_out(error):
        why = "its cap" if cap == s.caps[case.kind] else "the end of the budget"
        return f"stopped at {why} ({cap:.0f} s)"
    if isinstance(error, torch.OutOfMemoryError):
        return f"failed: out of memory ({str(error).splitlines()[0]})"
    logger.exception("%s failed", case.label)
    return f"failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def _timed_out(error: BaseException | None) -> bool:
    """Whether error is the cap's CaseTimeout, or wraps it (dynamo re-raises it as its own error)."""
    while error is not None:
        if isinstance(error, CaseTimeout):
            return True
        error = error.__cause__ or error.__context__
    return False


def environment(device: torch.device, bench: Bench) -> dict[str, Any]:
    import timm
    import torchvision
    import transformers

    def commit() -> str | None:
        done = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        )
        return done.stdout.strip() or None

    env = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "cpu_cores": gpu_data.cpu_cores(),
        "torchcvt_commit": commit(),
    }
    if device.type == "cuda":
        env["memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    env["bf16_peak_tflops"], env["bf16_peak_entry"] = bench.peak if bench.peak else (None, "unknown device")
    env["measured_bf16_matmul_tflops"] = bench.matmul_tflops
    return env


def run(s: Settings, out: Path, only: set[str] | None = None, command: str = "") -> dict[str, Any]:
    """Every planned case that fits the budget; gpu-bench.md and gpu-bench.json in out after each case."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cases = plan(s, only)
    reserve = compiled_reserve(s, cases)
    report: dict[str, Any] = {
        "settings": {**asdict(s), "data": asdict(s.data)},
        "command": command,
        "cases": cases,
        "partial": True,
        "compiled_reserve_s": reserve,
    }
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="torchcvt-gpu-bench-") as workdir:
        data = None
        if any(case.kind in ("pipeline", "train-run") for case in cases):
            writing = time.monotonic()
            data = gpu_data.generate(Path(workdir) / "data", s.data)
            report["data_generation_s"] = time.monotonic() - writing
        bench = Bench(s, device, Path(workdir), data)
        bench.measure_matmul()
        report["environment"] = environment(device, bench)
        started = time.monotonic()  # the budget's clock: the dataset and the set-up come before it
        try:
            for case in cases:
                # Eager cases share the budget less the compiled cases' reserve; compiled ones get the rest.
                end = s.budget_s if case.kind.endswith("compiled") else s.budget_s - reserve
                left = end - (time.monotonic() - started)
                cap = min(s.caps[case.kind], left)
                if cap < 1:
                    continue
                logger.info("%s (cap %.0f s, %.0f s of the budget left)", case.label, cap, left)
                began = time.monotonic()
                try:
                    with time_cap(cap):
                        case.result = bench.run_case(case, cap)
                    case.status = case.result.pop("status", "done")
                except Exception as error:  # a failing case must not cost the rest of a rare GPU run
                    case.status = _failure(case, error, cap, s)
                case.result["seconds"] = time.monotonic() - began
                if case.kind.endswith("compiled"):
                    bench.drop_compiled()
                gpu_report.write(report, out)
            report["partial"] = any(case.status != "done" for case in cases)
        finally:
            report["elapsed_s"] = time.monotonic() - started
            gpu_report.write(report, out)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu-bench", help="folder for gpu-bench.md and gpu-bench.json")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a narrow model: checks the script")
    parser.add_argument("--budget", type=float, help="seconds for the whole run (default 450; smoke 240)")
    parser.add_argument(
        "--only",
        help="comma-separated case kinds to run: inference, train, pipeline, "
        "train-run, train-compiled, inference-compiled",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    s = Settings.smoke_run() if args.smoke else Settings.full()
    if args.budget is not None:
        s = replace(s, budget_s=args.budget)
    only = set(args.only.split(",")) if args.only else None
    if only and not only <= set(s.caps):
        parser.error(
            f"--only: unknown kind(s) {', '.join(sorted(only - set(s.caps)))}; "
            f"choose from {', '.join(s.caps)}"
        )
    report = run(s, Path(args.out), only, " ".join(["benchmarks/gpu.py", *(argv or sys.argv[1:])]))
    print((Path(args.out) / "gpu-bench.md").read_text())
    return 0 if not any(c.status.startswith("failed") for c in report["cases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
