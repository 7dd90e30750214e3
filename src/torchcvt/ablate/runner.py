"""Running a suite: one folder per run, claimed with a file lock so no two workers train the same run,
resumed from its own checkpoint after an interruption, and never mixed with another recipe or data set."""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import logging
import os
import shlex
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data import class_images, list_classes
from ..engine.runlock import lock_holder
from ..errors import TorchcvtError, shorten, shown
from ..files import write_bytes
from ..runrecord import LAST_NAME, SUMMARY_NAME
from ..typed import describe_changes, differences
from .plan import Plan, Run
from .studies import STUDIES

if TYPE_CHECKING:
    from ..engine import TrainConfig

logger = logging.getLogger("torchcvt.ablate")

SUITE_FORMAT = 1
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class RunFailed(Exception):
    """A run launched as a separate command stopped with an error."""


def run_folder(root: Path, run: Run) -> Path:
    return root / "runs" / run.model / f"seed-{run.seed}"


def is_finished(folder: Path) -> bool:
    """A run is finished when the engine has written its summary (after its last epoch): a JSON object."""
    try:
        return isinstance(json.loads((folder / SUMMARY_NAME).read_bytes()), dict)
    except (OSError, ValueError):
        return False


# Files whose whole content the data fingerprint hashes, spread evenly over each tree: a fixed cost however
# large the data set, on top of one stat per file.
FINGERPRINT_SAMPLE = 64


