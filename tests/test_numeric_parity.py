"""Logits against independent references, with every weight, bias and BatchNorm statistic perturbed, for both
activations and both CPU inference kernels (oneDNN's fused linear forced on, and off).

References: tests/official_cvt.py (the official module tree, forward written from the formulas with plain
ops, QuickGELU as x * sigmoid(1.702 x)) and transformers' CvtForImageClassification (exact GELU only).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from official_cvt import OfficialCvT, Spec, perturbed, quick_gelu
from transformers import CvtConfig as HfCvtConfig
from transformers import CvtForImageClassification

import torchcvt
from torchcvt import fused
from torchcvt.weights import save_official

SPEC = Spec()
TINY = {"embed_dim": list(SPEC.embed_dim), "num_heads": list(SPEC.num_heads), "depth": list(SPEC.depth)}
ACTIVATIONS = ["quick_gelu", "gelu"]
# bf16 computes every product from inputs rounded to 8 bits: a tolerance for a tiny model's logits of about
# unit size, well below what a wrong bias or scale changes (tens of percent of a logit).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.1}


@pytest.fixture(params=[True, False], ids=["fused", "plain"])
def kernel(request, monkeypatch) -> bool:
    """oneDNN's fused linear forced on (or off) for the test, the switch restored after."""
    if request.param and not fused._AVAILABLE:
        pytest.skip("this PyTorch has no oneDNN fused linear")
    monkeypatch.setattr(fused, "_setting", fused._setting, raising=False)
    torchcvt.set_fused_linear(request.param)
    return request.param


def _fused_calls(fn) -> int:
    """How many times fn runs oneDNN's fused linear kernel, counted by the profiler."""
    with torch.profiler.profile() as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if "_linear_pointwise" in e.key)


def _run(model: torch.nn.Module, images: torch.Tensor, dtype: torch.dtype, kernel: bool) -> torch.Tensor:
    """model(images) in inference, under bf16 autocast for bfloat16; checks that the kernel asked for ran."""
    out = []

    def forward() -> None:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out.append(model(images).float())

    calls = _fused_calls(forward)
    if kernel and not calls:
        pytest.skip(f"oneDNN's fused linear does not run in {dtype} on this CPU (its first-use check failed)")
    assert kernel or calls == 0
    if kernel:  # and it never failed and handed over to plain ops (which would hide a wrong call)
        with torch.no_grad():
            assert fused.fused_dtype(torch.zeros(1, dtype=dtype)) == dtype
    return out[0]


def _assert_close(ours: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype) -> None:
    assert (reference[0] - reference[1]).abs().max() > 0.1, "degenerate logits would hide a wrong number"
    tolerance = TOLERANCE[dtype] * reference.abs().max().clamp(min=1).item()
    torch.testing.assert_close(ours, reference, rtol=0, atol=tolerance)


def _reference_and_model(tmp_path, spec: Spec = SPEC, activation: str = "quick_gelu",
                         **overrides) -> tuple[OfficialCvT, torchcvt.CvT]:
    """The reference with perturbed weights, and the model create_model makes from its official .pth."""
    reference = perturbed(OfficialCvT(spec, num_classes=7, activation=activation))
    torch.save(reference.state_dict(), tmp_path / "cvt.pth")
    model = torchcvt.create_model("cvt_13", checkpoint=tmp_path / "cvt.pth", num_classes=7,
                                  activation=activation, **TINY, **overrides)
    return reference, model


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 72, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_official_layout_file_gives_the_reference_logits(tmp_path, kernel, activation, dtype, images):
    """An official .pth of the reference's perturbed weights, loaded by create_model, gives its logits."""
    reference, model = _reference_and_model(tmp_path, activation=activation)
    _assert_close(_run(model.eval(), images, dtype, kernel), reference(images), dtype)


