"""Data: column checks, image modes, paired transforms, and prompt choice."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from controlnet_trainer.data import (
    Columns,
    DataError,
    PairedTransform,
    caption_options,
    caption_text,
    check_captions,
    check_columns,
    choose_caption,
    collate,
    to_rgb,
)
from controlnet_trainer.datasources import load_train_dataset
from controlnet_trainer.settings import DataSettings

COLUMNS = Columns("image", "conditioning_image", "text")


def tiny_dataset(text) -> datasets.Dataset:
    image = Image.new("RGB", (8, 8))
    return datasets.Dataset.from_dict({"image": [image], "conditioning_image": [image], "text": [text]}).cast_column(
        "image", datasets.Image()
    )


def test_missing_column_names_the_flag_and_the_columns():
    dataset = tiny_dataset("a").rename_column("conditioning_image", "edges")
    with pytest.raises(
        DataError, match=r"`--conditioning_image_column`.*'conditioning_image'.*\['image', 'edges', 'text'\]"
    ):
        check_columns(dataset, COLUMNS)


def test_caption_column_must_be_text():
    check_columns(tiny_dataset("a"), COLUMNS)
    check_columns(tiny_dataset(["a", "b"]), COLUMNS)
    with pytest.raises(DataError, match="strings or lists of strings"):
        check_columns(tiny_dataset(3), COLUMNS)


def loading_args(dataset: Path) -> DataSettings:
    """The data settings load_train_dataset reads, for a local dataset folder."""
    return DataSettings(dataset_name=str(dataset))


def rows_with_captions(captions) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"text": captions})


def test_rows_without_a_caption_are_named_before_training(tmp_path):
    check_captions(rows_with_captions(["a", "", "b"]), "text")  # "" is a prompt-free sample
    with pytest.raises(DataError, match=r"1 row\(s\) have no caption in column `text`; the first is row 1"):
        check_captions(rows_with_captions(["a", None, "b"]), "text")
    with pytest.raises(DataError, match=r"2 row\(s\) .* the first is row 1"):
        check_captions(rows_with_captions([["a"], [], ["b", None]]), "text")
    # A stream is not checked before training: its rows fail (or are skipped) one by one.
    with pytest.raises(DataError, match="non-empty list of strings, not None"):
        caption_options(None)
    # Wired into loading: a parquet dataset with a missing caption fails there.
    image = Image.new("RGB", (8, 8))
    rows = {"image": [image, image], "conditioning_image": [image, image], "text": ["a", None]}
    datasets.Dataset.from_dict(rows).to_parquet(tmp_path / "data" / "train.parquet")
    with pytest.raises(DataError, match="the first is row 1"):
        load_train_dataset(loading_args(tmp_path / "data"))


def test_nonexistent_dataset_path_and_empty_dataset(tmp_path):
    empty = tiny_dataset("a").select([])
    empty.to_parquet(tmp_path / "empty" / "train.parquet")
    args = loading_args(tmp_path / "empty")
    with pytest.raises(DataError, match="no rows"):
        load_train_dataset(args)
    with pytest.raises(DataError, match="`--dataset_name` points to .*does not exist"):
        load_train_dataset(dataclasses.replace(args, dataset_name=str(tmp_path / "nope")))


def marker_image(size: tuple[int, int], box: tuple[int, int, int, int], colour) -> Image.Image:
    array = np.zeros((size[1], size[0], 3), np.uint8)
    left, top, right, bottom = box
    array[top:bottom, left:right] = colour
    return Image.fromarray(array)


@pytest.mark.parametrize("size", [(96, 64), (64, 128), (64, 64)])
def test_transform_keeps_image_and_conditioning_aligned(size):
    """A marker at the same place in both images lands on the same pixels after resize + crop."""
    box = (size[0] // 2 - 6, size[1] // 2 - 4, size[0] // 2 + 2, size[1] // 2 + 8)
    image = marker_image(size, box, (255, 0, 0))
    # The conditioning image is stored at twice the size: it must still follow the image.
    conditioning = marker_image((size[0] * 2, size[1] * 2), tuple(v * 2 for v in box), (255, 255, 255))
    out = PairedTransform(32)(image, conditioning)
    pixels, cond = out["pixel_values"], out["conditioning_pixel_values"]
    assert pixels.shape == cond.shape == (3, 32, 32)
    assert pixels.min() >= -1 and pixels.max() <= 1 and cond.min() >= 0 and cond.max() <= 1
    image_mask = pixels[0] > 0  # red channel above mid-grey
    cond_mask = cond[0] > 0.5
    assert image_mask.any()
    overlap = (image_mask & cond_mask).sum() / (image_mask | cond_mask).sum()
    assert overlap > 0.9


def test_transform_reports_the_crop_it_made():
    out = PairedTransform(64)(Image.new("RGB", (200, 100)), Image.new("RGB", (200, 100)))
    # Resized to 128x64 (short side 64), centre crop 64 wide starts at column 32.
    assert out["original_size"] == (100, 200)
    assert out["crop_top_left"] == (0, 32)
    out = PairedTransform(64)(Image.new("RGB", (100, 300)), Image.new("RGB", (100, 300)))
    assert out["original_size"] == (300, 100) and out["crop_top_left"] == (64, 0)


def test_to_rgb_converts_every_mode_correctly():
    # 16-bit greyscale is rescaled, not clipped to white: 128 * 257 is mid-grey 128.
    sixteen = Image.fromarray(np.array([[0, 128 * 257, 65535]], np.uint16))
    assert np.asarray(to_rgb(sixteen, (0, 0, 0)))[0, :, 0].tolist() == [0, 128, 255]
    grey = Image.new("L", (4, 4), 77)
    assert np.asarray(to_rgb(grey, (0, 0, 0)))[0, 0].tolist() == [77, 77, 77]
    transparent = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert np.asarray(to_rgb(transparent, (255, 255, 255)))[0, 0].tolist() == [255, 255, 255]
    assert np.asarray(to_rgb(transparent, (0, 0, 0)))[0, 0].tolist() == [0, 0, 0]
    opaque = Image.new("RGBA", (4, 4), (10, 20, 30, 255))
    assert np.asarray(to_rgb(opaque, (255, 255, 255)))[0, 0].tolist() == [10, 20, 30]
    palette = Image.new("P", (4, 4), 3)
    palette.putpalette([0, 0, 0] * 3 + [1, 2, 3] + [0, 0, 0] * 252)
    assert np.asarray(to_rgb(palette, (0, 0, 0)))[0, 0].tolist() == [1, 2, 3]


def choose_prompts(captions, proportion_empty: float, generator: torch.Generator) -> list[str]:
    """Prompts for many samples drawn from one generator, as the tests below need."""
    return [caption_text(options, choose_caption(options, proportion_empty, generator)) for options in captions]


def test_prompt_dropout_rate_and_determinism():
    captions = [["red circle"]] * 4000
    prompts = choose_prompts(captions, 0.25, torch.Generator().manual_seed(0))
    assert abs(prompts.count("") / len(prompts) - 0.25) < 0.03
    assert prompts == choose_prompts(captions, 0.25, torch.Generator().manual_seed(0))
    assert prompts != choose_prompts(captions, 0.25, torch.Generator().manual_seed(1))
    assert "" not in choose_prompts(captions, 0.0, torch.Generator().manual_seed(0))


def test_caption_lists_pick_each_option():
    prompts = choose_prompts([["a", "b", "c"]] * 300, 0.0, torch.Generator().manual_seed(0))
    assert set(prompts) == {"a", "b", "c"}


def test_collate_stacks_and_keeps_caption_lists():
    sample = PairedTransform(16)(Image.new("RGB", (16, 16)), Image.new("RGB", (16, 16)))
    batch = collate([sample | {"captions": ["x"], "index": 3}, sample | {"captions": ["y", "z"], "index": 5}])
    assert batch["pixel_values"].shape == (2, 3, 16, 16)
    assert batch["captions"] == [["x"], ["y", "z"]] and batch["index"] == [3, 5]
    assert batch["original_size"].tolist() == [[16, 16], [16, 16]]


def dataset_with_files(tmp_path, sizes, broken: dict[int, bytes]) -> datasets.Dataset:
    """Rows whose images are files on disk; ``broken`` replaces some files' bytes."""
    paths = []
    for index, size in enumerate(sizes):
        path = tmp_path / f"{index}.png"
        Image.new("RGB", size, (index * 10, 0, 0)).save(path)
        if index in broken:
            path.write_bytes(broken[index])
        paths.append(str(path))
    return datasets.Dataset.from_dict({"image": paths, "conditioning_image": paths, "text": ["a"] * len(paths)})


def test_corrupt_and_truncated_images_fail_with_row_and_file(tmp_path):
    from controlnet_trainer.integrity import apply_scan, scan_images

    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64)).save(good)
    truncated = good.read_bytes()[:-200]
    rows = dataset_with_files(tmp_path, [(64, 64)] * 5, {2: truncated, 4: b"not an image"})
    report = scan_images(rows, COLUMNS, resolution=64, num_workers=0)
    assert sorted({p.row for p in report.problems}) == [2, 4]
    with pytest.raises(
        DataError, match=r"2 row\(s\) have unreadable images; the first is row 2.*2\.png.*--skip_bad_images"
    ):
        apply_scan(rows, report, skip_bad=False, resolution=64)
    kept = apply_scan(rows, report, skip_bad=True, resolution=64)
    assert [Path(p).name for p in kept["image"]] == ["0.png", "1.png", "3.png"]


def test_small_images_are_counted(tmp_path):
    from controlnet_trainer.integrity import scan_images

    rows = dataset_with_files(tmp_path, [(64, 64), (40, 100), (100, 30)], {})
    assert scan_images(rows, COLUMNS, resolution=64, num_workers=0).small_images == 2
