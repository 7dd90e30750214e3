"""Running the ablation suite on the shared suite machinery (torchcvt.suite): one folder per distinct model
and seed, claimed, resumed and sharded as every suite is, and never mixed with another recipe or data set."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..data import is_folder_tree, list_classes, walk_images
from ..errors import TorchcvtError
from ..suite import Job, Progress, default_shard, run_jobs
from ..suite import open_suite as open_any_suite
from ..suite import read_suite as read_any_suite
from .plan import Plan, Run
from .studies import STUDIES

__all__ = ["data_fingerprint", "default_shard", "open_suite", "read_suite", "run_folder", "run_suite"]


def run_folder(root: Path, run: Run) -> Path:
    return root / "runs" / run.model / f"seed-{run.seed}"


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


def open_suite(root: Path, settings: dict[str, Any], data: dict[str, Any], studies: Sequence[str],
               seeds: Sequence[int]) -> dict[str, Any]:
    """Create root/suite.json, or check that the suite in root has this recipe and data and add the studies
    and seeds to it. Returns the suite record (all its studies and seeds)."""
    order = {"studies": list(STUDIES).index, "seeds": None}
    return open_any_suite(root, {"recipe": settings, "data": data}, {"studies": studies, "seeds": seeds},
                          order, what="suite")


def read_suite(root: Path) -> dict[str, Any]:
    return read_any_suite(root, "ablation suite")


def run_suite(plan: Plan, root: Path, config: str | None, base_overrides: Sequence[str],
              shard: tuple[int, int] = (0, 1), launcher: str | None = None,
              after_each: Callable[[], Any] | None = None) -> Progress:
    """Train this worker's share of the plan's runs that are not finished and not held by another worker;
    after_each (rebuilding the report, say) is called after every run this worker finishes."""
    from .recipe import run_overrides

    rows_of: dict[str, list[str]] = {}
    for planned in plan.rows:
        rows_of.setdefault(planned.model, []).append(f"{planned.study.table}{planned.row.letter}")
    jobs = [Job(run.name, run_folder(root, run), config,
                (*base_overrides, *run_overrides(run.knobs, run.seed, run_folder(root, run))),
                note=f"rows {' '.join(rows_of[run.model])}") for run in plan.runs()]
    return run_jobs(jobs, root, shard, launcher, after_each)
