"""The shape the developers' guide asks of the package: no import cycle (module and class sizes are checked
by the lint step, tools/check_sizes.py, run by `make lint`)."""

from __future__ import annotations

import ast
import re
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


def test_errors_are_at_the_bottom_of_the_house():
    """Every layer raises TorchcvtError, so errors.py itself depends on nothing of torchcvt."""
    assert _imports("torchcvt.errors", MODULES["torchcvt.errors"]) == set()


def _library_notices(tree: ast.AST) -> list[str]:
    """print calls, warnings.warn calls other than deprecations, and hand-written "warning:" prefixes."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            category = ast.unparse(node.args[1]) if len(node.args) > 1 else next(
                (ast.unparse(k.value) for k in node.keywords if k.arg == "category"), "UserWarning")
            if name == "print" or (name == "warnings.warn" and "Deprecation" not in category):
                found.append(f"line {node.lineno}: {name}")
        elif isinstance(node, ast.Constant) and re.search(r"(^|: )warning: ", str(node.value), re.IGNORECASE):
            found.append(f"line {node.lineno}: {node.value[:40]!r}")
    return found


def test_library_notices_go_through_logging():
    """The command shows log records (INFO on stdout, WARNING on stderr); library code never prints."""
    found = {name: _library_notices(ast.parse(path.read_text())) for name, path in MODULES.items()
             if not name.startswith("torchcvt.cli")}
    assert {name: notices for name, notices in found.items() if notices} == {}


def test_the_notice_finder_finds_prints_and_warnings():
    code = 'print(1)\nwarnings.warn("x")\nwarnings.warn("y", DeprecationWarning)\nlog("warning: z")\n'
    code += '"""Said in a warning: not a prefix."""\n'
    expected = ["line 1: print", "line 2: warnings.warn", "line 4: 'warning: z'"]
    assert _library_notices(ast.parse(code)) == expected


def test_one_class_name_for_one_concept():
    """No two classes of the package share a name (three were called Progress, each a different thing)."""
    homes: dict[str, list[str]] = {}
    for name, path in MODULES.items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef):
                homes.setdefault(node.name, []).append(name)
    assert {cls: where for cls, where in homes.items() if len(where) > 1} == {}
