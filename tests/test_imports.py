"""`import torchcvt` changes no global state: no signal handler, during or after the import, nothing of the
command, no optional dependency; the command's entry point alone holds a Ctrl-C while torch loads."""

import ast
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import torchcvt
import torchcvt_launcher
from torchcvt.extras import EXTRAS

SRC = Path(__file__).resolve().parents[1] / "src"

# Run in a fresh interpreter: a program with handlers of its own imports torchcvt; an import hook looks at
# every handler at every import torchcvt makes (torch's, timm's included), then once more after.
_PROGRAM = """
import json, signal, sys

def handler(signum, frame):
    pass

signal.signal(signal.SIGINT, handler)
signal.signal(signal.SIGTERM, handler)
numbers = [s for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP)]

def handlers():
    found = {}
    for number in numbers:
        try:
            found[int(number)] = signal.getsignal(number)
        except (OSError, ValueError):
            pass
    return found

before, changed, imports = handlers(), [], []

def differences():
    now = handlers()
    return sorted(signal.Signals(n).name for n in before if now.get(n) is not before[n])

class Watch:
    def find_spec(self, name, path=None, target=None):
        imports.append(name)
        if differences():
            changed.append([name, differences()])
        return None

sys.meta_path.insert(0, Watch())
import torchcvt
sys.meta_path.pop(0)
print(json.dumps({"during": changed[:5], "after": differences(), "imports": len(imports),
                  "engine": type(getattr(torchcvt, "engine", None)).__name__,
                  "command": sorted(m for m in sys.modules if m.startswith("torchcvt.cli")),
                  "extras": sorted(p for p in EXTRAS if p in sys.modules)}))
"""


@pytest.fixture(scope="module")
def imported() -> dict:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    program = f"EXTRAS = {sorted(EXTRAS)!r}\n" + _PROGRAM
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=env,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_importing_torchcvt_changes_no_signal_handler_during_or_after(imported):
    assert imported["imports"] > 100  # the hook saw the import of torch, timm and torchcvt
    assert imported["during"] == [] and imported["after"] == [], imported


def test_importing_torchcvt_imports_no_command_and_no_optional_dependency(imported):
    assert imported["command"] == [] and imported["extras"] == [], imported


def test_the_engine_is_an_attribute_of_the_package(imported):
    """The README's API table lists torchcvt.engine; it is there after `import torchcvt` alone."""
    assert imported["engine"] == "module"
    assert torchcvt.engine.train is torchcvt.engine.loop.train and "engine" in torchcvt.__all__


def test_the_package_init_reads_no_argv_and_imports_no_command():
    tree = ast.parse(Path(torchcvt.__file__).read_text())
    names = {ast.unparse(node) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    modules = {("." * node.level) + (node.module or "") for node in ast.walk(tree)
               if isinstance(node, ast.ImportFrom)}
    modules |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert "sys.argv" not in names and "sys.orig_argv" not in names
    command = {m for m in modules if m in (".cli", "torchcvt.cli", "signal") or m.startswith(".cli.")}
    assert not command, modules


def test_the_entry_point_holds_a_ctrl_c_until_the_block_ends_and_restores_the_handler():
    def mine(signum, frame):
        raise AssertionError("the held interrupt reached the previous handler")

    previous = signal.signal(signal.SIGINT, mine)
    try:
        with pytest.raises(KeyboardInterrupt):
            with torchcvt_launcher.hold_interrupt():
                os.kill(os.getpid(), signal.SIGINT)
                finished = True  # the block runs to its end before the interrupt is raised
        assert finished and signal.getsignal(signal.SIGINT) is mine
    finally:
        signal.signal(signal.SIGINT, previous)


def test_the_entry_point_runs_the_command(capsys):
    assert torchcvt_launcher.main(["info", "cvt_nope"]) == 2
    assert capsys.readouterr().err.startswith("torchcvt info: error: unknown model 'cvt_nope'")