@pytest.mark.parametrize("methods", [("avg", "linear", "dw_bn"), ("linear", "avg", "avg")], ids="-".join)
def test_the_ablations_projections_give_the_reference_logits(tmp_path, kernel, methods, images):
    """The paper's projection ablation: 'avg' (keys and values pooled 3x3 in ceil mode, the query linear)
    and 'linear' (no convolution), with a class token in every stage, a stride-1 pooling in one and no
    q/k/v bias in another."""
    spec = Spec(method=methods, cls_token=(True, True, True), stride_kv=(2, 1, 2),
                qkv_bias=(True, False, True))
    reference, model = _reference_and_model(tmp_path, spec, qkv_projection_method=list(methods),
                                            cls_token=[True] * 3, stride_kv=[2, 1, 2],
                                            qkv_bias=[True, False, True])
    _assert_close(_run(model.eval(), images, torch.float32, kernel), reference(images), torch.float32)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_with_gradients_the_logits_gradients_and_statistics_are_the_references(
        tmp_path, activation, mode, images):
    """Autograd's path (a training step; evaluation with gradients on, as in a saliency map): the logits, the
    gradient of every parameter and of the images, and BatchNorm's running statistics after the step."""
    reference, model = _reference_and_model(tmp_path, activation=activation, drop_path_rate=[0.0] * 3)
    # Each logit weighed differently, so that a gradient with a wrong sign or scale on any of them shows.
    weights = torch.randn(2, 7, generator=torch.Generator().manual_seed(3))

    def step(net: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits and the images' gradient of one backward in mode."""
        inputs = images.clone().requires_grad_()
        logits = getattr(net, mode)()(inputs)
        (logits * weights).sum().backward()
        return logits.detach(), inputs.grad

    (logits, image_grad), (reference_logits, reference_image_grad) = step(model), step(reference)
    _assert_close(logits, reference_logits, torch.float32)
    torch.testing.assert_close(image_grad, reference_image_grad, rtol=1e-4, atol=1e-5)
    grads = {name: p.grad for name, p in model.named_parameters()}
    reference_grads = {name: p.grad for name, p in reference.named_parameters()}
    assert grads.keys() == reference_grads.keys()
    # The last block's grid queries reach nothing the head reads: only the class token's query counts.
    unused = "stage2.blocks.1.attn.conv_proj_q."
    for name, grad in reference_grads.items():
        assert name.startswith(unused) or grad.abs().max() > 0, name
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    statistics = {name: b for name, b in model.named_buffers() if "running" in name}
    reference_statistics = {name: b for name, b in reference.named_buffers() if "running" in name}
    assert statistics.keys() == reference_statistics.keys() and statistics
    for name, buffer in reference_statistics.items():
        torch.testing.assert_close(statistics[name], buffer, rtol=0, atol=1e-6, msg=name)


def test_without_a_class_token_the_mean_of_the_normed_tokens_is_classified(tmp_path, kernel, images):
    """The official pooling without a class token: LayerNorm of every token of the last map, then the mean."""
    spec = Spec(cls_token=(False, False, False), qkv_bias=(True, False, True), stride_kv=(2, 1, 2))
    reference, model = _reference_and_model(tmp_path, spec, cls_token=[False] * 3,
                                            qkv_bias=[True, False, True], stride_kv=[2, 1, 2])
    assert model.global_pool == "avg"
    _assert_close(_run(model.eval(), images, torch.float32, kernel), reference(images), torch.float32)


class _Shifted(torch.nn.Linear):
    """A Linear whose forward is not nn.Linear's, as a LoRA wrapper's or a quantized Linear's is not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 0.5


def _replace(model: torch.nn.Module, attribute: str) -> None:
    for module in list(model.modules()):
        old = getattr(module, attribute, None)
        if isinstance(old, torch.nn.Linear):
            new = _Shifted(old.in_features, old.out_features, bias=old.bias is not None)
            new.load_state_dict(old.state_dict())
            setattr(module, attribute, new)


@pytest.mark.parametrize("replaced", ["fc1", "fc2", "proj_v", "proj"])
def test_a_replaced_linear_is_called_on_every_path(tmp_path, kernel, replaced, images):
    """A block's Linear replaced by another module (fc1 alone, fc2 alone, a value or output projection)
    is called, not bypassed by a fast path that reads its weight: in inference and with gradients on, as
    when fine-tuning with LoRA."""
    reference, model = _reference_and_model(tmp_path)
    _replace(model, replaced)
    _replace(reference, replaced)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            _assert_close(model.eval()(images).detach(), reference(images).detach(), torch.float32)


@pytest.mark.parametrize("size", [(64, 64), (64, 72)], ids=["same-grid", "resized"])
def test_position_embedding_is_added_and_resized_to_the_grid(tmp_path, size):
    """The ablation's position embedding (stages 0 and 2), made for 64-pixel images: added as it is on a
    64 x 64 image, resized bicubically to a 64 x 72 image's grid."""
    spec = Spec(pos_grid=((16, 16), None, (4, 4)))
    reference, model = _reference_and_model(tmp_path, spec, position_embedding=[True, False, True],
                                            img_size=64)
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _assert_close(model.eval()(images), reference(images), torch.float32)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fused_and_plain_mlp_blocks_agree_with_the_formula(kernel, activation):
    """One block's MLP alone through the model's own Mlp, large biases: a wrong bias or scale is obvious."""
    from torchcvt.layers import Mlp

    mlp = perturbed(Mlp(24, 96, activation, drop=0.0), scale=0.5)
    x, residual = torch.randn(2, 13, 24), torch.randn(2, 13, 24)
    hidden = F.linear(x, mlp.fc1.weight, mlp.fc1.bias)
    act = quick_gelu(hidden) if activation == "quick_gelu" else F.gelu(hidden)
    want = residual + F.linear(act, mlp.fc2.weight, mlp.fc2.bias)
    got = []

    def forward() -> None:
        with torch.no_grad():
            got.append(mlp(x, residual))

    assert (_fused_calls(forward) > 0) == kernel
    torch.testing.assert_close(got[0], want.detach(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_transformers_weights_give_transformers_logits(tmp_path, kernel, dtype, images):
    """Exact GELU only (transformers hard-codes it); every bias and BatchNorm statistic perturbed."""
    config = HfCvtConfig(embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 2, 3], num_labels=5)
    hf_model = perturbed(CvtForImageClassification(config))
    hf_model.save_pretrained(tmp_path / "hf")
    model = torchcvt.create_model("cvt_13", checkpoint=tmp_path / "hf", activation="gelu", num_classes=5,
                                  embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 2, 3])
    with torch.no_grad():
        want = hf_model(pixel_values=images).logits
    _assert_close(_run(model.eval(), images, dtype, kernel), want, dtype)


def test_official_key_names_and_shapes_are_the_official_module_trees(tmp_path):
    """save_official writes exactly the keys and shapes of the official module tree, no more, no fewer."""
    model = torchcvt.create_model("cvt_13", num_classes=7, **TINY)
    official = OfficialCvT(SPEC, num_classes=7, activation="quick_gelu").state_dict()
    written = torch.load(save_official(model, tmp_path / "cvt.pth"), weights_only=True)
    assert {k: tuple(v.shape) for k, v in written.items()} == {k: tuple(v.shape) for k, v in official.items()}
