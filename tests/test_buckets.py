"""Aspect-ratio buckets: the bucket list, nearest bucket, placement geometry and batch sampler."""

from __future__ import annotations

import math
import random

import pytest
import torch
from accelerate.data_loader import prepare_data_loader, skip_first_batches
from torchvision.transforms.v2 import functional as F

from controlnet_trainer.buckets import (
    BucketBatchSampler,
    BucketError,
    bucket_geometry,
    make_buckets,
    nearest_bucket,
    summarize,
)

SETTINGS = [(512, 2.0), (768, 2.0), (1024, 2.0), (1024, 1.5), (1024, 4 / 3), (640, 1.0)]


@pytest.mark.parametrize(("resolution", "max_ratio"), SETTINGS)
def test_buckets_are_multiples_within_area_and_ratio(resolution, max_ratio):
    buckets = make_buckets(resolution, max_ratio=max_ratio)
    for height, width in buckets:
        assert height % 64 == 0 and width % 64 == 0
        assert height * width <= resolution * resolution
        assert 1 / max_ratio - 1e-9 <= width / height <= max_ratio + 1e-9
    assert (resolution, resolution) in buckets
    assert all((width, height) in buckets for height, width in buckets)
    assert list(buckets) == sorted(set(buckets))


@pytest.mark.parametrize(("resolution", "max_ratio"), SETTINGS)
def test_every_bucket_is_as_long_as_area_and_ratio_allow(resolution, max_ratio):
    for height, width in make_buckets(resolution, max_ratio=max_ratio):
        short, long = sorted((height, width))
        longer = long + 64
        assert short * longer > resolution * resolution or longer / short > max_ratio


def test_buckets_for_512_are_the_area_filling_ones_plus_the_ratio_limited_one():
    # 320 x 640 is the largest exact 1:2 bucket; 320 x 768 would fit the area but not the ratio.
    assert make_buckets(512) == (
        (320, 640),
        (384, 640),
        (448, 576),
        (512, 512),
        (576, 448),
        (640, 320),
        (640, 384),
    )


def test_buckets_for_1024_reach_sdxl_two_to_one_bucket():
    buckets = make_buckets(1024)
    assert {(704, 1408), (768, 1344), (832, 1216), (896, 1152), (960, 1088), (1024, 1024)} <= set(buckets)
    assert len(buckets) == 11


def test_ratio_limit_is_not_lost_to_float_error():
    # 2.28 * 1600 is 3648 = 57 * 64, but 2.28 * 1600 / 64 is 56.99999999999999 in floats.
    assert (1600, 3648) in make_buckets(2496, max_ratio=2.28)


def test_max_ratio_one_gives_only_the_square():
    assert make_buckets(768, max_ratio=1.0) == ((768, 768),)


def test_resolution_not_a_multiple_names_the_fix():
    with pytest.raises(BucketError, match=r"multiple of 64, got 500; use --resolution=512\.") as raised:
        make_buckets(500)
    assert isinstance(raised.value, ValueError)


@pytest.mark.parametrize("kwargs", [{"max_ratio": 0.5}, {"multiple": 0}])
def test_impossible_settings_are_refused(kwargs):
    with pytest.raises(BucketError):
        make_buckets(512, **kwargs)


def test_landscape_goes_to_a_wide_bucket_and_portrait_to_a_tall_one():
    buckets = make_buckets(512)
    assert nearest_bucket(500, 1000, buckets) == (320, 640)
    assert nearest_bucket(1000, 500, buckets) == (640, 320)
    assert nearest_bucket(300, 400, buckets) == (448, 576)
    assert nearest_bucket(700, 700, buckets) == (512, 512)
    for height, width in [(480, 640), (720, 1280), (1000, 1400)]:
        wide, tall = nearest_bucket(height, width, buckets), nearest_bucket(width, height, buckets)
        assert wide[1] > wide[0] and tall == wide[::-1]


def test_nearest_is_measured_in_log_space():
    # Aspect 2 is nearer 3.9 than 1 by ratio (1.95x vs 2x), though nearer 1 by difference.
    assert nearest_bucket(100, 200, [(100, 100), (100, 390)]) == (100, 390)


@pytest.mark.parametrize(
    ("image", "buckets", "expected"),
    [
        ((100, 200), [(256, 512), (320, 640)], (320, 640)),  # same shape: the larger wins
        ((100, 200), [(64, 256), (128, 128)], (128, 128)),  # equally far, same area: the squarer wins
        ((512, 512), [(384, 640), (640, 384)], (384, 640)),  # mirror images: a fixed choice
    ],
)
def test_ties_are_broken_the_same_way_in_any_order(image, buckets, expected):
    assert nearest_bucket(*image, buckets) == expected
    assert nearest_bucket(*image, buckets[::-1]) == expected


def test_nearest_bucket_needs_buckets():
    with pytest.raises(BucketError):
        nearest_bucket(10, 10, [])


