"""The machinery every suite of training runs shares (`ablate`, `transfer`): one folder per run, claimed
with a file lock so that no two workers train the same run, resumed from its own checkpoint after an
interruption, shared between workers by --shard I/N or a SLURM array, launched in this process or as
`LAUNCHER -m torchcvt train`, and a suite.json that keeps one suite folder to one recipe and data set."""

from __future__ import annotations

import fcntl
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

from .errors import TorchcvtError

logger = logging.getLogger("torchcvt.suite")

SUITE_FORMAT = 1


class RunFailed(Exception):
    """A run launched as a separate command stopped with an error."""


@dataclass(frozen=True)
class Job:
    """One training run of a suite: a `torchcvt train` of config and overrides into folder, then `finish`
    (called with the folder; e.g. a final evaluation) until done_file is written."""

    name: str  # unique in the suite: its claim file and its lines in events.jsonl
    folder: Path
    config: str | None
    overrides: tuple[str, ...]
    note: str = ""  # what the progress line says about the run besides its name
    finish: Callable[[Path], None] | None = None
    done_file: str = "summary.json"

    @property
    def finished(self) -> bool:
        return is_finished(self.folder, self.done_file)


def is_finished(folder: Path, done_file: str = "summary.json") -> bool:
    """Whether a run wrote its last file (the engine's summary.json after its last step)."""
    return (folder / done_file).is_file()


def differences(saved: dict[str, Any], ours: dict[str, Any], prefix: str = "") -> list[str]:
    """Each key whose value differs between two nested records, as 'key old -> new'."""
    changes = []
    for key in [*saved, *(key for key in ours if key not in saved)]:
        old, new = saved.get(key, "unset"), ours.get(key, "unset")
        if isinstance(old, dict) and isinstance(new, dict):
            changes += differences(old, new, f"{prefix}{key} ")
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
            suite = json.loads(path.read_text())
            changes = differences({key: suite[key] for key in identity}, identity)
            if changes:
                more = f" and {len(changes) - 3} more" if len(changes) > 3 else ""
                raise TorchcvtError(f"output folder {root} holds a {what} with another recipe or data: "
                                    f"{'; '.join(changes[:3])}{more}; give another --output")
        else:
            suite = {"format": SUITE_FORMAT, **identity, **{key: [] for key in lists}}
        for key, items in lists.items():
            merged = list(dict.fromkeys([*suite.get(key, []), *items]))
            suite[key] = sorted(merged, key=order.get(key))
        temporary = path.with_name(f"suite.json.tmp-{os.getpid()}")
        temporary.write_text(json.dumps(suite, indent=2))
        os.replace(temporary, path)
    return suite


def read_suite(root: Path, what: str = "suite") -> dict[str, Any]:
    path = root / "suite.json"
    if not path.is_file():
        raise TorchcvtError(f"{root} holds no {what} (no suite.json)")
    return json.loads(path.read_text())


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
    handle = open(_claim_path(root, name), "a+")
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
    with open(root / "events.jsonl", "a") as handle:
        handle.write(json.dumps(line) + "\n")


def events(root: Path) -> list[dict[str, Any]]:
    path = root / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


@dataclass
class Progress:
    """What one worker did: counts for its closing line."""

    trained: list[str] = field(default_factory=list)
    already_done: int = 0
    held_elsewhere: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def add(self, other: Progress) -> None:
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
             after_each: Callable[[], Any] | None = None) -> Progress:
    """Train this worker's share of the jobs that are not finished and not held by another worker;
    after_each (rebuilding the report, say) is called after every job this worker finishes."""
    mine = shard_runs(jobs, *shard)
    progress = Progress()
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
            resuming = (job.folder / "last.pth").is_file()
            eta = ""
            if progress.trained:
                left = len(mine) - number + 1
                minutes = (time.perf_counter() - started) / len(progress.trained) * left / 60
                eta = f", about {minutes:.0f} min left in this share"
            note = f" ({job.note})" if job.note else ""
            doing = "resuming" if resuming else "training"
            logger.info(f"[{number}/{len(mine)}] {doing} {job.name}{note}{eta}")
            record(root, "resume" if resuming else "start", job.name)
            trained = (job.folder / "summary.json").is_file()  # trained, killed before its finish step
            if trained or train_one(job.config, list(job.overrides), launcher):
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


def train_one(config: str | None, overrides: list[str], launcher: str | None) -> bool:
    """Train one run in this process, or as `LAUNCHER -m torchcvt train ...`; False if it diverged."""
    from .engine import TrainingDiverged, load_config, train

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


def parse_shard(text: str | None) -> tuple[int, int]:
    """--shard I/N (0-based), or default_shard() when not given."""
    if text is None:
        return default_shard()
    index, sep, count = text.partition("/")
    try:
        index_number, count_number = int(index), int(count)
    except ValueError:
        raise TorchcvtError(f"--shard expects I/N (e.g. 0/4), got {text!r}") from None
    if not sep or count_number < 1 or not 0 <= index_number < count_number:
        raise TorchcvtError(f"--shard expects I/N with 0 <= I < N, got {text!r}")
    return index_number, count_number


def override(key: str, value: Any) -> str:
    """KEY=VALUE with the value as JSON, which the engine reads back as YAML to the same value."""
    return f"{key}={json.dumps(value)}"


def write_text(path: Path, text: str) -> None:
    """Replace a report file whole (readers never see half of it)."""
    from .files import write_bytes

    write_bytes(path, text.encode())
