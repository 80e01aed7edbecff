"""The training loop: optimizer steps until the plan's last step or a stop signal, with logging,
checkpoints, the control-gap measure and validation when due, and the progress arithmetic that
makes resume exact."""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from . import checkpointing, data, fidelity, sharding, tracking, validation
from .cache import EmbeddingCache
from .checkpointing import TrainingProgress
from .errors import TrainingError
from .families import ModelFamily, Models, TextConditioning
from .models import eager_evaluation
from .optimization import averaged_weights
from .plan import TrainPlan
from .settings import Settings
from .step import micro_batch_loss, step_generators

logger = get_logger(__name__)


@dataclasses.dataclass(frozen=True)
class LoopParts:
    """What the loop works with, assembled once by ``training.train``."""

    accelerator: Accelerator
    settings: Settings
    family: ModelFamily
    models: Models
    plan: TrainPlan
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    metrics: tracking.MetricsLog
    probe: fidelity.FidelityProbe | None = None
    embeddings: EmbeddingCache | None = None
    offloaded: tuple[torch.nn.Module, ...] = ()  # encoders that wait on the CPU for validation
    ema: EMAModel | None = None
    # The validation prompts' embeddings, when the pipeline takes them instead of text encoders.
    prompt_embeddings: dict[str, TextConditioning] | None = None


def train_loop(parts: LoopParts, batches, progress: TrainingProgress, stop) -> tuple[TrainingProgress, bool]:
    """Optimizer steps until max_train_steps or a stop signal; returns (progress, stopped)."""
    accelerator, plan, models = parts.accelerator, parts.plan, parts.models
    settings = parts.settings
    loop, optimizer = settings.loop, settings.optimizer
    bar = tqdm(
        total=plan.max_train_steps,
        initial=progress.global_step,
        desc="Steps",
        disable=not accelerator.is_local_main_process,
    )
    losses: list[torch.Tensor] = []  # micro-batch losses of the optimizer step in progress
    pending: list[torch.Tensor] = []  # step losses not yet logged
    step_started, train_seconds = time.perf_counter(), 0.0
    # A stream's epochs are counted as they end: max_train_steps alone ends the run.
    streaming = settings.data.streaming
    epochs = itertools.count(progress.epoch) if streaming else range(progress.epoch, plan.num_train_epochs)
    for epoch in epochs:
        if progress.global_step >= plan.max_train_steps:
            break
        skip = progress.batch_in_epoch if epoch == progress.epoch else 0
        epoch_batches, batches_per_epoch = batches.epoch(epoch, skip)
        index = skip - 1
        for index, batch in enumerate(epoch_batches, start=skip):
            generators = step_generators(plan.seed, epoch, batch["index"], accelerator.device)
            with accelerator.accumulate(models.controlnet):
                loss = micro_batch_loss(
                    batch,
                    models,
                    parts.family,
                    generators,
                    data_settings=settings.data,
                    objective=settings.objective,
                    weight_dtype=plan.weight_dtype,
                    embeddings=parts.embeddings,
                )
                accelerator.backward(loss)
                # With --fused_backward_pass, backward has already stepped and clipped each parameter.
                if accelerator.sync_gradients and not optimizer.fused_backward_pass:
                    accelerator.clip_grad_norm_(models.controlnet.parameters(), optimizer.max_grad_norm)
                parts.optimizer.step()
                parts.lr_scheduler.step()
                parts.optimizer.zero_grad(set_to_none=optimizer.set_grads_to_none)
            losses.append(loss.detach())
            if not accelerator.sync_gradients:
                continue
            if parts.ema is not None:
                parts.ema.step(models.controlnet.parameters())
            progress = advance(progress, epoch, index + 1, batches_per_epoch)
            pending.append(torch.stack(losses).mean())
            losses = []
            bar.update(1)
            last_step = progress.global_step >= plan.max_train_steps
            checkpoint_due = progress.global_step % loop.checkpointing_steps == 0
            stopping = not last_step and (stop.agreed(accelerator) or progress.global_step == loop.stop_at_step)
            logging_due = progress.global_step % loop.logging_steps == 0 or last_step or checkpoint_due or stopping
            # The only host sync of a step: never save or finish on a loss not yet checked. It comes
            # before the clock is read, so step times include the GPU work queued since the last one.
            step_loss = mean_loss(accelerator, pending) if logging_due else None
            train_seconds += time.perf_counter() - step_started
            if step_loss is not None:
                log_losses(parts, step_loss, train_seconds / len(pending), progress, bar)
                pending, train_seconds = [], 0.0
            if checkpoint_due or stopping:
                path = checkpointing.save_checkpoint(
                    accelerator, settings.output.output_dir, progress, loop.checkpoints_total_limit
                )
                if stopping:
                    logger.warning(
                        "Stopped by %s at step %d; saved %s. Run the same command with "
                        "--resume_from_checkpoint=latest to continue.",
                        stop.signal_name or "--stop_at_step or a signal on another rank",
                        progress.global_step,
                        path,
                    )
                    return progress, True
            evaluate_if_due(parts, progress.global_step, last_step)
            step_started = time.perf_counter()  # step times leave out checkpoints and evaluations
            if last_step:
                break
        else:
            progress = end_epoch(progress, epoch, batches_run=index + 1 - skip)
    bar.close()
    return progress, False


