"""Where a process runs (rank, world size, device), the process group, seeding and RNG state."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..checks import resolve_device
from ..errors import TorchcvtError


@dataclass
class Runtime:
    """Where this process runs: its rank among world_size processes and its device."""

    rank: int
    world_size: int
    device: torch.device
    control: Any = None  # a Gloo group for host-side agreements when the default group is NCCL

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_runtime(device: str = "auto") -> Runtime:
    """Join the torchrun process group when launched by torchrun (NCCL on GPUs, Gloo on CPU)."""
    resolve_device(device)  # a device this machine lacks is a one-line error
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    chosen = torch.device(
        f"cuda:{local_rank}"
        if use_cuda and device in ("auto", "cuda")
        else (device if device != "auto" else "cpu")
    )
    if world_size > 1 and not dist.is_initialized():
        if chosen.type == "cuda":
            torch.cuda.set_device(chosen)
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
    control = dist.new_group(backend="gloo") if world_size > 1 and dist.get_backend() != "gloo" else None
    return Runtime(rank, world_size, chosen, control)


def all_reduce(values: Sequence[float] | torch.Tensor, runtime: Runtime) -> list[float]:
    """Sum a few numbers (host floats or a tensor on the device) over all processes: one collective,
    one read back to the host."""
    tensor = values if isinstance(values, torch.Tensor) else torch.tensor(list(values), dtype=torch.float64)
    if runtime.distributed:
        tensor = tensor.to(runtime.device)
        dist.all_reduce(tensor)
    return tensor.tolist()


def agree_on_failure(runtime: Runtime, error: TorchcvtError | None) -> None:
    """Every rank calls this at the same point; if any rank brings an error, every rank raises it.

    So a user error one rank meets (a strict-mode unreadable image) stops all ranks with the same
    one-line message, instead of one rank leaving the others waiting in the next collective.
    """
    if not runtime.distributed:
        if error is not None:
            raise error
        return
    # On a CPU (Gloo) group: a GPU run pays no device sync for this check.
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int32)
    dist.all_reduce(flag, group=runtime.control)
    if flag.item():
        messages: list[Any] = [None] * runtime.world_size
        dist.all_gather_object(messages, None if error is None else str(error), group=runtime.control)
        rank, message = next((r, m) for r, m in enumerate(messages) if m is not None)
        raise TorchcvtError(message if rank == runtime.rank else f"{message} (on rank {rank})")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every global random stream as tensors and plain data (so weights_only loading works)."""
    numpy_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
            "pos": int(numpy_state[2]),
            "has_gauss": int(numpy_state[3]),
            "gauss": float(numpy_state[4]),
        },
        "python": torch.tensor(random.getstate()[1], dtype=torch.int64),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    random.setstate((3, tuple(state["python"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@contextmanager
def torch_settings(deterministic: bool, device: torch.device) -> Iterator[None]:
    """Deterministic algorithms or cuDNN autotuning for the run; the caller's settings restored after."""
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
    )
    if deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark = saved[2]
