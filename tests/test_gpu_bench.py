"""benchmarks/gpu.py: its smoke mode end to end on this machine, its time caps and budget, and (with CUDA
only) the GPU-only measurements: peak memory, the measured matmul rate and MFU."""

import gc
import importlib.util
import json
import signal
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load_gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", BENCHMARKS / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_bench"] = module
    spec.loader.exec_module(module)
    return module


gpu = _load_gpu_bench()


def _flags():
    return (
        torch.get_float32_matmul_precision(),
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.benchmark,
        signal.getsignal(signal.SIGALRM),
    )


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("NVIDIA H200", (989.0, "H200 SXM")),
        ("NVIDIA H100 80GB HBM3", (989.0, "H100 SXM")),
        ("NVIDIA H100 PCIe", (756.0, "H100 PCIe")),
        ("NVIDIA H100 NVL", (835.0, "H100/H200 NVL")),
        ("NVIDIA A100-SXM4-80GB", (312.0, "A100")),
        ("NVIDIA A10", (125.0, "A10")),
        ("NVIDIA L4", (121.0, "L4")),
        ("Tesla V100-SXM2-16GB", None),
    ],
)
def test_bf16_peak_names_the_entry_it_used(name, expected):
    assert gpu.bf16_peak(name) == expected


def test_time_cap_stops_a_case_and_restores_the_alarm_handler():
    before = signal.getsignal(signal.SIGALRM)
    started = time.monotonic()
    with pytest.raises(gpu.CaseTimeout), gpu.time_cap(0.2):
        time.sleep(5)
    assert time.monotonic() - started < 2
    assert signal.getsignal(signal.SIGALRM) is before
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_a_spent_budget_writes_a_partial_report(tmp_path):
    report = gpu.run(gpu.Settings.smoke_run(budget_s=0), tmp_path, command="gpu.py --budget 0")
    data = json.loads((tmp_path / "gpu-bench.json").read_text())
    assert data["partial"] is True and report["partial"] is True
    assert {case["status"] for case in data["cases"]} == {"not run: overall budget"}
    text = (tmp_path / "gpu-bench.md").read_text()
    assert f"**Partial**: {len(data['cases'])} of {len(data['cases'])} cases" in text
    assert "- train-run: not run: overall budget" in text


def test_only_runs_the_kinds_named(tmp_path):
    assert {case.kind for case in gpu.plan(gpu.Settings.full(), {"pipeline", "train"})} == {
        "pipeline",
        "train",
    }
    with pytest.raises(SystemExit):
        gpu.main(["--smoke", "--out", str(tmp_path), "--only", "inference,warp-drive"])


@pytest.mark.slow
def test_smoke_run_measures_every_case_and_restores_global_state(tmp_path):
    flags = _flags()
    report = gpu.run(gpu.Settings.smoke_run(budget_s=900), tmp_path, command="gpu.py --smoke")
    assert _flags() == flags
    data = json.loads((tmp_path / "gpu-bench.json").read_text())
    statuses = {f"{c['kind']} {c['params']}": c["status"] for c in data["cases"]}
    assert set(statuses.values()) == {"done"}, statuses
    assert data["partial"] is False and report["partial"] is False
    cases = {(c["kind"], json.dumps(c["params"], sort_keys=True)): c["result"] for c in data["cases"]}
    kinds = {kind for kind, _ in cases}
    assert {c["status"] for c in data["cases"]} == {"done"}
    assert kinds == {"inference", "inference-compiled", "train", "train-compiled", "pipeline", "train-run"}
    for (kind, _), result in cases.items():
        if kind.startswith("inference"):
            assert result["torchcvt"]["images_per_s"] > 0 and result["transformers"]["images_per_s"] > 0
            assert result["max_logit_difference"] < 1e-4  # the same weights in both
        elif kind.startswith("train-") and kind != "train-run" or kind == "train":
            assert result["images_per_s"] > 0 and result["model_tflops"] > 0
    pipeline = next(r for (k, _), r in cases.items() if k == "pipeline")
    assert pipeline["images_per_s"] > 0 and pipeline["workers"] == gpu.gpu_data.cpu_cores()
    run = next(r for (k, _), r in cases.items() if k == "train-run")
    assert run["steps"] == 8 and len(run["losses"]) == 2 and run["images_per_s"] > 0
    assert "cvt-13-224.yaml" in run["command"] and "model.name=cvt_digits" in run["command"]
    text = (tmp_path / "gpu-bench.md").read_text()
    for heading in ("#### Inference", "#### Training step"):
        assert heading in text
    assert "#### Input pipeline" in text and "#### `torchcvt train`" in text
    assert "Unknown device: no vendor bf16 peak, so no MFU." in text or torch.cuda.is_available()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: peak memory, matmul rate, MFU")
