"""Optional dependencies: an inference-only install imports none of them, and a missing one is one line
that names the extra installing it."""

import subprocess
import sys

import pytest
from PIL import Image

from torchcvt.cli import main
from torchcvt.extras import EXTRAS, MissingExtra, require


def _hide(monkeypatch, package: str) -> None:
    """Make `package` (and its submodules already imported) look uninstalled for this test."""
    for name in [m for m in sys.modules if m == package or m.startswith(package + ".")] + [package]:
        monkeypatch.setitem(sys.modules, name, None)


def test_importing_torchcvt_imports_no_optional_dependency():
    code = ("import sys, torchcvt, torchcvt.cli, torchcvt.engine; "
            f"print(sorted(p for p in {sorted(EXTRAS)!r} if p in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(("module", "extra"), [("matplotlib.figure", "plot"), ("sklearn.datasets", "train"),
                                              ("tensorboard", "train"), ("onnxscript", "export")])
def test_missing_dependency_names_its_extra(monkeypatch, module, extra):
    package = module.split(".")[0]
    _hide(monkeypatch, package)
    with pytest.raises(MissingExtra, match=rf"^plotting needs {package}, which is not installed: "
                                           rf"pip install 'torchcvt\[{extra}\]'$"):
        require(module, "plotting")


def test_missing_dependency_of_a_command_is_one_line(monkeypatch, tmp_path, capsys):
    image = tmp_path / "cat.png"
    Image.new("RGB", (40, 30), (200, 120, 40)).save(image)
    _hide(monkeypatch, "matplotlib")
    assert main(["attention", "--model", "cvt_digits", str(image), "-o", str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err
    assert err == ("torchcvt attention: error: rendering attention maps needs matplotlib, which is not "
                   "installed: pip install 'torchcvt[plot]'\n")
