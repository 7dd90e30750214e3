"""Optional dependencies: each comes with an extra (pip install 'torchcvt[train]'), imported where used."""

from __future__ import annotations

import importlib
from types import ModuleType

# The extra that installs each optional top-level package (pyproject.toml's optional-dependencies).
EXTRAS = {"tensorboard": "train", "sklearn": "train", "matplotlib": "plot", "onnx": "export",
          "onnxscript": "export", "transformers": "bench", "datasets": "data"}


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def require(module: str, purpose: str) -> ModuleType:
    """Import module (of a package in EXTRAS), or raise MissingExtra naming who needs it and the extra."""
    package = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name is None or error.name.split(".")[0] != package:
            raise  # something the package itself imports is missing: not ours to explain
        raise MissingExtra(f"{purpose} needs {package}, which is not installed: "
                           f"pip install 'torchcvt[{EXTRAS[package]}]'") from None
