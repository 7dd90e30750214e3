"""The machinery every suite of training runs shares (`ablate`, `transfer`): one folder per run, claimed
with a file lock so that no two workers train the same run, resumed from its own checkpoint after an
interruption, shared between workers by --shard I/N or a SLURM array, launched in this process or as
`LAUNCHER -m torchcvt train`, and a suite.json that keeps one suite folder to one recipe and data set."""

from __future__ import annotations

import ctypes
import fcntl
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .engine.runlock import lock_holder
from .errors import TorchcvtError, shorten, shown
from .files import append_text, write_bytes, write_json, write_text
from .runrecord import LAST_NAME, SUMMARY_NAME, RunSummary
from .typed import describe_changes, differences

if TYPE_CHECKING:
    from .engine import TrainConfig

logger = logging.getLogger("torchcvt.suite")

SUITE_FORMAT = 1
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class RunFailed(Exception):
    """A run launched as a separate command stopped with an error."""


@dataclass(frozen=True)
class Job:
    """One training run of a suite: a `torchcvt train` of config and overrides (resolved by
    engine.resolve_config, as the command resolves them) or of `resolved`, an already resolved
    TrainConfig, into folder; then `finish` (called with the folder; e.g. a final evaluation) until
    done_file is written."""

    name: str  # unique in the suite: its claim file and its lines in events.jsonl
    folder: Path
    config: str | None
    overrides: tuple[str, ...]
    note: str = ""  # what the progress line says about the run besides its name
    finish: Callable[[Path], None] | None = None
    done_file: str | None = None  # what finish writes last
    resolved: TrainConfig | None = None

    @property
    def finished(self) -> bool:
        done = self.done_file is None or (self.folder / self.done_file).is_file()
        return done and is_finished(self.folder)

    def train_config(self) -> TrainConfig:
        if self.resolved is not None:
            return self.resolved
        from .engine.resolve import resolve_config

        return resolve_config(self.config, self.overrides).config


def read_summary(folder: Path) -> RunSummary | None:
    """The summary the engine writes after a run's last epoch; None when there is none, or one a kill left
    unreadable (said in a warning: a rerun of the suite trains the run to its end again)."""
    path = folder / SUMMARY_NAME
    if not path.is_file():
        return None
    try:
        return RunSummary.read(path)
    except TorchcvtError as error:
        logger.warning(f"{error}; the run counts as not finished")
        return None


