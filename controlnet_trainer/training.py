"""The training run: set up, loop over optimizer steps, checkpoint, validate, save."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, broadcast_object_list, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, free_memory
from tqdm.auto import tqdm

from . import cache, checkpointing, data, export, fidelity, hub, integrity, plots, tracking, validation
from .checkpointing import TrainingProgress
from .errors import InputError
from .family import ModelFamily, TextConditioning, crop_override_from_args, unet_added_conditioning
from .loss import diffusion_loss, sample_noise_and_timesteps
from .models import Models, enable_memory_options, freeze_and_place, load_models, make_optimizer
from .plan import TrainPlan, make_plan
from .preemption import stop_on_signals

logger = get_logger(__name__)


class TrainingError(InputError):
    """Training cannot go on; the message says why and what was kept."""


@dataclasses.dataclass(frozen=True)
class RunResult:
    output_dir: Path
    global_step: int
    stopped_early: bool = False


def train(args: argparse.Namespace, family: ModelFamily) -> RunResult:
    """Train a ControlNet as the flags say; returns where it ended."""
    output_dir = Path(args.output_dir)
    resume_path = checkpointing.resolve_resume(output_dir, args.resume_from_checkpoint)
    if resume_path is None:
        check_output_dir_is_free(output_dir)
    validation.check_validation_images(args.validation_image)
    accelerator = make_accelerator(args, output_dir)
    seed = agree_on_seed(accelerator, args.seed, resume_path)
    set_seed(seed)  # also seeds Accelerate's sampler, so data order is a function of the epoch
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True

    with accelerator.main_process_first():
        rows = data.load_train_dataset(args)
    rows, held_out = fidelity.heldout_rows(args, checked_rows(accelerator, args, rows), seed)
    rows = data.select_samples(rows, args.max_train_samples, seed)
    plan = make_plan(
        args,
        num_samples=len(rows),
        num_processes=accelerator.num_processes,
        mixed_precision=accelerator.mixed_precision,
        seed=seed,
    )
    if args.dry_run:
        print(json.dumps({"family": family.name, "plan": plan.to_json()}, indent=2))
        return RunResult(output_dir, 0)

    models = load_models(args, family)
    freeze_and_place(
        models,
        family,
        device=accelerator.device,
        weight_dtype=plan.weight_dtype,
        custom_vae=bool(getattr(args, "pretrained_vae_model_name_or_path", None)),
    )
    enable_memory_options(args, models, accelerator.device)
    transform = make_transform(args)
    probe = None
    if held_out is not None:
        probe = fidelity.probe_for_training(
            args, held_out, models, family, transform=transform, weight_dtype=plan.weight_dtype, seed=seed
        )
    embeddings = cache.prepare_cache(accelerator, args, family, models, rows, transform)
    offloaded = offload_cached_encoders(args, models)
    dataset = data.ControlNetDataset(
        rows, data.columns_from_args(args), transform, with_image=not args.cache_latents
    )
    loader = data.make_dataloader(
        dataset, batch_size=args.train_batch_size, num_workers=args.dataloader_num_workers
    )
    optimizer = make_optimizer(args, models.controlnet.parameters(), plan.learning_rate)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        # The prepared scheduler steps once per process per optimizer step.
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=plan.max_train_steps * accelerator.num_processes,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )
    ema = make_ema(args, models.controlnet, accelerator.device)
    checkpointing.register_model_hooks(accelerator, ema)
    models.controlnet, optimizer, loader, lr_scheduler = accelerator.prepare(
        models.controlnet, optimizer, loader, lr_scheduler
    )

    metrics = tracking.MetricsLog(accelerator, output_dir)
    progress = TrainingProgress(seed=seed)
    if resume_path is not None:
        progress = checkpointing.load_checkpoint(accelerator, resume_path)
    if accelerator.is_main_process:
        # Records of steps past the checkpoint (or of a run killed before its first one) are
        # replaced by the ones this run writes.
        metrics.drop_after(progress.global_step)
        tracking.write_options(output_dir, args, plan, family.name)
    accelerator.init_trackers(args.tracker_project_name, config=tracking.tracker_config(args, plan))
    log_plan(accelerator, plan, progress)
    if probe is not None and progress.global_step == 0:  # the EMA equals the weights here
        metrics.log(probe.evaluate(models.controlnet, accelerator=accelerator).to_metrics(), step=0)

    with stop_on_signals() as stop:
        progress, stopped = train_loop(
            accelerator,
            args,
            family,
            models,
            plan,
            loader,
            optimizer,
            lr_scheduler,
            progress,
            metrics,
            stop,
            Extras(probe, embeddings, offloaded, ema),
        )
    if not stopped:
        with averaged_weights(accelerator, models.controlnet, ema):
            finish(accelerator, args, family, models, plan)
    accelerator.end_training()
    return RunResult(output_dir, progress.global_step, stopped)


def make_accelerator(args: argparse.Namespace, output_dir: Path) -> Accelerator:
    project = ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir))
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to in ("none", "") else args.report_to,
        project_config=project,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    return accelerator


def check_output_dir_is_free(output_dir: Path) -> None:
    """Refuse to mix a new run with another run's checkpoints (rotation would delete them)."""
    found = checkpointing.list_checkpoints(output_dir)
    if found:
        raise checkpointing.CheckpointError(
            f"--output_dir {output_dir} already holds checkpoints of another run "
            f"({', '.join(p.name for p in found)}). To continue that run add "
            "--resume_from_checkpoint=latest; to start a new one choose another --output_dir."
        )


