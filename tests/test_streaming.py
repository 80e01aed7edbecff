"""--streaming and WebDataset shards: the stream is read in a fixed order, shared out between
ranks and workers without overlap, and a stopped run resumes exactly where it was."""

from __future__ import annotations

import gc
import hashlib
import json
from pathlib import Path

import datasets
import pytest
import torch
from conftest import RESOLUTION, train_argv

from controlnet_trainer import data, datasources, fixtures, streaming
from controlnet_trainer.arguments import ArgumentError
from controlnet_trainer.cli import run

COLUMNS = data.Columns("image", "conditioning_image", "text")
ROWS = 24


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """The 24 fill rows of the session fixture as three tar shards."""
    return fixtures.write_fill_webdataset(
        tmp_path_factory.mktemp("webdataset"), num_rows=ROWS, size=RESOLUTION, rows_per_shard=10
    )


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(output_dir / "diffusion_pytorch_model.safetensors")


def stream_of(source: Path) -> datasets.IterableDataset:
    return datasources.load_stream(
        str(source), config_name=None, cache_dir=None, columns=COLUMNS, flag="--dataset_name"
    )


def source_of(stream, *, rank=0, num_processes=1, num_workers=0, batch_size=4, whole_shards_allowed=False):
    return streaming.StreamBatches(
        stream=data.undecoded(stream, [COLUMNS.image, COLUMNS.conditioning_image]),
        columns=COLUMNS,
        transform=data.PairedTransform(RESOLUTION),
        batch_size=batch_size,
        rank=rank,
        num_processes=num_processes,
        num_workers=num_workers,
        seed=0,
        shuffle_buffer_size=8,
        skip_bad_images=False,
        whole_shards_allowed=whole_shards_allowed,
    )


def loaded_batches(stream, *, epoch=0, skip=0, **source) -> list[dict]:
    batches, _ = source_of(stream, **source).epoch(epoch, skip)
    return list(batches)


def batches_of(stream, *, epoch=0, skip=0, **source) -> list[list]:
    """(stream position, caption) of each sample of each batch a rank's loader yields."""
    batches = loaded_batches(stream, epoch=epoch, skip=skip, **source)
    return [list(zip(batch["index"], batch["captions"], strict=True)) for batch in batches]


def fingerprint(conditioning: torch.Tensor) -> str:
    return hashlib.sha256(conditioning.numpy().tobytes()).hexdigest()


def test_webdataset_shards_load_with_the_default_column_names(shards, assets):
    """``<key>.image.png`` answers to --image_column=image; the rows are the fill rows."""
    rows = datasources.load_rows(str(shards), config_name=None, cache_dir=None, columns=COLUMNS)
    data.check_columns(rows, COLUMNS)
    expected = datasets.load_dataset(str(assets["fill"]))["train"]
    assert rows["text"] == expected["text"]
    assert rows[5]["conditioning_image"].tobytes() == expected[5]["conditioning_image"].tobytes()
    streamed = stream_of(shards)
    data.check_columns(streamed, COLUMNS)
    assert [row["text"] for row in streamed] == expected["text"]


def test_stream_order_is_fixed_by_seed_and_epoch_whatever_the_workers(shards, assets):
    stream = stream_of(shards)
    single = batches_of(stream)
    samples = [sample for batch in single for sample in batch]
    assert [position for position, _ in samples] == list(range(ROWS))
    expected = datasets.load_dataset(str(assets["fill"]))["train"]["text"]
    assert sorted(caption for _, [caption] in samples) == sorted(expected)  # every row once
    assert [caption for _, [caption] in samples] != expected  # shuffled
    assert batches_of(stream, num_workers=2) == single
    assert batches_of(stream, epoch=1) != single  # reshuffled every epoch
    assert batches_of(stream, skip=2, num_workers=2) == single[2:]