def is_finished(folder: Path) -> bool:
    """A run is finished when the engine has written its summary (after its last epoch) and it reads."""
    return read_summary(folder) is not None


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def open_suite(root: Path, identity: dict[str, Any], lists: dict[str, Sequence[Any]],
               order: dict[str, Callable[[Any], Any]] | None = None, what: str = "suite") -> dict[str, Any]:
    """Create root/suite.json, or check that the suite in root has this identity (recipe, data...) and add
    the lists' items (studies, seeds...) to its own, each kept sorted by its `order` key. Returns the
    suite record (everything it holds)."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "suite.json"
    order = order or {}
    with _locked(root / "suite.lock"):
        if path.is_file():
            suite = _suite_record(path, identity, {key: type(next(iter(items), "")) for key, items in
                                                   lists.items()})
            changes = differences({key: suite[key] for key in identity}, identity)
            if changes:
                raise TorchcvtError(f"output folder {root} holds a {what} with another recipe or data: "
                                    f"{describe_changes(changes, 3)}; give another --output")
        else:
            suite = {"format": SUITE_FORMAT, **identity, **{key: [] for key in lists}}
        for key, items in lists.items():
            merged = list(dict.fromkeys([*suite.get(key, []), *items]))
            suite[key] = sorted(merged, key=order.get(key))
        write_json(path, suite)
    return suite


def read_suite(root: Path, identity: Sequence[str], lists: dict[str, type],
               what: str = "suite") -> dict[str, Any]:
    """root/suite.json, checked to hold the identity's objects and the lists' arrays of `lists[key]` items."""
    path = root / "suite.json"
    if not path.is_file():
        raise TorchcvtError(f"{root} holds no {what} (no suite.json)")
    return _suite_record(path, {key: {} for key in identity}, lists)


def _suite_record(path: Path, identity: dict[str, Any], lists: dict[str, type]) -> dict[str, Any]:
    """suite.json read and checked: a one-line error naming the file and the key that is wrong."""
    try:
        suite = json.loads(path.read_bytes())
    except ValueError as error:  # not JSON, or not UTF-8
        raise TorchcvtError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(suite, dict):
        raise TorchcvtError(
            f"{path} must hold a JSON object (a suite record), got a JSON {type(suite).__name__}")
    kinds = {**{key: dict if isinstance(value, dict) else type(value) for key, value in identity.items()},
             **{key: list for key in lists}}
    for key, kind in kinds.items():
        if not isinstance(suite.get(key), kind):
            found = "nothing" if key not in suite else f"a JSON {type(suite[key]).__name__}"
            wanted = {dict: "object", list: "array"}.get(kind, kind.__name__)
            raise TorchcvtError(f"{path}: key {key!r} must hold a JSON {wanted}, got {found}")
    for key, item in lists.items():
        if item is int and not (suite[key] and all(type(value) is int for value in suite[key])):
            raise TorchcvtError(
                f"{path}: key {key!r} must hold one or more integers, got {shown(suite[key])}")
        if item is str and not all(isinstance(value, str) for value in suite[key]):
            raise TorchcvtError(f"{path}: key {key!r} must hold names, got {shown(suite[key])}")
    return suite


def _claim_path(root: Path, name: str) -> Path:
    folder = root / "claims"
    folder.mkdir(exist_ok=True)
    return folder / f"{name.replace('/', '.')}.lock"


@contextmanager
def claim(root: Path, name: str) -> Iterator[bool]:
    """Hold the run's lock file while training it; yields False when another live worker holds it.

    The kernel drops the lock of a process that dies (even by SIGKILL), so a run never stays claimed by a
    dead worker. Shared folders need working file locks (local disks, NFSv4, Lustre mounted with flock).
    """
    path = _claim_path(root, name)
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


def is_claimed(root: Path, name: str) -> bool:
    """Whether a live worker holds the run's claim now."""
    with claim(root, name) as held:
        return not held


def record(root: Path, event: str, name: str, **details: Any) -> None:
    """Append one line to root/events.jsonl: which worker started, resumed or finished which run."""
    line = {"time": time.time(), "event": event, "run": name, "host": socket.gethostname(),
            "pid": os.getpid(), **details}
    append_text(root / "events.jsonl", json.dumps(line) + "\n")


def events(root: Path) -> list[dict[str, Any]]:
    path = root / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


@dataclass
class WorkerTally:
    """What one worker did: counts for its closing line."""

    trained: list[str] = field(default_factory=list)
    already_done: int = 0
    held_elsewhere: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def add(self, other: WorkerTally) -> None:
        self.trained += other.trained
        self.already_done += other.already_done
        self.held_elsewhere += other.held_elsewhere
        self.failed += other.failed

    def line(self, shard: tuple[int, int]) -> str:
        share = f" (shard {shard[0]}/{shard[1]})" if shard[1] > 1 else ""
        return (f"trained {len(self.trained)} run(s){share}, {self.already_done} already finished"
                + (f", {len(self.held_elsewhere)} held by other workers" if self.held_elsewhere else "")
                + (f", {len(self.failed)} diverged: {', '.join(self.failed)}" if self.failed else ""))


def shard_runs(runs: Sequence[Any], index: int, count: int) -> list[Any]:
    """Every count-th run from index: the share of one of count workers."""
    return [run for i, run in enumerate(runs) if i % count == index]


