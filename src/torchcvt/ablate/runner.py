"""Running a suite: one folder per run, claimed with a file lock so no two workers train the same run,
resumed from its own checkpoint after an interruption, and never mixed with another recipe or data set."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shlex
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data import is_folder_tree, list_classes, walk_images
from ..errors import TorchcvtError
from .plan import Plan, Run
from .studies import STUDIES

logger = logging.getLogger("torchcvt.ablate")

SUITE_FORMAT = 1


class RunFailed(Exception):
    """A run launched as a separate command stopped with an error."""


def run_folder(root: Path, run: Run) -> Path:
    return root / "runs" / run.model / f"seed-{run.seed}"


def is_finished(folder: Path) -> bool:
    """A run is finished when the engine has written its summary (after its last epoch)."""
    return (folder / "summary.json").is_file()


def data_fingerprint(train_dir: str | Path, val_dir: str | Path) -> dict[str, Any]:
    """Class and image counts of both trees and a hash of their file lists (names only: no image is read).

    A training tree with fewer than two classes is a one-line error.
    """
    fingerprint = {}
    for split, folder in (("train", Path(train_dir)), ("val", Path(val_dir))):
        if not is_folder_tree(folder):
            from ..hfdata import fingerprint as dataset_fingerprint

            fingerprint[split] = dataset_fingerprint(str(folder))
            continue
        classes = list_classes(folder)
        if split == "train" and len(classes) < 2:
            raise TorchcvtError(f"data folder {folder} holds 1 class ({classes[0]}): an ablation needs a "
                             "classifier, so at least 2 class folders")
        files = [path.relative_to(folder).as_posix() for path in walk_images(folder)]
        listing = hashlib.sha256("\n".join(files).encode()).hexdigest()[:16]
        fingerprint[split] = {"classes": len(classes), "images": len(files), "file_list_sha256": listing}
    return fingerprint


def _differences(saved: dict[str, Any], ours: dict[str, Any], prefix: str = "") -> list[str]:
    changes = []
    for key in [*saved, *(key for key in ours if key not in saved)]:
        old, new = saved.get(key, "unset"), ours.get(key, "unset")
        if isinstance(old, dict) and isinstance(new, dict):
            changes += _differences(old, new, f"{prefix}{key} ")
        elif old != new:
            changes.append(f"{prefix}{key} {json.dumps(old)} -> {json.dumps(new)}")
    return changes


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def open_suite(root: Path, settings: dict[str, Any], data: dict[str, Any], studies: Sequence[str],
               seeds: Sequence[int]) -> dict[str, Any]:
    """Create root/suite.json, or check that the suite in root has this recipe and data and add the studies
    and seeds to it. Returns the suite record (all its studies and seeds)."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "suite.json"
    with _locked(root / "suite.lock"):
        if path.is_file():
            suite = json.loads(path.read_text())
            changes = _differences({"recipe": suite["recipe"], "data": suite["data"]},
                                   {"recipe": settings, "data": data})
            if changes:
                more = f" and {len(changes) - 3} more" if len(changes) > 3 else ""
                raise TorchcvtError(f"output folder {root} holds a suite with another recipe or data: "
                                 f"{'; '.join(changes[:3])}{more}; give another --output")
        else:
            suite = {"format": SUITE_FORMAT, "recipe": settings, "data": data, "studies": [], "seeds": []}
        suite["studies"] = [name for name in STUDIES if name in set(suite["studies"]) | set(studies)]
        suite["seeds"] = sorted(set(suite["seeds"]) | set(seeds))
        temporary = path.with_name(f"suite.json.tmp-{os.getpid()}")
        temporary.write_text(json.dumps(suite, indent=2))
        os.replace(temporary, path)
    return suite


def read_suite(root: Path) -> dict[str, Any]:
    path = root / "suite.json"
    if not path.is_file():
        raise TorchcvtError(f"{root} holds no ablation suite (no suite.json)")
    return json.loads(path.read_text())


