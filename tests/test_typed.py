"""torchcvt.typed: one parser for every KEY=VALUE (training overrides, --set on every command) and the
dataclass checks behind the model and training configs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from torchcvt import create_model
from torchcvt.cli import main
from torchcvt.cli.common import model_overrides
from torchcvt.config import CvtConfig
from torchcvt.engine import load_config
from torchcvt.typed import check_fields, from_mapping, option, parse_assignment, set_path

TINY = {"embed_dim": [16, 32, 48], "num_heads": [1, 2, 3], "depth": [1, 1, 2]}


@pytest.fixture
def predict_args(tmp_path: Path) -> list[str]:
    """`torchcvt predict` of one image with tiny cvt_13 weights that do not record their config (as an
    official file): --set gives the shape, and layer_norm_eps is whatever --set says."""
    model = create_model("cvt_13", num_classes=3, **TINY)
    checkpoint = tmp_path / "tiny.pth"
    torch.save({"state_dict": model.state_dict(), "class_names": ["a", "b", "c"]}, checkpoint)
    image = tmp_path / "photo.png"
    Image.effect_noise((64, 48), 60).convert("RGB").save(image)
    sets = [f"--set={key}={json.dumps(value)}" for key, value in TINY.items()]
    return ["predict", "--model", "cvt_13", "--checkpoint", str(checkpoint), *sets, "--quiet",
            "--workers", "0", str(image)]


def _report(tmp_path: Path, args: list[str], *extra: str) -> list[dict[str, Any]]:
    report = tmp_path / "report.json"
    assert main([*args, *extra, "--json", str(report)]) == 0
    return json.loads(report.read_text())


def test_set_reads_exponents_as_train_does(tmp_path: Path, predict_args: list[str]) -> None:
    # Issue 18 item 2: --set read values with YAML 1.1, so 1e-6 was the string '1e-6' and predict stopped
    # with "layer_norm_eps must be a finite float > 0, got '1e-6'" while train read the same text as a float.
    assert _report(tmp_path, predict_args, "--set", "layer_norm_eps=1e-6")
    # The value takes effect: 1e2 and 100.0 are the same number, and another eps than the default's.
    spelled = [_report(tmp_path, predict_args, "--set", f"layer_norm_eps={eps}") for eps in ("1e2", "100.0")]
    assert spelled[0] == spelled[1] != _report(tmp_path, predict_args)
    assert model_overrides(["layer_norm_eps=1e-6"]) == load_config(
        None, ["model.overrides.layer_norm_eps=1e-6"]).model.overrides == {"layer_norm_eps": 1e-6}


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("layer_norm_epz=1e-6",
         "unknown config field 'layer_norm_epz' in --set; did you mean 'layer_norm_eps'?"),
        ("layer_norm_eps=abc", "layer_norm_eps must be a finite float > 0, got 'abc'"),
        ("depth=[1,", "the value of --set 'depth=[1,' is not valid YAML"),
        ("depth", "--set expects FIELD=VALUE (e.g. depth=[1,2,4]), got 'depth'"),
    ],
)
def test_bad_set_items_are_one_line_errors(
    item: str, message: str, predict_args: list[str], capsys: pytest.CaptureFixture
) -> None:
    assert main([*predict_args, "--set", item]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("torchcvt predict: error: ") and "\n" not in err and message in err, err


def test_model_config_fields_suggest_the_closest() -> None:
    with pytest.raises(ValueError, match=r"^unknown config field 'num_head'; did you mean 'num_heads'\?$"):
        CvtConfig.from_dict({"num_head": [1, 2, 3]})
    with pytest.raises(ValueError, match=r"^unknown config field 'zzz'$"):
        CvtConfig().replace(zzz=1)


@dataclass(frozen=True)
class _Inner:
    size: int = option(2, low=1)
    scale: tuple[float, float] = option((0.5, 1.0), low=0.0)
    table: dict[str, Any] = option({}, of="names to numbers")


@dataclass(frozen=True)
class _Outer:
    inner: _Inner = _Inner()
    name: str | None = None


def test_paths_sections_and_free_mappings() -> None:
    tree: dict[str, Any] = {}
    set_path(_Outer, tree, "inner.size", 3)
    set_path(_Outer, tree, "inner.table.a.b", 1)  # a key inside a mapping field: the rest is the entry
    set_path(_Outer, tree, "inner.table.c", 2)
    assert tree == {"inner": {"size": 3, "table": {"a.b": 1, "c": 2}}}
    with pytest.raises(ValueError, match="'inner' in the command line is a section, not a value; .*size="):
        set_path(_Outer, tree, "inner", 5)
    with pytest.raises(ValueError, match="unknown config key 'inner.sise' in x; did you mean 'inner.size'"):
        set_path(_Outer, tree, "inner.sise", 5, origin="x")
    with pytest.raises(ValueError, match="unknown config key 'name.first'"):
        set_path(_Outer, tree, "name.first", 5)
    built = from_mapping(_Outer, {"inner": {"scale": [0, 1]}})
    assert built == _Outer(_Inner(scale=[0, 1]))
    checked = check_fields(built.inner, "inner")
    assert checked.scale == (0.0, 1.0) and isinstance(checked.scale[0], float)
    with pytest.raises(ValueError, match="^inner.table must be a mapping of names to numbers, got 3$"):
        check_fields(_Inner(table=3), "inner")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="^size must be at least 1, got 0$"):
        check_fields(_Inner(size=0))


def test_parse_assignment_reads_yaml_1_2_numbers_and_empty_as_null() -> None:
    assert parse_assignment("a.b=5e3") == ("a.b", 5000.0)
    assert parse_assignment(" a = -1.5E-2 ") == ("a", -0.015)
    assert parse_assignment("a=1_000") == ("a", 1000)
    assert parse_assignment("a=") == ("a", None)
    assert parse_assignment("a=[1, 2e-1]") == ("a", [1, 0.2])
    assert parse_assignment("a=x=y") == ("a", "x=y")
    with pytest.raises(ValueError, match=r"^override expects KEY=VALUE \(e.g. train.epochs=10\), got '=3'$"):
        parse_assignment("=3")