def evaluate_if_due(parts: LoopParts, step: int, last_step: bool) -> None:
    """The control gap and the validation images, at their intervals and after the last step."""
    evaluation = parts.settings.evaluation
    probe_due = parts.probe is not None and (step % evaluation.fidelity_every == 0 or last_step)
    validation_due = step % evaluation.validation_steps == 0 or last_step
    if not (probe_due or validation_due):
        return
    # Only when due: swapping the EMA weights in copies every weight to the host and back
    # (EMAModel.store/restore), 1.3 s a step for SD 1.5 on an H100.
    with averaged_weights(parts.accelerator, parts.models.controlnet, parts.ema), eager_evaluation():
        if probe_due:
            result = parts.probe.evaluate(parts.models.controlnet, accelerator=parts.accelerator)
            parts.metrics.log(result.to_metrics(), step=step)
        if validation_due:
            validate(parts, step)


def mean_loss(accelerator: Accelerator, pending: list[torch.Tensor]) -> float:
    """The mean loss of the steps since the last log, over processes (waits for the GPU)."""
    return accelerator.reduce(torch.stack(pending).mean(), reduction="mean").item()


def log_losses(parts: LoopParts, step_loss: float, seconds_per_step: float, progress, bar) -> None:
    """Log the loss and step time since the last log, and the device's peak memory; stop on NaN or inf."""
    learning_rate = parts.lr_scheduler.get_last_lr()[0]
    bar.set_postfix(loss=step_loss, lr=learning_rate)
    values = {"loss": step_loss, "lr": learning_rate, "step_seconds": seconds_per_step}
    parts.metrics.log(values | tracking.device_memory(parts.accelerator.device), step=progress.global_step)
    if not math.isfinite(step_loss):
        raise TrainingError(non_finite_message(step_loss, progress.global_step, parts.metrics.path.parent))


def validate(parts: LoopParts, step: int) -> None:
    """Validation images; offloaded encoders visit the accelerator only for its duration."""
    accelerator, settings = parts.accelerator, parts.settings
    if not settings.evaluation.validation_prompt:
        return
    controlnet = sharding.full_controlnet(accelerator, parts.models.controlnet, every_rank=False)
    if not accelerator.is_main_process:
        return
    for module in parts.offloaded:
        module.to(accelerator.device)
    validation.run_validation(
        accelerator=accelerator,
        family=parts.family,
        models=parts.models,
        controlnet=controlnet,
        evaluation=settings.evaluation,
        resolution=settings.data.resolution,
        output_dir=settings.output.output_dir,
        weight_dtype=parts.plan.weight_dtype,
        step=step,
        seed=parts.plan.seed,
        prompt_embeddings=parts.prompt_embeddings,
    )
    for module in parts.offloaded:
        module.to("cpu")


def advance(
    progress: TrainingProgress, epoch: int, batches_done: int, batches_per_epoch: int | None
) -> TrainingProgress:
    """Progress after an optimizer step that ended at micro-batch ``batches_done`` of ``epoch``
    (an epoch of unknown length, a stream's, is closed by ``end_epoch``)."""
    if batches_per_epoch is not None and batches_done >= batches_per_epoch:
        epoch, batches_done = epoch + 1, 0
    return dataclasses.replace(progress, global_step=progress.global_step + 1, epoch=epoch, batch_in_epoch=batches_done)


def end_epoch(progress: TrainingProgress, epoch: int, batches_run: int) -> TrainingProgress:
    """Progress once ``epoch``'s batches ran out: the next epoch starts from its first batch."""
    if progress.epoch > epoch:
        return progress  # advance() already closed it
    if batches_run == 0 and progress.batch_in_epoch == 0:
        raise data.DataError(
            "An epoch of the stream gave no batch: it holds fewer rows than one batch per process "
            "(--train_batch_size x processes), or --skip_bad_images left out every row it read (see the "
            "warnings above). Add data, lower --train_batch_size, or fix the images."
        )
    return dataclasses.replace(progress, epoch=epoch + 1, batch_in_epoch=0)


def non_finite_message(loss: float, step: int, output_dir: Path) -> str:
    kept = checkpointing.list_checkpoints(output_dir)
    where = f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint was saved yet"
    return (
        f"The loss became {loss} at step {step}; stopping without saving this state ({where}). "
        "Lower --learning_rate, use bf16 instead of fp16, or set --max_grad_norm, then resume "
        "with --resume_from_checkpoint=latest."
    )


def log_plan(accelerator: Accelerator, plan: TrainPlan, progress: TrainingProgress) -> None:
    logger.info("***** Running training *****")
    logger.info("  Num examples = %s", "a stream" if plan.num_samples is None else plan.num_samples)
    logger.info("  Num epochs = %s", "as the stream lasts" if plan.num_train_epochs is None else plan.num_train_epochs)
    logger.info("  Total train batch size (parallel, distributed & accumulation) = %d", plan.total_batch_size)
    logger.info("  Total optimization steps = %d", plan.max_train_steps)
    if progress.global_step:
        logger.info(
            "  Resuming at step %d (epoch %d, batch %d)", progress.global_step, progress.epoch, progress.batch_in_epoch
        )
    if progress.global_step >= plan.max_train_steps:
        logger.warning(
            "The checkpoint is at step %d and --max_train_steps is %d: nothing is left to train, so the "
            "checkpoint's weights are saved as the final model. Raise --max_train_steps to train on.",
            progress.global_step,
            plan.max_train_steps,
        )
