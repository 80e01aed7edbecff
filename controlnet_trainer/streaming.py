"""--streaming: training rows read as a stream, for data larger than the disk or memory.

The stream (datasets' IterableDataset: hub data, parquet or WebDataset tar shards) is shuffled
with a buffer and a new shard order every epoch, from the run's seed. It is cut into rounds of
``train_batch_size x num_processes`` rows; rank ``r`` trains on the ``r``-th block of every
round, and data-loader workers take whole rounds in turn. So the batch sequence is a pure
function of (seed, epoch), whatever the number of workers, and resuming skips the rounds
already trained on (reading them, not decoding them) to continue exactly where it stopped.

The price of that exactness: every rank and worker reads the whole stream and keeps only its
own rows. Decoding and transforms, the expensive part, are done once per row. With more than
one process the last incomplete round of an epoch is left out, so every rank takes the same
number of steps; the rows left out differ every epoch.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

import datasets
import torch

from . import data, datasources
from .errors import InputError

logger = logging.getLogger(__name__)


def load_stream(args: argparse.Namespace) -> datasets.IterableDataset:
    """The train split of --dataset_name / --train_data_dir as a stream, columns checked."""
    source = args.dataset_name or args.train_data_dir
    columns = data.columns_from_args(args)
    stream = datasources.load_stream(
        source,
        config_name=args.dataset_config_name,
        cache_dir=args.cache_dir,
        columns=columns,
        flag="--dataset_name" if args.dataset_name else "--train_data_dir",
    )
    data.check_columns(stream, columns)
    return stream


def split_stream(
    stream: datasets.IterableDataset, *, held_out: int, max_samples: int | None
) -> tuple[datasets.IterableDataset, datasets.Dataset | None]:
    """(training stream, held-out rows): the first ``held_out`` rows are kept in memory for the
    fidelity measure and never trained on; --max_train_samples then takes the next rows."""
    rows = None
    if held_out:
        rows = datasets.Dataset.from_list(list(stream.take(held_out)), features=stream.features)
        if len(rows) < held_out:
            raise data.DataError(
                f"The stream has only {len(rows)} rows, too few to hold out --fidelity_samples={held_out} "
                "and train on the rest; lower --fidelity_samples or pass --fidelity_dataset."
            )
        stream = stream.skip(held_out)
    if max_samples is not None:
        stream = stream.take(max_samples)
    return stream, rows


@dataclasses.dataclass(frozen=True)
class StreamBatches:
    """Batches of one rank's share of the stream, epoch by epoch."""

    stream: datasets.IterableDataset
    columns: data.Columns
    transform: data.PairedTransform
    batch_size: int
    rank: int
    num_processes: int
    num_workers: int
    seed: int
    shuffle_buffer_size: int
    skip_bad_images: bool

    def epoch(self, epoch: int, skip: int) -> tuple[torch.utils.data.DataLoader, None]:
        """The epoch's batches after the first ``skip``; its length is not known in advance."""
        blocks = RankBlocks(self, epoch, skip)
        loader = torch.utils.data.DataLoader(
            blocks, batch_size=None, num_workers=self.num_workers, pin_memory=torch.cuda.is_available()
        )
        return loader, None


class RankBlocks(torch.utils.data.IterableDataset):
    """One epoch of a rank's collated batches; each worker yields every ``num_workers``-th one."""

    def __init__(self, source: StreamBatches, epoch: int, skip: int):
        self.source = source
        self.epoch = epoch
        self.skip = skip

    def __iter__(self):
        source = self.source
        worker = torch.utils.data.get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        stream = source.stream.shuffle(seed=source.seed, buffer_size=source.shuffle_buffer_size)
        stream.set_epoch(self.epoch)
        round_size = source.batch_size * source.num_processes
        # .iter() reads the whole stream in every worker; iterating the IterableDataset itself
        # would hand each worker a subset of the shards, and the order would depend on the workers.
        rounds = stream.iter(batch_size=round_size, drop_last_batch=source.num_processes > 1)
        for number, columns in enumerate(rounds):
            if number < self.skip or (number - self.skip) % num_workers != worker_id:
                continue
            batch = self._block(columns, number * round_size)
            if batch is not None:
                yield batch

    def _block(self, columns: dict[str, list], round_start: int) -> dict | None:
        source = self.source
        first = source.rank * source.batch_size
        count = len(next(iter(columns.values())))
        samples = []
        for offset in range(first, min(first + source.batch_size, count)):
            row = {name: values[offset] for name, values in columns.items()}
            sample = self._sample(row, round_start + offset)
            if sample is not None:
                samples.append(sample)
        return data.collate(samples) if samples else None

    def _sample(self, row: dict, position: int) -> dict | None:
        """The row at ``position`` of the epoch's stream, as tensors (None if skipped as bad)."""
        try:
            return data.make_sample(row, position, self.source.columns, self.source.transform)
        except (OSError, ValueError, InputError) as error:
            where = f"Row {position} of epoch {self.epoch} of the stream" + _key_of(row)
            if not self.source.skip_bad_images:
                raise data.DataError(
                    f"{where} has an image that cannot be read ({error}). Fix or remove it, or pass "
                    "--skip_bad_images to leave such rows out."
                ) from error
            logger.warning("--skip_bad_images: leaving out %s: %s", where, error)
            return None


def _key_of(row: dict) -> str:
    key = row.get("__key__")
    return f" (WebDataset key {key!r} in {row.get('__url__')})" if key is not None else ""