@contextmanager
def claim(root: Path, run: Run) -> Iterator[bool]:
    """Hold the run's lock file while training it; yields False when another live worker holds it.

    The kernel drops the lock of a process that dies (even by SIGKILL), so a run never stays claimed by a
    dead worker. Shared folders need working file locks (local disks, NFSv4, Lustre mounted with flock).
    """
    folder = root / "claims"
    folder.mkdir(exist_ok=True)
    path = folder / f"{run.model}.seed-{run.seed}.lock"
    handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        handle.truncate(0)
        handle.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}))
        handle.flush()
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        handle.close()


def record(root: Path, event: str, run: Run, **details: Any) -> None:
    """Append one line to root/events.jsonl: which worker started, resumed or finished which run."""
    line = {"time": time.time(), "event": event, "run": run.name, "host": socket.gethostname(),
            "pid": os.getpid(), **details}
    with open(root / "events.jsonl", "a") as handle:
        handle.write(json.dumps(line) + "\n")


@dataclass
class Progress:
    """What one worker did: counts for its closing line."""

    trained: list[str] = field(default_factory=list)
    already_done: int = 0
    held_elsewhere: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def shard_runs(runs: Sequence[Run], index: int, count: int) -> list[Run]:
    """Every count-th run from index: the share of one of count workers."""
    return [run for i, run in enumerate(runs) if i % count == index]


def run_suite(plan: Plan, root: Path, config: str | None, base_overrides: Sequence[str],
              shard: tuple[int, int] = (0, 1), launcher: str | None = None,
              after_each: Callable[[], Any] | None = None) -> Progress:
    """Train this worker's share of the plan's runs that are not finished and not held by another worker;
    after_each (rebuilding the report, say) is called after every run this worker finishes."""
    from .recipe import run_overrides

    mine = shard_runs(plan.runs(), *shard)
    progress = Progress()
    rows_of = {}
    for planned in plan.rows:
        rows_of.setdefault(planned.model, []).append(f"{planned.study.table}{planned.row.letter}")
    started = time.perf_counter()
    for number, run in enumerate(mine, start=1):
        folder = run_folder(root, run)
        if is_finished(folder):
            progress.already_done += 1
            continue
        with claim(root, run) as held:
            if not held:
                progress.held_elsewhere.append(run.name)
                logger.info(f"[{number}/{len(mine)}] {run.name}: another worker is training it; skipped")
                continue
            if is_finished(folder):  # finished by another worker between the two checks
                progress.already_done += 1
                continue
            resuming = (folder / "last.pth").is_file()
            trained = len(progress.trained)
            eta = ""
            if trained:
                left = len(mine) - number + 1
                minutes = (time.perf_counter() - started) / trained * left / 60
                eta = f", about {minutes:.0f} min left in this share"
            logger.info(f"[{number}/{len(mine)}] {'resuming' if resuming else 'training'} {run.name} "
                        f"(rows {' '.join(rows_of[run.model])}){eta}")
            record(root, "resume" if resuming else "start", run)
            overrides = [*base_overrides, *run_overrides(run.knobs, run.seed, folder)]
            if _train_one(config, overrides, launcher):
                record(root, "done", run)
                progress.trained.append(run.name)
            else:
                record(root, "failed", run)
                progress.failed.append(run.name)
        if after_each is not None:
            after_each()
    return progress


def _train_one(config: str | None, overrides: list[str], launcher: str | None) -> bool:
    """Train one run in this process, or as `LAUNCHER -m torchcvt train ...`; False if it diverged."""
    from ..engine import TrainingDiverged, load_config, train

    if launcher is None:
        try:
            train(load_config(config, overrides))
        except TrainingDiverged as error:
            logger.warning(str(error))
            return False
        return True
    command = [*shlex.split(launcher), "-m", "torchcvt", "train", *(["--config", config] if config else []),
               *overrides]
    code = subprocess.run(command, stdin=subprocess.DEVNULL).returncode
    if code != 0:
        raise RunFailed(f"`{shlex.join(command)}` stopped with exit code {code}")
    return True


def default_shard() -> tuple[int, int]:
    """SLURM's array task (index from its first id, count) when set, else the whole suite."""
    if "SLURM_ARRAY_TASK_ID" in os.environ and "SLURM_ARRAY_TASK_COUNT" in os.environ:
        first = int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
        return int(os.environ["SLURM_ARRAY_TASK_ID"]) - first, int(os.environ["SLURM_ARRAY_TASK_COUNT"])
    return 0, 1
