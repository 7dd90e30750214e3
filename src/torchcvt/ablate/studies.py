"""The paper's four ablation studies (Tables 5-8) as data: rows lettered as in the paper, with its figures."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import TorchcvtError


@dataclass(frozen=True)
class Row:
    """One row of a study: the model-config fields it sets (one value per stage) and the paper's figures."""

    letter: str
    label: str
    knobs: dict[str, tuple[Any, ...]]
    paper_top1: float | None = None
    paper_params_m: float | None = None
    paper_gflops: float | None = None


@dataclass(frozen=True, eq=False)
class Study:
    """A table of the paper: rows in its order; `default` is the row that is the default CvT."""

    name: str
    table: int
    title: str
    rows: tuple[Row, ...]
    default: str

    def row(self, letter: str) -> Row:
        return next(row for row in self.rows if row.letter == letter)


_ALL, _NONE = (True, True, True), (False, False, False)
_CONV, _PATCH = ("conv", "conv", "conv"), ("patch", "patch", "patch")
_LINEAR = ("linear", "linear", "linear")

STUDIES: dict[str, Study] = {
    study.name: study
    for study in (
        Study("position-embedding", 5, "position embedding (rows c-f)", (
            Row("c", "every stage", {"position_embedding": _ALL}, 81.5, 20.0),
            Row("d", "first stage only", {"position_embedding": (True, False, False)}, 81.4, 20.0),
            Row("e", "last stage only", {"position_embedding": (False, False, True)}, 81.4, 20.0),
            Row("f", "none", {"position_embedding": _NONE}, 81.6, 20.0),
        ), default="f"),
        Study("token-embedding", 6, "convolutional token embedding", (
            Row("a", "patch embedding, no position embedding",
                {"token_embedding": _PATCH, "position_embedding": _NONE}, 80.7, 19.5),
            Row("b", "patch embedding, position embedding",
                {"token_embedding": _PATCH, "position_embedding": _ALL}, 81.1, 19.9),
            Row("c", "conv. embedding, position embedding",
                {"token_embedding": _CONV, "position_embedding": _ALL}, 81.4, 20.3),
            Row("d", "conv. embedding, no position embedding",
                {"token_embedding": _CONV, "position_embedding": _NONE}, 81.6, 20.0),
        ), default="d"),
        Study("kv-stride", 7, "key/value projection stride", (
            Row("a", "stride 1", {"stride_kv": (1, 1, 1)}, 82.3, 20.0, 6.55),
            Row("b", "stride 2", {"stride_kv": (2, 2, 2)}, 81.6, 20.0, 4.53),
        ), default="b"),
        Study("projection", 8, "convolutional vs position-wise linear projection", (
            Row("a", "linear in every stage", {"qkv_projection_method": _LINEAR}, 80.6),
            Row("b", "conv. in stage 1", {"qkv_projection_method": ("dw_bn", "linear", "linear")}, 80.8),
            Row("c", "conv. in stages 1-2", {"qkv_projection_method": ("dw_bn", "dw_bn", "linear")}, 81.0),
            Row("d", "conv. in every stage", {"qkv_projection_method": ("dw_bn", "dw_bn", "dw_bn")}, 81.6),
        ), default="d"),
    )
}


def select_studies(names: Sequence[str] | None) -> list[Study]:
    """The named studies in the paper's order (all four when none are named); a one-line error naming
    the closest study for an unknown name."""
    if not names:
        return list(STUDIES.values())
    for name in names:
        if name not in STUDIES:
            close = difflib.get_close_matches(name, list(STUDIES), n=1, cutoff=0.0)
            raise TorchcvtError(f"unknown study {name!r}; did you mean {close[0]!r}? "
                             f"(studies: {', '.join(STUDIES)})")
    return [study for study in STUDIES.values() if study.name in names]