def test_cuda_paths_measure_memory_matmul_and_mfu(tmp_path):
    flags = _flags()
    s = gpu.Settings.smoke_run(budget_s=600)
    report = gpu.run(s, tmp_path, {"train", "train-compiled", "inference-compiled"}, command="gpu.py --smoke")
    assert _flags() == flags
    env = report["environment"]
    assert env["measured_bf16_matmul_tflops"] > 0 and env["memory_gib"] > 0
    assert {case.status for case in report["cases"]} == {"done"}
    for case in report["cases"]:
        if case.kind.startswith("train"):
            assert case.result["peak_memory_gib"] > 0
            assert ("mfu" in case.result) == (env["bf16_peak_tflops"] is not None)
            assert case.result["share_of_measured_matmul"] > 0


def test_a_training_step_measures_its_own_model_alone(tmp_path, monkeypatch):
    """The inference models a run caches are freed before a training case makes its model: on CUDA its
    peak memory (reset there too) is then the case's own."""
    s = gpu.Settings.smoke_run()
    bench = gpu.Bench(s, torch.device("cpu"), tmp_path)
    cached = weakref.ref(bench.pair(s.models[0])[0])
    load, freed_before_loading = bench.load, []

    def recording_load(name, implementation):
        gc.collect()
        freed_before_loading.append(cached() is None)
        return load(name, implementation)

    monkeypatch.setattr(bench, "load", recording_load)
    result = bench.train_step("torchcvt", compiled=False, checkpointing=True)
    assert freed_before_loading == [True] and not bench.pairs
    assert result["images_per_s"] > 0 and result["peak_memory_gib"] is None  # no CUDA here


def test_compiled_cases_keep_their_share_of_the_budget(tmp_path, monkeypatch):
    """Eager cases that use up their caps stop at the budget less the compiled cases' reserve: the
    compiled ones still run, and the report says how the budget was split."""
    caps = {"inference": 1.0, "train": 1.0, "pipeline": 1.0, "train-run": 1.0,
            "train-compiled": 1.0, "inference-compiled": 1.0}
    s = gpu.replace(gpu.Settings.smoke_run(), budget_s=6.0, caps=caps)
    full = gpu.Settings.full()
    assert gpu.compiled_reserve(full, gpu.plan(full)) <= full.budget_s / 2  # the default split

    def run_case(self, case, seconds):
        if not case.kind.endswith("compiled"):
            time.sleep(seconds + 1)  # stopped by its cap
        return {}

    monkeypatch.setattr(gpu.Bench, "run_case", run_case)
    for table in ("inference_table", "training_table"):  # no figures to tabulate from this stand-in
        monkeypatch.setattr(gpu.gpu_report, table, lambda *args: [])
    report = gpu.run(s, tmp_path, {"inference", "train", "train-compiled", "inference-compiled"})
    assert report["compiled_reserve_s"] == 3.0
    statuses = {case.label: case.status for case in report["cases"]}
    assert [status for label, status in statuses.items() if "compiled" in label] == ["done"] * 3, statuses
    assert any(status == "not run: overall budget" for status in statuses.values()), statuses
    text = (tmp_path / "gpu-bench.md").read_text()
    assert "6 s budget, of which 3 s were kept for the compiled cases" in text


def test_the_dataset_is_written_before_the_budget_clock_starts(tmp_path, monkeypatch):
    """Writing the JPEGs takes minutes on a GPU machine: not out of the training run's cap."""
    def slow_generate(root, shape):
        time.sleep(1.5)
        root.mkdir(parents=True)
        return root

    seen = []

    def run_case(self, case, seconds):
        seen.append((case.kind, self.generated(), seconds))
        return {}

    monkeypatch.setattr(gpu.gpu_data, "generate", slow_generate)
    monkeypatch.setattr(gpu.Bench, "run_case", run_case)
    s = gpu.replace(gpu.Settings.smoke_run(), budget_s=1.4)
    report = gpu.run(s, tmp_path, {"train-run"})
    assert report["data_generation_s"] >= 1.5
    assert [case.status for case in report["cases"]] == ["done"]
    assert seen[0][0] == "train-run" and seen[0][1].name == "data" and seen[0][2] > 1


def test_a_timeout_that_dynamo_wraps_is_still_a_stop_at_the_cap():
    s = gpu.Settings.smoke_run()
    case = gpu.Case("train-compiled", {"implementation": "torchcvt", "checkpointing": False})
    try:
        try:
            raise gpu.CaseTimeout
        except gpu.CaseTimeout as timeout:
            raise RuntimeError("InternalTorchDynamoError: CaseTimeout") from timeout
    except RuntimeError as wrapped:
        assert gpu._failure(case, wrapped, s.caps[case.kind], s) == "stopped at its cap (120 s)"
    assert gpu._failure(case, ValueError("bad"), 5, s) == "failed: ValueError: bad"
