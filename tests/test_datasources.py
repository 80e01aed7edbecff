"""Data sources: every form of training data gives what training sees from the parquet fixture."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import pytest
import torch
from conftest import RESOLUTION, train_argv

from controlnet_trainer import fixtures, streaming
from controlnet_trainer.cli import run
from controlnet_trainer.data import Columns, ControlNetDataset, DataError, PairedTransform
from controlnet_trainer.datasources import load_rows, load_train_dataset
from controlnet_trainer.settings import DataSettings
from controlnet_trainer.tracking import OPTIONS_FILE

COLUMNS = Columns("image", "conditioning_image", "text")
FILL_ROWS = 24  # conftest's assets["fill"]: 24 rows, 64 px, seed 0


def load(
    source: Path | str, columns: Columns = COLUMNS, *, flag: str = "--dataset_name", cache_dir: str | None = None
) -> datasets.Dataset:
    return load_rows(str(source), config_name=None, cache_dir=cache_dir, columns=columns, flag=flag)


def seen_by_training(rows: datasets.Dataset, columns: Columns = COLUMNS) -> list[dict]:
    dataset = ControlNetDataset(rows, columns, PairedTransform(RESOLUTION))
    return [dataset[index] for index in range(len(dataset))]


def assert_same_as_fill(rows: datasets.Dataset, assets, columns: Columns = COLUMNS) -> None:
    expected = seen_by_training(datasets.load_dataset(str(assets["fill"]))["train"])
    actual = seen_by_training(rows, columns)
    assert len(actual) == len(expected) == FILL_ROWS
    for got, want in zip(actual, expected):
        assert torch.equal(got["pixel_values"], want["pixel_values"])
        assert torch.equal(got["conditioning_pixel_values"], want["conditioning_pixel_values"])
        assert got["captions"] == want["captions"]


@pytest.fixture(scope="module")
def fill_folder(tmp_path_factory) -> Path:
    return fixtures.write_fill_folder(tmp_path_factory.mktemp("folder") / "fill", num_rows=FILL_ROWS, size=RESOLUTION)


def test_hub_style_parquet_folder_loads_as_before(assets):
    assert_same_as_fill(load(assets["fill"]), assets)


@pytest.mark.parametrize("metadata", ["jsonl", "csv"])
def test_metadata_folder_gives_the_same_rows(assets, tmp_path, metadata):
    folder = fixtures.write_fill_folder(tmp_path / "fill", num_rows=FILL_ROWS, size=RESOLUTION, metadata=metadata)
    rows = load(folder, flag="--train_data_dir")
    assert rows.features["conditioning_image"] == datasets.Image()
    assert_same_as_fill(rows, assets)


@pytest.mark.parametrize("dict_format", [True, False], ids=["DatasetDict", "Dataset"])
def test_saved_to_disk_gives_the_same_rows(assets, tmp_path, dict_format):
    saved = fixtures.write_fill_saved(tmp_path / "saved", num_rows=FILL_ROWS, size=RESOLUTION, dict_format=dict_format)
    assert_same_as_fill(load(saved), assets)


def test_saved_dataset_dict_needs_a_train_split(tmp_path):
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": ["a"]})}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError, match=r"no 'train' split \(it has \['test'\]\)"):
        load(tmp_path / "saved")


def test_relative_paths_resolve_against_the_folder_not_the_working_directory(
    assets, fill_folder, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    rows = load(fill_folder, flag="--train_data_dir")
    paths = rows.cast_column("conditioning_image", datasets.Image(decode=False))["conditioning_image"]
    assert [Path(p["path"]) for p in paths] == [
        fill_folder.resolve() / "conditioning" / f"{i}.png" for i in range(FILL_ROWS)
    ]
    assert_same_as_fill(rows, assets)


def test_fingerprint_follows_the_image_files(tmp_path):
    """Caches keyed by the fingerprint (--cache_latents) see an image replaced in place."""
    folder = fixtures.write_fill_folder(tmp_path / "fill", num_rows=4, size=16)
    first = load(folder)._fingerprint
    assert load(folder)._fingerprint == first
    fixtures.write_fill_folder(tmp_path / "other", num_rows=4, size=16, seed=1)
    shutil.copy(tmp_path / "other" / "images" / "2.png", folder / "images" / "2.png")
    assert load(folder)._fingerprint != first


def test_metadata_in_a_train_split_folder_and_absolute_paths(assets, fill_folder, tmp_path):
    split = tmp_path / "root" / "train"
    split.mkdir(parents=True)
    lines = (fill_folder / "metadata.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    for row in rows:
        row["image"] = str(fill_folder / row["image"])
    (split / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    shutil.copytree(fill_folder / "conditioning", split / "conditioning")
    assert_same_as_fill(load(tmp_path / "root", flag="--train_data_dir"), assets)


@pytest.mark.parametrize(
    "keys, columns",
    [
        (("target", "hint", "prompt"), Columns("target", "hint", "prompt")),
        (("file_name", "conditioning_file_name", "text"), COLUMNS),
        (("file_name", "conditioning_image_file_name", "text"), COLUMNS),
        (("file_name", "conditioning_file_name", "prompt"), Columns("photo", "edges", "prompt")),
    ],
)
def test_custom_and_imagefolder_column_names(assets, tmp_path, keys, columns):
    folder = fixtures.write_fill_folder(tmp_path / "fill", num_rows=FILL_ROWS, size=RESOLUTION, keys=keys)
    rows = load(folder, columns)
    assert rows.column_names == [columns.image, columns.conditioning_image, columns.caption]
    assert_same_as_fill(rows, assets, columns)


def test_missing_files_are_named_before_training(tmp_path):
    folder = fixtures.write_fill_folder(tmp_path / "fill", num_rows=6, size=16)
    (folder / "conditioning" / "3.png").unlink()
    (folder / "conditioning" / "5.png").unlink()
    with pytest.raises(DataError) as raised:
        load(folder)
    message = str(raised.value)
    assert "row 3 (line 4)" in message and "'conditioning/3.png'" in message
    assert "`conditioning_image`" in message and "2 of 12 image files" in message
    assert "--skip_bad_images" in message


def test_skip_missing_leaves_those_rows_out(tmp_path, caplog):
    folder = fixtures.write_fill_folder(tmp_path / "fill", num_rows=6, size=16)
    (folder / "images" / "1.png").unlink()
    (folder / "conditioning" / "4.png").unlink()
    rows = load_rows(str(folder), config_name=None, cache_dir=None, columns=COLUMNS, skip_missing=True)
    everything = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert rows["text"] == [row["text"] for index, row in enumerate(everything) if index not in (1, 4)]
    assert "row 1 (line 2)" in caplog.text and "Training on the other 4 rows" in caplog.text
    shutil.rmtree(folder / "images")
    with pytest.raises(DataError, match="nothing to train on"):
        load_rows(str(folder), config_name=None, cache_dir=None, columns=COLUMNS, skip_missing=True)


FULL_ROW = '{"image": "images/0.png", "conditioning_image": "conditioning/0.png", "text": "a"}\n'


@pytest.mark.parametrize(
    "lines, match",
    [
        ([], "lists no rows"),
        ([FULL_ROW, "not json\n"], "line 2 is not valid JSON"),
        ([FULL_ROW, '{"image": "images/0.png", "conditioning_image": "conditioning/0.png"}\n'], "row 1 .* no caption"),
        ([FULL_ROW, "\n", '{"image": "images/0.png", "text": "b"}\n'], r"row 1 \(line 3\) has no file path in `cond"),
    ],
)
def test_bad_metadata_is_explained(tmp_path, lines, match):
    folder = fixtures.write_fill_folder(tmp_path / "fill", num_rows=1, size=16)
    (folder / "metadata.jsonl").write_text("".join(lines))
    with pytest.raises(DataError, match=match):
        load(folder)


def test_nonexistent_paths_error_clearly(tmp_path, monkeypatch):
    missing = str(tmp_path / "nope")
    with pytest.raises(DataError) as raised:
        load(missing, flag="--train_data_dir")
    assert str(raised.value) == f"`--train_data_dir` points to {missing!r}, which does not exist. Check the path."
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"`--dataset_name` points to '\./nope', which does not exist"):
        load("./nope")
    with pytest.raises(DataError, match="`--train_data_dir` points to 'nope'"):
        load("nope", flag="--train_data_dir")


def test_a_metadata_file_may_be_named_directly_but_no_other_file(assets, fill_folder):
    assert_same_as_fill(load(fill_folder / "metadata.jsonl", flag="--train_data_dir"), assets)
    with pytest.raises(DataError, match=r"`--train_data_dir` points to the file .*0\.png'; point it at the folder"):
        load(fill_folder / "images" / "0.png", flag="--train_data_dir")


def test_config_name_is_refused_where_it_means_nothing(fill_folder):
    with pytest.raises(DataError, match="`--dataset_config_name=edges` has no meaning"):
        load_rows(str(fill_folder), config_name="edges", cache_dir=None, columns=COLUMNS)


def test_rebuilt_dataset_folder_with_configs_is_not_served_from_a_stale_cache(tmp_path):
    """datasets caches a folder whose README declares `configs:` by its name alone."""
    folder, cache = tmp_path / "captions", str(tmp_path / "cache")

    def build(text: str) -> None:
        shutil.rmtree(folder, ignore_errors=True)
        datasets.Dataset.from_dict({"text": [text]}).to_parquet(str(folder / "data" / "train-0.parquet"))
        (folder / "README.md").write_text(
            "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*\n---\n"
        )

    build("first")
    first = load(folder, cache_dir=cache)
    assert first["text"] == ["first"]
    assert load(folder, cache_dir=cache)._fingerprint == first._fingerprint
    build("second")
    second = load(folder, cache_dir=cache)
    assert second["text"] == ["second"]
    # Caches keyed by the fingerprint (--cache_latents) must not serve the old rows either.
    assert second._fingerprint != first._fingerprint
    assert load(folder, cache_dir=cache)._fingerprint == second._fingerprint


def test_trains_two_steps_on_a_metadata_folder(assets, fill_folder, tmp_path):
    """End to end through the CLI; needs datasources.load_train_dataset to call load_rows."""
    result = run(train_argv(assets, tmp_path, dataset_name=None, train_data_dir=fill_folder, max_train_steps=2))
    assert result.global_step == 2
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()


@pytest.fixture(scope="module")
def subsets(tmp_path_factory) -> Path:
    """One local dataset folder, three subsets: parquet a/ (8 rows) and b/ (5), metadata folder c/ (3)."""
    root = tmp_path_factory.mktemp("subsets") / "fill"
    fixtures.build_fill_dataset(root / "a", num_rows=8, size=16, seed=1)
    fixtures.build_fill_dataset(root / "b", num_rows=5, size=RESOLUTION, seed=2)
    fixtures.write_fill_folder(root / "c", num_rows=3, size=16, seed=3)
    return root


def flags(**values) -> DataSettings:
    """The data settings the loaders read; ``values`` override them."""
    return DataSettings(**{name: str(value) for name, value in values.items()})


def test_train_data_dir_beside_dataset_name_is_its_data_dir(subsets):
    """diffusers: load_dataset(--dataset_name, data_dir=--train_data_dir)."""
    subset_b = datasets.load_dataset(str(subsets / "b"))["train"]["text"]
    assert load_train_dataset(flags(dataset_name=subsets, train_data_dir="b"))["text"] == subset_b
    assert load_train_dataset(flags(dataset_name=subsets, train_data_dir=subsets / "b"))["text"] == subset_b
    # The stream reads the same subfolder.
    stream = streaming.load_stream(flags(dataset_name=subsets, train_data_dir="b"))
    assert [row["text"] for row in stream] == subset_b
    # A subfolder described by metadata.jsonl is read as such: its conditioning images are images.
    subset_c = load_train_dataset(flags(dataset_name=subsets, train_data_dir="c"))
    assert len(subset_c) == 3 and subset_c.features["conditioning_image"] == datasets.Image()
    # datasets' own idiom for a folder of images, with the metadata's conditioning images read too.
    from_imagefolder = load_train_dataset(flags(dataset_name="imagefolder", train_data_dir=subsets / "c"))
    assert from_imagefolder["text"] == subset_c["text"]
    assert from_imagefolder.features["conditioning_image"] == datasets.Image()
    with pytest.raises(DataError, match=r"`--train_data_dir=d` names the folder of `--dataset_name=.*fill` to load"):
        load_train_dataset(flags(dataset_name=subsets, train_data_dir="d"))


def test_trains_on_the_subfolder_train_data_dir_selects(assets, subsets, tmp_path):
    argv = train_argv(assets, tmp_path, dataset_name=subsets, train_data_dir="b", max_train_steps=1)
    assert run(argv).global_step == 1
    options = json.loads((tmp_path / OPTIONS_FILE).read_text())
    assert options["plan"]["num_samples"] == 5  # b/ alone: a/ has 8 rows, the whole folder 16
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
