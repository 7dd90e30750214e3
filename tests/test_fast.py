"""Every fast path of torchcvt.layers gives the plain path's outputs and gradients."""

import copy

import pytest
import torch
from trainkit import PlainOps

import torchcvt
from torchcvt import fused, layers, weightcache
from torchcvt.layers import Attention, ConvProjection

VARIANTS = {
    "dw_bn": {},
    "avg_linear_gelu_cls_everywhere": {"qkv_projection_method": ["avg", "linear", "dw_bn"],
                                       "cls_token": [True, False, True], "activation": "gelu"},
}


def _model(tiny_overrides: dict, **overrides) -> torchcvt.CvT:
    model = torchcvt.create_model("cvt_13", num_classes=10, **{**tiny_overrides, **overrides})
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():  # non-trivial BatchNorm statistics and biases, so that they matter
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
            module.weight.data.normal_(generator=generator)
            module.bias.data.normal_(generator=generator)
        if isinstance(module, torch.nn.Linear) and module.bias is not None:  # zero at init: would hide a bias
            module.bias.data.normal_(0.0, 0.2, generator=generator)
    return model


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(a: dict, b: dict, tolerance: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    scale = max(g.abs().max().item() for g in a.values())
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=tolerance * scale, msg=name)


@pytest.mark.parametrize("fused_linear", [True, False])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", [(1, 3, 64, 64), (2, 3, 56, 80)])
def test_fast_inference_equals_plain(tiny_overrides, fused_state, variant, shape, fused_linear):
    """Both inference paths: oneDNN's fused linear, and plain products with the MLP in row blocks."""
    torchcvt.set_fused_linear(fused_linear)
    model = _model(tiny_overrides, **VARIANTS[variant]).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        fast = model(x)
        with PlainOps():
            plain = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast_bf16 = model(x)
            with PlainOps():
                plain_bf16 = model(x)
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-4)
    assert fast_bf16.dtype == plain_bf16.dtype
    torch.testing.assert_close(fast_bf16.float(), plain_bf16.float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("with_residual", [True, False])
def test_mlp_in_row_blocks_equals_the_whole_mlp(monkeypatch, fused_state, activation, with_residual):
    torchcvt.set_fused_linear(False)
    monkeypatch.setattr(layers, "_BLOCK_BYTES", 64 * 40 * 4)  # 64 rows a block: 194 rows make 4 blocks
    torch.manual_seed(0)
    mlp = layers.Mlp(12, 40, activation, drop=0.0).eval()
    x, residual = torch.randn(2, 97, 12), torch.randn(2, 97, 12) if with_residual else None
    with torch.no_grad():
        with PlainOps():
            whole = mlp(x, residual)
        assert layers._rows_per_block(194, 40 * 4) == 49  # 4 blocks of 49 rows or fewer
        blocks = mlp(x, residual)
    want = mlp.fc2(mlp.act(mlp.fc1(x))) + (0 if residual is None else residual)
    torch.testing.assert_close(whole, want.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(blocks, whole, rtol=0, atol=1e-5)
    assert blocks.shape == (2, 97, 12) and blocks.is_contiguous()


def _copied_maps(model: torch.nn.Module, x: torch.Tensor) -> list[list[int]]:
    """Shapes of the 4-D tensors (maps and convolution weights) copied in one inference call."""
    with torch.no_grad(), torch.profiler.profile(record_shapes=True) as prof:
        model(x)
    return sorted(shapes[0] for e in prof.key_averages(group_by_input_shape=True)
                  for shapes in [e.input_shapes] * e.count
                  if e.key == "aten::copy_" and len(shapes[0]) == 4 and shapes[0] == shapes[1])


def test_convolutions_take_the_token_layout_as_it_is(tiny_overrides, monkeypatch):
    """The image is made channels-last once; after that every convolution reads the token map as it is,
    except behind a class token (batch > 1): one copy per block for three convs. The embedding weights
    are made channels-last on each call, or once with the weight cache on."""
    model = _model(tiny_overrides).eval()
    cls_blocks = model.config.depth[-1]
    weights = sorted(list(s.patch_embed.proj.weight.shape) for s in model.stages)
    assert _copied_maps(model, torch.randn(1, 3, 64, 64)) == sorted([[1, 3, 64, 64], *weights])
    monkeypatch.setattr(weightcache, "_enabled", True)
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))  # makes the channels-last embedding weights, once
    assert _copied_maps(model, torch.randn(1, 3, 64, 64)) == [[1, 3, 64, 64]]
    dim = model.config.embed_dim[-1]
    assert _copied_maps(model, torch.randn(2, 3, 64, 64)) == [[2, 3, 64, 64]] + [[2, dim, 4, 4]] * cls_blocks
    channels_last = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    assert _copied_maps(model, channels_last) == [[2, dim, 4, 4]] * cls_blocks


