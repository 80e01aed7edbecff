"""Training data: loading, column checks, paired transforms, batching and prompt choice.

Workers only decode and transform (deterministic work). Every random choice about data,
which caption of a list and whether it is dropped, is made in the training loop from the
step's own generator, so it is drawn afresh every step, survives worker restarts and resumes
exactly.
"""

from __future__ import annotations

import dataclasses
import io
import logging
from collections.abc import Sequence

import datasets
import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from .buckets import Bucket, BucketGeometry, bucket_geometry, make_buckets, nearest_bucket
from .errors import InputError
from .settings import DataSettings

logger = logging.getLogger(__name__)


class DataError(InputError):
    """The dataset cannot be used as given; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class Columns:
    image: str
    conditioning_image: str
    caption: str


def check_captions(rows: datasets.Dataset, column: str) -> None:
    """Fail before training on rows without a caption (None, or an empty list), which would
    otherwise stop the run at the first batch that holds one."""
    missing = [index for index, cell in enumerate(column_values(rows, column)) if not is_caption(cell)]
    if missing:
        raise DataError(
            f"{len(missing)} row(s) have no caption in column `{column}`; the first is row {missing[0]}. "
            'Give every row a string or a non-empty list of strings (an empty string "" trains '
            "that row without a prompt), or leave those rows out of the dataset."
        )


def column_values(rows: datasets.Dataset, column: str) -> list:
    """One column as a list, read in arrow batches: iterating ``rows[column]`` goes row by row,
    about 200x slower (13 s for a million captions)."""
    batches = rows.select_columns([column]).iter(batch_size=10_000)
    return [value for batch in batches for value in batch[column]]


def is_caption(cell: object) -> bool:
    if isinstance(cell, str):
        return True
    return isinstance(cell, list) and bool(cell) and all(isinstance(item, str) for item in cell)


def columns_of(settings: DataSettings) -> Columns:
    return Columns(settings.image_column, settings.conditioning_image_column, settings.caption_column)


def check_columns(dataset: datasets.Dataset | datasets.IterableDataset, columns: Columns) -> None:
    """Fail before training if a column is missing or the captions are not text.

    A stream whose features are not declared is checked on its first row.
    """
    features = dataset.features
    if features is None:
        first = next(iter(dataset), None)
        if first is None:
            raise DataError("The dataset has no rows in its train split; add training data.")
        features = datasets.Features({name: _feature_of(value) for name, value in first.items()})
    names = list(features)
    for flag, name in (
        ("--image_column", columns.image),
        ("--conditioning_image_column", columns.conditioning_image),
        ("--caption_column", columns.caption),
    ):
        if name not in names:
            raise DataError(
                f"`{flag}` value {name!r} is not a column of the dataset; its columns are "
                f"{names}. Pass `{flag}=<one of those>`."
            )
    caption_feature = features[columns.caption]
    if not _is_text_feature(caption_feature):
        raise DataError(
            f"Caption column `{columns.caption}` should contain either strings or lists of "
            f"strings, but its type is {caption_feature}. Point `--caption_column` at the text."
        )


def _feature_of(value: object) -> object:
    """The feature a value of an undeclared stream stands for, as far as the checks need it."""
    if isinstance(value, str):
        return datasets.Value("string")
    if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        return datasets.List(datasets.Value("string"))
    return datasets.Value("null")


def _is_text_feature(feature: object) -> bool:
    if isinstance(feature, datasets.Value):
        return feature.dtype in ("string", "large_string")
    inner = getattr(feature, "feature", None)  # List / Sequence / LargeList
    return isinstance(inner, datasets.Value) and inner.dtype in ("string", "large_string")


def select_samples(dataset: datasets.Dataset, max_samples: int | None, seed: int) -> datasets.Dataset:
    """--max_train_samples: a seeded random subset, as diffusers takes it; all rows when there
    are no more than that."""
    if max_samples is None:
        return dataset
    if max_samples >= len(dataset):
        if max_samples > len(dataset):
            logger.warning(
                "--max_train_samples=%d is more than the %d training rows; training on all of them.",
                max_samples,
                len(dataset),
            )
        return dataset
    return dataset.shuffle(seed=seed).select(range(max_samples))


def to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """RGB for any PIL mode: 16-bit is rescaled (not clipped), transparency is composited."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        pixels = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
        image = Image.fromarray(np.clip(pixels / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        canvas = Image.new("RGBA", image.size, background + (255,))
        return Image.alpha_composite(canvas, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


@dataclasses.dataclass(frozen=True)
class PairedTransform:
    """Resize (short side to ``resolution``) + centre crop, identical for image and conditioning.

    The geometry is computed once from the image's size and applied to both, so outlines stay on
    the edges they describe even when the conditioning image is stored at another size; SDXL's
    time ids report the crop actually made. With aspect-ratio buckets the image is resized to
    cover its bucket and centre-cropped to it instead of to the square.
    """

    resolution: int
    interpolation: v2.InterpolationMode = v2.InterpolationMode.BILINEAR

    def geometry(self, height: int, width: int, bucket: Bucket | None = None) -> BucketGeometry:
        # Covering a square bucket is torchvision's resize of the short side plus centre crop.
        return bucket_geometry(height, width, bucket or (self.resolution, self.resolution))

    def _place(self, image: Image.Image, geometry: BucketGeometry) -> torch.Tensor:
        resized = F.resize(
            F.to_image(image), list(geometry.resized_size), interpolation=self.interpolation, antialias=True
        )
        cropped = F.crop(resized, *geometry.crop_top_left, *geometry.crop_size)
        return F.to_dtype(cropped, torch.float32, scale=True)

    def __call__(self, image: Image.Image, conditioning: Image.Image, bucket: Bucket | None = None) -> dict:
        geometry = self.geometry(image.height, image.width, bucket)
        return self.conditioning_only(conditioning, geometry) | {
            "pixel_values": self._place(image, geometry) * 2.0 - 1.0
        }

    def conditioning_only(self, conditioning: Image.Image, geometry: BucketGeometry) -> dict:
        """Everything but the target image, for runs whose latents are cached."""
        return {
            "conditioning_pixel_values": self._place(conditioning, geometry),
            "original_size": geometry.original_size,
            "crop_top_left": geometry.crop_top_left,
            "target_size": geometry.crop_size,
        }


class ControlNetDataset(torch.utils.data.Dataset):
    """Rows of a datasets.Dataset as tensors; captions always come back as a list.

    With ``with_image=False`` the target image is never decoded (its latents are cached): only
    its header is read, for the geometry.
    """

    def __init__(
        self,
        rows: datasets.Dataset,
        columns: Columns,
        transform: PairedTransform,
        *,
        with_image: bool = True,
        buckets: Sequence[Bucket] | None = None,
    ):
        if not with_image:
            rows = undecoded(rows, [columns.image])
        self.rows = rows
        self.columns = columns
        self.transform = transform
        self.with_image = with_image
        self.buckets = buckets  # each row's, with --aspect_ratio_buckets

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        bucket = None if self.buckets is None else self.buckets[index]
        return make_sample(
            self.rows[index], index, self.columns, self.transform, with_image=self.with_image, bucket=bucket
        )


def make_sample(
    row: dict,
    index: int,
    columns: Columns,
    transform: PairedTransform,
    *,
    with_image: bool = True,
    bucket: Bucket | None = None,
) -> dict:
    """One row as tensors; ``index`` identifies the sample to the step's random draws."""
    # Photos with transparency usually sit on white; control maps (edges, poses) on black.
    conditioning = to_rgb(open_image(row[columns.conditioning_image]), (0, 0, 0))
    image = open_image(row[columns.image])
    if with_image:
        sample = transform(to_rgb(image, (255, 255, 255)), conditioning, bucket)
    else:
        sample = transform.conditioning_only(conditioning, transform.geometry(image.height, image.width, bucket))
    sample["captions"] = caption_options(row[columns.caption])
    sample["index"] = index
    return sample


def assign_buckets(
    rows: datasets.Dataset, settings: DataSettings, indices: Sequence[int] | None = None
) -> list[Bucket]:
    """The aspect-ratio bucket (--aspect_ratio_buckets) of each row of ``indices`` (all by
    default), from its image's size."""
    choices = make_buckets(settings.resolution)
    sizes = image_sizes(rows, settings.image_column, num_workers=settings.dataloader_num_workers, indices=indices)
    return [nearest_bucket(height, width, choices) for height, width in sizes]


def image_sizes(
    rows: datasets.Dataset, column: str, *, num_workers: int, indices: Sequence[int] | None = None
) -> list[tuple[int, int]]:
    """(height, width) of the image of each row of ``indices`` (all by default), from the headers."""
    sizes = torch.utils.data.Subset(_ImageSizes(rows, column), range(len(rows)) if indices is None else indices)
    loader = torch.utils.data.DataLoader(sizes, batch_size=None, num_workers=num_workers)
    return [tuple(size) for size in loader]


class _ImageSizes(torch.utils.data.Dataset):
    def __init__(self, rows: datasets.Dataset, column: str):
        self.rows = undecoded(rows, [column]).select_columns([column])
        self.column = column

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[int, int]:
        image = open_image(self.rows[index][self.column])  # lazy: PIL reads the header only
        return image.height, image.width


def undecoded(rows, names: Sequence[str]):
    """``rows`` (a Dataset or a stream) with the image columns ``names`` as undecoded bytes/paths:
    for reading only headers, skipping rows cheaply, or reporting a corrupt file ourselves."""
    for name in names:
        if isinstance((rows.features or {}).get(name), datasets.Image):
            rows = rows.cast_column(name, datasets.Image(decode=False))
    return rows


def caption_options(cell: str | Sequence[str]) -> list[str]:
    """A caption cell as a list: one string, or the several a row may carry."""
    if not is_caption(cell):  # a stream's rows are not checked before training
        raise DataError(f"a caption must be a string or a non-empty list of strings, not {cell!r}")
    return [cell] if isinstance(cell, str) else list(cell)


def open_image(value: object) -> Image.Image:
    """An image cell as PIL: decoded Image features pass through, undecoded ones ({bytes, path})
    and path strings are opened (lazily: PIL reads pixels only when they are used)."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, str):
        return Image.open(value)
    if isinstance(value, dict) and value.get("bytes"):
        return Image.open(io.BytesIO(value["bytes"]))
    if isinstance(value, dict) and value.get("path"):
        return Image.open(value["path"])
    raise DataError(f"Expected an image or an image path, got {type(value).__name__}.")


def collate(samples: Sequence[dict]) -> dict:
    batch = {
        "conditioning_pixel_values": torch.stack([s["conditioning_pixel_values"] for s in samples]).contiguous(),
        "original_size": torch.tensor([s["original_size"] for s in samples]),
        "crop_top_left": torch.tensor([s["crop_top_left"] for s in samples]),
        "target_size": torch.tensor([s["target_size"] for s in samples]),
        "captions": [s["captions"] for s in samples],
        # A list stays on the host when Accelerate moves the batch: reading it never waits for the GPU.
        "index": [int(s["index"]) for s in samples],
    }
    if "pixel_values" in samples[0]:
        batch["pixel_values"] = torch.stack([s["pixel_values"] for s in samples]).contiguous()
    return batch


def make_dataloader(
    dataset: torch.utils.data.Dataset,
    *,
    batch_size: int,
    num_workers: int,
    batch_sampler: torch.utils.data.Sampler | None = None,
) -> torch.utils.data.DataLoader:
    """Shuffled loader; its order is a function of the seed and the epoch: Accelerate's seedable
    sampler's, or the bucket sampler's (``batch_sampler``) with --aspect_ratio_buckets."""
    batching = {"batch_sampler": batch_sampler} if batch_sampler else {"batch_size": batch_size, "shuffle": True}
    return torch.utils.data.DataLoader(
        dataset,
        **batching,
        collate_fn=collate,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


def stop_workers(loader: torch.utils.data.DataLoader) -> None:
    """End a loader's persistent worker processes now, not whenever garbage collection frees it.

    A prepared loader sits in reference cycles (Accelerate's objects), so its workers outlive
    training. With pinned memory, PyTorch 2.11 then waits 5 s for each at exit before killing it
    (pytorch/pytorch#81794): 40 s with 8 workers, measured on an H100; 2.14 shuts them down at exit
    instead. PyTorch has no public call for this, so this uses the one its garbage collection calls.
    """
    base = getattr(loader, "base_dataloader", loader)  # the torch loader inside Accelerate's wrapper
    iterator = getattr(base, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
        base._iterator = None


def choose_caption(options: Sequence[str], proportion_empty: float, generator: torch.Generator) -> int:
    """Index of the caption to use (random among several), or -1 for the empty prompt, which
    replaces the caption with probability ``proportion_empty``."""
    pick = int(torch.randint(len(options), (1,), generator=generator)) if len(options) > 1 else 0
    dropped = float(torch.rand((), generator=generator)) < proportion_empty
    return -1 if dropped else pick


def caption_text(options: Sequence[str], pick: int) -> str:
    """The prompt a ``choose_caption`` result stands for."""
    return "" if pick < 0 else options[pick]
