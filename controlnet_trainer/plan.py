"""The numbers derived from the flags, computed once and never changed afterwards."""

from __future__ import annotations

import dataclasses
import math

import torch

from .settings import OptimizerSettings

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class TrainPlan:
    """What the run will do; logged beside the raw arguments and saved in the output dir."""

    num_samples: int | None  # None: a stream of unknown length
    num_processes: int
    batches_per_epoch: int | None  # micro-batches each process sees per epoch
    steps_per_epoch: int | None  # optimizer steps per epoch
    max_train_steps: int
    num_train_epochs: int | None
    total_batch_size: int
    learning_rate: float
    mixed_precision: str
    seed: int

    @property
    def weight_dtype(self) -> torch.dtype:
        """dtype of the frozen models; the ControlNet keeps fp32 master weights."""
        return DTYPES[self.mixed_precision]

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"weight_dtype": str(self.weight_dtype)}


def make_plan(
    train_batch_size: int,
    optimizer: OptimizerSettings,
    *,
    num_samples: int | None,
    num_processes: int,
    mixed_precision: str,
    seed: int,
    num_batches: int | None = None,
) -> TrainPlan:
    """Derive steps, epochs, batch and learning rate the way diffusers' script does.

    ``num_samples`` is None for a stream of unknown length: --max_train_steps alone sets the
    length of the run, and epochs are counted as the stream runs out. ``num_batches`` is the
    number of micro-batches per epoch over all processes when it is not the plain division
    (aspect-ratio buckets, whose last batches may be short).
    """
    total_batch_size = train_batch_size * num_processes * optimizer.gradient_accumulation_steps
    learning_rate = optimizer.learning_rate * (total_batch_size if optimizer.scale_lr else 1)
    batches_per_epoch = steps_per_epoch = num_train_epochs = None
    max_train_steps = optimizer.max_train_steps
    if num_samples is not None:
        batches_per_epoch = math.ceil((num_batches or num_samples / train_batch_size) / num_processes)
        steps_per_epoch = math.ceil(batches_per_epoch / optimizer.gradient_accumulation_steps)
        max_train_steps = max_train_steps or optimizer.num_train_epochs * steps_per_epoch
        num_train_epochs = math.ceil(max_train_steps / steps_per_epoch)
    return TrainPlan(
        num_samples=num_samples,
        num_processes=num_processes,
        batches_per_epoch=batches_per_epoch,
        steps_per_epoch=steps_per_epoch,
        max_train_steps=max_train_steps,
        num_train_epochs=num_train_epochs,
        total_batch_size=total_batch_size,
        learning_rate=learning_rate,
        mixed_precision=mixed_precision or "no",
        seed=seed,
    )
