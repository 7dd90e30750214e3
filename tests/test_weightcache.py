"""Weights derived for inference (cast, QuickGELU-scaled, BatchNorm-folded) never go stale: by default they
are made on every call; with set_weight_cache(True) they are kept only while the parameters are unchanged."""

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn
from trainkit import perturb_weights

import torchcvt
from torchcvt import fused, weightcache

# The opt-in cache is deprecated (optimize_for_inference replaces it) but works for one more release.
pytestmark = pytest.mark.filterwarnings("ignore:torchcvt.*deprecated:DeprecationWarning")


def test_the_cache_switches_are_deprecated(monkeypatch):
    monkeypatch.setattr(weightcache, "_enabled", weightcache._enabled)
    for switch in (lambda: torchcvt.set_weight_cache(False), torchcvt.clear_weight_cache):
        with pytest.warns(DeprecationWarning, match="optimize_for_inference"):
            switch()


def _model(tiny_overrides: dict) -> torchcvt.CvT:
    model = torchcvt.create_model("cvt_13", num_classes=10, activation="quick_gelu", **tiny_overrides)
    with torch.no_grad():
        perturb_weights(model)  # every tensor moves the logits, BatchNorm statistics included
    return model.eval()


def _fresh(model: torchcvt.CvT) -> torchcvt.CvT:
    """A new model of the same config holding model's state dict: nothing derived from it yet."""
    other = torchcvt.create_model("cvt_13", **model.config.to_dict()).eval()
    other.load_state_dict(model.state_dict())
    return other.to(next(model.parameters()).dtype)


def _fc1(model: torchcvt.CvT) -> nn.Linear:
    return model.stage2.blocks[0].mlp.fc1


def _halve_through_data(model):
    _fc1(model).weight.data.mul_(0.5)
    model.stage1.patch_embed.proj.weight.data.mul_(0.5)


def _copy_into_data(model):
    _fc1(model).weight.data.copy_(torch.randn_like(_fc1(model).weight) * 0.05)


def _reassign_data(model):
    _fc1(model).weight.data = _fc1(model).weight.data * -1.0


def _in_place_no_grad(model):
    with torch.no_grad():
        _fc1(model).weight.mul_(0.5)


def _batchnorm_statistics(model):
    bn = model.stage2.blocks[0].attn.conv_proj_k.bn
    bn.running_var.mul_(4.0)
    bn.running_mean.add_(1.0)


