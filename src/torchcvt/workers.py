"""How many data-loader processes a machine can use: the one rule for training, evaluation and predict."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, as PyTorch's DataLoader counts them)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# Data-loader processes when none are asked for: enough for a GPU's small-image pipeline, capped by the CPUs.
DEFAULT_WORKERS = 4


def sized_workers(workers: int | None, key: str = "data.workers") -> int:
    """workers (None: DEFAULT_WORKERS), capped at the usable CPUs, with a notice naming key when a number
    asked for is capped: more loader processes than CPUs only compete for them, and PyTorch warns about
    each such DataLoader."""
    cpus = usable_cpus()
    if workers is None:
        return min(DEFAULT_WORKERS, cpus)
    if workers <= cpus:
        return workers
    logger.info(f"{key}={workers} but this machine lets the run use {cpus} CPU(s): loading with {cpus} "
                "worker process(es)")
    return cpus
