"""Every file the package writes goes through torchcvt/files.py (atomic, durable, a full disk one line).

A call that writes a file by itself anywhere else fails here: open() for writing, os.open with a writing
flag, Path.write_text/write_bytes, json.dump, and the serialisers (torch.save, np.save, savefig, PIL's and
ONNX's .save, safetensors' save_file) unless they write into a handle files.replace_file gave or an
in-memory buffer. TensorBoard's SummaryWriter is a third-party writer of its own files and is not covered.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import torchcvt

PACKAGE = Path(torchcvt.__file__).parent
WRITERS = PACKAGE / "files.py"
# Calls that write through a handle or a path given as their destination argument (its index).
SERIALISERS = {"torch.save": 1, "torch.jit.save": 1, "torch.export.save": 1, "np.save": 0, "np.savez": 0,
               "save_file": 1, "savefig": 0, "save": 0, "dump": 1}
# Files written outside files.py on purpose: lock files, which hold no data anyone reads back as a result.
ALLOWED = {
    ("suite.py", "open(path, 'a')"): "the suite's lock file, opened only to hold an flock",
    ("suite.py", "open(path, 'a+')"): "a run's claim lock, naming the worker that holds it",
    ("cli/__init__.py", "os.open(os.devnull, os.O_WRONLY)"): "stdout sent to /dev/null after a broken pipe",
    ("engine/runlock.py", "os.open(self.path, os.O_RDWR | os.O_CREAT, 420)"): "the run folder's lock file",
    ("engine/loop.py", "self.checkpoints.save(name, epoch, epoch_images, self.loop.left_out + "
     "self.steps.left_out)"): "torchcvt's own Checkpoints.save, which writes through files.replace_file",
}


def _name(node: ast.AST) -> str:
    return ast.unparse(node)


def _safe_handles(function: ast.AST) -> set[str]:
    """Names bound in function to a handle from files.replace_file or to an in-memory buffer."""
    names = set()
    for node in ast.walk(function):
        if isinstance(node, ast.With):
            for item in node.items:
                if (isinstance(item.context_expr, ast.Call) and _name(item.context_expr.func).endswith(
                        "replace_file") and isinstance(item.optional_vars, ast.Name)):
                    names.add(item.optional_vars.id)
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            if _name(node.value.func) in ("io.BytesIO", "BytesIO", "io.StringIO", "StringIO"):
                names.update(target.id for target in node.targets if isinstance(target, ast.Name))
    return names


def writes_outside_files(tree: ast.AST) -> list[str]:
    """The calls in a module's syntax tree that write a file without files.py, as source text."""
    found = []
    functions = [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    for function in functions or [tree]:
        safe = _safe_handles(function)
        for node in ast.walk(function):
            if not isinstance(node, ast.Call):
                continue
            func = _name(node.func)
            last = func.rpartition(".")[2]
            if func == "open":
                modes = [*node.args[1:2], *(k.value for k in node.keywords if k.arg == "mode")]
                if any(not isinstance(m, ast.Constant) or set(str(m.value)) & set("wax+") for m in modes):
                    found.append(_name(node))
            elif func == "os.open" and any(flag in _name(node) for flag in ("O_WRONLY", "O_RDWR", "O_CREAT")):
                found.append(_name(node))
            elif last in ("write_text", "write_bytes") and isinstance(node.func, ast.Attribute):
                found.append(_name(node))
            elif func in SERIALISERS or (last in SERIALISERS and isinstance(node.func, ast.Attribute)):
                index = SERIALISERS.get(func, SERIALISERS[last])
                target = node.args[index] if len(node.args) > index else None
                if not (isinstance(target, ast.Name) and target.id in safe):
                    found.append(_name(node))
    return sorted(set(found))


MODULES = sorted(path for path in PACKAGE.rglob("*.py") if path != WRITERS)


@pytest.mark.parametrize("path", MODULES, ids=lambda path: str(path.relative_to(PACKAGE)))
def test_every_file_is_written_through_files_py(path: Path) -> None:
    relative = path.relative_to(PACKAGE).as_posix()
    calls = writes_outside_files(ast.parse(path.read_text(), str(path)))
    unexplained = [call for call in calls if (relative, call) not in ALLOWED]
    assert not unexplained, f"{relative} writes files without torchcvt.files: {unexplained}"


@pytest.mark.parametrize("source", [
    "def f(p):\n    open(p, 'w').write('x')",
    "def f(p):\n    open(p, mode='ab')",
    "def f(p):\n    p.write_text('x')",
    "def f(p):\n    torch.save({}, p)",
    "def f(p, a):\n    np.save(p, a)",
    "def f(p, fig):\n    fig.savefig(p, dpi=100)",
    "def f(p, image):\n    image.save(p)",
    "def f(p, d):\n    json.dump(d, open(p))",
    "def f(p):\n    os.open(p, os.O_WRONLY | os.O_CREAT)",
])
def test_the_check_finds_a_direct_write(source: str) -> None:
    assert writes_outside_files(ast.parse(source)), source


def test_the_check_accepts_handles_from_files_py_and_memory() -> None:
    source = ("def f(p, fig, a):\n    with replace_file(p) as handle:\n        torch.save({}, handle)\n"
              "    buffer = io.BytesIO()\n    np.save(buffer, a)\n    open(p, 'rb').read()")
    assert writes_outside_files(ast.parse(source)) == []