def test_ranks_take_disjoint_blocks_and_the_same_number_of_batches(shards):
    stream = stream_of(shards)
    ranks = [batches_of(stream, rank=rank, num_processes=2, batch_size=5) for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == ROWS // 10  # the incomplete last round is left out
    seen = [position for rank in ranks for batch in rank for position, _ in batch]
    assert sorted(seen) == list(range(20))


@pytest.fixture(scope="module")
def four_shards(tmp_path_factory) -> Path:
    """24 fill rows as four tar shards of 7, 7, 7 and 3 rows."""
    return fixtures.write_fill_webdataset(
        tmp_path_factory.mktemp("four-shards"), num_rows=ROWS, size=RESOLUTION, rows_per_shard=7
    )


def test_ranks_read_whole_shards_of_their_own_when_the_shard_count_allows(four_shards):
    stream = stream_of(four_shards)
    undecoded = data.undecoded(stream, [COLUMNS.image, COLUMNS.conditioning_image])
    transform = data.PairedTransform(RESOLUTION)
    shard_of = {
        fingerprint(data.make_sample(row, index, COLUMNS, transform)["conditioning_pixel_values"]): index // 7
        for index, row in enumerate(undecoded)
    }
    assert len(shard_of) == ROWS

    def read(rank: int, epoch: int = 0, skip: int = 0, whole_shards_allowed: bool = True) -> list[dict]:
        return loaded_batches(
            stream,
            rank=rank,
            num_processes=2,
            batch_size=2,
            epoch=epoch,
            skip=skip,
            whole_shards_allowed=whole_shards_allowed,
        )

    assignments = []
    for epoch in range(3):
        ranks = [read(rank, epoch) for rank in (0, 1)]
        rows = [[fingerprint(c) for batch in rank for c in batch["conditioning_pixel_values"]] for rank in ranks]
        shards = [{shard_of[row] for row in rank_rows} for rank_rows in rows]
        assert len(shards[0]) == len(shards[1]) == 2 and not shards[0] & shards[1]
        for rank_rows, rank_shards in zip(rows, shards, strict=True):
            in_shards = sum(7 if shard < 3 else 3 for shard in rank_shards)
            assert len(set(rank_rows)) == len(rank_rows) == in_shards - in_shards % 2  # whole batches of them
        positions = [{i for batch in rank for i in batch["index"]} for rank in ranks]
        assert not positions[0] & positions[1]  # each sample's random draws are its own
        assignments.append(shards[0])
    assert len({frozenset(a) for a in assignments}) > 1  # the shards are dealt out anew each epoch
    # Resuming skips the batches already trained on: the rest is the same.
    whole = [batch["index"] for batch in read(1)]
    assert [batch["index"] for batch in read(1, skip=2)] == whole[2:]
    # Without whole shards a rank keeps its block of every round, from every shard.
    mixed = read(0, whole_shards_allowed=False)
    assert len({shard_of[fingerprint(c)] for batch in mixed for c in batch["conditioning_pixel_values"]}) > 2


def test_streaming_run_resumes_exactly(assets, shards, tmp_path):
    """8 steps over 6-batch epochs: stopped mid-epoch with 2 workers, resumed, bit-identical to a
    straight run without workers."""
    common = dict(dataset_name=shards, streaming=True, max_train_steps=8, shuffle_buffer_size=8)
    run(train_argv(assets, tmp_path / "straight", **common))
    stopped = run(train_argv(assets, tmp_path / "resumed", stop_at_step=3, dataloader_num_workers=2, **common))
    assert stopped.stopped_early
    state = json.loads((tmp_path / "resumed" / "checkpoint-3" / "training_state.json").read_text())
    assert (state["epoch"], state["batch_in_epoch"]) == (0, 3)
    run(train_argv(assets, tmp_path / "resumed", resume_from_checkpoint="latest", dataloader_num_workers=2, **common))
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)


def test_max_train_samples_sets_the_epoch_length_of_a_stream(assets, tmp_path):
    run(train_argv(assets, tmp_path, streaming=True, max_train_samples=8, max_train_steps=5, checkpointing_steps=5))
    state = json.loads((tmp_path / "checkpoint-5" / "training_state.json").read_text())
    # 2 batches per epoch: after 5 steps, epochs 0 and 1 are done and epoch 2 is half through.
    assert (state["epoch"], state["batch_in_epoch"]) == (2, 1)
    options = json.loads((tmp_path / "training_options.json").read_text())
    assert options["plan"]["num_samples"] == 8


def test_bad_image_in_a_stream_names_its_row_or_is_skipped(assets, tmp_path):
    rows = datasets.load_dataset(str(assets["fill"]))["train"].cast_column("image", datasets.Image(decode=False))
    broken = rows.map(
        lambda row, i: {"image": {"bytes": b"garbage", "path": None} if i == 2 else row["image"]}, with_indices=True
    )
    broken.to_parquet(tmp_path / "data" / "data" / "train-00000-of-00001.parquet")
    flags = dict(dataset_name=tmp_path / "data", streaming=True, max_train_steps=6, shuffle_buffer_size=1)
    with pytest.MonkeyPatch.context() as patch:
        # datasets gives pyarrow's threads 5 s whenever a parquet stream's reader is closed before
        # its end, as the failed run's readers are once collected; this process lives on anyway.
        patch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)
        with pytest.raises(data.DataError, match="Row 2 of epoch 0 of the stream.*--skip_bad_images"):
            run(train_argv(assets, tmp_path / "a", **flags))
        assert run(train_argv(assets, tmp_path / "b", skip_bad_images=True, **flags)).global_step == 6
        gc.collect()  # the failed run's readers, held in its traceback's reference cycles


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (dict(cache_latents=True), "A streaming dataset cannot be cached"),
        (dict(max_train_steps=None), "pass `--max_train_steps`"),
    ],
)
def test_streaming_flag_conflicts_are_refused(assets, tmp_path, flags, message):
    with pytest.raises(ArgumentError, match=message):
        run(train_argv(assets, tmp_path, streaming=True, **flags))