def test_pure_bfloat16_model_runs_without_autocast(tiny_overrides):
    """model.to(torch.bfloat16): every op in bf16 (LayerNorm computed in float32), close to float32."""
    model = _model(tiny_overrides).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
        model.to(torch.bfloat16)
        got = model(x.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05 * want.abs().max().item())


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("case", ["fp32", "fc2_frozen", "bf16_autocast"])
def test_fast_training_path_equals_plain(tiny_overrides, variant, mode, case):
    """Recomputed MLP activation (train and eval), folded BatchNorm (eval): same outputs and gradients,
    also with the MLPs' fc2 weights frozen (fine-tuning part of a block) and under bf16 autocast."""
    model = getattr(_model(tiny_overrides, **VARIANTS[variant]), mode)()
    if case == "fc2_frozen":
        for block in model.modules():
            if isinstance(block, layers.Mlp):
                block.fc2.weight.requires_grad_(False)
    plain = copy.deepcopy(model)
    x = torch.randn(2, 3, 48, 64)
    # backward outside autocast, as torch.amp asks: a backward that relied on autocast's casts would fail
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "bf16_autocast"):
        torch.manual_seed(1)
        loss = model(x).float().square().sum()
        torch.manual_seed(1)
        with PlainOps():
            plain_loss = plain(x).float().square().sum()
    loss.backward()
    with PlainOps():
        plain_loss.backward()
    grads, plain_grads = _grads(model), _grads(plain)
    assert all(grads[name].dtype == p.dtype for name, p in model.named_parameters() if name in grads)
    _assert_grads_close(grads, plain_grads, 2e-2 if case == "bf16_autocast" else 1e-5)
    for a, b in zip(model.state_dict().values(), plain.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # BatchNorm running statistics too


def test_folded_batchnorm_is_conv_then_bn_with_gradients():
    projection = ConvProjection(8, "dw_bn", kernel_size=3, padding=1, stride=2)
    projection.bn.running_mean.normal_()
    projection.bn.running_var.uniform_(0.5, 2.0)
    projection.bn.weight.data.normal_()
    projection.eval()
    x = torch.randn(2, 8, 9, 7, requires_grad=True)
    folded = projection(x)
    folded.square().sum().backward()
    folded_grads = [x.grad.clone()] + [p.grad.clone() for p in projection.parameters()]
    x.grad = None
    projection.zero_grad()
    reference = projection.bn(projection.conv(x))
    reference.square().sum().backward()
    torch.testing.assert_close(folded, reference, rtol=0, atol=1e-5)
    for got, want in zip(folded_grads, [x.grad] + [p.grad for p in projection.parameters()], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_fast_paths_keep_state_dict_and_attention_maps(tiny_overrides):
    model = _model(tiny_overrides).eval()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        attention = model.stage2.blocks[0].attn
        attention.keep_attention = True
        kept = model(x)
    assert list(model.state_dict()) == list(before)
    assert "stage0.blocks.0.attn.conv_proj_k.bn.running_var" in before
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    torch.testing.assert_close(kept, out, rtol=0, atol=1e-5)
    assert attention.last_attention.shape == (1, 3, 1 + 4 * 4, 1 + 2 * 2)
    assert attention.last_kv_grid == (2, 2)
    assert not any(isinstance(m, Attention) and m.last_attention is not None and m is not attention
                   for m in model.modules())


def test_grad_checkpointing_gives_same_grads_and_statistics(tiny_overrides):
    model = _model(tiny_overrides, drop_path_rate=[0.1, 0.1, 0.1]).train()
    checkpointed = copy.deepcopy(model)
    checkpointed.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 64, 48)
    for m in (model, checkpointed):
        torch.manual_seed(3)
        m(x).square().sum().backward()
    _assert_grads_close(_grads(model), _grads(checkpointed))
    for (name, a), b in zip(model.state_dict().items(), checkpointed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)  # BN stats updated once, not twice


def _fused_calls(fn) -> int:
    """How many times fn runs oneDNN's fused linear kernel, counted by the profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key.startswith("mkldnn::_linear_pointwise"))


@pytest.fixture
def fused_state(monkeypatch):
    """The switch and the first-use check results as they were before the test, restored after it."""
    monkeypatch.setattr(fused, "_setting", fused._setting)
    monkeypatch.setattr(fused, "_working", dict(fused._working))
    return fused


@pytest.mark.skipif(not fused._AVAILABLE, reason="no oneDNN")
def test_switch_turns_the_fused_kernel_off_and_on(tiny_overrides, fused_state):
    model = _model(tiny_overrides).eval()
    x = torch.randn(2, 3, 64, 64)
    outputs = {}

    @torch.no_grad()
    def run(enable: bool) -> None:
        torchcvt.set_fused_linear(enable)
        outputs[enable] = model(x)

    assert _fused_calls(lambda: run(True)) > 0
    assert _fused_calls(lambda: run(False)) == 0
    assert not torchcvt.fused_linear_enabled()
    torch.testing.assert_close(outputs[True], outputs[False], rtol=0, atol=1e-4)


@pytest.mark.parametrize(("value", "enabled"), [("0", False), ("off", False), ("1", True), (" True ", True),
                                              ("auto", None), ("", None)])
def test_environment_variable_sets_the_switch(monkeypatch, fused_state, value, enabled):
    monkeypatch.setenv("TORCHCVT_FUSED", value)
    monkeypatch.setattr(fused, "_setting", None)
    for dtype in (torch.float32, torch.bfloat16):
        expected = dtype in fused.preferred_dtypes() if enabled is None else enabled
        assert fused.fused_linear_enabled(dtype) is expected
    with torch.no_grad():
        expected = torch.float32 in fused.preferred_dtypes() if enabled is None else enabled
        assert (fused.fused_dtype(torch.zeros(2, 3)) is not None) is (expected and fused._AVAILABLE)


def test_bad_environment_variable_is_a_one_line_error(monkeypatch, fused_state):
    monkeypatch.setenv("TORCHCVT_FUSED", "maybe")
    monkeypatch.setattr(fused, "_setting", None)
    message = r"^TORCHCVT_FUSED must be 0, 1 or auto \(or true/false, on/off\), got 'maybe'$"
    with pytest.raises(ValueError, match=message):
        fused.fused_linear_enabled()


@pytest.mark.parametrize(("capability", "native_bf16", "expected"), [
    ("AVX2", False, ()), ("AVX2", True, (torch.bfloat16,)), ("AVX512", False, (torch.float32,)),
    ("AVX512", True, (torch.float32, torch.bfloat16)), ("DEFAULT", False, ()),
])
def test_per_cpu_choice_of_the_fused_kernel(monkeypatch, fused_state, capability, native_bf16, expected):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native_bf16)
    assert fused.preferred_dtypes.__wrapped__() == expected
    monkeypatch.setattr(fused, "preferred_dtypes", lambda: expected)
    torchcvt.set_fused_linear(None)
    assert [fused.fused_linear_enabled(d) for d in (torch.float32, torch.bfloat16)] == [
        torch.float32 in expected, torch.bfloat16 in expected]
    torchcvt.set_fused_linear(True)
    assert fused.fused_linear_enabled(torch.float32) and fused.fused_linear_enabled(torch.bfloat16)


@pytest.mark.skipif(not fused._AVAILABLE, reason="no oneDNN")
def test_kernel_failure_falls_back_to_plain_ops_with_one_warning(tiny_overrides, fused_state, caplog):
    model = _model(tiny_overrides).eval()
    x = torch.randn(1, 3, 64, 64)
    torchcvt.set_fused_linear(True)
    with torch.no_grad():
        expected = model(x)
        assert fused.fused_dtype(x) == torch.float32
        # A weight of the wrong width makes the real kernel raise: the error is caught and fp32 turned off.
        assert fused.linear(torch.randn(2, 8), torch.randn(4, 5), None, torch.float32) is None
        assert fused.fused_dtype(x) is None
        assert _fused_calls(lambda: torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-4)) == 0
    warnings = [r.getMessage() for r in caplog.records if r.name == "torchcvt.fused"]
    assert len(warnings) == 1 and "oneDNN fused linear failed in torch.float32" in warnings[0]


def test_bf16_autocast_gives_plain_results_whether_or_not_the_cpu_runs_fused_bf16(tiny_overrides):
    """On CPUs whose oneDNN has no bfloat16 inner product (no AVX-512) the first-use check falls back."""
    model = _model(tiny_overrides).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        works = fused.fused_dtype(x) == torch.bfloat16  # runs the first-use check, if not yet run
        calls = _fused_calls(lambda: model(x))
        fast = model(x)
        with PlainOps():
            plain = model(x)
    assert (calls > 0) is works
    torch.testing.assert_close(fast.float(), plain.float(), rtol=0.05, atol=0.05)


def test_grad_checkpointing_updates_syncbatchnorm_statistics_once(tiny_overrides):
    # Without a process group SyncBatchNorm normalises like BatchNorm2d; the statistics it keeps must
    # still be updated once per step, not again in checkpointing's recomputation.
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(_model(tiny_overrides)).train()
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    checkpointed = copy.deepcopy(model)
    checkpointed.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 48, 48)
    for m in (model, checkpointed):
        m(x).square().sum().backward()
    counts = {name: int(b) for name, b in checkpointed.named_buffers() if name.endswith("batches_tracked")}
    assert counts and set(counts.values()) == {1}
    for (name, a), b in zip(model.state_dict().items(), checkpointed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
