"""Aspect-ratio buckets: which sizes to train at, where each image goes, and how to batch them.

Without buckets every image is resized and centre-cropped to a ``resolution`` square, which
cuts the ends off wide and tall pictures. With them each image is placed in the bucket whose
shape is closest to its own (all buckets hold about ``resolution**2`` pixels), and every batch
is drawn from a single bucket so its tensors stack. Pure logic: no images, no models.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Iterator, Sequence
from fractions import Fraction

import numpy as np
import torch

from .errors import InputError

Bucket = tuple[int, int]  # (height, width) in pixels

# max_ratio is a float: 2.28 * 1600 / 64 is 56.99999999999999, and the floor must still be 57.
_RATIO_TOLERANCE = 1e-9


class BucketError(InputError):
    """The bucketing settings cannot work; the message says what to change."""


def make_buckets(resolution: int, *, multiple: int = 64, max_ratio: float = 2.0) -> tuple[Bucket, ...]:
    """The (height, width) buckets for a target area of ``resolution**2``, sorted.

    Both sides are multiples of ``multiple``, the area is at most ``resolution**2`` and the
    aspect ratio lies within [1/max_ratio, max_ratio]. For each height from ``resolution`` down,
    the bucket takes the widest width that fits the area. At the first height where the ratio
    limit binds instead, the widest width within the ratio gives one more bucket if it is more
    elongated than the last (so images near ``max_ratio`` lose little to the crop), and the
    scan stops: shorter heights would only give smaller buckets of no more extreme shape.
    Every bucket has its transpose.
    """
    _check_settings(resolution, multiple, max_ratio)
    area = resolution * resolution
    wide = [(resolution, resolution)]
    for height in range(resolution - multiple, 0, -multiple):
        area_width = (area // height) // multiple * multiple
        ratio_width = math.floor(max_ratio * height / multiple + _RATIO_TOLERANCE) * multiple
        if area_width <= ratio_width:
            wide.append((height, area_width))
            continue
        last_height, last_width = wide[-1]
        if ratio_width * last_height > last_width * height:
            wide.append((height, ratio_width))
        break
    return tuple(sorted({*wide, *((width, height) for height, width in wide)}))


def _check_settings(resolution: int, multiple: int, max_ratio: float) -> None:
    if multiple < 1:
        raise BucketError(f"The bucket size multiple must be a positive number of pixels, got {multiple}.")
    if max_ratio < 1.0:
        raise BucketError(f"The largest bucket aspect ratio must be at least 1.0, got {max_ratio}.")
    if resolution < multiple or resolution % multiple:
        suggestion = max(multiple, round(resolution / multiple) * multiple)
        raise BucketError(
            f"Aspect-ratio buckets need --resolution to be a multiple of {multiple}, got {resolution}; "
            f"use --resolution={suggestion}."
        )


def nearest_bucket(height: int, width: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is closest to the image's in log space.

    Ties go to the larger bucket, then the squarer one, then the smaller (height, width), so
    the answer never depends on the order of ``buckets``.
    """
    if not buckets:
        raise BucketError("There are no buckets to choose from; build them with make_buckets().")
    _check_size(height, width)
    return min(buckets, key=lambda bucket: _bucket_preference(height, width, bucket))


def _bucket_preference(height: int, width: int, bucket: Bucket) -> tuple:
    bucket_height, bucket_width = bucket
    # |log(w/h) - log(bw/bh)| compared exactly as the rational max(a, b) / min(a, b):
    # float logs of reciprocal ratios are not exact negatives, which would break ties by noise.
    image_side, bucket_side = width * bucket_height, height * bucket_width
    distance = Fraction(max(image_side, bucket_side), min(image_side, bucket_side))
    elongation = Fraction(max(bucket), min(bucket))
    return (distance, -bucket_height * bucket_width, elongation, bucket)


def _check_size(height: int, width: int) -> None:
    if height < 1 or width < 1:
        raise BucketError(f"An image of {height}x{width} pixels (height x width) cannot be placed in a bucket.")


@dataclasses.dataclass(frozen=True)
class BucketGeometry:
    """Where an image of ``original_size`` lands: resized to cover the bucket, then centre-cropped.

    All pairs are (height, width), or (top, left) for the crop corner; SDXL's time ids are
    ``original_size``, ``crop_top_left`` and ``crop_size`` (the target size).
    """

    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    crop_size: tuple[int, int]


