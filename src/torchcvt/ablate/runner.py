"""Running the ablation suite on the shared suite machinery (torchcvt.suite): one folder per distinct model
and seed, claimed, resumed and sharded as every suite is, and never mixed with another recipe or data set."""

from __future__ import annotations

import hashlib
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data import class_images, is_folder_tree, list_classes
from ..errors import TorchcvtError
from ..suite import Job, WorkerTally, default_shard, is_finished, run_jobs
from ..suite import open_suite as open_any_suite
from ..suite import read_suite as read_any_suite
from .plan import Plan, Run
from .studies import STUDIES

if TYPE_CHECKING:
    from ..engine import TrainConfig

__all__ = ["WorkerTally", "data_fingerprint", "default_shard", "is_finished", "open_suite", "read_suite",
           "run_folder", "run_suite"]

# Files whose whole content the data fingerprint hashes, spread evenly over each tree: a fixed cost however
# large the data set, on top of one stat per file.
FINGERPRINT_SAMPLE = 64


def run_folder(root: Path, run: Run) -> Path:
    return root / "runs" / run.model / f"seed-{run.seed}"


def data_fingerprint(train_dir: str | Path, val_dir: str | Path) -> dict[str, Any]:
    """Class and image counts of both trees, a hash of every image's path and size, and a hash of the bytes
    of FINGERPRINT_SAMPLE images spread over the tree: one stat per image and a few dozen reads, so it stays
    cheap for ImageNet (a Hugging Face dataset: hfdata.fingerprint). A training tree with fewer than two
    classes is a one-line error.
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


def open_suite(root: Path, settings: dict[str, Any], data: dict[str, Any], studies: Sequence[str],
               seeds: Sequence[int]) -> dict[str, Any]:
    """Create root/suite.json, or check that the suite in root has this recipe and data and add the studies
    and seeds to it. Returns the suite record (all its studies and seeds)."""
    order = {"studies": list(STUDIES).index, "seeds": None}
    return open_any_suite(root, {"recipe": settings, "data": data}, {"studies": studies, "seeds": seeds},
                          order, what="suite")


def read_suite(root: Path) -> dict[str, Any]:
    return read_any_suite(root, ("recipe", "data"), {"studies": str, "seeds": int}, "ablation suite")


def run_suite(plan: Plan, root: Path, config: TrainConfig, shard: tuple[int, int] = (0, 1),
              launcher: str | None = None, after_each: Callable[[], Any] | None = None) -> WorkerTally:
    """Train this worker's share of the plan's runs that are not finished and not held by another worker,
    each with the suite's resolved config and its own settings (recipe.run_values); after_each
    (rebuilding the report, say) is called after every run this worker finishes."""
    from .recipe import run_values

    rows_of: dict[str, list[str]] = {}
    for planned in plan.rows:
        rows_of.setdefault(planned.model, []).append(f"{planned.study.table}{planned.row.letter}")
    jobs = [Job(run.name, run_folder(root, run), None, (), note=f"rows {' '.join(rows_of[run.model])}",
                resolved=config.override(run_values(run.knobs, run.seed, run_folder(root, run))))
            for run in plan.runs()]
    return run_jobs(jobs, root, shard, launcher, after_each)
