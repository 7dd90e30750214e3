import random
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from trainkit import perturb_weights

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


TINY = {"embed_dim": [16, 32, 48], "num_heads": [1, 2, 3], "depth": [1, 1, 2]}


@pytest.fixture
def tiny_overrides() -> dict:
    """Config overrides that make cvt_13 small enough for fast CPU tests but keep every feature."""
    return dict(TINY)


@pytest.fixture
def perturb():
    """In place: noise on every weight and random BatchNorm statistics, so every tensor moves the outputs."""
    return perturb_weights


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread: tiny models gain nothing from a second, and subprocess tests that run on one
    thread need the same float reductions here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