def bucket_geometry(height: int, width: int, bucket: Bucket) -> BucketGeometry:
    """Resize keeping the aspect so the image covers ``bucket``, then take a centre crop of it.

    The side that needs the larger scale is set to the bucket's side and the other side is
    scaled with torchvision's rounding (``int``), so for a square bucket this is exactly
    ``Resize(resolution)`` followed by ``CenterCrop(resolution)``.
    """
    _check_size(height, width)
    bucket_height, bucket_width = bucket
    if bucket_height * width >= bucket_width * height:  # height needs the larger scale
        resized = (bucket_height, int(bucket_height * width / height))
    else:
        resized = (int(bucket_width * height / width), bucket_width)
    # The same offsets as torchvision's center_crop (round half to even included).
    top = round((resized[0] - bucket_height) / 2.0)
    left = round((resized[1] - bucket_width) / 2.0)
    return BucketGeometry((height, width), resized, (top, left), (bucket_height, bucket_width))


def summarize(buckets_of_samples: Sequence[Bucket]) -> dict[Bucket, int]:
    """How many samples each bucket holds, in bucket order, for logging."""
    return dict(sorted(collections.Counter(buckets_of_samples).items()))


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of dataset indices, each batch from a single bucket.

    Every epoch shuffles the indices within each bucket, cuts them into batches of at most
    ``batch_size`` (a bucket's last batch may be smaller: no sample is dropped) and shuffles
    the order of all batches. The order is a pure function of (seed, epoch), so a resumed run
    recomputes it and skips the batches already done.

    Pass it to ``DataLoader(batch_sampler=...)``; ``len()`` is the number of batches per epoch
    over all processes, which is at least ``ceil(num_samples / batch_size)``.
    """

    # Read by accelerate when it shards batch samplers across processes. batch_size is None
    # because batches vary in size: with an int, accelerate's BatchSamplerShard only hands out
    # a round of batches whose last batch is full, silently dropping every round that ends on
    # a bucket's short batch; with None it deals out whole batches of any size.
    batch_size = None
    drop_last = False

    def __init__(self, buckets_of_samples: Sequence[Bucket], batch_size: int, seed: int):
        super().__init__()
        if batch_size < 1:
            raise BucketError(f"The batch size must be at least 1, got {batch_size}.")
        if seed < 0:
            raise BucketError(f"The sampler seed must be zero or positive, got {seed}.")
        self.max_batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.buckets_of_samples = tuple(tuple(bucket) for bucket in buckets_of_samples)
        self._groups = _group_indices(self.buckets_of_samples)
        self._num_batches = sum(math.ceil(len(indices) / batch_size) for indices in self._groups)

    @property
    def sampler(self) -> BucketBatchSampler:
        # Once accelerate has wrapped this sampler for sharding, its DataLoader.set_epoch reaches
        # it only as ``batch_sampler.batch_sampler.sampler.set_epoch``; without this every epoch
        # on several processes would repeat epoch 0's order.
        return self

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order ``__iter__`` yields; accelerate's DataLoader.set_epoch calls this."""
        self.epoch = epoch

    def batches(self, epoch: int) -> list[list[int]]:
        """The batches of ``epoch`` in order; the same (seed, epoch) always gives the same list."""
        generator = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
        batches = []
        for indices in self._groups:
            shuffled = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
            batches += _chunks(shuffled, self.max_batch_size)
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches(self.epoch))

    def __len__(self) -> int:
        return self._num_batches


def _chunks(indices: list[int], size: int) -> list[list[int]]:
    return [indices[start : start + size] for start in range(0, len(indices), size)]


def _group_indices(buckets_of_samples: Sequence[Bucket]) -> tuple[tuple[int, ...], ...]:
    """Dataset indices per bucket, buckets in sorted order so grouping never depends on input order."""
    groups = collections.defaultdict(list)
    for index, bucket in enumerate(buckets_of_samples):
        groups[tuple(bucket)].append(index)
    return tuple(tuple(groups[bucket]) for bucket in sorted(groups))


def _epoch_seed(seed: int, epoch: int) -> int:
    # SeedSequence mixes the pair, so nearby (seed, epoch) pairs give unrelated streams,
    # unlike seed + epoch, where seed 1 epoch 0 would replay seed 0 epoch 1.
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0])
