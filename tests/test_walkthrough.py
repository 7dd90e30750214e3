"""docs/finetune.md, run as written: every ```bash block's commands in order, in a fresh folder, with the
documented `train.epochs=N` cut to 1. The commands run in this process (`torchcvt ...` through the CLI's
main, `python -c CODE` through exec), so the page costs no interpreter start-ups; a command of another form
fails the test, as does a failing command or an output the page shows that is not written."""

import os
import re
import shlex
import warnings
from pathlib import Path

import pytest

from torchcvt.cli import main

ROOT = Path(__file__).resolve().parents[1]
WALKTHROUGH = ROOT / "docs" / "finetune.md"


def bash_blocks(text: str) -> list[str]:
    """The ```bash blocks of a Markdown page, in order (```sh blocks, which need a network, are not run)."""
    return re.findall(r"^```bash\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)


def walkthrough_commands(epochs: int | None = None) -> list[list[str]]:
    """docs/finetune.md's bash blocks as argument lists, split as the shell splits them; `epochs` replaces
    every train.epochs=N."""
    commands = []
    for block in bash_blocks(WALKTHROUGH.read_text()):
        pending = ""
        for line in block.replace("\\\n", " ").splitlines():
            pending += line + "\n"
            try:
                argv = shlex.split(pending, comments=True)
            except ValueError:  # a quoted argument (python -c "...") continues on the next line
                continue
            if argv:
                commands.append(argv)
            pending = ""
        assert not pending.strip(), pending
    if epochs is not None:
        commands = [[re.sub(r"^train\.epochs=\d+$", f"train.epochs={epochs}", arg) for arg in argv]
                    for argv in commands]
    return commands


def test_the_page_runs_the_whole_path() -> None:
    script = "\n".join(" ".join(argv) for argv in walkthrough_commands())
    steps = ("write_digits(", "torchcvt train --data digits-0-4", "model.checkpoint=runs/digits-0-4/best.pth",
             "torchcvt eval", "torchcvt predict", "torchcvt attention", "--format onnx", "convert --to hf",
             "pipeline('image-classification'")
    for step in steps:
        assert step in script, step
    assert "--pretrained" not in script  # the download commands are ```sh blocks, shown but not run
    assert all(argv[0] == "torchcvt" or argv[:2] == ["python", "-c"] for argv in walkthrough_commands())
    assert "train.epochs=1 " in " ".join(" ".join(argv) for argv in walkthrough_commands(epochs=1))


@pytest.mark.slow
def test_walkthrough_runs_as_written(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # A 2-core machine, as torchcvt and PyTorch's DataLoader both count it (the walk-through's own figures
    # come from one): PyTorch warns about each loader with more workers than that.
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    out = err = ""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for argv in walkthrough_commands(epochs=1):
            if argv[0] == "torchcvt":
                assert main(argv[1:]) == 0, (argv, capsys.readouterr())
            else:
                exec(compile(argv[2], "docs/finetune.md", "exec"), {"__name__": "__main__"})
            captured = capsys.readouterr()
            out, err = out + captured.out, err + captured.err
    worker_warnings = [str(w.message) for w in caught if "worker" in str(w.message)]
    assert not worker_warnings and "worker" not in err, worker_warnings
    assert "recipe: from scratch (no --pretrained): cvt_digits, 1 epoch at batch 32" in out
    # The recipe line states the learning rate the run uses: the command's optim.lr=0.03.
    assert "recipe: fine-tune (weights given: runs/digits-0-4/best.pth): SGD lr 0.03, 1 epoch" in out
    # Step 3 again, as the page says: the run resolves the same config (the depth it took from the
    # checkpoint included) and says it is finished, without announcing a resume at an epoch past its last.
    step3 = next(argv for argv in walkthrough_commands(epochs=1) if "--data" in argv
                 and "model.checkpoint=runs/digits-0-4/best.pth" in argv)
    assert main(step3[1:]) == 0
    rerun = capsys.readouterr().out
    assert "is already finished" in rerun and not re.search(r"resuming from .* at epoch", rerun)
    # Five classes: top-5 is always 100%, so eval does not print it.
    assert re.search(r"top-1 \d+\.\d\d%  loss .*\(181 images, 5 classes\)", out) and "top-5" not in out
    assert "drawing stage 2" in out and "(stage 2 of 3," in out
    difference = re.search(r"ONNX top-1: [5-9] \| max logit difference from torch: (\S+)", out)
    assert difference and float(difference.group(1)) < 1e-3
    # The pipeline's answer, with the class names and torchcvt predict's probability for the same image.
    predicted = re.search(r"digits-5-9/val/7/0007.png +1 +(0\.\d+) +(\d) \(\d\)", out)
    label, score = re.search(r"\[\{'label': '(\d)', 'score': (\S+)\}", out).groups()
    assert predicted and label == predicted.group(2)
    assert float(score) == pytest.approx(float(predicted.group(1)), abs=2e-4)  # predict prints 4 decimals
    for written in ("runs/digits-5-9/best.pth", "runs/digits-5-9/curves.png", "runs/digits-5-9/eval_val.json",
                    "attention.png", "digits-5-9.onnx", "digits-5-9-hf/preprocessor_config.json",
                    "digits-5-9-hf/README.md"):
        assert (tmp_path / written).is_file(), written
