"""Dynamic int8 quantisation of the Linear layers runs and keeps the digits model's accuracy."""

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.datasets import ImageFolder

import torchcvt
from torchcvt.config import get_variant
from torchcvt.data import eval_transform, load_image, write_digits

SMALL = {"embed_dim": [16, 32, 48], "num_heads": [1, 2, 3], "depth": [1, 1, 1]}


def _tensors(folder) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of an ImageFolder tree through cvt_digits' evaluation transform, and the labels."""
    variant = get_variant("cvt_digits")
    config = {"input_size": variant.input_size, "crop_pct": variant.crop_pct,
              "mean": variant.mean, "std": variant.std}
    xs, ys = zip(*ImageFolder(folder, transform=eval_transform(config), loader=load_image), strict=True)
    return torch.stack(xs), torch.tensor(ys)


def _top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return 100 * (model(x).argmax(1) == y).float().mean().item()


def test_dynamic_int8_keeps_digits_top1_within_one_point(tmp_path):
    train_dir, val_dir = write_digits(tmp_path / "digits")
    x_train, y_train = _tensors(train_dir)
    x_val, y_val = _tensors(val_dir)
    model = torchcvt.create_model("cvt_digits", **SMALL)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(2):
        for batch in torch.randperm(len(y_train), generator=generator).split(32):
            optimizer.zero_grad()
            F.cross_entropy(model(x_train[batch]), y_train[batch]).backward()
            optimizer.step()
    model.eval()
    fp32 = _top1(model, x_val, y_val)
    int8 = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    # Every Linear, the ones the fused path would otherwise take included, is now int8.
    assert isinstance(int8.stage2.blocks[0].mlp.fc1, torch.ao.nn.quantized.dynamic.Linear)
    assert isinstance(int8.stage2.blocks[0].attn.proj_q, torch.ao.nn.quantized.dynamic.Linear)
    quantized = _top1(int8, x_val, y_val)
    assert fp32 >= 90, fp32  # a trained model, so that one point of accuracy means something
    assert abs(quantized - fp32) <= 1.0, (fp32, quantized)
