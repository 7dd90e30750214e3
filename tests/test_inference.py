"""optimize_for_inference: the same function as the model, prepared once, a snapshot that leaves the model as
it was."""

import pytest
import torch
from trainkit import PlainOps, perturb_weights

import torchcvt
from torchcvt import fused
from torchcvt.inference import InferenceCvT, optimize_for_inference

VARIANTS = {
    "dw_bn": {},
    "avg_linear_cls_everywhere": {"qkv_projection_method": ["avg", "linear", "dw_bn"],
                                  "cls_token": [True, False, True]},
}


def _model(tiny_overrides: dict, activation: str, **overrides) -> torchcvt.CvT:
    model = torchcvt.create_model("cvt_13", num_classes=10, activation=activation,
                                  **{**tiny_overrides, **overrides})
    with torch.no_grad():
        perturb_weights(model)  # non-zero biases, BatchNorm affine and statistics away from identity
    return model.eval()


@pytest.mark.parametrize(("variant", "activation", "fused_linear"), [
    ("dw_bn", "quick_gelu", None), ("dw_bn", "gelu", None), ("avg_linear_cls_everywhere", "quick_gelu", None),
    ("avg_linear_cls_everywhere", "gelu", None),
    ("dw_bn", "quick_gelu", False),  # plain products, the MLP in row blocks: the folded SiLU there
])
def test_matches_the_model_in_float32_and_bfloat16(tiny_overrides, monkeypatch, variant, activation,
                                                   fused_linear):
    monkeypatch.setattr(fused, "_setting", fused._setting)
    torchcvt.set_fused_linear(fused_linear)  # None: the per-CPU choice
    model = _model(tiny_overrides, activation, **VARIANTS[variant])
    fast32, fast16 = optimize_for_inference(model), optimize_for_inference(model, torch.bfloat16)
    for x in (torch.randn(1, 3, 64, 64), torch.randn(2, 3, 56, 80)):
        with torch.no_grad():
            want = model(x)
            features = model.forward_head(model.forward_features(x), pre_logits=True)
        got32, got16 = fast32(x), fast16(x)
        assert got32.dtype == torch.float32 and got16.dtype == torch.bfloat16
        torch.testing.assert_close(got32, want, rtol=0, atol=1e-5)
        # The bf16 tolerance of tests/test_fast.py's pure bfloat16 model.
        torch.testing.assert_close(got16.float(), want, rtol=0.05, atol=0.05 * want.abs().max().item())
        embedded = fast32.forward_head(fast32.forward_features(x), pre_logits=True)
        torch.testing.assert_close(embedded, features, rtol=0, atol=1e-5)
        with torch.no_grad(), PlainOps():  # SiLU on the scaled weights, as traced, compiled or on a GPU
            torch.testing.assert_close(fast32(x), want, rtol=0, atol=1e-5)


def _snapshot(model: torch.nn.Module) -> dict:
    return {"state": {k: v.clone() for k, v in model.state_dict().items()},
            "dtypes": [p.dtype for p in model.parameters()],
            "requires_grad": [p.requires_grad for p in model.parameters()],
            "training": [m.training for m in model.modules()],
            "modules": [type(m) for m in model.modules()]}


def test_leaves_the_model_as_it_was(tiny_overrides):
    model = _model(tiny_overrides, "quick_gelu").train()
    before = _snapshot(model)
    optimize_for_inference(model, torch.bfloat16)
    after = _snapshot(model)
    assert before.keys() == after.keys()
    for key in ("dtypes", "requires_grad", "training", "modules"):
        assert before[key] == after[key], key
    for name, tensor in before["state"].items():
        assert torch.equal(tensor, after["state"][name]), name


def test_is_a_snapshot_that_later_edits_do_not_reach(tiny_overrides):
    model = _model(tiny_overrides, "quick_gelu")
    optimized = optimize_for_inference(model)
    x = torch.randn(2, 3, 64, 64)
    before = optimized(x)
    with torch.no_grad():
        model.stage0.blocks[0].mlp.fc1.weight.data.mul_(0.5)
        model.stage2.blocks[0].attn.conv_proj_k.bn.running_mean.add_(1.0)
        model.head.bias.add_(3.0)
        changed = model(x)
    assert (changed - before).abs().max() > 1e-2  # the edits move the model's logits
    torch.testing.assert_close(optimized(x), before, rtol=0, atol=0)


def test_does_no_per_call_weight_work(tiny_overrides):
    """No weight is cast, scaled, folded or copied in a call: every copy is of a batch-sized activation."""
    model = _model(tiny_overrides, "quick_gelu")
    for dtype in (torch.float32, torch.bfloat16):
        optimized = optimize_for_inference(model, dtype)
        x = torch.randn(2, 3, 64, 64, dtype=dtype)
        optimized(x)
        with torch.profiler.profile(record_shapes=True) as prof:
            optimized(x)
        events = prof.key_averages(group_by_input_shape=True)
        assert not [e.key for e in events if e.key in ("aten::_to_copy", "aten::rsqrt", "aten::mul")], dtype
        copied = [e.input_shapes[0] for e in events if e.key == "aten::copy_"]
        assert copied and all(shape[0] == 2 for shape in copied), copied


