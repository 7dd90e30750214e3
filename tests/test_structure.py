"""The shape the developers' guide asks of the package: no import cycle (module and class sizes are checked
by the lint step, tools/check_sizes.py, run by `make lint`)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import torchcvt

PACKAGE = Path(torchcvt.__file__).parent


def _module_name(path: Path) -> str:
    parts = ("torchcvt", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path) -> set[str]:
    """torchcvt modules that `name` imports anywhere in its body, inside functions included."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from . import fused` imports the module torchcvt.fused; `from .x import f` imports torchcvt.x.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                       for alias in node.names]
        else:
            continue
        found.update(target for target in targets if target in MODULES and target != name)
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for neighbour in sorted(graph[node]):
            if state.get(neighbour) == 1:
                return stack[stack.index(neighbour):] + [neighbour]
            if neighbour not in state and (found := visit(neighbour)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_counting_imports_inside_functions():
    graph = {name: _imports(name, path) for name, path in MODULES.items()}
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_import_reader_sees_every_kind_of_import(tmp_path, monkeypatch):
    """Relative, absolute, `from . import module` and imports inside functions all count as edges."""
    files = {
        "torchcvt/engine/__init__.py": "",
        "torchcvt/engine/a.py": "from . import b\nfrom ..c import f\n",
        "torchcvt/engine/b.py": "def g():\n    from torchcvt import d\n    import torchcvt.c\n",
        "torchcvt/c.py": "import os\n",
        "torchcvt/d.py": "",
    }
    modules = {}
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
        modules[name.removesuffix(".py").removesuffix("/__init__").replace("/", ".")] = tmp_path / name
    monkeypatch.setitem(globals(), "MODULES", modules)
    assert _imports("torchcvt.engine.a", modules["torchcvt.engine.a"]) == {"torchcvt.engine.b", "torchcvt.c"}
    assert _imports("torchcvt.engine.b", modules["torchcvt.engine.b"]) == {"torchcvt.d", "torchcvt.c"}
    assert _imports("torchcvt.c", modules["torchcvt.c"]) == set()


def test_the_size_check_of_the_lint_step_names_an_oversized_module_and_class(tmp_path):
    tool = Path(__file__).resolve().parents[1] / "tools" / "check_sizes.py"
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "small.py").write_text("x = 1\n")
    assert subprocess.run([sys.executable, str(tool), str(package)]).returncode == 0
    (package / "big.py").write_text("class Big:\n" + "    x = 1\n" * 200 + "\n" * 300)
    run = subprocess.run([sys.executable, str(tool), str(package)], capture_output=True, text=True)
    assert run.returncode == 1
    assert run.stderr.splitlines() == ["pkg/big.py: 501 lines (at most 500)",
                                       "pkg/big.py: class Big has 201 lines (at most 200)"]