def _load_state_dict(model):
    state = {k: v * 0.5 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.load_state_dict(state)


def _swap_module(model):
    old = _fc1(model)
    model.stage2.blocks[0].mlp.fc1 = nn.Linear(old.in_features, old.out_features)


def _replace_parameter(model):
    _fc1(model).weight = nn.Parameter(torch.randn_like(_fc1(model).weight) * 0.05)


def _dtype_round_trip(model):
    model.double()
    _fc1(model).weight.data.mul_(0.5)
    model.float()


def _to_bfloat16(model):
    model.bfloat16()


PATTERNS: dict[str, Callable[[torchcvt.CvT], None]] = {
    "data.mul_": _halve_through_data, "data.copy_": _copy_into_data, "data=": _reassign_data,
    "no_grad mul_": _in_place_no_grad, "batchnorm statistics": _batchnorm_statistics,
    "load_state_dict": _load_state_dict, "module swap": _swap_module, "new Parameter": _replace_parameter,
    "dtype round trip": _dtype_round_trip, "bfloat16": _to_bfloat16,
}
# What set_weight_cache(True) does not promise to see (its docstring asks for clear_weight_cache() after
# these): an edit through .data leaves no trace on the parameter, and a moved storage may reuse an address.
INVISIBLE_TO_THE_CACHE = ("data.mul_", "data.copy_", "data=", "dtype round trip", "bfloat16")


@pytest.fixture
def cache_state(monkeypatch):
    """The switches as they were before the test, restored after it."""
    monkeypatch.setattr(weightcache, "_enabled", weightcache._enabled)
    monkeypatch.setattr(fused, "_setting", fused._setting)
    monkeypatch.setattr(fused, "_working", dict(fused._working))
    yield
    weightcache.clear_weight_cache()


def _outputs(model: torchcvt.CvT, x: torch.Tensor) -> list[torch.Tensor]:
    """Logits in the model's dtype and under bfloat16 autocast: every path that derives weights."""
    with torch.no_grad():
        plain = model(x.to(next(model.parameters()).dtype))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    return [plain.float(), low.float()]


@pytest.mark.parametrize("fused_linear", [True, False])
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_no_change_to_the_weights_is_missed(tiny_overrides, cache_state, pattern, fused_linear):
    torchcvt.set_fused_linear(fused_linear)
    model = _model(tiny_overrides)
    x = torch.randn(2, 3, 64, 64)
    before = _outputs(model, x)  # anything derivable has been derived now
    PATTERNS[pattern](model)
    after, expected = _outputs(model, x), _outputs(_fresh(model), x)
    assert (after[0] - before[0]).abs().max() > 1e-3  # the change moves the logits
    for got, want in zip(after, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_opt_in_cache_follows_what_it_promises(tiny_overrides, cache_state, pattern):
    torchcvt.set_weight_cache(True)
    model = _model(tiny_overrides)
    x = torch.randn(2, 3, 64, 64)
    _outputs(model, x)
    if fused._working.get(torch.float32) and fused.fused_linear_enabled():
        assert weightcache.cached_for(_fc1(model).weight) > 0  # the scaled fc1 weight is kept
    assert weightcache.cached_for(model.stage2.blocks[0].attn.conv_proj_k.conv.weight) > 0
    PATTERNS[pattern](model)
    if pattern in INVISIBLE_TO_THE_CACHE:
        torchcvt.clear_weight_cache()  # as documented: .data edits with the cache on need this call
    for got, want in zip(_outputs(model, x), _outputs(_fresh(model), x), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_cache_is_off_by_default_and_keeps_nothing(tiny_overrides):
    assert not weightcache.weight_cache_enabled()
    model = _model(tiny_overrides)
    _outputs(model, torch.randn(1, 3, 64, 64))
    assert all(weightcache.cached_for(p) == 0 for p in model.parameters())


@pytest.mark.parametrize("fused_linear", [True, False])
def test_opt_in_cache_follows_training_and_loading(tiny_overrides, cache_state, fused_linear):
    """A training step and a load_state_dict change parameters and statistics in place; the next
    inference must use the new values and equal a fresh copy of the model."""
    torchcvt.set_fused_linear(fused_linear)
    torchcvt.set_weight_cache(True)
    model = _model(tiny_overrides)
    x = torch.randn(2, 3, 64, 64)

    def cached_and_fresh() -> tuple[torch.Tensor, torch.Tensor]:
        model.eval()
        fresh = copy.deepcopy(model)
        with torch.no_grad():
            return model(x), fresh(x)

    first, _ = cached_and_fresh()
    original = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    model(x).square().mean().backward()  # also updates the BatchNorm running statistics
    optimizer.step()
    cached, fresh = cached_and_fresh()
    torch.testing.assert_close(cached, fresh, rtol=0, atol=1e-5)
    assert (cached - first).abs().max() > 1e-3
    model.load_state_dict(original)
    cached, fresh = cached_and_fresh()
    torch.testing.assert_close(cached, fresh, rtol=0, atol=1e-5)
    torch.testing.assert_close(cached, first, rtol=0, atol=1e-5)


@pytest.mark.parametrize("cache", [False, True])
def test_model_made_in_inference_mode_runs(tiny_overrides, cache_state, cache):
    torchcvt.set_weight_cache(cache)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        model = _model(tiny_overrides)
        inside = model(x)
    with torch.no_grad():
        outside = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert inside.shape == outside.shape == low.shape == (2, 10)
    torch.testing.assert_close(inside, outside, rtol=0, atol=1e-6)