def run_jobs(jobs: Sequence[Job], root: Path, shard: tuple[int, int] = (0, 1), launcher: str | None = None,
             after_each: Callable[[], Any] | None = None) -> WorkerTally:
    """Train this worker's share of the jobs that are not finished and not held by another worker (or by a
    training still running in their folder); after_each (rebuilding the report, say) is called after every
    job this worker finishes."""
    mine = shard_runs(jobs, *shard)
    progress = WorkerTally()
    started = time.perf_counter()
    for number, job in enumerate(mine, start=1):
        if job.finished:
            progress.already_done += 1
            continue
        with claim(root, job.name) as held:
            if not held:
                progress.held_elsewhere.append(job.name)
                logger.info(f"[{number}/{len(mine)}] {job.name}: another worker is training it; skipped")
                continue
            if job.finished:  # finished by another worker between the two checks
                progress.already_done += 1
                continue
            training = lock_holder(job.folder)
            if training is not None:  # a training left running by a worker that died (or started by hand)
                progress.held_elsewhere.append(job.name)
                logger.info(f"[{number}/{len(mine)}] {job.name}: a training ({training}) still runs in its "
                            "folder; skipped")
                continue
            resuming = (job.folder / LAST_NAME).is_file()
            eta = ""
            if progress.trained:
                left = len(mine) - number + 1
                minutes = (time.perf_counter() - started) / len(progress.trained) * left / 60
                eta = f", about {minutes:.0f} min left in this share"
            note = f" ({job.note})" if job.note else ""
            doing = "resuming" if resuming else "training"
            logger.info(f"[{number}/{len(mine)}] {doing} {job.name}{note}{eta}")
            record(root, "resume" if resuming else "start", job.name)
            trained = is_finished(job.folder)  # trained, killed before its finish step
            if trained or train_one(job.train_config(), launcher, job.folder):
                if job.finish is not None:
                    job.finish(job.folder)
                record(root, "done", job.name)
                progress.trained.append(job.name)
            else:
                record(root, "failed", job.name)
                progress.failed.append(job.name)
        if after_each is not None:
            after_each()
    return progress


def train_one(config: TrainConfig, launcher: str | None, folder: Path) -> bool:
    """Train one run in this process, or as `LAUNCHER -m torchcvt train --config OUTPUT/config.yaml` (its
    whole config, written to its run folder); False if it diverged.

    A launched run counts as trained only when it leaves a valid summary.json in its folder, whatever its
    exit code; it is stopped (SIGTERM) if this worker dies, so a killed worker leaves no training behind.
    """
    from .engine import TrainingDiverged, train

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


def parse_shard(text: str | None) -> tuple[int, int]:
    """--shard I/N (0-based), or default_shard() when not given."""
    if text is None:
        return default_shard()
    index, sep, count = text.partition("/")
    try:
        index_number, count_number = int(index), int(count)
    except ValueError:
        raise TorchcvtError(f"--shard expects I/N (e.g. 0/4), got {text!r}") from None
    if sep and index_number == count_number >= 1:
        # The 1-based form of the last shard: 1/N would be ambiguous, so no 1-based form is guessed.
        raise TorchcvtError(
            f"--shard {text}: I is 0-based (0 to {count_number - 1}); for the 1-based task id {index_number} "
            f"(SLURM's --array=1-{count_number}) give --shard {index_number - 1}/{count_number}")
    if not sep or count_number < 1 or not 0 <= index_number < count_number:
        raise TorchcvtError(f"--shard expects I/N with 0 <= I < N (0-based), got {text!r}")
    return index_number, count_number


def parse_launcher(text: str | None) -> str | None:
    """--launcher checked to be a command line (None: train in this process)."""
    if text is None:
        return None
    try:
        launcher = shlex.split(text)
    except ValueError as error:
        raise TorchcvtError(f"--launcher {shown(text)} is not a command line: {error}") from None
    if not launcher:
        raise TorchcvtError('--launcher "" names no command: give one (e.g. "torchrun --nproc-per-node '
                            '8"), or leave --launcher out to train in this process')
    return text


def override(key: str, value: Any) -> str:
    """KEY=VALUE with the value as JSON, which the engine reads back as YAML to the same value."""
    return f"{key}={json.dumps(value)}"


def write_suite_report(root: Path, stem: str, data: dict[str, Any], markdown: Callable[[dict], str],
                       plot: Callable[[dict, Path], Any]) -> dict[str, Path]:
    """A suite's report from its collected data: report.md, STEM.json and STEM.png in root."""
    paths = {"report": root / "report.md", "json": root / f"{stem}.json", "plot": root / f"{stem}.png"}
    write_json(paths["json"], data)
    write_text(paths["report"], markdown(data))
    plot(data, paths["plot"])
    return paths
