"""gpu-bench.json and gpu-bench.md from a benchmarks/gpu.py report (rewritten after every case)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any


def _num(value: float | None, digits: int = 0) -> str:
    """digits decimals, or three significant digits for a value under 10 (smoke runs, slow devices)."""
    if value is None:
        return "-"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:,.{digits}f}"


def _spread(timing: dict[str, Any]) -> str:
    """Median images/s ± half the range over rounds, as a share of the median."""
    half = (timing["max_s"] - timing["min_s"]) / 2 / timing["median_s"]
    return f"{_num(timing['images_per_s'], 1)} ±{100 * half:.0f}%"


def _done(cases: list[Any], kind: str) -> list[Any]:
    return [c for c in cases if c.kind == kind and c.status == "done"]


def inference_table(cases: list[Any]) -> list[str]:
    rows = [c for c in cases if c.kind.startswith("inference") and c.status == "done"]
    if not rows:
        return []
    lines = [
        "| model | size | batch | precision | torchcvt img/s | transformers img/s | torchcvt / transformers "
        "| torchcvt TFLOP/s | first call s (torchcvt / transformers) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in rows:
        r = c.result
        first = f"{r['torchcvt']['first_call_s']:.1f} / {r['transformers']['first_call_s']:.1f}"
        lines.append(
            f"| {c.params['model']} | {r['img_size']} | {r['batch']} | {c.params['precision']} "
            f"| {_spread(r['torchcvt'])} | {_spread(r['transformers'])} | {r['ratio']:.2f}x "
            f"| {_num(r['torchcvt_tflops'], 1)} | {first} |"
        )
    return lines


def training_table(cases: list[Any], env: dict[str, Any]) -> list[str]:
    rows = [c for c in cases if c.kind in ("train", "train-compiled") and c.status == "done"]
    if not rows:
        return []
    peak = env.get("bf16_peak_tflops")
    lines = [
        f"| implementation | mode | activation checkpointing | images/s | peak memory GiB | model TFLOP/s "
        f"| MFU (of {_num(peak)} TFLOP/s) | share of measured matmul | first step s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in rows:
        r = c.result
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        share = f"{100 * r['share_of_measured_matmul']:.1f}%" if "share_of_measured_matmul" in r else "-"
        lines.append(
            f"| {c.params['implementation']} | {'compiled' if c.kind == 'train-compiled' else 'eager'} "
            f"| {'yes' if c.params['checkpointing'] else 'no'} | {_num(r['images_per_s'], 1)} "
            f"| {_num(r['peak_memory_gib'], 2)} | {_num(r['model_tflops'], 1)} | {mfu} | {share} "
            f"| {r['first_step_s']:.1f} |"
        )
    return lines


def pipeline_lines(cases: list[Any]) -> list[str]:
    pipes = _done(cases, "pipeline")
    if not pipes or pipes[0].result["images_per_s"] is None:
        return []
    p = pipes[0].result
    lines = [
        f"The official training augmentation (configs/{p['config']}: timm's RandAugment, random erasing, "
        f"bicubic random-resized crops) over {p['dataset_images']:,} generated JPEGs of "
        f"{p['mean_jpeg_kb']:.0f} KB on average, with {p['workers']} workers, batch {p['batch']}: "
        f"**{p['images_per_s']:,.0f} images/s** (first batch after {p['first_batch_s']:.1f} s).",
        "",
    ]
    consumers = [
        (
            f"{c.params['implementation']} {'compiled' if c.kind == 'train-compiled' else 'eager'} "
            f"bf16 training step{' with checkpointing' if c.params['checkpointing'] else ''}",
            c.result["images_per_s"],
        )
        for c in cases
        if c.kind in ("train", "train-compiled") and c.status == "done"
    ]
    runs = _done(cases, "train-run")
    if runs and runs[0].result["images_per_s"]:
        consumers.append(("`torchcvt train` (fp16, data loading included)", runs[0].result["images_per_s"]))
    for name, speed in consumers:
        verdict = "keeps up" if p["images_per_s"] >= speed else "**starves the model**"
        lines.append(
            f"- {name}: {_num(speed)} images/s; the pipeline delivers {p['images_per_s'] / speed:.2f}x "
            f"that: it {verdict}"
        )
    return lines


def train_run_lines(cases: list[Any]) -> list[str]:
    runs = [c for c in cases if c.kind == "train-run" and c.result.get("command")]
    if not runs:
        return []
    r = runs[0].result
    falls = {True: "falls", False: "**does not fall**", None: "not measured"}[r["loss_falls"]]
    return [
        f"`{r['command']}`",
        "",
        f"{r['steps']} optimizer steps in {r['wall_s']:.0f} s (start-up, validation and checkpoints "
        "included), "
        f"**{_num(r['images_per_s'])} images/s** on this one device while training; train loss "
        f"{_num(r['loss_first'], 3)} (first logged windows) -> {_num(r['loss_last'], 3)} (last): it {falls}. "
        f"Status: {runs[0].status}.",
    ]


def markdown(report: dict[str, Any]) -> str:
    env, cases = report.get("environment", {}), report["cases"]
    smoke = " (smoke run: tiny sizes, not a measurement)" if report["settings"]["smoke"] else ""
    lines = [f"### {env.get('device', 'unknown device')}{smoke}", ""]
    if env:
        lines += [
            f"`{report['command']}`: torch {env['torch']} (CUDA {env['cuda']}), transformers "
            f"{env['transformers']}, timm {env['timm']}, Python {env['python']}, {env['cpu_cores']} CPU "
            "cores; "
            f"torchcvt {env['torchcvt_commit'] or '(no git)'}; {report.get('elapsed_s', 0):.0f} s of a "
            f"{report['settings']['budget_s']:.0f} s budget, of which "
            f"{report.get('compiled_reserve_s', 0):.0f} s were kept for the compiled cases "
            "(the eager ones share the rest)"
            + (f"; the dataset was written in {report['data_generation_s']:.0f} s before the budget's clock "
               "started" if "data_generation_s" in report else "") + ".",
            "",
        ]
        if env["bf16_peak_tflops"]:
            lines.append(
                f"MFU is against the vendor's dense bf16 peak for {env['bf16_peak_entry']}: "
                f"{env['bf16_peak_tflops']:.0f} TFLOP/s (datasheet)."
            )
        else:
            lines.append("Unknown device: no vendor bf16 peak, so no MFU.")
        if env["measured_bf16_matmul_tflops"]:
            lines[-1] += (
                f" A bf16 8192x8192x8192 product on random data ran at "
                f"{env['measured_bf16_matmul_tflops']:.0f} TFLOP/s in this run."
            )
        lines.append("")
    if report.get("partial"):
        missing = [c for c in cases if c.status != "done"]
        lines += [
            f"**Partial**: {len(missing)} of {len(cases)} cases did not finish (listed at the end).",
            "",
        ]
    sections = [
        (
            "Inference",
            inference_table(cases),
            "Images/s: median over alternating torchcvt / transformers rounds after warm-up, ± half the "
            "range. fp32 with TF32 matmuls and convolutions; bf16 under autocast; `torch.compile`d (static "
            "shapes) under bf16 autocast. The first call includes compilation. Both models compute exact "
            "GELU on the same weights (torchcvt's checkpoint conversion).",
        ),
        (
            "Training step",
            training_table(cases, env),
            "Forward, backward and AdamW under bf16 autocast on one random batch. Peak memory: "
            "torch.cuda.max_memory_allocated of the case alone (every other model freed and the peak reset "
            "before its model is made: weights, gradients, AdamW state, activations). "
            "Model FLOPs: 3 forward passes of torchcvt.count_flops (2 per multiply-add); a checkpointed "
            "block's recomputed forward is overhead, not counted.",
        ),
        ("Input pipeline against training speed", pipeline_lines(cases), ""),
        ("`torchcvt train`, the official CvT-13 recipe's shape", train_run_lines(cases), ""),
    ]
    for title, body, note in sections:
        if body:
            lines += [f"#### {title}", "", *body, ""] + ([note, ""] if note else [])
    missing = [c for c in cases if c.status != "done"]
    if missing:
        lines += ["#### Not measured", "", *[f"- {c.label}: {c.status}" for c in missing], ""]
    return "\n".join(lines)


def write(report: dict[str, Any], out: Path) -> None:
    """out/gpu-bench.json (every number) and out/gpu-bench.md (the section for docs/benchmarks.md)."""
    data = {**report, "cases": [asdict(c) for c in report["cases"]]}
    (out / "gpu-bench.json").write_text(json.dumps(data, indent=2, default=str))
    (out / "gpu-bench.md").write_text(markdown(report))
