"""The numbers data.py hands to training: samplers, per-sample seeds, collation, and the transforms' pixels
checked against PIL and numpy computed here."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data.distributed import DistributedSampler
from torchvision.transforms import InterpolationMode

from torchcvt.data import (
    BadImage,
    ResizeCenterCrop,
    SeededSampler,
    ShardSampler,
    collate_skipping_bad,
    eval_transform,
    train_transform,
)
from torchcvt.decoding import seeded_rng
from torchcvt.engine import TrainConfig

MEAN, STD = (0.2, 0.4, 0.6), (0.5, 0.25, 0.125)
CONFIG = {"input_size": (3, 24, 24), "mean": MEAN, "std": STD, "crop_pct": 0.875, "interpolation": "bicubic"}


def _image(width: int = 24, height: int = 24, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _normalised(image: Image.Image) -> torch.Tensor:
    pixels = np.asarray(image, dtype=np.float32) / 255
    pixels = (pixels - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    return torch.from_numpy(pixels).permute(2, 0, 1)


def test_shard_sampler_gives_each_index_to_one_rank_in_order():
    shards = [list(ShardSampler(10, rank, 3)) for rank in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert [len(ShardSampler(10, rank, 3)) for rank in range(3)] == [4, 3, 3]
    assert list(ShardSampler(4)) == [0, 1, 2, 3] and len(ShardSampler(0)) == 0


def _seeded(seed: int, rank: int = 0, world: int = 1, epoch: int = 0, start: int = 0) -> tuple[list, int]:
    shuffled = DistributedSampler(range(12), world, rank, shuffle=True, seed=5)
    sampler = SeededSampler(shuffled, seed, rank, world)
    sampler.set_epoch(epoch, start)
    return list(sampler), len(sampler)


def test_per_sample_seeds_are_the_same_for_one_process_and_for_two():
    one, length = _seeded(7)
    assert length == 12 and sorted(index for index, _ in one) == list(range(12))
    assert len({seed for _, seed in one}) == 12  # every sample its own seed
    ranks = [_seeded(7, rank, 2)[0] for rank in range(2)]
    # Position p of rank r is position 2p + r of the whole epoch: the same seed there as in one process.
    by_flat = {2 * p + r: seed for r in range(2) for p, (_, seed) in enumerate(ranks[r])}
    assert [by_flat[i] for i in range(12)] == [seed for _, seed in one]


def test_seeds_are_those_of_earlier_versions():
    """A run resumed by a newer torchcvt draws the same augmentations: the seeds of a few samples, pinned."""
    sampler = SeededSampler(ShardSampler(6), seed=7)
    sampler.sampler.set_epoch = lambda epoch: None
    assert list(sampler) == [(i, 700002149000147 + i) for i in range(6)]  # never set_epoch: epoch 0, start 0
    sampler.set_epoch(3)
    assert list(sampler)[:2] == [(0, 700002449000168), (1, 700002449000169)]
    ranks = [SeededSampler(ShardSampler(6, rank, 2), seed=7, rank=rank, world_size=2) for rank in range(2)]
    assert [seed for rank in ranks for _, seed in rank] == [700002149000147 + i for i in (0, 2, 4, 1, 3, 5)]
    assert all(type(seed) is int for _, seed in sampler)


def test_seeds_stay_within_int64_for_the_largest_run_seed():
    """The loader collates each sample's seed into an int64 tensor: even a run seed of 2**32 - 1 fits."""
    for run_seed in (2**32 - 1, 2**32 - 2, 3_000_000_019, 2**31 + 11, 123_456_789, 987_654_321, 2**30 + 3):
        sampler = SeededSampler(ShardSampler(50), seed=run_seed)
        sampler.sampler.set_epoch = lambda epoch: None  # the order is not what is tested here
        sampler.set_epoch(1000)
        seeds = [seed for _, seed in sampler]
        assert all(0 <= seed < 2**63 for seed in seeds) and len(set(seeds)) == 50
        assert torch.tensor(seeds, dtype=torch.int64).tolist() == seeds


