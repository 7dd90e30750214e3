"""engine.steps: one optimiser step against an update computed here by hand, divergence, lone images."""

from __future__ import annotations

import copy
import datetime
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.utils import ModelEmaV3

from torchcvt.engine.runtime import Runtime
from torchcvt.engine.steps import StepRunner, TrainingDiverged, merge_lone_images

CPU = Runtime(0, 1, torch.device("cpu"))


def _parts(mixup=None, lr: float = 0.5) -> SimpleNamespace:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    return SimpleNamespace(model=model, ddp=model, criterion=torch.nn.CrossEntropyLoss(), mixup=mixup,
                           optimizer=torch.optim.SGD(model.parameters(), lr=lr), amp_dtype=None, ema=None,
                           scaler=torch.amp.GradScaler("cpu", enabled=False))


def _batch(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=generator), torch.randint(0, 3, (n,), generator=generator)


def _sgd_by_hand(model: torch.nn.Module, images, targets, lr: float, clip: float | None = None) -> dict:
    """The weights after one plain SGD step on the mean cross-entropy, gradients from autograd here."""
    model = copy.deepcopy(model)
    loss = F.cross_entropy(F.linear(images, model.weight, model.bias), targets)
    grads = torch.autograd.grad(loss, [model.weight, model.bias])
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    factor = min(1.0, clip / (norm.item() + 1e-6)) if clip else 1.0
    return {"weight": model.weight - lr * factor * grads[0], "bias": model.bias - lr * factor * grads[1],
            "loss": loss, "norm": norm}