@pytest.mark.parametrize("size", [(0, 10), (10, 0), (-5, 10)])
def test_empty_images_are_refused(size):
    with pytest.raises(BucketError, match="cannot be placed"):
        nearest_bucket(*size, [(64, 64)])
    with pytest.raises(BucketError, match="cannot be placed"):
        bucket_geometry(*size, (64, 64))


def image_sizes(count: int, seed: int = 0) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(1, 3000), rng.randint(1, 3000)) for _ in range(count)]


def test_geometry_covers_the_bucket_and_crops_inside_the_resized_image():
    buckets = make_buckets(1024)
    for height, width in image_sizes(300) + [(1, 3000), (3000, 1), (1024, 1024)]:
        for bucket in buckets:
            geometry = bucket_geometry(height, width, bucket)
            (resized_h, resized_w), (top, left) = geometry.resized_size, geometry.crop_top_left
            assert geometry.original_size == (height, width)
            assert geometry.crop_size == bucket
            assert resized_h >= bucket[0] and resized_w >= bucket[1]
            assert resized_h == bucket[0] or resized_w == bucket[1]
            assert 0 <= top and top + bucket[0] <= resized_h
            assert 0 <= left and left + bucket[1] <= resized_w
            # The aspect is kept: the scaled side is the exact one truncated to an int.
            assert abs(resized_w - resized_h * width / height) < 1 or abs(resized_h - resized_w * height / width) < 1


def test_geometry_of_the_nearest_bucket_crops_little():
    buckets = make_buckets(1024)
    for height, width in image_sizes(300, seed=1):
        if not 0.5 <= width / height <= 2.0:
            continue
        geometry = bucket_geometry(height, width, nearest_bucket(height, width, buckets))
        kept = (geometry.crop_size[0] * geometry.crop_size[1]) / (geometry.resized_size[0] * geometry.resized_size[1])
        assert kept > 0.9


def test_square_image_at_square_bucket_is_a_plain_resize():
    geometry = bucket_geometry(700, 700, (512, 512))
    assert (geometry.resized_size, geometry.crop_top_left, geometry.crop_size) == ((512, 512), (0, 0), (512, 512))


@pytest.mark.parametrize(
    "size", [(700, 700), (300, 700), (701, 333), (512, 517), (512, 525), (525, 512), (97, 131), (131, 97)]
)
def test_square_bucket_matches_torchvision_resize_and_center_crop(size):
    pixels = torch.rand(1, *size)
    geometry = bucket_geometry(*size, (128, 128))
    resized = F.resize(pixels, 128, antialias=False)
    assert tuple(resized.shape[-2:]) == geometry.resized_size
    top, left = geometry.crop_top_left
    assert torch.equal(F.center_crop(resized, [128, 128]), resized[..., top : top + 128, left : left + 128])


@pytest.mark.parametrize(("size", "bucket"), [((300, 700), (64, 192)), ((701, 333), (192, 64)), ((99, 515), (64, 128))])
def test_crop_offsets_match_torchvision_center_crop_in_any_bucket(size, bucket):
    geometry = bucket_geometry(*size, bucket)
    resized = torch.rand(1, *geometry.resized_size)
    top, left = geometry.crop_top_left
    expected = resized[..., top : top + bucket[0], left : left + bucket[1]]
    assert torch.equal(F.center_crop(resized, list(bucket)), expected)


def test_summarize_counts_samples_per_bucket_in_order():
    assert summarize([(2, 1), (1, 2), (2, 1)]) == {(1, 2): 1, (2, 1): 2}
    assert list(summarize([(2, 1), (1, 2)])) == [(1, 2), (2, 1)]


# 37 samples over four buckets, sizes 10, 1, 19 and 7: every bucket ends on a short batch.
SAMPLE_BUCKETS = [(512, 512)] * 10 + [(320, 640)] + [(640, 384)] * 19 + [(448, 576)] * 7
random.Random(0).shuffle(SAMPLE_BUCKETS)