def test_seeds_change_with_epoch_and_run_seed_and_resume_part_way():
    seeds = {tuple(s for _, s in _seeded(seed, epoch=epoch)[0]) for seed in (7, 8) for epoch in (0, 1)}
    assert len(seeds) == 4 and len({s for run in seeds for s in run}) == 48
    full, _ = _seeded(7, epoch=3)
    tail, length = _seeded(7, epoch=3, start=5)
    assert tail == full[5:] and length == 7


def test_seeded_rng_repeats_draws_and_restores_the_global_state():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    after = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    draws = []
    for _ in range(2):
        with seeded_rng(2**32 + 3):
            draws.append((random.random(), np.random.rand(), torch.rand(1).item()))
    assert draws[0] == draws[1]
    random.seed(2**32 + 3), np.random.seed(3), torch.manual_seed(2**32 + 3)  # numpy takes 32 bits
    assert draws[0] == (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    with seeded_rng(5):
        pass
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == after


def test_collate_keeps_readable_samples_and_returns_the_unreadable():
    bad = BadImage("x.png", "truncated")
    images, targets, unreadable = collate_skipping_bad([(torch.ones(2), 3), bad, (torch.zeros(2), 1)])
    assert torch.equal(images, torch.tensor([[1.0, 1.0], [0.0, 0.0]])) and targets.tolist() == [3, 1]
    assert unreadable == [bad]
    assert collate_skipping_bad([bad, bad]) == (None, None, [bad, bad])


@pytest.mark.parametrize("hflip", [0.0, 1.0])
def test_torchvision_pipeline_pixels(hflip):
    """Scale and ratio 1 on a square image: the whole image resized, flipped or not, normalised."""
    aug = dataclasses.replace(TrainConfig().aug, pipeline="torchvision", scale=(1.0, 1.0), ratio=(1.0, 1.0),
                              hflip=hflip)
    image = _image(40, 40)
    want = image.resize((24, 24), Image.Resampling.BICUBIC)
    want = want.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if hflip else want
    torch.testing.assert_close(train_transform(aug, CONFIG)(image), _normalised(want), rtol=0, atol=1e-5)


@pytest.mark.parametrize("hflip", [0.0, 1.0])
def test_timm_pipeline_pixels_of_a_whole_image_crop(hflip):
    """Scale and ratio 1, no colour or RandAugment or erasing: the image resized, flipped or not, never
    flipped upside down."""
    aug = dataclasses.replace(TrainConfig().aug, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=hflip,
                              color_jitter=None, auto_augment=None, re_prob=0.0, interpolation="bilinear")
    image = _image(40, 40)
    want = image.resize((24, 24), Image.Resampling.BILINEAR)
    want = want.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if hflip else want
    torch.testing.assert_close(train_transform(aug, CONFIG)(image), _normalised(want), rtol=0, atol=1e-5)


def test_timm_pipeline_takes_every_augmentation_setting():
    aug = dataclasses.replace(TrainConfig().aug, scale=(0.3, 0.9), ratio=(0.5, 2.0), hflip=0.25,
                              color_jitter=0.4, auto_augment=None, re_prob=0.7, re_mode="rand", re_count=3)
    steps = {type(step).__name__: step for step in train_transform(aug, CONFIG).transforms}
    crop, erase = steps["RandomResizedCropAndInterpolation"], steps["RandomErasing"]
    assert (crop.size, crop.scale, crop.ratio) == ((24, 24), (0.3, 0.9), (0.5, 2.0))
    assert crop.interpolation == InterpolationMode.BICUBIC  # aug's, not timm's default (bilinear)
    assert steps["RandomHorizontalFlip"].p == 0.25 and "RandomVerticalFlip" not in steps
    assert steps["ColorJitter"].brightness == pytest.approx((0.6, 1.4))
    assert (erase.probability, erase.mode, erase.max_count) == (0.7, "rand", 3)
    no_jitter = train_transform(dataclasses.replace(aug, color_jitter=None), CONFIG)
    assert not any(type(step).__name__ == "ColorJitter" for step in no_jitter.transforms)


def test_torchvision_pipeline_takes_scale_ratio_and_interpolation():
    aug = dataclasses.replace(TrainConfig().aug, pipeline="torchvision", scale=(0.3, 0.9), ratio=(0.5, 2.0),
                              interpolation="bilinear", hflip=0.25)
    crop, flip = train_transform(aug, CONFIG).transforms[:2]
    assert (crop.size, crop.scale, crop.ratio) == ((24, 24), (0.3, 0.9), (0.5, 2.0))
    assert crop.interpolation == InterpolationMode.BILINEAR and flip.p == 0.25


def test_timm_pipeline_without_augmentation_only_normalises_an_image_of_the_input_size():
    aug = dataclasses.replace(TrainConfig().aug, enabled=False)
    image = _image()
    torch.testing.assert_close(train_transform(aug, CONFIG)(image), _normalised(image), rtol=0, atol=1e-5)


def test_randaugment_posterize_to_zero_bits_gives_black():
    transform = train_transform(TrainConfig().aug, CONFIG)
    ops = [op for step in transform.transforms for op in getattr(step, "ops", ())
           if op.name.startswith("Posterize")]
    assert ops
    image = _image()
    for op in ops:
        assert not np.asarray(op.aug_fn(image, 0)).any()
        assert op.aug_fn(image, 8) is image
        for bits, mask in ((4, 0xF0), (1, 0x80)):
            assert np.array_equal(np.asarray(op.aug_fn(image, bits)), np.asarray(image) & mask)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_eval_transform_pixels(interpolation):
    """crop_pct 1: squashed to the size; below 1: the shorter side to size / crop_pct, then a centre crop;
    a non-square size: both sides by crop_pct. The same pixels as PIL's resize and crop."""
    resample = Image.Resampling[interpolation.upper()]
    config = {**CONFIG, "interpolation": interpolation}
    image = _image(50, 30)
    squash = eval_transform({**config, "crop_pct": 1.0})(image)
    torch.testing.assert_close(squash, _normalised(image.resize((24, 24), resample)), rtol=0, atol=1e-6)
    cropped = eval_transform(config)(image)  # 27 a side: 45 x 27, crop 24 x 24 at (10, 2)
    want = image.resize((45, 27), resample).crop((10, 2, 34, 26))
    torch.testing.assert_close(cropped, _normalised(want), rtol=0, atol=1e-6)
    wide = eval_transform({**config, "input_size": (3, 24, 32)})(image)  # 27 x 36, crop 24 x 32 at (2, 2)
    want = image.resize((36, 27), resample).crop((2, 2, 34, 26))
    torch.testing.assert_close(wide, _normalised(want), rtol=0, atol=1e-6)


def test_eval_transform_defaults_are_bicubic_and_crop_pct_0875():
    image = _image(50, 30)
    bare = {"input_size": (3, 24, 24), "mean": MEAN, "std": STD}
    torch.testing.assert_close(eval_transform(bare)(image), eval_transform(CONFIG)(image), rtol=0, atol=0)
    bare_wide = {**bare, "input_size": (3, 24, 32)}
    torch.testing.assert_close(eval_transform(bare_wide)(image),
                               eval_transform({**CONFIG, "input_size": (3, 24, 32)})(image), rtol=0, atol=0)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
# The last three scale by 2 or more: the crop box in source pixels, and the filter, show.
@pytest.mark.parametrize(
    "size", [(4000, 10), (10, 4000), (160, 10), (10, 170), (8000, 20), (20, 8030), (320, 20)]
)
def test_resize_center_crop_matches_resize_then_crop(size, interpolation):
    """Up to an aspect of 16 exactly torchvision's Resize + CenterCrop; beyond, the same pixels up to
    PIL's rounding (only the crop is resampled)."""
    from torchvision import transforms as T

    mode = T.InterpolationMode(interpolation)
    image = _image(*size, seed=3)
    got = np.asarray(ResizeCenterCrop(10, 8, mode)(image)).astype(int)
    want = np.asarray(T.CenterCrop(8)(T.Resize(10, interpolation=mode)(image))).astype(int)
    assert got.shape == want.shape == (8, 8, 3)
    assert np.abs(got - want).max() <= (0 if max(size) <= 16 * min(size) else 2)
