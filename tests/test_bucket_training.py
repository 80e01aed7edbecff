"""--aspect_ratio_buckets in training: wide and tall images keep their shape, image and
conditioning are cropped alike, SDXL's time ids describe the bucket, and resume is exact."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import settings_of, step_records, straight_and_resumed, train_argv
from safetensors.torch import load_file

from controlnet_trainer import data, fixtures
from controlnet_trainer.arguments import ArgumentError
from controlnet_trainer.cli import run
from controlnet_trainer.families.sdxl import time_ids as sdxl_time_ids

RESOLUTION = 128  # buckets (64, 128), (128, 64) and (128, 128)
COLUMNS = data.Columns("image", "conditioning_image", "text")


@pytest.fixture(scope="module")
def mixed_shapes(tmp_path_factory) -> Path:
    """16 fill rows 128 px high, each 256 or 64 px wide (drawn at random)."""
    return fixtures.build_fill_dataset(
        tmp_path_factory.mktemp("mixed") / "fill", num_rows=16, size=RESOLUTION, aspect_ratios=(2.0, 0.5)
    )


def test_rows_keep_their_shape_and_outlines_stay_on_the_circle(mixed_shapes):
    rows = datasets.load_dataset(str(mixed_shapes))["train"]
    args = train_argv_namespace(mixed_shapes)
    assigned = data.assign_buckets(rows, args)
    sizes = [(image.height, image.width) for image in rows["image"]]
    assert set(assigned) == {(64, 128), (128, 64)}
    for (height, width), bucket in zip(sizes, assigned, strict=True):
        assert (bucket[1] > bucket[0]) == (width > height)  # wide stays wide, tall stays tall
    dataset = data.ControlNetDataset(rows, COLUMNS, data.PairedTransform(RESOLUTION), buckets=assigned)
    for index in range(4):
        sample = dataset[index]
        assert tuple(sample["pixel_values"].shape[1:]) == assigned[index] == sample["target_size"]
        # The outline (white) lies where the image changes colour: on the circle's edge.
        outline = sample["conditioning_pixel_values"].mean(0) > 0.25
        edges = edge_map(sample["pixel_values"])
        assert edges[outline].mean() > 5 * edges[~outline].mean()


def edge_map(pixels: torch.Tensor) -> torch.Tensor:
    """Colour change to the neighbouring pixels, per pixel."""
    padded = torch.nn.functional.pad(pixels, (1, 1, 1, 1), mode="replicate")
    dy = (padded[:, 2:, 1:-1] - padded[:, :-2, 1:-1]).abs().sum(0)
    dx = (padded[:, 1:-1, 2:] - padded[:, 1:-1, :-2]).abs().sum(0)
    return dx + dy


def train_argv_namespace(dataset: Path):
    """The data settings of a bucketed run on ``dataset``."""
    return settings_of(
        [f"--pretrained_model_name_or_path={dataset}", f"--dataset_name={dataset}", f"--resolution={RESOLUTION}"]
        + ["--aspect_ratio_buckets"]
    ).data


def test_sdxl_time_ids_describe_the_bucket_and_crop(mixed_shapes):
    rows = datasets.load_dataset(str(mixed_shapes))["train"]
    assigned = data.assign_buckets(rows, train_argv_namespace(mixed_shapes))
    dataset = data.ControlNetDataset(rows, COLUMNS, data.PairedTransform(RESOLUTION), buckets=assigned)
    wide = next(i for i, bucket in enumerate(assigned) if bucket == (64, 128))
    batch = data.collate([dataset[wide]])
    time_ids = sdxl_time_ids(batch["original_size"], batch["crop_top_left"], batch["target_size"])
    # A 128 x 256 image covers the 64 x 128 bucket when halved: no crop at all.
    assert time_ids.tolist() == [[128, 256, 0, 0, 64, 128]]


def test_bucketed_run_resumes_exactly(assets, mixed_shapes, tmp_path):
    common = dict(dataset_name=mixed_shapes, resolution=RESOLUTION, aspect_ratio_buckets=True, max_train_steps=6)
    straight, resumed = straight_and_resumed(assets, tmp_path, 3, **common)
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)
    # Each bucket's last batch may be short, so an epoch has more batches than 16 / 4.
    options = json.loads((tmp_path / "resumed" / "training_options.json").read_text())
    shapes = [(image.height, image.width) for image in datasets.load_dataset(str(mixed_shapes))["train"]["image"]]
    wide = sum(width > height for height, width in shapes)
    assert options["plan"]["batches_per_epoch"] == -(-wide // 4) + -(-(16 - wide) // 4)


def test_sdxl_trains_on_non_square_buckets(sdxl_assets, mixed_shapes, tmp_path):
    result = run(
        train_argv(
            sdxl_assets,
            tmp_path,
            sdxl=True,
            dataset_name=mixed_shapes,
            resolution=RESOLUTION,
            aspect_ratio_buckets=True,
            max_train_steps=2,
        ),
        family="sdxl",
    )
    assert result.global_step == 2
    weights = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    assert all(np.isfinite(tensor.numpy()).all() for tensor in weights.values())


def test_bucketed_latents_are_cached_per_bucket(assets, mixed_shapes, tmp_path):
    """A cached bucketed run follows the uncached one; the cache holds one array per bucket."""
    flags = dict(
        dataset_name=mixed_shapes,
        resolution=RESOLUTION,
        aspect_ratio_buckets=True,
        train_batch_size=2,
        max_train_steps=4,
    )
    run(train_argv(assets, tmp_path / "plain", **flags))
    cache_root = tmp_path / "cache"
    run(train_argv(assets, tmp_path / "cached", cache_latents=True, embeddings_cache_dir=cache_root, **flags))
    assert losses(tmp_path / "cached") == pytest.approx(losses(tmp_path / "plain"), rel=1e-5)
    (cache_dir,) = [p for p in cache_root.iterdir() if (p / "complete.json").exists()]
    arrays = [np.load(path) for path in cache_dir.glob("latent_mean_*.npy")]
    assert sorted(a.shape[2:] for a in arrays) == [(8, 16), (16, 8)]  # the buckets at 1/8 scale
    assert sum(len(a) for a in arrays) == 16  # every row once


def losses(output_dir: Path) -> list[float]:
    return [record["loss"] for record in step_records(output_dir)]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (dict(resolution=96), "multiple of 64.*--resolution=128"),
        (dict(streaming=True), "cannot be combined with `--streaming`"),
    ],
)
def test_bucket_flag_conflicts_are_refused(assets, tmp_path, flags, message):
    with pytest.raises(ArgumentError, match=message):
        run(train_argv(assets, tmp_path, aspect_ratio_buckets=True, **flags))