def test_runs_without_autograd_and_refuses_training(tiny_overrides):
    optimized = optimize_for_inference(_model(tiny_overrides, "gelu"))
    assert isinstance(optimized, InferenceCvT) and not optimized.training
    assert not any(p.requires_grad for p in optimized.parameters())
    assert not optimized(torch.randn(1, 3, 64, 64, requires_grad=True)).requires_grad
    with pytest.raises(torchcvt.errors.TorchcvtError, match="for inference only: train the original"):
        optimized.train()


def test_bad_arguments_are_one_line_errors(tiny_overrides):
    model = _model(tiny_overrides, "gelu")
    with pytest.raises(torchcvt.errors.TorchcvtError, match=r"dtype must be one of .*got torch.int8"):
        optimize_for_inference(model, torch.int8)
    with pytest.raises(torchcvt.errors.TorchcvtError, match="takes a torchcvt CvT, got a Linear"):
        optimize_for_inference(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(("queries", "keys", "heads"), [(784, 196, 1), (197, 50, 6), (5, 3, 2)])
def test_bf16_attention_in_query_blocks_is_the_attention_formula(monkeypatch, queries, keys, heads):
    """fused.blocked_attention against softmax(scale q k^T) v in float64, in blocks of query rows that leave
    a remainder (on any CPU: where bf16 is not native, oneDNN emulates it)."""
    monkeypatch.setattr(fused, "ATTENTION_BLOCK_BYTES", 2 * heads * keys * 2 * 7)  # 7 query rows a block
    q, k, v = (torch.randn(2, heads, n, 16) for n in (queries, keys, keys))
    scale = 0.3
    want = ((q.double() @ k.double().transpose(-2, -1)) * scale).softmax(dim=-1) @ v.double()
    got = fused.blocked_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), scale)
    assert got.dtype == torch.bfloat16 and got.shape == q.shape
    torch.testing.assert_close(got.double(), want, rtol=0, atol=3e-2)


def test_bf16_attention_runs_only_in_bf16_inference_on_the_onednn_path(monkeypatch):
    monkeypatch.setattr(fused, "_setting", fused._setting)
    q, k, v = (torch.randn(2, 3, n, 16) for n in (9, 4, 4))
    for enable in (True, False):
        torchcvt.set_fused_linear(enable)
        with torch.no_grad():
            assert fused.attention(q, k, v, 0.3) is None  # float32
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert fused.attention(q, k, v, 0.3) is None  # float32 tensors are not its inputs
            got = fused.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.3)
            refused = fused.fused_dtype(q.bfloat16()) is None  # switched off, or oneDNN refuses bf16 here
        if refused:
            assert got is None
        else:
            want = fused.blocked_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.3)
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert fused.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.3) is None  # autograd on


def test_under_bf16_autocast_the_fused_linear_computes_in_bf16(monkeypatch):
    """autocast's dtype, not the float32 input's, chooses the kernel: the output is bf16, as F.linear's."""
    monkeypatch.setattr(fused, "_setting", fused._setting)
    torchcvt.set_fused_linear(True)
    layer = torch.nn.Linear(24, 8)
    x = torch.randn(3, 24)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        if fused.fused_dtype(x) is None:
            pytest.skip("oneDNN refuses bf16 on this CPU")
        got, want = torchcvt.layers.linear(layer, x), torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=0.02, atol=0.02)


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_under_bf16_autocast_the_fused_mlp_computes_in_bf16_without_falling_back(monkeypatch, caplog,
                                                                                 activation):
    monkeypatch.setattr(fused, "_setting", fused._setting)
    monkeypatch.setattr(fused, "_working", {})
    torchcvt.set_fused_linear(True)
    mlp = torchcvt.layers.Mlp(16, 64, activation, 0.0).eval()
    with torch.no_grad():
        mlp.fc1.bias.normal_()
        mlp.fc2.bias.normal_()
    x = torch.randn(2, 5, 16)
    act = torchcvt.layers.make_activation(activation)
    want = mlp.fc2(act(mlp.fc1(x)))  # float32, outside autocast
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        if fused.fused_dtype(x) is None:
            pytest.skip("oneDNN refuses bf16 on this CPU")
        got = mlp(x)
    assert got.dtype == torch.bfloat16
    assert fused._working == {torch.bfloat16: True} and "fused linear failed" not in caplog.text
    torch.testing.assert_close(got.float(), want.detach(), rtol=0.05, atol=0.05)