def agree_on_seed(accelerator: Accelerator, seed: int | None, resume_path: Path | None) -> int:
    """The run's seed: the flag, else the resumed run's, else one drawn and shared by all ranks."""
    if resume_path is not None:
        saved = TrainingProgress.load(resume_path).seed
        if seed is not None and seed != saved:
            logger.warning("--seed=%d differs from the checkpoint's seed %d; using the checkpoint's", seed, saved)
        return saved
    if seed is not None:
        return seed
    drawn = [random.SystemRandom().randrange(2**31)]
    return int(broadcast_object_list(drawn)[0])


def checked_rows(accelerator: Accelerator, args: argparse.Namespace, rows):
    """The rows after one scan of every image (on the main process, shared with the others)."""
    report = [None]
    if accelerator.is_main_process:
        report = [
            integrity.scan_images(
                rows,
                data.columns_from_args(args),
                resolution=args.resolution,
                num_workers=args.dataloader_num_workers,
            )
        ]
    report = broadcast_object_list(report)[0]
    return integrity.apply_scan(rows, report, skip_bad=args.skip_bad_images, resolution=args.resolution)


def make_transform(args: argparse.Namespace) -> data.PairedTransform:
    mode = getattr(args, "image_interpolation_mode", "bilinear")
    return data.PairedTransform(args.resolution, data.v2.InterpolationMode[mode.upper()])


def step_generators(seed: int, epoch: int, indices, device: torch.device):
    """Generators for each sample of a micro-batch, keyed on (seed, epoch, dataset index).

    A sample's noise, timestep, VAE draw and caption choice depend only on which sample it is and
    in which epoch: not on how the run got here (resume is exact), nor on the rank, the micro-batch
    it landed in or the number of processes, so 2 processes x batch 2 draw what 1 x 4 draws.
    """
    cpu, on_device = [], []
    for index in indices:
        words = np.random.SeedSequence([seed, epoch, int(index)]).generate_state(2, dtype=np.uint64)
        cpu.append(torch.Generator().manual_seed(int(words[0])))
        on_device.append(torch.Generator(device=device).manual_seed(int(words[1])))
    return cpu, on_device


def encode_batch(
    batch: dict, models: Models, family: ModelFamily, args, plan: TrainPlan, generators, embeddings=None
) -> tuple[torch.Tensor, TextConditioning]:
    """Latents and prompt embeddings of a batch, from the cache or the frozen models.

    Both paths make the same random draws in the same order, so caching changes nothing but speed.
    """
    cpu_generators, device_generators = generators
    picks = [
        data.choose_caption(options, args.proportion_empty_prompts, generator)
        for options, generator in zip(batch["captions"], cpu_generators, strict=True)
    ]
    scaling = models.vae.config.scaling_factor
    with torch.no_grad():
        if embeddings is not None and embeddings.latent_mean is not None:
            latents = torch.cat(
                [
                    embeddings.latents(batch["index"][i : i + 1], generator, scaling)
                    for i, generator in enumerate(device_generators)
                ]
            )
        else:
            pixels = batch["pixel_values"].to(models.vae.device, models.vae.dtype, non_blocking=True)
            latents = models.vae.encode(pixels).latent_dist.sample(generator=device_generators) * scaling
        if embeddings is not None and embeddings.text_hidden is not None:
            text = embeddings.text(batch["index"], picks, latents.device)
        else:
            prompts = [data.caption_text(options, pick) for options, pick in zip(batch["captions"], picks)]
            text = family.encode(models.tokenizers, models.text_encoders, prompts)
    return latents.to(plan.weight_dtype), text


