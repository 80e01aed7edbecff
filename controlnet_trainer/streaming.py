"""--streaming: training rows read as a stream, for data larger than the disk or memory.

The stream (datasets' IterableDataset: hub data, parquet or WebDataset tar shards) is shuffled
with a buffer and a new shard order every epoch, from the run's seed. It is cut into rounds of
``train_batch_size x num_processes`` rows; rank ``r`` trains on the ``r``-th block of every
round, and data-loader workers take whole rounds in turn. So the batch sequence is a pure
function of (seed, epoch), whatever the number of workers, and resuming skips the rounds
already trained on (reading them, not decoding them) to continue exactly where it stopped.

With several processes and a number of shards (data files, tar shards) that the number of
processes divides, each rank reads only its own shards: an epoch's shuffled shard list is dealt
out to the ranks, each rank reads its shards in rounds of ``train_batch_size`` rows and trains
on whole rounds. Shards can hold different numbers of rows, so the ranks agree before every
step, over the host, that each still has a batch: the epoch ends for all when one runs out, and
the rest of the longer ranks' shards waits for a later epoch. Otherwise (one shard, a shard
count the processes do not divide, or rows held out from or capped at the stream's head) every
rank reads the whole stream and keeps its own block of every round: the batches of N processes
are then exactly those of one process with N times the batch.

Either way every data-loader worker reads its rank's whole share of the stream and keeps its
own rounds; decoding and transforms, the expensive part, are done once per row. With more than
one process the last incomplete round of an epoch is left out, so every rank takes the same
number of steps; the rows left out differ every epoch.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Iterator

import datasets
import datasets.distributed
import torch

from . import data, datasources, ranks
from .errors import InputError
from .settings import DataSettings

logger = logging.getLogger(__name__)


def load_stream(settings: DataSettings) -> datasets.IterableDataset:
    """The train split of --dataset_name and/or --train_data_dir as a stream, columns checked."""
    source = datasources.source_of(settings)
    columns = data.columns_of(settings)
    stream = datasources.load_stream(
        source.path,
        config_name=settings.dataset_config_name,
        cache_dir=settings.cache_dir,
        columns=columns,
        flag=source.flag,
        data_dir=source.data_dir,
    )
    data.check_columns(stream, columns)
    # One row is read (not decoded) so that an empty stream fails here, not after the models load.
    if next(iter(data.undecoded(stream, [columns.image, columns.conditioning_image]).take(1)), None) is None:
        raise data.DataError(f"Dataset {source.describe()!r} has no rows in its train split; add training data.")
    return stream


def split_stream(
    stream: datasets.IterableDataset, *, held_out: int, max_samples: int | None
) -> tuple[datasets.IterableDataset, datasets.Dataset | None]:
    """(training stream, held-out rows): the first ``held_out`` rows are kept in memory for the
    fidelity measure and never trained on; --max_train_samples then takes the next rows."""
    rows = None
    if held_out:
        # One row more than is held out: the training stream must not be left empty.
        first = list(stream.take(held_out + 1))
        if len(first) <= held_out:
            raise data.DataError(
                f"The stream has only {len(first)} rows, too few to hold out --fidelity_samples={held_out} "
                "and train on the rest; lower --fidelity_samples or pass --fidelity_dataset."
            )
        rows = datasets.Dataset.from_list(first[:held_out], features=stream.features)
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
    host_group: object = None  # ranks.host_group(): None in one process
    # Whether ranks may read whole shards of their own: they need the host group to agree on
    # when an epoch ends, and a stream whose rows are not held out or capped at its head.
    whole_shards_allowed: bool = False

    @property
    def whole_shards(self) -> bool:
        """Each rank reads only its own shards (see the module docstring)."""
        return self.whole_shards_allowed and self.num_processes > 1 and self.stream.num_shards % self.num_processes == 0

    def sharing(self) -> str:
        """How the ranks share the stream, for the log."""
        shards, processes = self.stream.num_shards, self.num_processes
        if self.whole_shards:
            return f"Each of the {processes} ranks reads its own {shards // processes} of the stream's {shards} shards."
        return (
            f"Every rank reads the whole stream ({shards} shards) and keeps its own rows: a shard count "
            f"that {processes} processes divide, without rows held out or capped at "
            "the stream's head, lets each rank read only its own shards."
        )

    def epoch(self, epoch: int, skip: int) -> tuple[Iterable[dict], None]:
        """The epoch's batches after the first ``skip``; its length is not known in advance."""
        blocks = RankBlocks(self, epoch, skip)
        loader = torch.utils.data.DataLoader(
            blocks, batch_size=None, num_workers=self.num_workers, pin_memory=torch.cuda.is_available()
        )
        if self.whole_shards:
            return _while_every_rank_has_one(loader, self.host_group), None
        return loader, None


def _while_every_rank_has_one(batches: Iterable[dict], group) -> Iterator[dict]:
    """The batches for as long as every rank still has one. Ranks reading different shards run
    out at different times; without this they would start their next epochs at different steps,
    train on rows of two epochs at once and disagree about where a checkpoint stands."""
    iterator = iter(batches)
    while True:
        batch = next(iterator, None)
        if not ranks.every_rank(batch is not None, group):
            return
        yield batch


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
        if source.whole_shards:
            # The shard list is shuffled by (seed, epoch) alike on every rank before it is dealt out.
            stream = datasets.distributed.split_dataset_by_node(
                stream, rank=source.rank, world_size=source.num_processes
            )
        stream.set_epoch(self.epoch)
        round_size = source.batch_size * source.num_processes
        # .iter() reads the rank's whole share in every worker; iterating the IterableDataset itself
        # would hand each worker a subset of the shards, and the order would depend on the workers.
        rows_read = source.batch_size if source.whole_shards else round_size
        rounds = stream.iter(batch_size=rows_read, drop_last_batch=source.num_processes > 1)
        for number, columns in enumerate(rounds):
            if number < self.skip or (number - self.skip) % num_workers != worker_id:
                continue
            batch = self._block(columns, number * round_size)
            if batch is not None:
                yield batch

    def _block(self, columns: dict[str, list], round_start: int) -> dict | None:
        source = self.source
        first = 0 if source.whole_shards else source.rank * source.batch_size
        count = len(next(iter(columns.values())))
        samples = []
        for offset in range(first, min(first + source.batch_size, count)):
            row = {name: values[offset] for name, values in columns.items()}
            # Positions count the epoch's rounds of all ranks, so no two ranks share one: a
            # sample's random draws are keyed on its position.
            position = round_start + source.rank * source.batch_size + offset - first
            sample = self._sample(row, position)
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
                    f"{where} cannot be used ({error}). Fix or remove it, or pass "
                    "--skip_bad_images to leave such rows out."
                ) from error
            logger.warning("--skip_bad_images: leaving out %s: %s", where, error)
            return None


def _key_of(row: dict) -> str:
    key = row.get("__key__")
    return f" (WebDataset key {key!r} in {row.get('__url__')})" if key is not None else ""
