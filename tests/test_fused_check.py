"""The fused kernel's first-use check: a kernel that differs from F.linear, in its numbers or its dtype, is
refused with one warning naming the form; a correct one passes; the check leaves the global random state."""

from __future__ import annotations

import logging

import pytest
import torch

from torchcvt import fused

pytestmark = pytest.mark.skipif(not fused._AVAILABLE, reason="this PyTorch has no oneDNN fused linear")
FORMS = ("none", "gelu", "swish", "add")


def _broken(monkeypatch: pytest.MonkeyPatch, form: str, error: float, dtype: torch.dtype | None = None
            ) -> None:
    """The real kernel, with `error` added to the outputs of one form (or them cast to dtype)."""
    real = fused._call

    def call(x, weight, bias, activation, residual):
        out = real(x, weight, bias, activation, residual)
        if activation != form:
            return out
        return out + error if dtype is None else out.to(dtype)

    monkeypatch.setattr(fused, "_call", call)


def _dtypes() -> list[torch.dtype]:
    return [torch.float32, *([torch.bfloat16] if torch.ops.mkldnn._is_mkldnn_bf16_supported() else [])]


@pytest.mark.parametrize("dtype", _dtypes())
def test_the_real_kernel_passes_and_the_global_random_state_is_untouched(dtype):
    state = torch.get_rng_state()
    assert fused._check(dtype) is True
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("form", FORMS)
def test_a_kernel_off_by_more_than_the_tolerance_is_refused_with_one_warning(monkeypatch, caplog, form):
    _broken(monkeypatch, form, 1e-3)  # float32's tolerance is 1e-4
    with caplog.at_level(logging.WARNING, logger="torchcvt.fused"):
        assert fused._check(torch.float32) is False
    assert [record.getMessage() for record in caplog.records] == [
        f"oneDNN fused linear ({form}, torch.float32) differs from F.linear by 1.00e-03; using plain ops"]


def test_a_kernel_within_the_tolerance_passes(monkeypatch):
    _broken(monkeypatch, "gelu", 2e-5)
    assert fused._check(torch.float32) is True


@pytest.mark.skipif(torch.bfloat16 not in _dtypes(), reason="no native bf16 in oneDNN on this CPU")
def test_a_bf16_kernel_off_by_more_than_its_tolerance_is_refused(monkeypatch):
    _broken(monkeypatch, "none", 0.25)  # bf16's tolerance is 3e-2
    assert fused._check(torch.bfloat16) is False


def test_a_kernel_that_answers_in_another_dtype_is_refused(monkeypatch):
    _broken(monkeypatch, "swish", 0.0, dtype=torch.float64)
    assert fused._check(torch.float32) is False


def test_a_kernel_that_raises_is_refused_with_one_warning(monkeypatch, caplog):
    def refuse(*args):
        raise RuntimeError("could not create a primitive descriptor\nsecond line")

    monkeypatch.setattr(fused, "_call", refuse)
    monkeypatch.setattr(fused, "_working", {})
    with caplog.at_level(logging.WARNING, logger="torchcvt.fused"):
        assert fused._check(torch.float32) is False
    assert caplog.messages == ["oneDNN fused linear failed in torch.float32 (could not create a primitive "
                               "descriptor); using plain PyTorch ops"]
