"""Generated JPEG data for benchmarks/gpu.py: writing it, the speed of the official training augmentation
over it, and a short `torchcvt train` run on it through the command line."""

from __future__ import annotations

import colorsys
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import torchcvt

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class DataShape:
    """An ImageFolder of JPEGs at about ImageNet's mean size (500x375) by default."""

    classes: int = 10
    train_per_class: int = 512  # 5120 images: 20 steps of the official batch of 256 per epoch
    val_per_class: int = 20
    width: int = 500
    height: int = 375
    quality: int = 90

    @classmethod
    def smoke(cls) -> DataShape:
        return cls(classes=2, train_per_class=8, val_per_class=2, width=64, height=48)


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def synthetic_image(label: int, index: int, shape: DataShape) -> Image.Image:
    """Stripes whose angle and hue give the class, at a random period and phase, under pixel noise: a
    class a CvT can learn through crops, flips and RandAugment, and a JPEG about as costly to decode as a
    photograph of the same size."""
    rng = np.random.default_rng([label, index])
    angle = math.pi * label / shape.classes
    yy, xx = np.mgrid[0 : shape.height, 0 : shape.width].astype(np.float32)
    phase = (xx * math.cos(angle) + yy * math.sin(angle)) * (2 * math.pi / rng.uniform(10, 30))
    stripes = np.sin(phase + rng.uniform(0, 2 * math.pi))[..., None]
    colour = np.array(colorsys.hsv_to_rgb(label / shape.classes, 0.8, 1.0), dtype=np.float32)
    pixels = 128 + 90 * stripes * colour + rng.normal(0, 25, (shape.height, shape.width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _write(job: tuple[Path, int, int, DataShape]) -> int:
    path, label, index, shape = job
    if not path.exists():
        part = path.with_suffix(".part")
        synthetic_image(label, index, shape).save(part, format="JPEG", quality=shape.quality)
        part.rename(path)  # a run stopped mid-write leaves no truncated JPEG behind
    return path.stat().st_size


def generate(root: Path, shape: DataShape) -> Path:
    """root/train and root/val ImageFolders (written once; an interrupted write resumes)."""
    done = root / "complete.json"
    if done.is_file():
        return root
    jobs = []
    for split, count in (("train", shape.train_per_class), ("val", shape.val_per_class)):
        for label in range(shape.classes):
            folder = root / split / f"class_{label:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            # Train and val indices differ, so no validation image is a training image.
            offset = 0 if split == "train" else shape.train_per_class
            jobs += [(folder / f"{i:05d}.jpg", label, offset + i, shape) for i in range(count)]
    if len(jobs) > 64:
        with Pool(cpu_cores()) as pool:
            sizes = pool.map(_write, jobs, chunksize=16)
    else:
        sizes = [_write(job) for job in jobs]
    done.write_text(json.dumps({"images": len(jobs), "mean_kb": sum(sizes) / len(sizes) / 1024}))
    return root


def official_transform(config: Path, model: str) -> Any:
    """The training augmentation the config asks for, built as `torchcvt train` builds it."""
    from torchcvt.data import train_transform
    from torchcvt.engine import load_config

    aug = load_config(str(config)).aug
    if aug.pipeline != "timm":
        raise ValueError(f"{config}: aug.pipeline {aug.pipeline!r}; this benchmark measures timm's pipeline")
    return train_transform(aug, torchcvt.get_variant(model).data_config())


def pipeline_speed(
    train_dir: Path, config: Path, model: str, batch: int, workers: int, pin_memory: bool, seconds: float
) -> dict[str, Any]:
    """Images/s that DataLoader workers deliver through the official augmentation, measured over the last
    two thirds of `seconds` (the first third drains the batches the workers prepared while starting)."""
    from torch.utils.data import DataLoader, RandomSampler
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(train_dir), official_transform(config, model))
    batch = min(batch, len(dataset))
    sampler = RandomSampler(dataset, replacement=True, num_samples=10**8)
    loader = DataLoader(
        dataset, batch_size=batch, sampler=sampler, num_workers=workers, pin_memory=pin_memory, drop_last=True
    )
    started = time.perf_counter()
    stamps: list[float] = []
    iterator = iter(loader)
    try:
        while not stamps or stamps[-1] - started < seconds:
            next(iterator)
            stamps.append(time.perf_counter())
    finally:
        del iterator  # shuts the workers down, also when the case's time cap interrupts it
    steady = [t for t in stamps if t - started >= seconds / 3] or stamps[-2:]
    images_per_s = batch * (len(steady) - 1) / (steady[-1] - steady[0]) if len(steady) > 1 else None
    info = json.loads((train_dir.parent / "complete.json").read_text())
    return {
        "images_per_s": images_per_s,
        "config": config.name,
        "workers": workers,
        "batch": batch,
        "first_batch_s": stamps[0] - started,
        "batches": len(stamps),
        "dataset_images": len(dataset),
        "mean_jpeg_kb": info["mean_kb"],
        "transform": str(dataset.transform),
    }


def train_run(
    config: Path, data: Path, output: Path, overrides: list[str], seconds: float
) -> dict[str, Any]:
    """`torchcvt train` in a subprocess, stopped with its workers after `seconds`: steps, images/s, losses."""
    config = config.resolve().relative_to(ROOT) if config.resolve().is_relative_to(ROOT) else config
    command = [
        sys.executable,
        "-m",
        "torchcvt",
        "train",
        "--config",
        str(config),
        "--data",
        str(data),
        "--output",
        str(output),
        "--no-resume",
        "--quiet",
        *overrides,
    ]
    src = str(Path(torchcvt.__file__).resolve().parents[1])  # the torchcvt this script imported
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # leave the GPU's free memory to the run
    output.parent.mkdir(parents=True, exist_ok=True)
    log = output.parent / "train-run.log"
    started = time.monotonic()
    with open(log, "w") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True
        )
        try:
            process.wait(timeout=max(seconds - 10, 1))  # keeps 10 s to stop it and read what it wrote
        except subprocess.TimeoutExpired:
            pass
        finally:
            _stop(process)
    stopped = process.returncode not in (0, None) and time.monotonic() - started >= seconds - 10
    if process.returncode != 0 and not stopped:
        lines = log.read_text().strip().splitlines()
        raise RuntimeError(f"torchcvt train exited with {process.returncode}: {lines[-1] if lines else ''}")
    records = (
        [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line.strip()]
        if (output / "metrics.jsonl").is_file()
        else []
    )
    losses = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    speeds = [r["images_per_second"] for r in records if r.get("kind") == "train"][
        1:
    ]  # the first has start-up
    summary_path = output / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    window = max(1, min(3, len(losses) // 2))
    first = statistics.fmean(loss for _, loss in losses[:window]) if losses else None
    last = statistics.fmean(loss for _, loss in losses[-window:]) if losses else None
    return {
        "command": "torchcvt train " + " ".join(command[4:]).replace(str(output.parent), "TMP"),
        "status": f"stopped at its cap ({seconds:.0f} s)" if stopped else "done",
        "steps": losses[-1][0] if losses else 0,
        "images_per_s": summary.get("images_per_second") or (statistics.median(speeds) if speeds else None),
        "losses": losses,
        "loss_first": first,
        "loss_last": last,
        "loss_falls": None if first is None or len(losses) < 2 else last < first,
        "final_val_top1": summary.get("final_val_top1"),
        "wall_s": time.monotonic() - started,
    }


def _stop(process: subprocess.Popen) -> None:
    """End the run and its DataLoader workers (its own process group), politely first."""
    if process.poll() is not None:
        return
    for sig, grace in ((signal.SIGINT, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return
