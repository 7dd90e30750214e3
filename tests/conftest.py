import random
from collections.abc import Iterator
from pathlib import Path

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


@pytest.fixture
def offline_home(tmp_path, monkeypatch) -> Path:
    """An empty HF_HOME with HF_HUB_OFFLINE=1; huggingface_hub reads both at import, so set them there too."""
    import huggingface_hub.constants

    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return home


@pytest.fixture
def saved_figures(monkeypatch) -> list:
    """Every matplotlib figure saved while the test runs (still written as usual), in order."""
    from matplotlib.figure import Figure

    figures = []
    real_savefig = Figure.savefig

    def savefig(self, *args, **kwargs):
        figures.append(self)
        return real_savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return figures


@pytest.fixture
def devices(tmp_path: Path) -> dict[str, Path]:
    """Private character devices, null and full (as /dev/null and /dev/full), for output tests: a writer that
    wrongly replaced a device replaces these, never the machine's own (needs root)."""
    import os
    import stat

    folder = tmp_path / "dev"
    folder.mkdir()
    nodes = {"null": folder / "null", "full": folder / "full"}
    try:
        for path, minor in ((nodes["null"], 3), (nodes["full"], 7)):
            os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, minor))
    except OSError as error:
        pytest.skip(f"cannot make device nodes here (needs root): {error.strerror}")
    return nodes
