"""Every fast path of torchcvt.layers gives the plain path's outputs and gradients; the bench runs."""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import torchcvt
from torchcvt.bench import Case, format_markdown, run_benchmark
from torchcvt.cli import main
from torchcvt.layers import Attention, ConvProjection

VARIANTS = {
    "dw_bn": {},
    "avg_linear_gelu_cls_everywhere": {"qkv_projection_method": ["avg", "linear", "dw_bn"],
                                       "cls_token": [True, False, True], "activation": "gelu"},
}


class PlainOps(TorchDispatchMode):
    """Passes every op through unchanged; its presence makes torchcvt.layers take the plain path."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _model(tiny_overrides: dict, **overrides) -> torchcvt.CvT:
    model = torchcvt.create_model("cvt_13", num_classes=10, **{**tiny_overrides, **overrides})
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():  # non-trivial BatchNorm statistics, so that folding them matters
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
            module.weight.data.normal_(generator=generator)
            module.bias.data.normal_(generator=generator)
    return model


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    scale = max(g.abs().max().item() for g in a.values())
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", [(1, 3, 64, 64), (2, 3, 56, 80)])
def test_fused_inference_equals_plain(tiny_overrides, variant, shape):
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


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fast_training_path_equals_plain(tiny_overrides, variant, mode):
    """Recomputed MLP activation (train and eval), folded BatchNorm (eval): same outputs and gradients."""
    model = getattr(_model(tiny_overrides, **VARIANTS[variant]), mode)()
    plain = copy.deepcopy(model)
    x = torch.randn(2, 3, 48, 64)
    torch.manual_seed(1)
    model(x).square().sum().backward()
    torch.manual_seed(1)
    with PlainOps():
        plain(x).square().sum().backward()
    _assert_grads_close(_grads(model), _grads(plain))
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


def test_bench_quick_on_tiny_model(tmp_path):
    tiny = {"embed_dim": [16, 32, 48], "num_heads": [1, 2, 3], "depth": [1, 2, 3]}
    report = run_benchmark("cvt_13", cases=[Case("fp32", 1, 32), Case("bf16", 1, 32), Case("train", 2, 32)],
                           warmup=1, repeats=1, **tiny)
    assert report["max_logit_difference"] < 1e-4
    assert [r.case.mode for r in report["results"]] == ["fp32", "bf16", "train"]
    assert all(r.torchcvt_ips > 0 and r.hf_ips > 0 for r in report["results"])
    train = report["results"][-1]
    assert train.torchcvt_mem_mb is not None and train.hf_mem_mb > 0
    table = format_markdown(report)
    assert "| train step | 2 | 32 |" in table and "GFLOP/s" in table


def test_bench_cli_rejects_bad_repeats(capsys):
    assert main(["bench", "--quick", "--repeats", "0"]) == 2
    assert "torchcvt bench: error: --repeats must be at least 1, got 0" in capsys.readouterr().err


def test_class_token_stage_stays_in_the_autocast_dtype(tiny_overrides: dict) -> None:
    # A float32 class token would promote the last stage's residual stream to float32 under autocast,
    # and every fused bf16 kernel there would fall back to casts.
    model = torchcvt.create_model("cvt_13", **tiny_overrides).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = model.forward_features(torch.randn(2, 3, 64, 64))
    assert tokens.dtype == torch.bfloat16