def data_fingerprint(train_dir: str | Path, val_dir: str | Path) -> dict[str, Any]:
    """Class and image counts of both trees, a hash of every image's path and size, and a hash of the bytes
    of FINGERPRINT_SAMPLE images spread over the tree: one stat per image and a few dozen reads, so it stays
    cheap for ImageNet. A training tree with fewer than two classes is a one-line error.
    """
    fingerprint = {}
    for split, folder in (("train", Path(train_dir)), ("val", Path(val_dir))):
        classes = list_classes(folder)
        if split == "train" and len(classes) < 2:
            raise TorchcvtError(f"data folder {folder} holds 1 class ({classes[0]}): an ablation needs a "
                             "classifier, so at least 2 class folders")
        paths = [path for path, _ in class_images(folder)]
        files, sample = hashlib.sha256(), hashlib.sha256()
        for path in paths:
            files.update(f"{path.relative_to(folder).as_posix()}\t{_size(path)}\n".encode())
        for path in paths[:: max(1, len(paths) // FINGERPRINT_SAMPLE)][:FINGERPRINT_SAMPLE]:
            sample.update(f"{path.relative_to(folder).as_posix()}\t".encode() + _content_hash(path))
        fingerprint[split] = {"classes": len(classes), "images": len(paths), "files_sha256":
                              files.hexdigest()[:16], "sample_sha256": sample.hexdigest()[:16]}
    return fingerprint


def _size(path: Path) -> int:
    """A file's size, or -1 for an entry that cannot be read (reported as unreadable by the runs)."""
    try:
        info = path.stat()
    except OSError:
        return -1
    return info.st_size if stat.S_ISREG(info.st_mode) else -1


def _content_hash(path: Path) -> bytes:
    if _size(path) < 0:
        return b"unreadable"
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    except OSError:
        return b"unreadable"
    return digest.digest()


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
            suite = _suite_record(path)
            changes = differences({"recipe": suite["recipe"], "data": suite["data"]},
                                  {"recipe": settings, "data": data})
            if changes:
                raise TorchcvtError(f"output folder {root} holds a suite with another recipe or data: "
                                    f"{describe_changes(changes, 3)}; give another --output")
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
    return _suite_record(path)


# What suite.json holds: each key and the JSON type of its value.
SUITE_KEYS = {"recipe": dict, "data": dict, "studies": list, "seeds": list}


def _suite_record(path: Path) -> dict[str, Any]:
    """suite.json read and checked: a one-line error naming the file and the key that is wrong."""
    try:
        suite = json.loads(path.read_bytes())
    except ValueError as error:  # not JSON, or not UTF-8
        raise TorchcvtError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(suite, dict):
        raise TorchcvtError(
            f"{path} must hold a JSON object (a suite record), got a JSON {type(suite).__name__}")
    for key, kind in SUITE_KEYS.items():
        if not isinstance(suite.get(key), kind):
            found = "nothing" if key not in suite else f"a JSON {type(suite[key]).__name__}"
            wanted = "object" if kind is dict else "array"
            raise TorchcvtError(f"{path}: key {key!r} must hold a JSON {wanted}, got {found}")
    if not all(isinstance(name, str) for name in suite["studies"]):
        raise TorchcvtError(f"{path}: key 'studies' must hold study names, got {shown(suite['studies'])}")
    if not suite["seeds"] or not all(type(seed) is int for seed in suite["seeds"]):
        raise TorchcvtError(
            f"{path}: key 'seeds' must hold one or more integers, got {shown(suite['seeds'])}")
    return suite


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


def run_suite(plan: Plan, root: Path, config: TrainConfig, shard: tuple[int, int] = (0, 1),
              launcher: str | None = None, after_each: Callable[[], Any] | None = None) -> Progress:
    """Train this worker's share of the plan's runs that are not finished and not held by another worker,
    each with the suite's resolved config and its own settings (recipe.run_values); after_each
    (rebuilding the report, say) is called after every run this worker finishes."""
    from .recipe import run_values

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
            training = lock_holder(folder)
            if training is not None:  # a training left running by a worker that died (or started by hand)
                progress.held_elsewhere.append(run.name)
                logger.info(f"[{number}/{len(mine)}] {run.name}: a training ({training}) still runs in its "
                            "folder; skipped")
                continue
            resuming = (folder / LAST_NAME).is_file()
            trained = len(progress.trained)
            eta = ""
            if trained:
                left = len(mine) - number + 1
                minutes = (time.perf_counter() - started) / trained * left / 60
                eta = f", about {minutes:.0f} min left in this share"
            logger.info(f"[{number}/{len(mine)}] {'resuming' if resuming else 'training'} {run.name} "
                        f"(rows {' '.join(rows_of[run.model])}){eta}")
            record(root, "resume" if resuming else "start", run)
            if _train_one(config.override(run_values(run.knobs, run.seed, folder)), launcher, folder):
                record(root, "done", run)
                progress.trained.append(run.name)
            else:
                record(root, "failed", run)
                progress.failed.append(run.name)
        if after_each is not None:
            after_each()
    return progress


def _train_one(config: TrainConfig, launcher: str | None, folder: Path) -> bool:
    """Train one run in this process, or as `LAUNCHER -m torchcvt train --config OUTPUT/config.yaml` (its
    whole config, written to its run folder); False if it diverged.

    A launched run counts as trained only when it leaves a valid summary.json in its folder, whatever its
    exit code; it is stopped (SIGTERM) if this worker dies, so a killed worker leaves no training behind.
    """
    from ..engine import TrainingDiverged, train

    if launcher is None:
        try:
            train(config)
        except TrainingDiverged as error:
            logger.warning(str(error))
            return False
        return True
    import yaml

    path = Path(config.train.output) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, yaml.safe_dump(config.to_dict(), sort_keys=False).encode())
    command = [*shlex.split(launcher), "-m", "torchcvt", "train", "--config", str(path)]
    command_line = shorten(shlex.join(command), 200)
    code = subprocess.run(command, stdin=subprocess.DEVNULL, preexec_fn=_stop_with(os.getpid())).returncode
    if code != 0:
        raise RunFailed(f"`{command_line}` stopped with exit code {code}")
    if not is_finished(folder):
        raise RunFailed(f"`{command_line}` exited with code 0 but left no valid summary.json in {folder}: "
                        "the launcher did not train the run")
    return True


def _stop_with(parent: int) -> Callable[[], None]:
    """A preexec_fn asking Linux to send the child SIGTERM when this process dies (prctl PDEATHSIG)."""

    def stop_with_parent() -> None:
        if sys.platform.startswith("linux"):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != parent:  # the parent died before the request took effect
                os._exit(1)

    return stop_with_parent


def default_shard() -> tuple[int, int]:
    """SLURM's array task as (index, count) when set, else the whole suite: task ids run from
    SLURM_ARRAY_TASK_MIN by SLURM_ARRAY_TASK_STEP (`--array=0-28:2`); an id outside that sequence, or an
    array that is not one (`--array=1,4,9`), is a one-line error asking for --shard."""
    if "SLURM_ARRAY_TASK_ID" not in os.environ or "SLURM_ARRAY_TASK_COUNT" not in os.environ:
        return 0, 1
    task, count, first, step = (_slurm_integer(name, default) for name, default in (
        ("SLURM_ARRAY_TASK_ID", None), ("SLURM_ARRAY_TASK_COUNT", None), ("SLURM_ARRAY_TASK_MIN", "0"),
        ("SLURM_ARRAY_TASK_STEP", "1")))
    last = _slurm_integer("SLURM_ARRAY_TASK_MAX", str(first + step * (count - 1)))
    where = (f"SLURM array task {task} (SLURM_ARRAY_TASK_MIN={first}, SLURM_ARRAY_TASK_MAX={last}, "
             f"SLURM_ARRAY_TASK_STEP={step}, SLURM_ARRAY_TASK_COUNT={count})")
    if count < 1 or step < 1:
        raise TorchcvtError(f"{where}: the count and step must be at least 1; give --shard I/N")
    if first + step * (count - 1) != last:
        raise TorchcvtError(f"{where}: the task ids are not one range with one step (an array such as "
                            "--array=1,4,9); give --shard I/N")
    index, off_step = divmod(task - first, step)
    if off_step or not 0 <= index < count:
        raise TorchcvtError(f"{where}: the id is not one of the array's {count} task ids; give --shard I/N")
    return index, count


def _slurm_integer(name: str, default: str | None) -> int:
    text = os.environ.get(name, default) if default is not None else os.environ[name]
    try:
        return int(text)
    except ValueError:
        raise TorchcvtError(f"{name}={text[:40]!r} is not an integer; give --shard I/N") from None
