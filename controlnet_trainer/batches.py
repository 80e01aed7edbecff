"""Where a run's batches come from: the rows (checked, held out, bucketed), the transform, and
the map-style loader or the stream, epoch by epoch."""

from __future__ import annotations

import dataclasses

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import gather_object

from . import buckets, data, datasources, fidelity, integrity, streaming
from .settings import DataSettings, EvaluationSettings

logger = get_logger(__name__)


def training_rows(accelerator: Accelerator, settings: DataSettings, evaluation: EvaluationSettings, seed: int):
    """(training rows or stream, held-out rows or None, number of training rows or None)."""
    if settings.streaming:
        stream = streaming.load_stream(settings)
        if evaluation.fidelity_dataset is not None:
            held_out = fidelity.heldout_from_dataset(settings, evaluation)
            stream, _ = streaming.split_stream(stream, held_out=0, max_samples=settings.max_train_samples)
        else:
            stream, held_out = streaming.split_stream(
                stream, held_out=evaluation.fidelity_samples, max_samples=settings.max_train_samples
            )
        # Rows of a stream are only opened as training reaches them; a bad one stops the run
        # there (or, with --skip_bad_images, is left out).
        # Undecoded: rows skipped on resume, or belonging to another rank, are never decoded.
        columns = data.columns_of(settings)
        stream = data.undecoded(stream, [columns.image, columns.conditioning_image])
        return stream, held_out, settings.max_train_samples
    with accelerator.main_process_first():
        rows = datasources.load_train_dataset(settings)
    rows, held_out = fidelity.heldout_rows(settings, evaluation, checked_rows(accelerator, settings, rows), seed)
    rows = data.select_samples(rows, settings.max_train_samples, seed)
    return rows, held_out, len(rows)


def checked_rows(accelerator: Accelerator, settings: DataSettings, rows):
    """The rows after one scan of every image, which the processes share: each opens every n-th
    row, and all get the merged report. (Scanned by one process, a large dataset kept the
    others at a collective longer than NCCL waits, 10 minutes.)"""
    share = range(accelerator.process_index, len(rows), accelerator.num_processes)
    columns = data.columns_of(settings)
    mine = integrity.scan_images(
        rows, columns, resolution=settings.resolution, num_workers=settings.dataloader_num_workers, indices=share
    )
    reports = gather_object([mine])  # [mine] in one process
    report = integrity.merge(reports)
    return integrity.apply_scan(rows, report, skip_bad=settings.skip_bad_images, resolution=settings.resolution)


def bucket_sampler(accelerator: Accelerator, settings: DataSettings, rows, seed: int):
    """With --aspect_ratio_buckets, batches drawn from one bucket each; otherwise None."""
    if not settings.aspect_ratio_buckets:
        return None
    # Each process reads every n-th image header; all get every row's bucket.
    rank, processes = accelerator.process_index, accelerator.num_processes
    mine = data.assign_buckets(rows, settings, indices=range(rank, len(rows), processes))
    shares = gather_object([mine])  # [mine] in one process
    assigned = [shares[index % processes][index // processes] for index in range(len(rows))]
    logger.info("Aspect-ratio buckets (height, width): samples: %s", buckets.summarize(assigned))
    return buckets.BucketBatchSampler(assigned, settings.train_batch_size, seed)


def make_transform(settings: DataSettings) -> data.PairedTransform:
    mode = data.v2.InterpolationMode[settings.image_interpolation_mode.upper()]
    return data.PairedTransform(settings.resolution, mode)


def make_loader(
    settings: DataSettings, rows, transform, sampler, *, with_image: bool
) -> torch.utils.data.DataLoader:
    """The map-style loader; without the target images (``with_image``) when their latents are cached."""
    dataset = data.ControlNetDataset(
        rows,
        data.columns_of(settings),
        transform,
        with_image=with_image,
        buckets=None if sampler is None else sampler.buckets_of_samples,
    )
    return data.make_dataloader(
        dataset, batch_size=settings.train_batch_size, num_workers=settings.dataloader_num_workers, batch_sampler=sampler
    )


@dataclasses.dataclass
class LoaderBatches:
    """Batches of the prepared, map-style loader, epoch by epoch."""

    accelerator: Accelerator
    loader: torch.utils.data.DataLoader
    # A resumed epoch's loader, which skips the batches already trained on: a loader of its own,
    # with worker processes of its own.
    skipping: torch.utils.data.DataLoader | None = None

    def epoch(self, epoch: int, skip: int):
        """(the epoch's batches after the first ``skip``, micro-batches in the epoch)."""
        self.loader.set_epoch(epoch)
        if self.skipping is not None:  # its epoch is over; its workers would sit idle to the end
            data.stop_workers(self.skipping)
            self.skipping = None
        if skip:
            self.skipping = self.accelerator.skip_first_batches(self.loader, skip)
        return (self.loader if self.skipping is None else self.skipping), len(self.loader)

    def stop_workers(self) -> None:
        for loader in (self.loader, self.skipping):
            if loader is not None:
                data.stop_workers(loader)


def stream_batches(
    accelerator: Accelerator,
    settings: DataSettings,
    evaluation: EvaluationSettings,
    stream,
    transform,
    seed: int,
    host_group,
):
    """The stream's batches for this process."""
    # A run that holds out the stream's first rows or stops at --max_train_samples needs the rows
    # in stream order: split by shards, every rank would skip or take its own first rows instead.
    held_out_in_stream = bool(evaluation.fidelity_samples) and not evaluation.fidelity_dataset
    in_order = bool(settings.max_train_samples) or held_out_in_stream
    batches = streaming.StreamBatches(
        stream=stream,
        columns=data.columns_of(settings),
        transform=transform,
        batch_size=settings.train_batch_size,
        rank=accelerator.process_index,
        num_processes=accelerator.num_processes,
        num_workers=settings.dataloader_num_workers,
        seed=seed,
        shuffle_buffer_size=settings.shuffle_buffer_size,
        skip_bad_images=settings.skip_bad_images,
        host_group=host_group,
        whole_shards_allowed=host_group is not None and not in_order,
    )
    if accelerator.num_processes > 1:
        logger.info(batches.sharing())
    return batches
