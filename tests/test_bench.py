"""The benchmark harness (benchmarks/bench.py, tooling outside the installed package) runs end to end."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench import (  # noqa: E402
    BEGIN,
    END,
    Case,
    default_cases,
    format_markdown,
    main,
    native_bf16,
    op_kind,
    op_shares,
    parse_cases,
    run_benchmark,
    write_report,
)


@pytest.mark.slow
def test_bench_smoke_on_a_tiny_model(tmp_path):
    """Every part of the harness on the smallest run that exercises it: one inference case (timed and
    profiled), one training case (timed, peak memory of both models), small matmul-peak products."""
    tiny = {"embed_dim": [16, 32, 48], "num_heads": [1, 2, 3], "depth": [1, 2, 3]}
    report = run_benchmark("cvt_13", cases=[Case("fp32", 1, 32), Case("train", 2, 32)],
                           warmup=0, repeats=1, peak_size=256, **tiny)
    assert report["max_logit_difference"] < 1e-4
    assert [r.case.mode for r in report["results"]] == ["fp32", "train"]
    assert all(r.first_call_s[0] > 0 and r.first_call_s[1] > 0 for r in report["results"])
    assert all(r.torchcvt_ips > 0 and r.hf_ips > 0 for r in report["results"])
    train = report["results"][-1]
    assert train.torchcvt_mem_mb is not None and train.hf_mem_mb > 0
    for result in report["results"][:1]:  # inference: profiled; the products are most of the time
        assert result.op_shares.keys() == {"matmul", "attention", "convolution", "other"}
        assert sum(result.op_shares.values()) == pytest.approx(1.0)
        assert result.op_shares["matmul"] > 0 and result.op_shares["convolution"] > 0
    assert train.op_shares is None
    table = format_markdown(report)
    assert "| train step | 2 | 32 |" in table and "GFLOP/s" in table
    fp32 = report["results"][0]
    share = fp32.gflop_per_image * fp32.torchcvt_ips / report["peaks"]["fp32"]
    assert f"- fp32 inference, batch 1: share of the fp32 matmul peak: {share:.0%} (" in table
    assert f"- fp32 inference, batch 1: speed against transformers: {fp32.ratio:.2f} (" in table
    assert "bf16 inference: time outside matmul, attention and convolution: not measured in this run" in table
    assert "torchcvt's profile, fp32 inference, batch 1, 32 px (self CPU time):" in table
    name, op_share, calls = fp32.top_ops[0]
    assert f"| {name} | {100 * op_share:.1f}% | {calls} |" in table
    assert f"| {100 * report['results'][0].op_shares['other']:.1f}% |" in table
    header, rule = table.splitlines()[4:6]
    assert header.count("|") == rule.count("|") == table.splitlines()[6].count("|")


def test_report_replaces_only_its_own_section(tmp_path):
    report = {"model": "cvt_13", "overrides": {}, "results": [], "peaks": {"fp32": 100.0, "bf16": 10.0},
              "max_logit_difference": 0.0, "machine": "test machine"}
    path = write_report(report, tmp_path / "benchmarks.md")
    first = path.read_text()
    assert first.startswith("# Benchmarks") and BEGIN in first and first.rstrip().endswith(END)
    generated = first.split("\n", 2)[2]  # without the title
    path.write_text("# Notes\n\nby hand before\n\n" + generated + "\n## Later\n\nby hand after\n")
    write_report({**report, "machine": "another machine"}, path)
    text = path.read_text()
    assert text.startswith("# Notes\n\nby hand before\n\n" + BEGIN)
    assert text.endswith(END + "\n\n## Later\n\nby hand after\n")
    assert "another machine" in text and "test machine" not in text
    assert "- fp32 inference, batch 16: share of the fp32 matmul peak: not measured in this run" in text


def test_op_kinds_of_the_profiled_ops():
    assert op_kind("mkldnn::_linear_pointwise") == op_kind("aten::addmm") == "matmul"
    assert op_kind("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert op_kind("aten::_softmax") == "attention" and op_kind("aten::baddbmm") == "matmul"
    assert op_kind("aten::mkldnn_convolution") == op_kind("aten::_slow_conv2d_forward") == "convolution"
    assert op_kind("aten::copy_") == op_kind("aten::native_layer_norm") == "other"
    shares = op_shares([("aten::addmm", 3.0, 2), ("aten::cat", 1.0, 4)])
    assert shares == {"matmul": 0.75, "attention": 0.0, "convolution": 0.0, "other": 0.25}


def test_bad_arguments_are_one_line_errors(capsys):
    assert main(["--quick", "--repeats", "0"]) == 2
    assert capsys.readouterr().err == "bench: error: --repeats must be at least 1, got 0\n"
    assert main(["--model", "cvt_digits", "--quick", "--no-memory", "--repeats", "1"]) == 2
    err = capsys.readouterr().err
    assert "transformers' CvT cannot build cvt_digits: stage 1 has depth 1" in err
    assert len(err.splitlines()) == 1


def test_cases_option_and_a_cpu_without_native_bf16(capsys):
    assert parse_cases("bf16:16:224,fp32:1:224") == [Case("bf16", 16, 224), Case("fp32", 1, 224)]
    assert main(["--cases", "bf16:16"]) == 2
    assert capsys.readouterr().err == ("bench: error: --cases: 'bf16:16' is not MODE:BATCH:SIZE with MODE "
                                       "one of fp32, bf16, train, train_ckpt\n")
    report = {"model": "cvt_13", "overrides": {}, "results": [], "peaks": {"fp32": 100.0, "bf16": 1.0},
              "max_logit_difference": 0.0, "machine": "AVX2 machine", "native_bf16": False}
    assert "- bf16: this CPU has no native bf16 (neither AVX512-BF16 nor AMX)" in format_markdown(report)


def test_full_benchmark_times_bf16_only_where_the_cpu_has_it(caplog: pytest.LogCaptureFixture) -> None:
    assert any(case.mode == "bf16" for case in default_cases(quick=False, bf16=True))
    assert not any(case.mode == "bf16" for case in default_cases(quick=False, bf16=False))
    assert "no native bf16" in caplog.text
    chosen = default_cases(quick=False)
    assert any(case.mode == "bf16" for case in chosen) == native_bf16()


def test_onnxruntime_contender_runs_the_exported_file_and_is_reported(tmp_path):
    from bench import CaseResult, _onnxruntime_fn

    from torchcvt import create_model

    model = create_model("cvt_13", embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 1, 1])
    _onnxruntime_fn(model, Case("fp32", 2, 64), tmp_path)()
    assert list(tmp_path.glob("*.onnx"))
    with pytest.raises(ValueError, match="--onnxruntime times fp32 inference only, not bf16"):
        _onnxruntime_fn(model, Case("bf16", 2, 64), tmp_path)
    result = CaseResult(Case("fp32", 16, 224), torchcvt_ips=10.0, hf_ips=5.0, gflop_per_image=9.0,
                        onnxruntime_ips=12.5)
    report = {"model": "cvt_13", "overrides": {}, "results": [result], "peaks": {"fp32": 900.0, "bf16": 1.0},
              "max_logit_difference": 0.0, "machine": "test machine"}
    table = format_markdown(report)
    assert "| - | 12.50 (0.80x) |" in table
    target = "- fp32 inference, batch 16: speed against ONNX Runtime: 0.80 (not met; target at least 0.95)"
    assert target in table
    assert "- bf16 inference, batch 16: speed against ONNX Runtime" not in table
