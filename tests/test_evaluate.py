"""engine.evaluate against fixed logits: top-1, top-5, loss (F.cross_entropy) and confusion cells by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from torchcvt.data import BadImage
from torchcvt.engine.evaluate import evaluate

# Six classes, five images. Ranks of the target: 1, 5, 6, 1, 2.
LOGITS = torch.tensor([
    [0.0, 1.0, 5.0, 2.0, 3.0, 4.0],  # target 2: top-1
    [6.0, 5.0, 4.0, 3.0, 2.0, 1.0],  # target 4: 5th, predicted 0
    [6.0, 5.0, 4.0, 3.0, 2.0, 1.0],  # target 5: 6th, outside the top 5, predicted 0
    [1.0, 9.0, 0.0, 0.2, 0.1, 0.3],  # target 1: top-1
    [0.0, 0.1, 0.2, 7.0, 0.3, 0.5],  # target 5: 2nd, predicted 3
])
TARGETS = torch.tensor([2, 4, 5, 1, 5])


class FixedLogits(torch.nn.Module):
    """Returns row i of `logits` for an image whose pixels hold i."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits[images.flatten(1)[:, 0].long()]


def _loader(rows: list[list[int]], bad: list[list[BadImage]] | None = None) -> list:
    bad = bad or [[] for _ in rows]
    return [(None, None, b) if not r else
            (torch.tensor(r, dtype=torch.float32)[:, None, None, None].expand(-1, 3, 2, 2), TARGETS[r], b)
            for r, b in zip(rows, bad, strict=True)]


@pytest.mark.parametrize("batches", [[[0, 1, 2, 3, 4]], [[0, 1, 2], [3, 4]], [[4], [0, 3], [1, 2]]])
def test_top1_top5_loss_and_confusion_of_fixed_logits(batches):
    result = evaluate(FixedLogits(LOGITS), _loader(batches), torch.device("cpu"), 6, confusion=True)
    assert result["top1"] == pytest.approx(2 / 5)
    assert result["top5"] == pytest.approx(4 / 5)
    assert result["loss"] == pytest.approx(F.cross_entropy(LOGITS, TARGETS).item(), rel=1e-6)
    assert result["images"] == 5 and result["unreadable"] == 0 and result["unreadable_images"] == []
    expected = torch.zeros(6, 6, dtype=torch.int64)
    for target, predicted in [(2, 2), (4, 0), (5, 0), (1, 1), (5, 3)]:  # rows: targets, columns: predictions
        expected[target, predicted] += 1
    assert torch.equal(result["confusion"], expected)


def test_no_confusion_unless_asked():
    assert "confusion" not in evaluate(FixedLogits(LOGITS), _loader([[0, 1]]), torch.device("cpu"), 6)


def test_top5_of_fewer_than_five_classes_counts_every_image():
    logits = torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0], [0.0, 0.0, 1.0]])
    targets = torch.tensor([2, 1, 0])
    loader = [(torch.arange(3.0)[:, None], targets, [])]
    result = evaluate(FixedLogits(logits), loader, torch.device("cpu"), 3)
    assert result["top1"] == 0 and result["top5"] == 1.0
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-6)


def test_unreadable_images_are_counted_and_never_scored():
    bad = [BadImage("a.png", "truncated"), BadImage("b.png", "truncated")]
    loader = _loader([[0, 1], [], [3]], [[bad[0]], [bad[1]], []])
    result = evaluate(FixedLogits(LOGITS), loader, torch.device("cpu"), 6)
    assert result["images"] == 3 and result["unreadable"] == 2
    assert result["unreadable_images"] == ["a.png", "b.png"]
    assert result["top1"] == pytest.approx(2 / 3) and result["top5"] == pytest.approx(1.0)
    rows = torch.tensor([0, 1, 3])
    assert result["loss"] == pytest.approx(F.cross_entropy(LOGITS[rows], TARGETS[rows]).item(), rel=1e-6)


def test_strict_stops_at_the_first_unreadable_image_naming_it():
    loader = _loader([[0], [1]], [[], [BadImage("b.png", "truncated")]])
    with pytest.raises(ValueError, match=r"unreadable image b.png \(truncated\); strict evaluation stops"):
        evaluate(FixedLogits(LOGITS), loader, torch.device("cpu"), 6, strict=True)


def test_nothing_readable_is_an_error():
    with pytest.raises(ValueError, match=r"no image could be read \(1 unreadable\)"):
        evaluate(FixedLogits(LOGITS), _loader([[]], [[BadImage("a.png", "x")]]), torch.device("cpu"), 6)


def test_low_precision_logits_are_scored_in_float32():
    """bf16 autocast: the figures come from the logits cast to float32, not rounded again."""
    logits = LOGITS.to(torch.bfloat16)
    result = evaluate(FixedLogits(logits), _loader([[0, 1, 2, 3, 4]]), torch.device("cpu"), 6,
                      amp_dtype=torch.bfloat16)
    assert result["loss"] == pytest.approx(F.cross_entropy(logits.float(), TARGETS).item(), rel=1e-6)
