"""The bottom of the weights layer: tensor files, atomic writes, and the layer's one-way imports."""

import ast
import builtins
from pathlib import Path

import pytest
import torch

from torchcvt import files
from torchcvt.weights.io import read_tensor_file, save_safetensors, save_torch, unwrap_state_dict

WEIGHTS = Path(__file__).resolve().parents[1] / "src" / "torchcvt" / "weights"
# Bottom to top: a module may import only those before it.
ORDER = ["io", "formats", "checkpoint", "load", "remote_code", "card", "save", "catalogue", "hub"]


def torchcvt_imports(path: Path) -> set[str]:
    """The torchcvt modules a file imports (relative imports, inside functions too), as dotted names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = ["torchcvt", "weights"][: 3 - node.level]
            found.add(".".join([*base, *(node.module.split(".") if node.module else [])]))
    return found


def test_the_weights_layer_imports_downward_only():
    for name in ORDER:
        imports = torchcvt_imports(WEIGHTS / f"{name}.py")
        assert "torchcvt.factory" not in imports, name
        inside = {module.split(".")[2] for module in imports if module.startswith("torchcvt.weights.")}
        assert inside <= set(ORDER[: ORDER.index(name)]), (name, inside)
    # Pure I/O: nothing of torchcvt but the bottom of the house (its error type and its file writer).
    assert torchcvt_imports(WEIGHTS / "io.py") == {"torchcvt.errors", "torchcvt.files"}


@pytest.mark.parametrize("save", [save_safetensors, save_torch], ids=["safetensors", "torch"])
def test_a_failed_write_keeps_the_previous_file(tmp_path, save, monkeypatch):
    path = tmp_path / "weights.bin"
    save({"a": torch.ones(2)}, path)
    before = path.read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("torchcvt.weights.io.safetensors_bytes", full_disk)
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save({"a": torch.zeros(2)}, path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["weights.bin"]


class _InterruptedFile:
    """A file whose third write stores half its bytes and raises KeyboardInterrupt: Ctrl-C in a write the
    kernel cut short. torch's zip writer then finds its position wrong while it closes the archive."""

    def __init__(self, handle):
        self.handle, self.writes = handle, 0

    def write(self, data):
        self.writes += 1
        if self.writes == 3:
            self.handle.write(bytes(data)[: len(data) // 2])
            raise KeyboardInterrupt
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.handle.close()


def test_ctrl_c_during_a_write_stays_an_interrupt_and_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    save_torch({"weights": torch.ones(1000)}, path)
    before = path.read_bytes()
    monkeypatch.setattr(files, "open", lambda name, mode: _InterruptedFile(builtins.open(name, mode)),
                        raising=False)
    with pytest.raises(KeyboardInterrupt):
        save_torch({"weights": torch.zeros(1000), "more": torch.zeros(1000)}, path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth"]


def test_tensor_files_round_trip_with_metadata_and_prefixes(tmp_path):
    save_safetensors({"module.x": torch.arange(3.0)}, tmp_path / "a.safetensors", {"note": "hi"})
    obj, metadata = read_tensor_file(tmp_path / "a.safetensors")
    assert metadata == {"format": "pt", "note": "hi"}
    assert torch.equal(unwrap_state_dict(obj, tmp_path)["x"], torch.arange(3.0))
    save_torch({"model": {"_orig_mod.y": torch.ones(1)}, "epoch": 2}, tmp_path / "b.pth")
    obj, metadata = read_tensor_file(tmp_path / "b.pth")
    assert metadata == {} and list(unwrap_state_dict(obj, tmp_path)) == ["y"]
