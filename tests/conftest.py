import random

import numpy as np
import pytest
import torch

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
