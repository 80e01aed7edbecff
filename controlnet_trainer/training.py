"""A training run, assembled top to bottom: checks, accelerator, data, models, optimizer and
batches, then the loop (``loop``) and the final save."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import random
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    DistributedType,
    InitProcessGroupKwargs,
    ProjectConfiguration,
    broadcast_object_list,
    set_seed,
)
from diffusers.training_utils import free_memory

from . import batches, cache, checkpointing, fidelity, hub, plots, ranks, tracking, validation
from .checkpointing import TrainingProgress
from .errors import TrainingError
from .families import ModelFamily, Models
from .loop import LoopParts, log_plan, train_loop
from .models import check_base_model, eager_evaluation, load_models
from .optimization import final_controlnet, make_ema, make_lr_scheduler, make_optimizer
from .plan import TrainPlan, make_plan
from .preemption import stop_on_signals
from .settings import MemorySettings, OutputSettings, Settings

logger = get_logger(__name__)


@dataclasses.dataclass(frozen=True)
class RunResult:
    output_dir: Path
    global_step: int
    stopped_early: bool = False
    plan: dict | None = None  # with --dry_run: the family and the plan, nothing trained


@dataclasses.dataclass(frozen=True)
class Start:
    """What the checks and the accelerator settle before any data or model is loaded."""

    accelerator: Accelerator
    resume: checkpointing.ResumePoint | None
    seed: int
    repo_id: str | None


def train(settings: Settings, family: ModelFamily) -> RunResult:
    """Train a ControlNet as the settings say; returns where it ended."""
    clock = tracking.StartupClock()
    output_dir = settings.output.output_dir
    start = start_run(settings, family)
    accelerator, seed = start.accelerator, start.seed
    clock.lap("accelerator")

    rows, held_out, num_samples = batches.training_rows(accelerator, settings.data, settings.evaluation, seed)
    sampler = batches.bucket_sampler(accelerator, settings.data, rows, seed)
    plan = make_plan(
        settings.data.train_batch_size,
        settings.optimizer,
        num_samples=num_samples,
        num_batches=None if sampler is None else len(sampler),
        num_processes=accelerator.num_processes,
        mixed_precision=accelerator.mixed_precision,
        seed=seed,
    )
    if settings.output.dry_run:
        answer = {"family": family.name, "plan": plan.to_json()}
        if family.memory_estimate is not None:
            answer["gpu_memory_gib_before_activations"] = family.memory_estimate(settings, plan.weight_dtype)
        return RunResult(output_dir, 0, plan=answer)
    clock.lap("data")

    models = load_models(settings.model, family)
    family.place_models(
        models,
        device=accelerator.device,
        weight_dtype=plan.weight_dtype,
        settings=settings.model,
    )
    family.enable_memory_options(models, settings.memory, accelerator.device)
    clock.lap("models")
    transform = batches.make_transform(settings.data)
    probe = None
    if held_out is not None:
        probe = fidelity.probe_for_training(
            held_out,
            models,
            family,
            settings.data,
            transform=transform,
            timesteps_per_sample=settings.evaluation.fidelity_timesteps,
            weight_dtype=plan.weight_dtype,
            seed=seed,
        )
        clock.lap("fidelity_probe")
    row_buckets = None if sampler is None else sampler.buckets_of_samples
    embeddings = cache.prepare_cache(accelerator, settings, family, models, rows, transform, row_buckets)
    prompt_embeddings = embed_validation_prompts(settings, family, models)
    offloaded = offload_cached_encoders(settings.memory, models, keep_vae=family.control_uses_vae)
    if prompt_embeddings is not None:  # the text encoders need not come back for validation
        offloaded = tuple(module for module in offloaded if all(module is not e for e in models.text_encoders))
    if embeddings is not None:
        clock.lap("embeddings_cache")

    optimizer = make_optimizer(settings.optimizer, models.controlnet.parameters(), plan.learning_rate, accelerator.device)
    lr_scheduler = make_lr_scheduler(settings.optimizer, optimizer, plan, accelerator.num_processes)
    ema = make_ema(settings.optimizer, models.controlnet, accelerator.device)
    checkpointing.register_model_hooks(accelerator, ema, folder=family.checkpoint_folder)
    # The ranks' per-step agreements; it waits as long as the main group (--ddp_timeout).
    host_group = ranks.host_group(accelerator.num_processes, datetime.timedelta(seconds=settings.loop.ddp_timeout))
    if settings.data.streaming:
        source = batches.stream_batches(
            accelerator, settings.data, settings.evaluation, rows, transform, seed, host_group
        )
        batches_per_epoch = None  # a stream's length is unknown
        models.controlnet, optimizer, lr_scheduler = accelerator.prepare(models.controlnet, optimizer, lr_scheduler)
    else:
        loader = batches.make_loader(
            settings.data, rows, transform, sampler, with_image=not settings.memory.cache_latents
        )
        # DeepSpeed reads the micro-batch size from a loader prepared together with the model.
        models.controlnet, optimizer, loader, lr_scheduler = accelerator.prepare(
            models.controlnet, optimizer, loader, lr_scheduler
        )
        source = batches.LoaderBatches(accelerator, loader)
        batches_per_epoch = len(loader)

    metrics = tracking.MetricsLog(accelerator, output_dir)
    progress = starting_progress(
        accelerator,
        start.resume,
        seed,
        [settings.data.train_batch_size, accelerator.num_processes],
        batches_per_epoch=batches_per_epoch,
        accumulation=settings.optimizer.gradient_accumulation_steps,
    )
    record_run(accelerator, settings, family, plan, metrics, progress if start.resume is not None else None)
    clock.lap("optimizer_and_loader" if start.resume is None else "optimizer_loader_and_resume")
    log_plan(accelerator, plan, progress)
    if probe is not None and progress.global_step == 0:  # the EMA equals the weights here
        with eager_evaluation():
            metrics.log(probe.evaluate(models.controlnet, accelerator=accelerator).to_metrics(), step=0)
        clock.lap("fidelity_at_step_0")
    logger.info("Ready to train after %s", clock.summary())
    metrics.log(clock.metrics(), step=progress.global_step)

    parts = LoopParts(
        accelerator, settings, family, models, plan, optimizer, lr_scheduler, metrics, probe, embeddings, offloaded, ema,
        prompt_embeddings=prompt_embeddings,
    )
    try:
        with stop_on_signals(host_group) as stop:
            progress, stopped = train_loop(parts, source, progress, stop)
    finally:
        # A stream makes a loader per epoch, without persistent workers: exit does not wait on those.
        if isinstance(source, batches.LoaderBatches):
            source.stop_workers()
    if not stopped:
        finish(parts, start.repo_id)
    accelerator.end_training()
    return RunResult(output_dir, progress.global_step, stopped)


def start_run(settings: Settings, family: ModelFamily) -> Start:
    """Every check that needs no data or weights, the accelerator, the seed and the Hub repo."""
    output_dir = settings.output.output_dir
    resume = checkpointing.resolve_resume(output_dir, settings.loop.resume_from_checkpoint)
    checkpointing.check_output_dir(output_dir, resume)
    validation.check_validation_images(settings.evaluation.validation_image)
    accelerator = make_accelerator(settings, unused_parameters=family.unused_parameters)
    deepspeed = accelerator.state.deepspeed_plugin
    check_engine(accelerator.distributed_type, deepspeed.zero_stage if deepspeed else None, settings.optimizer.use_ema)
    check_precision(accelerator.mixed_precision, accelerator.device)
    if settings.optimizer.fused_backward_pass:
        check_fused_backward_pass(accelerator.num_processes, accelerator.mixed_precision)
    check_base_model(settings.model, family)
    # Not on a dry run, which must leave nothing behind, on the Hub either.
    output = settings.output
    repo_id = agree_on_hub_repo(accelerator, output) if output.push_to_hub and not output.dry_run else None
    seed = agree_on_seed(accelerator, settings.seed, resume)
    set_seed(seed)  # also seeds Accelerate's sampler, so data order is a function of the epoch
    if settings.memory.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    return Start(accelerator, resume, seed, repo_id)


def record_run(
    accelerator: Accelerator,
    settings: Settings,
    family: ModelFamily,
    plan: TrainPlan,
    metrics: tracking.MetricsLog,
    resumed: TrainingProgress | None,
) -> None:
    """The run's options and plan in the output folder and the trackers. On resume, the metrics of
    steps past the checkpoint are dropped, since this run writes them again; a run that starts
    afresh (in the folder of a run killed before its first checkpoint, or of a run that saved
    none) replaces all records, those of its step 0 too."""
    if accelerator.is_main_process:
        metrics.drop_after(resumed.global_step if resumed is not None else -1)
        tracking.write_options(settings.output.output_dir, settings.arguments, plan, family.name)
    accelerator.init_trackers(
        settings.output.tracker_project_name, config=tracking.tracker_config(settings.arguments, plan)
    )


def make_accelerator(settings: Settings, *, unused_parameters: bool = False) -> Accelerator:
    """The run's accelerator; ``unused_parameters``: some ControlNet parameters get no gradient in a
    step, so DDP must find them rather than wait for their gradients."""
    output_dir = settings.output.output_dir
    handlers = [InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=settings.loop.ddp_timeout))]
    if unused_parameters:
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    project = ProjectConfiguration(
        project_dir=str(output_dir), logging_dir=str(output_dir / settings.output.logging_dir)
    )
    accelerator = Accelerator(
        gradient_accumulation_steps=settings.optimizer.gradient_accumulation_steps,
        mixed_precision=settings.memory.mixed_precision,
        log_with=None if settings.output.report_to in ("none", "") else settings.output.report_to,
        project_config=project,
        # Pinned batches copied without waiting: the next step's inputs can go over while the
        # GPU still works on this one (the loader pins memory on CUDA).
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=True),
        # The timeout: other processes wait while the main one loads a dataset (a download, on first use).
        kwargs_handlers=handlers,
    )
    if accelerator.is_main_process and not settings.output.dry_run:  # a dry run leaves nothing behind
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


def check_fused_backward_pass(num_processes: int, mixed_precision: str) -> None:
    """The fused step runs on a rank's own gradient before any process could average it, and
    before a loss scaler could unscale it."""
    if num_processes > 1:
        raise TrainingError(
            f"--fused_backward_pass steps each parameter on this process's own gradient, before the "
            f"{num_processes} processes average them, so their weights would drift apart. Train on one "
            "process, or drop the flag (DeepSpeed ZeRO-2 shards gradients across GPUs instead)."
        )
    if mixed_precision == "fp16":  # from the accelerate config; the flag itself is checked earlier
        raise TrainingError(
            "--fused_backward_pass cannot unscale fp16 gradients before the step; the accelerate config "
            "asks for fp16. Pass --mixed_precision=bf16."
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


def agree_on_hub_repo(accelerator: Accelerator, output: OutputSettings) -> str:
    """The main process creates the upload's repo; every rank gets its id, or raises its error
    (rather than waiting for a main process that has stopped)."""
    answer = [None, None]
    if accelerator.is_main_process:
        try:
            answer = [hub.create_hub_repo(output), None]
        except hub.HubError as error:
            answer = [None, str(error)]
    repo_id, problem = broadcast_object_list(answer)
    if problem is not None:
        raise hub.HubError(problem)
    return repo_id


def embed_validation_prompts(settings: Settings, family: ModelFamily, models: Models) -> dict | None:
    """With the text embeddings cached, the validation prompts' embeddings, made now while the text
    encoders are on the device, where the family's pipeline can take embeddings: the encoders then
    stay in CPU memory through validation (FLUX.1's T5 alone is 8.9 GiB)."""
    prompts = settings.evaluation.validation_prompt
    if not (settings.memory.cache_text_embeddings and prompts and family.prompt_embedding_inputs):
        return None
    return validation.encode_validation_prompts(family, models, prompts)


def offload_cached_encoders(
    memory: MemorySettings, models: Models, *, keep_vae: bool = False
) -> tuple[torch.nn.Module, ...]:
    """Once their outputs are cached, the VAE and text encoders wait on the CPU for validation;
    ``keep_vae``: the VAE stays, as it encodes every step's conditioning images (SD3)."""
    offloaded = ((models.vae,) if memory.cache_latents and not keep_vae else ()) + (
        models.text_encoders if memory.cache_text_embeddings else ()
    )
    for module in offloaded:
        module.to("cpu")
    if offloaded:
        free_memory()
    return offloaded


def finish(parts: LoopParts, repo_id: str | None) -> None:
    """Final weights (the EMA's, with --use_ema) at the output root, the model card, and the
    optional upload."""
    started = time.perf_counter()
    accelerator, output = parts.accelerator, parts.settings.output
    accelerator.wait_for_everyone()
    controlnet = final_controlnet(accelerator, parts.models.controlnet, parts.ema)
    if not accelerator.is_main_process:
        return
    output_dir = output.output_dir
    hub.save_final_model(controlnet, output_dir, output.save_weight_dtype)
    if output.save_single_file:
        parts.family.save_single_file(controlnet, output_dir / hub.SINGLE_FILE)
    records = tracking.read_metrics(output_dir)
    # No step was logged where a run resumed from another folder had no step left to take.
    if any("loss" in record for record in records):
        plots.plot_training_curves(records, output_dir / hub.CURVES_FILE)
    hub.write_model_card(output_dir, parts.settings, parts.plan, parts.family)
    if repo_id is not None:
        hub.push_to_hub(output_dir, repo_id, output)
    logger.info("Saved the ControlNet to %s (%.1f s)", output_dir, time.perf_counter() - started)
