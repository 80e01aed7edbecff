"""The training run: set up, loop over optimizer steps, checkpoint, validate, save."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import itertools
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedType,
    InitProcessGroupKwargs,
    ProjectConfiguration,
    broadcast_object_list,
    gather_object,
    set_seed,
)
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, free_memory
from tqdm.auto import tqdm

from . import (
    buckets,
    cache,
    checkpointing,
    data,
    export,
    fidelity,
    hub,
    integrity,
    plots,
    ranks,
    sharding,
    streaming,
    tracking,
    validation,
)
from .checkpointing import TrainingProgress
from .errors import InputError
from .family import ModelFamily, TextConditioning, crop_override_from_args, unet_added_conditioning
from .loss import diffusion_loss, sample_noise_and_timesteps
from .models import (
    Models,
    check_family,
    eager_evaluation,
    enable_memory_options,
    freeze_and_place,
    load_models,
    make_optimizer,
)
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
    plan: dict | None = None  # with --dry_run: the family and the plan, nothing trained


def train(args: argparse.Namespace, family: ModelFamily) -> RunResult:
    """Train a ControlNet as the flags say; returns where it ended."""
    clock = tracking.StartupClock()
    output_dir = Path(args.output_dir)
    resume = checkpointing.resolve_resume(output_dir, args.resume_from_checkpoint)
    checkpointing.check_output_dir(output_dir, resume)
    validation.check_validation_images(args.validation_image)
    accelerator = make_accelerator(args, output_dir)
    deepspeed = accelerator.state.deepspeed_plugin
    check_engine(accelerator.distributed_type, deepspeed.zero_stage if deepspeed else None, args.use_ema)
    check_precision(accelerator.mixed_precision, accelerator.device)
    check_family(args, family)
    # Not on a dry run, which must leave nothing behind, on the Hub either.
    repo_id = agree_on_hub_repo(accelerator, args, output_dir) if args.push_to_hub and not args.dry_run else None
    seed = agree_on_seed(accelerator, args.seed, resume)
    set_seed(seed)  # also seeds Accelerate's sampler, so data order is a function of the epoch
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    clock.lap("accelerator")

    rows, held_out, num_samples = training_rows(accelerator, args, seed)
    sampler = bucket_sampler(accelerator, args, rows, seed)
    plan = make_plan(
        args,
        num_samples=num_samples,
        num_batches=None if sampler is None else len(sampler),
        num_processes=accelerator.num_processes,
        mixed_precision=accelerator.mixed_precision,
        seed=seed,
    )
    if args.dry_run:
        return RunResult(output_dir, 0, plan={"family": family.name, "plan": plan.to_json()})
    clock.lap("data")

    models = load_models(args, family)
    freeze_and_place(
        models,
        family,
        device=accelerator.device,
        weight_dtype=plan.weight_dtype,
        custom_vae=bool(getattr(args, "pretrained_vae_model_name_or_path", None)),
    )
    enable_memory_options(args, models, accelerator.device)
    clock.lap("models")
    transform = make_transform(args)
    probe = None
    if held_out is not None:
        probe = fidelity.probe_for_training(
            args, held_out, models, family, transform=transform, weight_dtype=plan.weight_dtype, seed=seed
        )
        clock.lap("fidelity_probe")
    row_buckets = None if sampler is None else sampler.buckets_of_samples
    embeddings = cache.prepare_cache(accelerator, args, family, models, rows, transform, row_buckets)
    offloaded = offload_cached_encoders(args, models)
    if embeddings is not None:
        clock.lap("embeddings_cache")
    optimizer = make_optimizer(args, models.controlnet.parameters(), plan.learning_rate, accelerator.device)
    lr_scheduler = make_lr_scheduler(args, optimizer, plan, accelerator.num_processes)
    ema = make_ema(args, models.controlnet, accelerator.device)
    checkpointing.register_model_hooks(accelerator, ema)
    # The ranks' per-step agreements; it waits as long as the main group (--ddp_timeout).
    host_group = ranks.host_group(accelerator.num_processes, datetime.timedelta(seconds=args.ddp_timeout))
    if args.streaming:
        batches = stream_batches(accelerator, args, rows, transform, seed, host_group)
        batches_per_epoch = None  # a stream's length is unknown
        models.controlnet, optimizer, lr_scheduler = accelerator.prepare(models.controlnet, optimizer, lr_scheduler)
    else:
        loader = make_loader(args, rows, transform, sampler)
        # DeepSpeed reads the micro-batch size from a loader prepared together with the model.
        models.controlnet, optimizer, loader, lr_scheduler = accelerator.prepare(
            models.controlnet, optimizer, loader, lr_scheduler
        )
        batches = LoaderBatches(accelerator, loader)
        batches_per_epoch = len(loader)

    metrics = tracking.MetricsLog(accelerator, output_dir)
    progress = starting_progress(
        accelerator,
        resume,
        seed,
        [args.train_batch_size, accelerator.num_processes],
        batches_per_epoch=batches_per_epoch,
        accumulation=args.gradient_accumulation_steps,
    )
    if accelerator.is_main_process:
        # Records of steps past the checkpoint are replaced by the ones this run writes; a run
        # that starts afresh (in the folder of a run killed before its first checkpoint, or of a
        # run that saved none) replaces them all, those of its step 0 too.
        metrics.drop_after(progress.global_step if resume is not None else -1)
        tracking.write_options(output_dir, args, plan, family.name)
    accelerator.init_trackers(args.tracker_project_name, config=tracking.tracker_config(args, plan))
    clock.lap("optimizer_and_loader" if resume is None else "optimizer_loader_and_resume")
    log_plan(accelerator, plan, progress)
    if probe is not None and progress.global_step == 0:  # the EMA equals the weights here
        with eager_evaluation():
            metrics.log(probe.evaluate(models.controlnet, accelerator=accelerator).to_metrics(), step=0)
        clock.lap("fidelity_at_step_0")
    logger.info("Ready to train after %s", clock.summary())
    metrics.log(clock.metrics(), step=progress.global_step)

    try:
        with stop_on_signals(host_group) as stop:
            progress, stopped = train_loop(
                accelerator,
                args,
                family,
                models,
                plan,
                batches,
                optimizer,
                lr_scheduler,
                progress,
                metrics,
                stop,
                Extras(probe, embeddings, offloaded, ema),
            )
    finally:
        # A stream makes a loader per epoch, without persistent workers: exit does not wait on those.
        if isinstance(batches, LoaderBatches):
            batches.stop_workers()
    if not stopped:
        finish(accelerator, args, family, models, plan, ema, repo_id)
    accelerator.end_training()
    return RunResult(output_dir, progress.global_step, stopped)


def make_accelerator(args: argparse.Namespace, output_dir: Path) -> Accelerator:
    project = ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir))
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to in ("none", "") else args.report_to,
        project_config=project,
        # Pinned batches copied without waiting: the next step's inputs can go over while the
        # GPU still works on this one (the loader pins memory on CUDA).
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=True),
        # Other processes wait while the main one loads a dataset (a download, on first use).
        kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=args.ddp_timeout))],
    )
    if accelerator.is_main_process and not args.dry_run:  # a dry run leaves nothing behind
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise TrainingError(
                f"--output_dir {output_dir} cannot be created ({error.strerror}). Check the path, or "
                "choose a folder on a disk you can write to."
            ) from error
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    return accelerator


def check_engine(engine: DistributedType, zero_stage: int | None, use_ema: bool) -> None:
    """Refuse what the sharding engines cannot do here.

    Under FSDP the saves and evaluations gather the ControlNet's shards (``sharding``), but the
    EMA copy would be one more full set of weights on every rank, the cost FSDP is there to
    avoid, and it would track shards rather than weights. DeepSpeed ZeRO-3 shards the weights
    inside its own engine, which that gathering does not reach.
    """
    if engine == DistributedType.FSDP and use_ema:
        raise TrainingError(
            "--use_ema is not supported under FSDP: the EMA would keep a full copy of the "
            "ControlNet on every GPU, the memory FSDP saves. Drop --use_ema, or train with plain "
            "multi-GPU DDP or DeepSpeed ZeRO-2, where EMA works."
        )
    if engine == DistributedType.DEEPSPEED and zero_stage == 3:
        raise TrainingError(
            "The accelerate config runs DeepSpeed ZeRO-3, which shards the ControlNet's weights "
            "inside DeepSpeed, where this trainer cannot gather them to save or evaluate. Use "
            "DeepSpeed ZeRO-2 (optimizer state and gradients sharded, the usual saving for a "
            "ControlNet, whose frozen UNet is replicated either way), FSDP, or plain multi-GPU DDP."
        )


def check_precision(mixed_precision: str, device: torch.device) -> None:
    """Refuse fp16 on the CPU, before any model is loaded.

    Accelerate turns fp16 autocast and loss scaling off on the CPU without a word, while the
    frozen models would still be cast to fp16: the first step would fail on mixed dtypes.
    """
    if mixed_precision == "fp16" and device.type == "cpu":
        raise TrainingError(
            "--mixed_precision=fp16 needs a GPU: on the CPU, Accelerate runs fp16 without autocast "
            "or loss scaling, so training cannot run. Use --mixed_precision=bf16 (the CPU "
            "autocasts bf16) or --mixed_precision=no, or train on a GPU. If the flag is not on "
            "the command line, it comes from your `accelerate config`."
        )


def agree_on_seed(accelerator: Accelerator, seed: int | None, resume: checkpointing.ResumePoint | None) -> int:
    """The run's seed: the resumed run's, else the flag, else one drawn and shared by all ranks."""
    saved = None if resume is None or resume.saved is None else resume.saved.seed
    if saved is not None:
        if seed is not None and seed != saved:
            logger.warning("--seed=%d differs from the checkpoint's seed %d; using the checkpoint's", seed, saved)
        return saved
    if seed is not None:
        return seed
    drawn = [random.SystemRandom().randrange(2**31)]
    return int(broadcast_object_list(drawn)[0])


def starting_progress(
    accelerator: Accelerator,
    resume: checkpointing.ResumePoint | None,
    seed: int,
    layout: list[int],
    *,
    batches_per_epoch: int | None,
    accumulation: int,
) -> TrainingProgress:
    """A fresh run's progress, or the checkpoint's, counted from now on in this run's batches."""
    if resume is None:
        return TrainingProgress(seed=seed, batch_layout=layout)
    progress = checkpointing.load_checkpoint(accelerator, resume, seed, batches_per_epoch, accumulation)
    warn_if_layout_changed(progress, layout)
    return dataclasses.replace(progress, batch_layout=layout)


