"""Bad input ends in one paragraph that names the problem and the fix, before the models load.

Every run here is a real ``run(...)`` on the fixtures that stops before training; the check that
it stopped early is that no training_options.json was written (it is written once the models,
the optimizer and the loader are ready).
"""

from __future__ import annotations

from pathlib import Path

import datasets
import huggingface_hub
import pytest
from conftest import train_argv

from controlnet_trainer import fixtures
from controlnet_trainer.cli import run
from controlnet_trainer.errors import InputError
from controlnet_trainer.tracking import OPTIONS_FILE

FILL_ROWS = 24  # conftest's assets["fill"]


def refused(argv: list[str], match: str) -> str:
    """The run's one-paragraph refusal, checked to match and to come before training."""
    with pytest.raises(InputError, match=match) as raised:
        run(argv)
    message = str(raised.value)
    assert "\n" not in message
    output_dir = Path(next(arg for arg in argv if arg.startswith("--output_dir=")).split("=", 1)[1])
    assert not (output_dir / OPTIONS_FILE).exists()
    return message


@pytest.fixture(scope="module")
def bad_data(assets, tmp_path_factory) -> dict[str, Path]:
    """Small datasets that are each wrong in one way."""
    root = tmp_path_factory.mktemp("bad-data")
    fill = datasets.load_dataset(str(assets["fill"]))["train"]
    fill.select([]).to_parquet(str(root / "empty-parquet" / "data" / "train-00000-of-00001.parquet"))
    fill.select([0]).to_parquet(str(root / "one-row" / "data" / "train-00000-of-00001.parquet"))
    datasets.DatasetDict({"train": fill.select([])}).save_to_disk(str(root / "empty-saved"))
    (root / "no-data-files").mkdir()
    # Six rows, four with a corrupt image (the file is there, but it is not an image); three, all corrupt.
    for name, num_rows, corrupt in (("some-bad", 6, 4), ("all-bad", 3, 3)):
        folder = fixtures.write_fill_folder(root / name, num_rows=num_rows, size=16)
        for index in range(corrupt):
            (folder / "images" / f"{index}.png").write_bytes(b"not a png")
    names = ("empty-parquet", "one-row", "empty-saved", "no-data-files", "some-bad", "all-bad")
    return {name: root / name for name in names}


# Every way the training rows can come out empty: loading, --skip_bad_images
# (integrity.apply_scan), the fidelity probe's held-out rows (fidelity.heldout_rows), and the same
# for a stream. --max_train_samples cannot empty them: it must be at least 1 (test_arguments).
@pytest.mark.parametrize(
    "dataset, flags, match",
    [
        ("empty-parquet", {}, r"empty-parquet' has no rows in its train split"),
        ("empty-saved", {}, r"empty-saved' has no rows in its train split"),
        ("no-data-files", {}, r"no-data-files' has no data files .* Point the flag at the folder"),
        ("empty-parquet", {"streaming": True}, r"empty-parquet' has no rows in its train split"),
        ("all-bad", {"skip_bad_images": True}, r"--skip_bad_images left out every row: all 3 .* row 0"),
        (None, {"fidelity_samples": FILL_ROWS}, rf"has {FILL_ROWS} rows, too few to hold out {FILL_ROWS}"),
        (
            "some-bad",
            {"skip_bad_images": True, "fidelity_samples": 2},
            r"has 2 rows, too few to hold out 2 .*after --skip_bad_images left out",
        ),
        (
            None,
            {"fidelity_samples": FILL_ROWS, "streaming": True},
            rf"stream has only {FILL_ROWS} rows, too few to hold out --fidelity_samples={FILL_ROWS}",
        ),
        ("one-row", {"fidelity_samples": 2, "fidelity_dataset": "__fidelity__"}, r"has 1 row\(s\); .* at least 2"),
        ("all-bad", {"fidelity_samples": 2, "fidelity_dataset": "__fidelity__"}, r"row 0 has an unreadable image"),
    ],
    ids=[
        "no-rows",
        "saved-without-rows",
        "no-data-files",
        "empty-stream",
        "skip-bad-images-leaves-none",
        "held-out-takes-all",
        "held-out-takes-what-skipping-left",
        "stream-held-out-takes-all",
        "fidelity-dataset-of-one-row",
        "fidelity-dataset-unreadable",
    ],
)
def test_no_training_rows_is_one_paragraph_before_training(assets, bad_data, tmp_path, dataset, flags, match):
    flags = dict(flags)
    if flags.get("fidelity_dataset") == "__fidelity__":  # the bad data is the held-out set
        flags["fidelity_dataset"], dataset = bad_data[dataset], None
    data = {"dataset_name": bad_data[dataset]} if dataset else {}
    refused(train_argv(assets, tmp_path / "out", **data, **flags), match)


def test_more_max_train_samples_than_rows_trains_on_all_and_says_so(assets, tmp_path, caplog):
    result = run(train_argv(assets, tmp_path, max_train_samples=100, max_train_steps=1, dry_run=True))
    assert result.plan["plan"]["num_samples"] == FILL_ROWS
    assert f"--max_train_samples=100 is more than the {FILL_ROWS} training rows" in caplog.text


def test_config_name_the_dataset_lacks(assets, tmp_path):
    refused(
        train_argv(assets, tmp_path / "out", dataset_config_name="edges"),
        r"`--dataset_config_name=edges` is not a configuration of .*Available: \['default'\].*drop the flag",
    )


def test_unreachable_hub_dataset(assets, tmp_path, monkeypatch):
    """A hub id (or a local name without ./ that does not exist) that cannot load: offline here."""
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    refused(
        train_argv(assets, tmp_path / "out", dataset_name="nobody/no-such-dataset"),
        r"Dataset 'nobody/no-such-dataset' is not a local folder, and it could not be loaded from the Hub "
        r"\(.*\)\. A hub id needs the network or an earlier download in the cache",
    )


@pytest.mark.parametrize(
    ("flag", "asset", "match"),
    [
        ("tokenizer_name", "sd", r"`--tokenizer_name` .*tiny-sd' holds no tokenizer .* tokenizer/ subfolder"),
        ("pretrained_model_name_or_path", "fill", r"fill' is not a diffusers pipeline that can be read"),
        ("controlnet_model_name_or_path", "sd", r"Check --pretrained_model_name_or_path, --controlnet_model_name"),
    ],
)
def test_a_model_flag_pointing_at_the_wrong_folder(assets, tmp_path, flag, asset, match):
    refused(train_argv(assets, tmp_path / "out", **{flag: assets[asset]}), match)
