"""docs/finetune.md, run as written: every ```bash block in order, in a fresh folder, with the documented
`train.epochs=N` cut to 1 so the whole walk-through stays under a minute. A command that fails, or an
output the page describes that is not written, fails the test: the page cannot rot."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WALKTHROUGH = ROOT / "docs" / "finetune.md"


def bash_blocks(text: str) -> list[str]:
    """The ```bash blocks of a Markdown page, in order (```sh blocks, which need a network, are not run)."""
    return re.findall(r"^```bash\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)


def walkthrough_script(epochs: int | None = None) -> str:
    """docs/finetune.md's bash blocks as one script that stops at the first failing command; `epochs`
    replaces every train.epochs=N."""
    script = "\n".join(bash_blocks(WALKTHROUGH.read_text()))
    if epochs is not None:
        script = re.sub(r"\btrain\.epochs=\d+", f"train.epochs={epochs}", script)
    return "set -euo pipefail\n" + script


def test_the_page_runs_the_whole_path() -> None:
    script = walkthrough_script()
    steps = ("write_digits(", "torchcvt train --data digits-0-4", "model.checkpoint=runs/digits-0-4/best.pth",
             "torchcvt eval", "torchcvt predict", "torchcvt attention", "--format onnx", "convert --to hf",
             "pipeline('image-classification'")
    for step in steps:
        assert step in script, step
    assert "--pretrained" not in script  # the download commands are ```sh blocks, shown but not run


@pytest.mark.slow
def test_walkthrough_runs_as_written(tmp_path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # `torchcvt` and `python` as a fresh clone's installed venv has them, importing this checkout.
    (bin_dir / "torchcvt").write_text(f'#!/bin/sh\nexec {sys.executable} -m torchcvt "$@"\n')
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT / "src"),
        "OMP_NUM_THREADS": "2",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf-home"),
    }
    done = subprocess.run(["bash", "-c", walkthrough_script(epochs=1)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "recipe: from scratch (no --pretrained): cvt_digits" in out
    assert "recipe: fine-tune (weights given: runs/digits-0-4/best.pth)" in out
    assert re.search(r"top-1 \d+\.\d\d%  top-5 \d+\.\d\d%  loss .*\(181 images, 5 classes\)", out)
    assert "drawing stage 2" in done.stderr and "(stage 2 of 3," in out
    assert re.search(r"ONNX top-1: [5-9] \| max logit difference from torch: (\S+)", out)
    assert float(re.search(r"from torch: (\S+)", out).group(1)) < 1e-3
    assert "'label': '" in out and "'score': " in out  # the pipeline's answer, with the class names
    for written in ("runs/digits-5-9/best.pth", "runs/digits-5-9/curves.png", "runs/digits-5-9/eval_val.json",
                    "attention.png", "digits-5-9.onnx", "digits-5-9-hf/preprocessor_config.json",
                    "digits-5-9-hf/README.md"):
        assert (work / written).is_file(), written