def warn_if_layout_changed(progress: TrainingProgress, layout: list[int]) -> None:
    """A resume that changes the samples per micro-batch over all processes cannot continue its
    epoch exactly: the position is counted in micro-batches of the saved size. Allowed, since it
    is how one gets past running out of memory, but said."""
    if progress.batch_layout is None:
        return
    (old_batch, old_processes), (batch, processes) = progress.batch_layout, layout
    used = progress.batch_in_epoch * old_batch * old_processes
    skipped = progress.batch_in_epoch * batch * processes
    if used == skipped:  # e.g. 2 processes of 2 after 1 of 4: the same global batches
        return
    logger.warning(
        "The checkpoint was saved with %d samples per batch on %d process(es); this run uses %d on %d. "
        "Epoch %d resumes after its first %d samples, while the saved run had used %d, so the rest of "
        "this epoch repeats or skips some samples; later epochs see each sample once, as usual.",
        old_batch,
        old_processes,
        batch,
        processes,
        progress.epoch,
        skipped,
        used,
    )


def agree_on_hub_repo(accelerator: Accelerator, args: argparse.Namespace, output_dir: Path) -> str:
    """The main process creates the upload's repo; every rank gets its id, or raises its error
    (rather than waiting for a main process that has stopped)."""
    answer = [None, None]
    if accelerator.is_main_process:
        try:
            answer = [hub.create_hub_repo(output_dir, args), None]
        except hub.HubError as error:
            answer = [None, str(error)]
    repo_id, problem = broadcast_object_list(answer)
    if problem is not None:
        raise hub.HubError(problem)
    return repo_id