def epoch_batches(sampler: BucketBatchSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("batch_size", [1, 4, 19, 50])
def test_every_index_once_per_epoch_in_single_bucket_batches(batch_size):
    sampler = BucketBatchSampler(SAMPLE_BUCKETS, batch_size, seed=3)
    per_bucket = summarize(SAMPLE_BUCKETS)
    for epoch in range(3):
        batches = epoch_batches(sampler, epoch)
        assert sorted(i for batch in batches for i in batch) == list(range(len(SAMPLE_BUCKETS)))
        assert all(1 <= len(batch) <= batch_size for batch in batches)
        assert all(len({SAMPLE_BUCKETS[i] for i in batch}) == 1 for batch in batches)
        batches_per_bucket = summarize([SAMPLE_BUCKETS[batch[0]] for batch in batches])
        assert batches_per_bucket == {bucket: math.ceil(n / batch_size) for bucket, n in per_bucket.items()}
        assert len(sampler) == len(batches)


def test_order_changes_with_epoch_and_seed_and_repeats_for_the_same_pair():
    sampler = BucketBatchSampler(SAMPLE_BUCKETS, 4, seed=3)
    first, second = epoch_batches(sampler, 0), epoch_batches(sampler, 1)
    assert first != second
    assert epoch_batches(sampler, 0) == first
    assert epoch_batches(BucketBatchSampler(SAMPLE_BUCKETS, 4, seed=3), 1) == second
    assert sampler.batches(1) == second
    assert epoch_batches(BucketBatchSampler(SAMPLE_BUCKETS, 4, seed=4), 1) != second
    # The seed and epoch are mixed, not added: (seed 4, epoch 0) is not (seed 3, epoch 1).
    assert epoch_batches(BucketBatchSampler(SAMPLE_BUCKETS, 4, seed=4), 0) != second


def test_batches_of_different_buckets_are_interleaved():
    sampler = BucketBatchSampler(SAMPLE_BUCKETS, 4, seed=3)
    for epoch in range(3):
        order = [SAMPLE_BUCKETS[batch[0]] for batch in epoch_batches(sampler, epoch)]
        runs = [bucket for position, bucket in enumerate(order) if position == 0 or order[position - 1] != bucket]
        assert len(runs) > len(set(order))  # some bucket comes back after another one


def test_indices_are_shuffled_within_a_bucket_not_only_between_batches():
    sampler = BucketBatchSampler([(64, 64)] * 20, 20, seed=0)
    (batch,) = epoch_batches(sampler, 0)
    assert batch != sorted(batch)
    assert epoch_batches(sampler, 1)[0] != batch


def test_resume_skips_the_batches_already_done():
    done = epoch_batches(BucketBatchSampler(SAMPLE_BUCKETS, 4, seed=3), 2)
    resumed = BucketBatchSampler(SAMPLE_BUCKETS, 4, seed=3)
    resumed.set_epoch(2)
    loader = skip_first_batches(torch.utils.data.DataLoader(range(len(SAMPLE_BUCKETS)), batch_sampler=resumed), 3)
    assert [batch.tolist() for batch in loader] == done[3:]


def test_length_does_not_depend_on_the_epoch():
    sampler = BucketBatchSampler(SAMPLE_BUCKETS, 4, seed=3)
    assert len(sampler) == 3 + 1 + 5 + 2
    assert {len(epoch_batches(sampler, epoch)) for epoch in range(4)} == {len(sampler)}


def test_accelerate_attributes_and_refusals():
    sampler = BucketBatchSampler(SAMPLE_BUCKETS, 4, seed=3)
    assert sampler.drop_last is False
    assert sampler.batch_size is None  # batches vary in size: see the sharding test below
    assert sampler.max_batch_size == 4
    with pytest.raises(BucketError):
        BucketBatchSampler(SAMPLE_BUCKETS, 0, seed=3)
    with pytest.raises(BucketError):
        BucketBatchSampler(SAMPLE_BUCKETS, 4, seed=-1)


def test_data_loader_yields_the_sampler_batches():
    sampler = BucketBatchSampler(SAMPLE_BUCKETS, 4, seed=3)
    loader = torch.utils.data.DataLoader(range(len(SAMPLE_BUCKETS)), batch_sampler=sampler)
    assert [batch.tolist() for batch in loader] == sampler.batches(0)


@pytest.mark.parametrize("num_processes", [2, 3])
def test_sharded_by_accelerate_every_index_is_seen_and_epochs_reach_the_sampler(num_processes):
    def shard_batches(process_index: int, epoch: int) -> list[list[int]]:
        sampler = BucketBatchSampler(SAMPLE_BUCKETS, 4, seed=3)
        loader = torch.utils.data.DataLoader(range(len(SAMPLE_BUCKETS)), batch_sampler=sampler)
        shard = prepare_data_loader(
            loader, num_processes=num_processes, process_index=process_index, put_on_device=False
        )
        shard.set_epoch(epoch)
        batches = [batch.tolist() for batch in shard]
        assert len(batches) == len(shard) == math.ceil(len(sampler) / num_processes)
        shard.set_epoch(epoch)  # as the training loop does before skipping on resume
        assert [batch.tolist() for batch in skip_first_batches(shard, 2)] == batches[2:]
        return batches

    for epoch in (0, 1):
        shards = [shard_batches(process, epoch) for process in range(num_processes)]
        seen = {i for batches in shards for batch in batches for i in batch}
        assert seen == set(range(len(SAMPLE_BUCKETS)))
        assert all(len({SAMPLE_BUCKETS[i] for i in batch}) == 1 for batches in shards for batch in batches)
        expected = BucketBatchSampler(SAMPLE_BUCKETS, 4, seed=3).batches(epoch)
        assert shards[0][0] == expected[0] and shards[1][0] == expected[1]