@pytest.mark.parametrize("clip", [None, 0.05])
def test_a_step_returns_the_loss_and_makes_the_sgd_update(clip):
    parts = _parts()
    images, targets = _batch(6)
    want = _sgd_by_hand(parts.model, images, targets, lr=0.5, clip=clip)
    assert clip is None or want["norm"] > 2 * clip  # clipping changes this step
    runner = StepRunner(parts, CPU, clip_grad=clip)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a float32 run asks for no autocast (CPU's would warn and disable)
        loss = runner.step(images, targets, global_step=0)
    assert loss.dtype == torch.float64 and loss.item() == pytest.approx(want["loss"].item(), rel=1e-6)
    torch.testing.assert_close(parts.model.weight.detach(), want["weight"].detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(parts.model.bias.detach(), want["bias"].detach(), rtol=0, atol=1e-6)
    assert runner.left_out == 0 and runner.check_finite(loss, "kept") == pytest.approx(loss.item())


def test_mixup_leaves_the_odd_image_out_and_counts_it():
    seen = []

    def mixup(images, targets):
        seen.append(len(images))
        return images, targets

    parts = _parts(mixup=mixup)
    images, targets = _batch(5)
    want = _sgd_by_hand(parts.model, images[:4], targets[:4], lr=0.5)
    runner = StepRunner(parts, CPU, clip_grad=None)
    loss = runner.step(images, targets, global_step=0)
    assert seen == [4] and runner.left_out == 1
    assert loss.item() == pytest.approx(want["loss"].item(), rel=1e-6)
    runner.step(*_batch(4), global_step=1)
    assert seen == [4, 4] and runner.left_out == 1
    runner.step(*_batch(3), global_step=2)
    assert seen == [4, 4, 2] and runner.left_out == 2


def test_the_forward_pass_runs_under_autocast_in_the_amp_dtype():
    parts = _parts()
    parts.amp_dtype = torch.bfloat16
    images, targets = _batch(6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.cross_entropy(parts.model(images), targets)
    full = F.cross_entropy(parts.model(images), targets).item()
    assert abs(want.item() - full) > 1e-5  # bf16 shows in the loss
    loss = StepRunner(parts, CPU, clip_grad=None).step(images, targets, global_step=0)
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)


def test_fp16_scales_the_loss_and_clips_the_unscaled_gradients():
    """fp16 autocast, a loss scaler that is on (as on every device) and clipping: the step is the SGD step
    on fp16-autocast gradients, clipped at their true norm."""
    parts = _parts()
    parts.amp_dtype = torch.float16
    parts.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    images, targets = _batch(6)
    model = copy.deepcopy(parts.model)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = F.cross_entropy(model(images), targets)
    grads = torch.autograd.grad(loss, [model.weight, model.bias])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert abs(F.cross_entropy(model(images), targets).item() - loss.item()) > 1e-5  # fp16, not bf16
    norm = torch.sqrt(sum((g**2).sum() for g in grads)).item()
    factor = 0.05 / (norm + 1e-6)
    assert factor < 0.5
    got = StepRunner(parts, CPU, clip_grad=0.05).step(images, targets, global_step=0)
    assert got.item() == pytest.approx(loss.item(), rel=1e-6)
    torch.testing.assert_close(parts.model.weight.detach(), (model.weight - 0.5 * factor * grads[0]).detach(),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(parts.model.bias.detach(), (model.bias - 0.5 * factor * grads[1]).detach(),
                               rtol=0, atol=1e-6)


def test_the_ema_copies_the_first_update_and_averages_from_the_second():
    """As timm's train.py drives ModelEmaV3: the first update copies the weights, later ones average."""
    parts = _parts()
    parts.ema = ModelEmaV3(parts.model, decay=0.75)
    with torch.no_grad():
        for value in parts.ema.module.parameters():
            value.add_(1.0)  # an average that copying and averaging leave in different places
    runner = StepRunner(parts, CPU, clip_grad=None)
    runner.step(*_batch(6), global_step=0)
    first = {name: value.clone() for name, value in parts.model.state_dict().items()}
    for name, value in parts.ema.module.state_dict().items():
        torch.testing.assert_close(value, first[name], rtol=0, atol=0, msg=name)
    runner.step(*_batch(6, seed=2), global_step=1)
    second = parts.model.state_dict()
    assert not torch.equal(second["weight"], first["weight"])
    for name, value in parts.ema.module.state_dict().items():
        want = 0.75 * first[name] + 0.25 * second[name]
        torch.testing.assert_close(value, want, rtol=0, atol=1e-6, msg=name)


def test_a_batch_with_nothing_readable_trains_nothing():
    parts = _parts()
    before = parts.model.weight.detach().clone()
    assert StepRunner(parts, CPU, clip_grad=None).step(None, None, global_step=0) is None
    assert torch.equal(parts.model.weight.detach(), before)


@pytest.mark.parametrize("previous", [False, True])
def test_under_ddp_a_rank_without_a_batch_steps_with_weight_zero(previous):
    """Every rank must take part in each step: on its previous batch, or a blank one, adding no gradient."""
    parts = _parts()
    parts.model.pretrained_cfg = {"input_size": (4,)}
    runner = StepRunner(parts, Runtime(0, 2, torch.device("cpu")), clip_grad=None)
    if previous:
        runner.step(*_batch(3), global_step=0)
    before = [p.detach().clone() for p in parts.model.parameters()]
    calls = []
    parts.ddp = lambda images: calls.append(images) or parts.model(images)
    loss = runner.step(None, None, global_step=1)
    assert loss.item() == 0 and len(calls) == 1
    assert torch.equal(calls[0], _batch(3)[0] if previous else torch.zeros(2, 4))
    assert all(torch.equal(p.detach(), b) for p, b in zip(parts.model.parameters(), before, strict=True))


def test_the_first_non_finite_loss_is_reported_with_its_step():
    parts = _parts()
    runner = StepRunner(parts, CPU, clip_grad=None)
    images, targets = _batch(4)
    total = runner.step(images, targets, global_step=0)
    total = total + runner.step(images, targets, global_step=1)
    assert runner.check_finite(total, "kept") == pytest.approx(total.item())
    bad = images.clone()
    bad[0, 0] = float("nan")
    runner.step(bad, targets, global_step=2)
    bad[0, 0] = float("inf")
    runner.step(bad, targets, global_step=3)  # a later one does not replace the first
    with pytest.raises(TrainingDiverged, match=r"^loss is nan at step 3; stopped, last.pth kept$"):
        runner.check_finite(runner.zero(), "last.pth kept")
    assert runner.zero().item() == 0 and runner.zero().dtype == torch.float64


@pytest.fixture
def gloo_group(tmp_path):
    """A real Gloo process group of one process: the collectives run, each rank's value is the result."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_distributed_divergence_check_agrees_on_the_first_bad_step(gloo_group):
    """The collective MIN over steps, with 'no divergence' as +inf: none is no error, one is named."""
    parts = _parts()
    runner = StepRunner(parts, Runtime(0, 2, torch.device("cpu")), clip_grad=None)
    images, targets = _batch(4)
    total = runner.step(images, targets, global_step=0)
    assert runner.check_finite(total, "kept") == pytest.approx(total.item())
    bad = images.clone()
    bad[0, 0] = float("inf")
    runner.step(bad, targets, global_step=4)
    with pytest.raises(TrainingDiverged, match=r"^loss is nan at step 5; stopped, kept$"):
        runner.check_finite(runner.zero(), "kept")


def _rank_checks_divergence(rank: int, store: str, results: str) -> None:
    """One of two Gloo ranks: only rank 1 meets a non-finite loss (at step 5); each writes what it raised."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        runner = StepRunner(_parts(), Runtime(rank, 2, torch.device("cpu")), clip_grad=None)
        images, targets = _batch(4)
        if rank == 1:
            images[0, 0] = float("nan")
        runner.step(images, targets, global_step=4)
        try:
            runner.check_finite(runner.zero(), "kept")
            message = "no error"
        except TrainingDiverged as error:
            message = str(error)
        Path(results, f"rank{rank}").write_text(message)
    finally:
        dist.destroy_process_group()


def test_a_divergence_on_the_other_rank_stops_this_one_at_its_step(tmp_path):
    """Two real Gloo ranks, this process and a spawned one: the rank whose loss stayed finite (this one)
    learns the other's first bad step."""
    store = str(tmp_path / "store")
    other = torch.multiprocessing.get_context("spawn").Process(target=_rank_checks_divergence,
                                                                 args=(1, store, str(tmp_path)))
    other.start()
    try:
        _rank_checks_divergence(0, store, str(tmp_path))
    finally:
        other.join(timeout=60)
        if other.is_alive():  # never left waiting on a rank that hangs
            other.kill()
    assert other.exitcode == 0
    assert (tmp_path / "rank1").read_text() == "loss is nan at step 5; stopped, kept"
    assert (tmp_path / "rank0").read_text() == "loss is not finite at step 5; stopped, kept"


def _sizes(batches) -> list:
    return [None if images is None else len(images) for images, _, _ in batches]


def _batches(*sizes: int | None) -> list:
    return [(None, None, ["bad"]) if n is None else (*_batch(n, seed=i), []) for i, n in enumerate(sizes)]


@pytest.mark.parametrize(
    ("sizes", "batch_size", "merged", "left_out"),
    [
        ((4, 1, 4), 4, [5, None, 4], []),  # a lone image joins the batch before it
        ((1, 4, 4), 4, [None, 5, 4], []),  # at the start, the batch after it
        ((None, 1, None, 3), 4, [None, None, None, 4], []),  # across unreadable batches
        ((4, 4), 4, [4, 4], []),
        ((4, 2, 4), 4, [4, 2, 4], []),  # two images are enough for BatchNorm
        ((1,), 4, [None], [1]),  # no other readable image in the epoch
        ((1, 1), 1, [1, 1], []),  # batch size 1 is what was asked for
    ],
)
def test_lone_images_are_merged(sizes, batch_size, merged, left_out):
    calls = []
    batches = _batches(*sizes)
    out = list(merge_lone_images(batches, batch_size, calls.append))
    assert _sizes(out) == merged and calls == left_out
    # The images themselves with their labels: nothing lost, nothing repeated.
    def rows(pairs) -> list:
        return sorted((*image.tolist(), int(label)) for images, targets in pairs
                      for image, label in zip(images, targets, strict=True))

    readable = [(images, targets) for images, targets, _ in batches if images is not None]
    got = [(images, targets) for images, targets, _ in out if images is not None]
    assert rows(got) == ([] if left_out else rows(readable))