def micro_batch_loss(batch, models, family, args, plan, generators, embeddings=None) -> torch.Tensor:
    latents, text = encode_batch(batch, models, family, args, plan, generators, embeddings)
    per_sample = [
        sample_noise_and_timesteps(
            latents[i : i + 1], models.noise_scheduler.config.num_train_timesteps, generator, args.noise_offset
        )
        for i, generator in enumerate(generators[1])
    ]
    noise = torch.cat([sample_noise for sample_noise, _ in per_sample])
    timesteps = torch.cat([sample_timesteps for _, sample_timesteps in per_sample])
    return diffusion_loss(
        unet=models.unet,
        controlnet=models.controlnet,
        noise_scheduler=models.noise_scheduler,
        latents=latents,
        noise=noise,
        timesteps=timesteps,
        encoder_hidden_states=text.encoder_hidden_states,
        controlnet_image=batch["conditioning_pixel_values"].to(latents.device, plan.weight_dtype),
        added_cond_kwargs=unet_added_conditioning(
            family, text, batch, resolution=args.resolution, crop_override=crop_override_from_args(args)
        ),
        weight_dtype=plan.weight_dtype,
        snr_gamma=args.snr_gamma,
    )


@dataclasses.dataclass(frozen=True)
class Extras:
    """Optional parts of a run: the fidelity probe and the embeddings cache."""

    probe: fidelity.FidelityProbe | None = None
    embeddings: cache.EmbeddingCache | None = None
    offloaded: tuple[torch.nn.Module, ...] = ()
    ema: EMAModel | None = None


def make_ema(args: argparse.Namespace, controlnet, device: torch.device) -> EMAModel | None:
    if not args.use_ema:
        return None
    ema = EMAModel(
        controlnet.parameters(), decay=args.ema_decay, model_cls=type(controlnet), model_config=controlnet.config
    )
    ema.to(device)
    return ema


@contextlib.contextmanager
def averaged_weights(accelerator: Accelerator, controlnet, ema: EMAModel | None):
    """The EMA weights in the ControlNet for the duration (evaluation, final save), then back."""
    if ema is None:
        yield
        return
    parameters = list(accelerator.unwrap_model(controlnet).parameters())
    ema.store(parameters)
    ema.copy_to(parameters)
    try:
        yield
    finally:
        ema.restore(parameters)


def offload_cached_encoders(args: argparse.Namespace, models: Models) -> tuple[torch.nn.Module, ...]:
    """Once their outputs are cached, the VAE and text encoders wait on the CPU for validation."""
    offloaded = ((models.vae,) if args.cache_latents else ()) + (
        models.text_encoders if args.cache_text_embeddings else ()
    )
    for module in offloaded:
        module.to("cpu")
    if offloaded:
        free_memory()
    return offloaded


def train_loop(
    accelerator, args, family, models, plan, loader, optimizer, lr_scheduler, progress, metrics, stop, extras
) -> tuple[TrainingProgress, bool]:
    """Optimizer steps until max_train_steps or a stop signal; returns (progress, stopped)."""
    output_dir = Path(args.output_dir)
    bar = tqdm(
        total=plan.max_train_steps,
        initial=progress.global_step,
        desc="Steps",
        disable=not accelerator.is_local_main_process,
    )
    losses: list[torch.Tensor] = []  # micro-batch losses of the optimizer step in progress
    pending: list[torch.Tensor] = []  # step losses not yet logged
    step_started, train_seconds = time.perf_counter(), 0.0
    for epoch in range(progress.epoch, plan.num_train_epochs):
        if progress.global_step >= plan.max_train_steps:
            break
        loader.set_epoch(epoch)
        skip = progress.batch_in_epoch if epoch == progress.epoch else 0
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        for index, batch in enumerate(batches, start=skip):
            generators = step_generators(plan.seed, epoch, batch["index"].tolist(), accelerator.device)
            with accelerator.accumulate(models.controlnet):
                loss = micro_batch_loss(batch, models, family, args, plan, generators, extras.embeddings)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(models.controlnet.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=args.set_grads_to_none)
            losses.append(loss.detach())
            if not accelerator.sync_gradients:
                continue
            if extras.ema is not None:
                extras.ema.step(models.controlnet.parameters())
            progress = advance(progress, epoch, index + 1, len(loader))
            pending.append(torch.stack(losses).mean())
            losses = []
            train_seconds += time.perf_counter() - step_started
            bar.update(1)
            last_step = progress.global_step >= plan.max_train_steps
            checkpoint_due = progress.global_step % args.checkpointing_steps == 0
            stopping = not last_step and (stop.agreed(accelerator) or progress.global_step == args.stop_at_step)
            if progress.global_step % args.logging_steps == 0 or last_step or checkpoint_due or stopping:
                # The only host sync of a step: never save or finish on a loss not yet checked.
                log_losses(accelerator, pending, progress, lr_scheduler, bar, metrics, train_seconds)
                pending, train_seconds = [], 0.0
            if checkpoint_due or stopping:
                path = checkpointing.save_checkpoint(accelerator, output_dir, progress, args.checkpoints_total_limit)
                if stopping:
                    logger.warning(
                        "Stopped by %s at step %d; saved %s. Run the same command with "
                        "--resume_from_checkpoint=latest to continue.",
                        stop.signal_name or "--stop_at_step or a signal on another rank",
                        progress.global_step,
                        path,
                    )
                    return progress, True
            fidelity_every = args.fidelity_steps or args.validation_steps
            with averaged_weights(accelerator, models.controlnet, extras.ema):
                if extras.probe is not None and (progress.global_step % fidelity_every == 0 or last_step):
                    result = extras.probe.evaluate(models.controlnet, accelerator=accelerator)
                    metrics.log(result.to_metrics(), step=progress.global_step)
                if progress.global_step % args.validation_steps == 0 or last_step:
                    validate(accelerator, args, family, models, plan, progress.global_step, extras.offloaded)
            step_started = time.perf_counter()  # step times leave out checkpoints and evaluations
            if last_step:
                break
    bar.close()
    return progress, False