def training_rows(accelerator: Accelerator, args: argparse.Namespace, seed: int):
    """(training rows or stream, held-out rows or None, number of training rows or None)."""
    if args.streaming:
        stream = streaming.load_stream(args)
        if args.fidelity_dataset is not None:
            held_out = fidelity.heldout_from_dataset(args)
            stream, _ = streaming.split_stream(stream, held_out=0, max_samples=args.max_train_samples)
        else:
            stream, held_out = streaming.split_stream(
                stream, held_out=args.fidelity_samples, max_samples=args.max_train_samples
            )
        # Rows of a stream are only opened as training reaches them; a bad one stops the run
        # there (or, with --skip_bad_images, is left out).
        # Undecoded: rows skipped on resume, or belonging to another rank, are never decoded.
        columns = data.columns_from_args(args)
        stream = data.undecoded(stream, [columns.image, columns.conditioning_image])
        return stream, held_out, args.max_train_samples
    with accelerator.main_process_first():
        rows = data.load_train_dataset(args)
    rows, held_out = fidelity.heldout_rows(args, checked_rows(accelerator, args, rows), seed)
    rows = data.select_samples(rows, args.max_train_samples, seed)
    return rows, held_out, len(rows)


def bucket_sampler(accelerator: Accelerator, args: argparse.Namespace, rows, seed: int):
    """With --aspect_ratio_buckets, batches drawn from one bucket each; otherwise None."""
    if not args.aspect_ratio_buckets:
        return None
    # Each process reads every n-th image header; all get every row's bucket.
    rank, processes = accelerator.process_index, accelerator.num_processes
    mine = data.assign_buckets(rows, args, indices=range(rank, len(rows), processes))
    shares = gather_object([mine])  # [mine] in one process
    assigned = [shares[index % processes][index // processes] for index in range(len(rows))]
    logger.info("Aspect-ratio buckets (height, width): samples: %s", buckets.summarize(assigned))
    return buckets.BucketBatchSampler(assigned, args.train_batch_size, seed)


def make_lr_scheduler(args: argparse.Namespace, optimizer, plan: TrainPlan, num_processes: int):
    return get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        # The prepared scheduler steps once per process per optimizer step.
        num_warmup_steps=args.lr_warmup_steps * num_processes,
        num_training_steps=plan.max_train_steps * num_processes,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )


def make_loader(args: argparse.Namespace, rows, transform, sampler) -> torch.utils.data.DataLoader:
    """The map-style loader; without the target images when their latents are cached."""
    dataset = data.ControlNetDataset(
        rows,
        data.columns_from_args(args),
        transform,
        with_image=not args.cache_latents,
        buckets=None if sampler is None else sampler.buckets_of_samples,
    )
    return data.make_dataloader(
        dataset, batch_size=args.train_batch_size, num_workers=args.dataloader_num_workers, batch_sampler=sampler
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


def stream_batches(accelerator: Accelerator, args: argparse.Namespace, stream, transform, seed: int, host_group):
    # A run that holds out the stream's first rows or stops at --max_train_samples needs the rows
    # in stream order: split by shards, every rank would skip or take its own first rows instead.
    in_order = bool(args.max_train_samples) or (bool(args.fidelity_samples) and not args.fidelity_dataset)
    batches = streaming.StreamBatches(
        stream=stream,
        columns=data.columns_from_args(args),
        transform=transform,
        batch_size=args.train_batch_size,
        rank=accelerator.process_index,
        num_processes=accelerator.num_processes,
        num_workers=args.dataloader_num_workers,
        seed=seed,
        shuffle_buffer_size=args.shuffle_buffer_size,
        skip_bad_images=args.skip_bad_images,
        host_group=host_group,
        whole_shards_allowed=host_group is not None and not in_order,
    )
    if accelerator.num_processes > 1:
        logger.info(batches.sharing())
    return batches


def checked_rows(accelerator: Accelerator, args: argparse.Namespace, rows):
    """The rows after one scan of every image, which the processes share: each opens every n-th
    row, and all get the merged report. (Scanned by one process, a large dataset kept the
    others at a collective longer than NCCL waits, 10 minutes.)"""
    share = range(accelerator.process_index, len(rows), accelerator.num_processes)
    columns = data.columns_from_args(args)
    mine = integrity.scan_images(
        rows, columns, resolution=args.resolution, num_workers=args.dataloader_num_workers, indices=share
    )
    reports = gather_object([mine])  # [mine] in one process
    report = integrity.merge(reports)
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
        if embeddings is not None and embeddings.latent_slots is not None:
            latents = torch.cat(
                [
                    embeddings.latents(index, generator, scaling)
                    for index, generator in zip(batch["index"], device_generators, strict=True)
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
        controlnet_image=batch["conditioning_pixel_values"].to(latents.device, plan.weight_dtype, non_blocking=True),
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


def final_controlnet(accelerator: Accelerator, controlnet, ema: EMAModel | None):
    """The ControlNet the final save writes, on the main process; every rank must call this.

    The EMA's fp32 average goes into a copy of its own, not into the module: under DeepSpeed
    with bf16 the module is bf16 and would round it.
    """
    if ema is None:
        return sharding.controlnet_to_save(accelerator, controlnet)
    if not accelerator.is_main_process:
        return None
    bare = accelerator.unwrap_model(controlnet)
    names = [name for name, _ in bare.named_parameters()]  # the order EMAModel keeps them in
    weights = {name: average.detach().to("cpu") for name, average in zip(names, ema.shadow_params, strict=True)}
    return sharding.plain_copy(bare.config, weights)


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
    accelerator, args, family, models, plan, batches, optimizer, lr_scheduler, progress, metrics, stop, extras
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
    # A stream's epochs are counted as they end: max_train_steps alone ends the run.
    epochs = itertools.count(progress.epoch) if args.streaming else range(progress.epoch, plan.num_train_epochs)
    for epoch in epochs:
        if progress.global_step >= plan.max_train_steps:
            break
        skip = progress.batch_in_epoch if epoch == progress.epoch else 0
        epoch_batches, batches_per_epoch = batches.epoch(epoch, skip)
        index = skip - 1
        for index, batch in enumerate(epoch_batches, start=skip):
            generators = step_generators(plan.seed, epoch, batch["index"], accelerator.device)
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
            progress = advance(progress, epoch, index + 1, batches_per_epoch)
            pending.append(torch.stack(losses).mean())
            losses = []
            bar.update(1)
            last_step = progress.global_step >= plan.max_train_steps
            checkpoint_due = progress.global_step % args.checkpointing_steps == 0
            stopping = not last_step and (stop.agreed(accelerator) or progress.global_step == args.stop_at_step)
            logging_due = progress.global_step % args.logging_steps == 0 or last_step or checkpoint_due or stopping
            # The only host sync of a step: never save or finish on a loss not yet checked. It comes
            # before the clock is read, so step times include the GPU work queued since the last one.
            step_loss = mean_loss(accelerator, pending) if logging_due else None
            train_seconds += time.perf_counter() - step_started
            if step_loss is not None:
                seconds_per_step = train_seconds / len(pending)
                log_losses(accelerator, step_loss, seconds_per_step, progress, lr_scheduler, bar, metrics)
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
            probe_due = extras.probe is not None and (progress.global_step % fidelity_every == 0 or last_step)
            validation_due = progress.global_step % args.validation_steps == 0 or last_step
            # Only when due: swapping the EMA weights in copies every weight to the host and back
            # (EMAModel.store/restore), 1.3 s a step for SD 1.5 on an H100.
            if probe_due or validation_due:
                with averaged_weights(accelerator, models.controlnet, extras.ema), eager_evaluation():
                    if probe_due:
                        result = extras.probe.evaluate(models.controlnet, accelerator=accelerator)
                        metrics.log(result.to_metrics(), step=progress.global_step)
                    if validation_due:
                        validate(accelerator, args, family, models, plan, progress.global_step, extras.offloaded)
            step_started = time.perf_counter()  # step times leave out checkpoints and evaluations
            if last_step:
                break
        else:
            progress = end_epoch(progress, epoch, batches_run=index + 1 - skip)
    bar.close()
    return progress, False


def mean_loss(accelerator: Accelerator, pending: list[torch.Tensor]) -> float:
    """The mean loss of the steps since the last log, over processes (waits for the GPU)."""
    return accelerator.reduce(torch.stack(pending).mean(), reduction="mean").item()


def log_losses(accelerator, step_loss: float, seconds_per_step: float, progress, lr_scheduler, bar, metrics) -> None:
    """Log the loss and step time since the last log, and the device's peak memory; stop on NaN or inf."""
    learning_rate = lr_scheduler.get_last_lr()[0]
    bar.set_postfix(loss=step_loss, lr=learning_rate)
    values = {"loss": step_loss, "lr": learning_rate, "step_seconds": seconds_per_step}
    metrics.log(values | tracking.device_memory(accelerator.device), step=progress.global_step)
    if not math.isfinite(step_loss):
        raise TrainingError(non_finite_message(step_loss, progress.global_step, metrics.path.parent))


def validate(accelerator, args, family, models, plan, step: int, offloaded) -> None:
    """Validation images; offloaded encoders visit the accelerator only for its duration."""
    if not args.validation_prompt:
        return
    controlnet = sharding.full_controlnet(accelerator, models.controlnet, every_rank=False)
    if not accelerator.is_main_process:
        return
    for module in offloaded:
        module.to(accelerator.device)
    validation.run_validation(
        accelerator=accelerator,
        family=family,
        models=models,
        controlnet=controlnet,
        args=args,
        weight_dtype=plan.weight_dtype,
        step=step,
        seed=plan.seed,
    )
    for module in offloaded:
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


def finish(accelerator, args, family, models, plan, ema: EMAModel | None, repo_id: str | None) -> None:
    """Final weights (the EMA's, with --use_ema) at the output root, the model card, and the
    optional upload."""
    started = time.perf_counter()
    accelerator.wait_for_everyone()
    controlnet = final_controlnet(accelerator, models.controlnet, ema)
    if not accelerator.is_main_process:
        return
    output_dir = Path(args.output_dir)
    hub.save_final_model(controlnet, output_dir)
    if args.save_single_file:
        export.save_single_file(controlnet, output_dir / hub.SINGLE_FILE)
    records = tracking.read_metrics(output_dir)
    # No step was logged where a run resumed from another folder had no step left to take.
    if any("loss" in record for record in records):
        plots.plot_training_curves(records, output_dir / hub.CURVES_FILE)
    hub.write_model_card(output_dir, args, plan, family.name)
    if repo_id is not None:
        hub.push_to_hub(output_dir, repo_id, args)
    logger.info("Saved the ControlNet to %s (%.1f s)", output_dir, time.perf_counter() - started)