def log_losses(accelerator, pending, progress, lr_scheduler, bar, metrics, seconds: float) -> None:
    """Log the mean loss of the steps since the last log (over processes); stop on NaN or inf."""
    step_loss = accelerator.reduce(torch.stack(pending).mean(), reduction="mean").item()
    learning_rate = lr_scheduler.get_last_lr()[0]
    bar.set_postfix(loss=step_loss, lr=learning_rate)
    metrics.log(
        {"loss": step_loss, "lr": learning_rate, "step_seconds": seconds / len(pending)}, step=progress.global_step
    )
    if not math.isfinite(step_loss):
        raise TrainingError(non_finite_message(step_loss, progress.global_step, metrics.path.parent))


def validate(accelerator, args, family, models, plan, step: int, offloaded) -> None:
    """Validation images; offloaded encoders visit the accelerator only for its duration."""
    if not args.validation_prompt or not accelerator.is_main_process:
        return
    for module in offloaded:
        module.to(accelerator.device)
    validation.run_validation(
        accelerator=accelerator,
        family=family,
        models=models,
        args=args,
        weight_dtype=plan.weight_dtype,
        step=step,
        seed=plan.seed,
    )
    for module in offloaded:
        module.to("cpu")


def advance(progress: TrainingProgress, epoch: int, batches_done: int, batches_per_epoch: int) -> TrainingProgress:
    """Progress after an optimizer step that ended at micro-batch ``batches_done`` of ``epoch``."""
    if batches_done >= batches_per_epoch:
        epoch, batches_done = epoch + 1, 0
    return dataclasses.replace(
        progress, global_step=progress.global_step + 1, epoch=epoch, batch_in_epoch=batches_done
    )


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
    logger.info("  Num examples = %d", plan.num_samples)
    logger.info("  Num epochs = %d", plan.num_train_epochs)
    logger.info("  Total train batch size (parallel, distributed & accumulation) = %d", plan.total_batch_size)
    logger.info("  Total optimization steps = %d", plan.max_train_steps)
    if progress.global_step:
        logger.info("  Resuming at step %d (epoch %d, batch %d)", progress.global_step, progress.epoch, progress.batch_in_epoch)


def finish(accelerator, args, family, models, plan) -> None:
    """Final weights at the output root, the model card, and the optional upload."""
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    output_dir = Path(args.output_dir)
    controlnet = accelerator.unwrap_model(models.controlnet)
    hub.save_final_model(controlnet, output_dir)
    if args.save_single_file:
        export.save_single_file(controlnet, output_dir / hub.SINGLE_FILE)
    plots.plot_training_curves(tracking.read_metrics(output_dir), output_dir / hub.CURVES_FILE)
    hub.write_model_card(output_dir, args, plan, family.name)
    if args.push_to_hub:
        hub.push_to_hub(output_dir, args)
    logger.info("Saved the ControlNet to %s", output_dir)
