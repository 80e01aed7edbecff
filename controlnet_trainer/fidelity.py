"""Conditioning fidelity: does the ControlNet use its conditioning image yet?

ControlNet training "suddenly converges": the loss barely moves for thousands of steps, then
the model starts obeying the conditioning. The training loss cannot show that moment, since
most of it is the denoising the UNet already does. This module measures it directly on a small
held-out set, with noise and timesteps fixed once so that two evaluations differ only by the
ControlNet's weights. It computes the mean denoising loss (MSE against the scheduler's target,
epsilon or v) of UNet + ControlNet given

- ``matched``: each sample's own conditioning image,
- ``mismatched``: the next held-out sample's conditioning image (the set rolled by one),
- ``blank``: an all-zero conditioning image,
- ``unet_only``: no ControlNet residuals at all,

and reports ``control_gap = (mismatched - matched) / mismatched``, the relative improvement the
right conditioning image brings over a wrong one. A fresh ControlNet (zero convolutions) gives
four equal losses and a gap of 0.

Evaluate a saved ControlNet (ours or any in diffusers format) from the command line::

    python -m controlnet_trainer.fidelity \\
        --pretrained_model_name_or_path=stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --controlnet_model_name_or_path=./controlnet-model --dataset_name=fusing/fill50k

It scores the first ``--num_samples`` rows of the dataset's train split (point it at data the
ControlNet was not trained on) and prints one JSON object with the four losses,
``control_gap`` and ``num_samples``. Under ``accelerate launch`` each process evaluates its
share of the samples and the main process prints the combined result.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from collections.abc import Sequence

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from torchvision.transforms import v2

from . import data, datasources, families, integrity, sharding
from .arguments import add_dataset_flags, add_model_flags
from .arguments import build_parser as training_parser
from .errors import InputError
from .families import ModelFamily, Models, TextConditioning, to_latents
from .families.sdxl import INTERPOLATION_MODES
from .models import check_base_model, load_models, mixed_precision_autocast
from .plan import DTYPES
from .settings import DataSettings, EvaluationSettings, Settings

# Fewer than two held-out samples leaves no *other* conditioning image to mismatch with.
MIN_SAMPLES = 2
CONDITIONS = ("matched", "mismatched", "blank", "unet_only")


@dataclasses.dataclass(frozen=True)
class FidelityResult:
    """Mean held-out denoising losses under the four conditionings, and the gap they give."""

    matched: float
    mismatched: float
    blank: float
    unet_only: float
    control_gap: float
    num_samples: int

    @classmethod
    def from_losses(cls, losses: dict[str, float], num_samples: int) -> FidelityResult:
        mismatched = losses["mismatched"]
        # A zero loss means nothing is left to improve on, not infinite improvement.
        gap = (mismatched - losses["matched"]) / mismatched if mismatched > 0 else 0.0
        return cls(**losses, control_gap=gap, num_samples=num_samples)

    def to_metrics(self, prefix: str = "fidelity/") -> dict[str, float]:
        """The losses and the gap for ``accelerator.log``; the constant sample count is left out."""
        return {f"{prefix}{name}": getattr(self, name) for name in (*CONDITIONS, "control_gap")}

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def split_heldout(rows: datasets.Dataset, num_samples: int, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train rows, held-out rows): ``num_samples`` rows drawn with ``seed``, both in dataset order.

    The draw depends only on the number of rows and the seed, so every process and every
    resumed run holds out the same rows.
    """
    if num_samples < MIN_SAMPLES:
        raise InputError(
            f"The fidelity probe needs at least {MIN_SAMPLES} held-out samples (one sample's "
            f"conditioning image is scored against another's); got {num_samples}. Hold out more."
        )
    if num_samples >= len(rows):
        raise InputError(
            f"The dataset has {len(rows)} rows, too few to hold out {num_samples} for the fidelity "
            f"probe and still train on the rest. Hold out fewer samples (at most {len(rows) - 1}) "
            "or use a larger dataset."
        )
    rng = np.random.default_rng(seed)
    heldout = np.sort(rng.choice(len(rows), size=num_samples, replace=False))
    keep = np.ones(len(rows), dtype=bool)
    keep[heldout] = False
    return rows.select(np.flatnonzero(keep)), rows.select(heldout)


def load_samples(rows: datasets.Dataset, columns: data.Columns, transform: data.PairedTransform) -> list[dict]:
    """Rows as training samples (same decoding and transform), ready for ``FidelityProbe.build``."""
    dataset = data.ControlNetDataset(rows, columns, transform)
    return [dataset[index] for index in range(len(dataset))]


def fixed_timesteps(
    num_samples: int, per_sample: int, num_train_timesteps: int, generator: torch.Generator
) -> torch.Tensor:
    """[num_samples, per_sample] timesteps: one in each of ``per_sample`` equal strata of the
    schedule, at an offset drawn once per sample, so every noise level is covered evenly."""
    offsets = torch.rand(num_samples, 1, generator=generator)
    strata = torch.arange(per_sample, dtype=torch.float32)
    timesteps = ((strata + offsets) * (num_train_timesteps / per_sample)).floor().long()
    return timesteps.clamp_(0, num_train_timesteps - 1)


def _as_batch(samples: Sequence[dict] | dict) -> dict:
    return samples if isinstance(samples, dict) else data.collate(samples)


@torch.no_grad()
def _encode(
    models: Models,
    family: ModelFamily,
    batch: dict,
    *,
    resolution: int,
    crop_override: tuple[int, int] | None,
) -> dict[str, torch.Tensor]:
    """One batch as the probe holds it, fp32 on the CPU: latents, prompt embeddings (and pooled
    ones), the conditioning images and blank ones as the ControlNet takes them, and SDXL's added
    conditioning (keys ``added.<name>``)."""
    vae = models.vae
    pixels = batch["pixel_values"].to(vae.device, vae.dtype)
    # Posterior means, not samples: the probe must not change between evaluations.
    latents = to_latents(vae, vae.encode(pixels).latent_dist.mean)
    conditioning = batch["conditioning_pixel_values"].to(vae.device, vae.dtype)
    prompts = [captions[0] for captions in batch["captions"]]
    text = family.encode_prompts(models, prompts)
    added = family.added_conditioning(text, batch, resolution=resolution, crop_override=crop_override)
    encoded = {
        "latents": latents,
        "hidden": text.encoder_hidden_states,
        "conditioning": family.encode_control(models, conditioning, None),
        "blank": family.encode_control(models, torch.zeros_like(conditioning), None),
    }
    if text.pooled is not None:
        encoded["pooled"] = text.pooled
    encoded |= {f"added.{name}": value for name, value in (added or {}).items()}
    return {name: value.float().cpu() for name, value in encoded.items()}


def _encode_in_batches(
    models: Models,
    family: ModelFamily,
    batch: dict,
    *,
    batch_size: int,
    resolution: int,
    crop_override: tuple[int, int] | None,
) -> dict[str, torch.Tensor]:
    """``_encode`` over the whole set, a few samples at a time to bound the VAE's memory."""
    count = len(batch["captions"])
    parts = [
        _encode(
            models,
            family,
            {name: value[start : start + batch_size] for name, value in batch.items()},
            resolution=resolution,
            crop_override=crop_override,
        )
        for start in range(0, count, batch_size)
    ]
    return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}


@dataclasses.dataclass(frozen=True, eq=False)
class FidelityProbe:
    """A held-out set encoded once, with fixed noise and timesteps, to score ControlNets on.

    Per-sample tensors have one row per held-out sample; per-item tensors one row per
    (sample, timestep) pair. They live on the CPU so that full-resolution conditioning images
    do not occupy accelerator memory for the whole run; each batch is moved when evaluated.
    """

    models: Models = dataclasses.field(repr=False)  # the frozen models the ControlNet is scored with
    family: ModelFamily = dataclasses.field(repr=False)
    weight_dtype: torch.dtype
    latents: torch.Tensor = dataclasses.field(repr=False)
    encoder_hidden_states: torch.Tensor = dataclasses.field(repr=False)
    pooled: torch.Tensor | None = dataclasses.field(repr=False)  # SDXL's and SD3's pooled prompt
    added_conditioning: dict[str, torch.Tensor] = dataclasses.field(repr=False)
    # The conditioning images, and blank (black) ones, as the ControlNet takes them.
    conditioning: torch.Tensor = dataclasses.field(repr=False)
    blank: torch.Tensor = dataclasses.field(repr=False)
    mismatched_index: torch.Tensor = dataclasses.field(repr=False)
    item_sample: torch.Tensor = dataclasses.field(repr=False)
    timesteps: torch.Tensor = dataclasses.field(repr=False)
    noise: torch.Tensor = dataclasses.field(repr=False)

    @property
    def num_samples(self) -> int:
        return self.latents.shape[0]

    @classmethod
    def build(
        cls,
        models: Models,
        family: ModelFamily,
        samples: Sequence[dict] | dict,
        *,
        resolution: int,
        timesteps_per_sample: int = 4,
        seed: int = 0,
        crop_override: tuple[int, int] | None = None,
        weight_dtype: torch.dtype = torch.float32,
        batch_size: int = 8,
    ) -> FidelityProbe:
        """Encode ``samples`` (``ControlNetDataset`` items, or a ``collate``d batch of them).

        Build it on every process from the same samples: it is deterministic for ``seed``, so
        all processes hold the same probe and each evaluates its share.
        """
        batch = _as_batch(samples)
        count = len(batch["captions"])
        if count < MIN_SAMPLES:
            raise InputError(
                f"The fidelity probe needs at least {MIN_SAMPLES} samples to mismatch "
                f"conditioning images between; got {count}."
            )
        if timesteps_per_sample < 1:
            raise InputError(f"timesteps_per_sample must be at least 1, got {timesteps_per_sample}.")
        encoded = _encode_in_batches(
            models, family, batch, batch_size=batch_size, resolution=resolution, crop_override=crop_override
        )
        latents = encoded["latents"]
        generator = torch.Generator().manual_seed(seed)
        num_train_timesteps = models.noise_scheduler.config.num_train_timesteps
        positions = fixed_timesteps(count, timesteps_per_sample, num_train_timesteps, generator)
        noise = torch.randn((count * timesteps_per_sample, *latents.shape[1:]), generator=generator)
        return cls(
            models=models,
            family=family,
            weight_dtype=weight_dtype,
            latents=latents,
            encoder_hidden_states=encoded["hidden"],
            pooled=encoded.get("pooled"),
            added_conditioning={
                name.removeprefix("added."): value for name, value in encoded.items() if name.startswith("added.")
            },
            conditioning=encoded["conditioning"],
            blank=encoded["blank"],
            mismatched_index=torch.roll(torch.arange(count), -1),
            item_sample=torch.arange(count).repeat_interleave(timesteps_per_sample),
            timesteps=family.schedule_timesteps(models, positions.flatten()),
            noise=noise,
        )

    def evaluate(
        self, controlnet: torch.nn.Module, *, batch_size: int = 8, accelerator: Accelerator | None = None
    ) -> FidelityResult:
        """Score ``controlnet``; with an ``accelerator``, every process must call this.

        Process ``r`` of ``n`` evaluates the samples ``i`` with ``i % n == r``; sums and counts
        are then added over processes, so all get the same result.
        """
        rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
        # The bare module with all its weights: DDP's forward would expect every rank to run the
        # same batches, and FSDP's shards are gathered into a plain copy on every rank.
        model = sharding.full_controlnet(accelerator, controlnet, every_rank=True) if accelerator else controlnet
        items = torch.nonzero(self.item_sample % world == rank).flatten()
        was_training = model.training
        model.eval()
        try:
            sums = self._loss_sums(model, items, batch_size)
        finally:
            model.train(was_training)
        mine = torch.arange(self.num_samples) % world == rank
        totals = torch.tensor([*sums, len(items), int(mine.sum())], dtype=torch.float64)
        if accelerator is not None and world > 1:
            totals = accelerator.reduce(totals.to(accelerator.device), reduction="sum").cpu()
        num_items = float(totals[len(CONDITIONS)])
        losses = {name: float(total) / num_items for name, total in zip(CONDITIONS, totals)}
        return FidelityResult.from_losses(losses, num_samples=int(totals[-1]))

    @torch.no_grad()
    def _loss_sums(self, controlnet: torch.nn.Module, items: torch.Tensor, batch_size: int) -> list[float]:
        """Per-condition sums of the per-item losses over ``items``."""
        device = self.models.denoiser.device
        sums = [0.0] * len(CONDITIONS)
        with mixed_precision_autocast(device, self.weight_dtype):
            for chunk in items.split(batch_size):
                losses = self._batch_losses(controlnet, chunk, device)
                sums = [total + float(loss.double().sum()) for total, loss in zip(sums, losses)]
        return sums

    def _batch_losses(self, controlnet: torch.nn.Module, items: torch.Tensor, device: torch.device):
        """Per-item losses of one batch under each of the four conditionings, in CONDITIONS order."""
        dtype = self.weight_dtype
        samples = self.item_sample[items]
        matched = self.conditioning[samples]
        images = (matched, self.conditioning[self.mismatched_index[samples]], self.blank[samples], None)
        added = {name: value[samples].to(device, dtype) for name, value in self.added_conditioning.items()}
        common = {
            "latents": self.latents[samples].to(device, dtype),
            "noise": self.noise[items].to(device, dtype),
            "timesteps": self.timesteps[items].to(device),
            "text": TextConditioning(
                self.encoder_hidden_states[samples].to(device, dtype),
                None if self.pooled is None else self.pooled[samples].to(device, dtype),
            ),
            "added_cond_kwargs": added or None,
            "weight_dtype": dtype,
            "reduce": False,
        }
        return [
            self.family.loss(
                self.models, controlnet, **common, controlnet_image=None if image is None else image.to(device, dtype)
            )
            for image in images
        ]


def heldout_rows(
    settings: DataSettings, evaluation: EvaluationSettings, rows: datasets.Dataset, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """(training rows, held-out rows or None) as --fidelity_samples / --fidelity_dataset say."""
    if not evaluation.fidelity_samples:
        return rows, None
    if evaluation.fidelity_dataset is not None:
        return rows, heldout_from_dataset(settings, evaluation)
    try:
        return split_heldout(rows, evaluation.fidelity_samples, seed)
    except InputError as error:
        if not settings.skip_bad_images:
            raise
        raise InputError(
            f"{error} (Counted after --skip_bad_images left out the rows with unreadable images.)"
        ) from error


def heldout_from_dataset(settings: DataSettings, evaluation: EvaluationSettings) -> datasets.Dataset:
    """The first --fidelity_samples rows of --fidelity_dataset, their images checked."""
    source = dataclasses.replace(settings, dataset_name=evaluation.fidelity_dataset, train_data_dir=None)
    held_out = datasources.load_train_dataset(source)
    held_out = held_out.select(range(min(evaluation.fidelity_samples, len(held_out))))
    if len(held_out) < MIN_SAMPLES:
        raise InputError(
            f"--fidelity_dataset {evaluation.fidelity_dataset!r} has {len(held_out)} row(s); the fidelity probe "
            f"needs at least {MIN_SAMPLES} (each sample is scored against another's conditioning image). "
            "Add rows, or drop --fidelity_dataset to hold out training rows instead."
        )
    # The training rows' images are checked before training; these are too, not when the probe is built.
    report = integrity.scan_images(held_out, data.columns_of(settings), resolution=settings.resolution, num_workers=0)
    if report.problems:
        first = report.problems[0]
        raise InputError(
            f"--fidelity_dataset {evaluation.fidelity_dataset!r}: row {first.row} has an unreadable image in "
            f"`{first.column}`, file {first.source!r} ({first.error}). Fix or remove it."
        )
    return held_out


def probe_for_training(
    rows: datasets.Dataset,
    models: Models,
    family: ModelFamily,
    settings: DataSettings,
    *,
    transform: data.PairedTransform,
    timesteps_per_sample: int,
    weight_dtype: torch.dtype,
    seed: int,
) -> FidelityProbe:
    """The probe the trainer evaluates; built identically on every process."""
    samples = load_samples(rows, data.columns_of(settings), transform)
    return FidelityProbe.build(
        models,
        family,
        samples,
        resolution=settings.resolution,
        timesteps_per_sample=timesteps_per_sample,
        seed=seed,
        crop_override=settings.crop_override,
        weight_dtype=weight_dtype,
    )


def build_parser() -> argparse.ArgumentParser:
    """The command line: the training scripts' model and dataset flags, and the probe's own."""
    parser = argparse.ArgumentParser(
        description="Score a ControlNet's use of its conditioning image on a dataset: denoising "
        "loss with matched, mismatched and blank conditioning images and without the ControlNet.",
    )
    models = parser.add_argument_group("models")
    add_model_flags(
        models,
        controlnet_help="The ControlNet to score: a diffusers folder or Hub id, or one .safetensors file in the "
        "original (A1111 / ComfyUI) layout. Without it, a fresh ControlNet made from the UNet is scored: the "
        "baseline, whose four losses are equal.",
    )
    models.add_argument("--pretrained_vae_model_name_or_path", type=str, default=None)
    models.add_argument(
        "--family",
        type=str,
        default=None,
        choices=families.names(),
        help="The base model's family: sd (default), sdxl, sd3 or flux, as the training script that made the "
        "ControlNet.",
    )
    models.add_argument("--sdxl", action="store_true", help="The base model is SDXL (--family=sdxl).")
    models.add_argument(
        "--max_sequence_length",
        type=int,
        default=None,
        help="SD3 and Flux: the T5 prompt length the ControlNet trained with (default: the training "
        "script's, 77 for SD3 and 512 for Flux).",
    )
    models.add_argument(
        "--guidance_scale", type=float, default=3.5, help="Flux: the guidance scale the ControlNet trained with."
    )
    models.add_argument("--drop_t5", action="store_true", help="SD3: the ControlNet trained without T5.")
    models.add_argument(
        "--mixed_precision",
        type=str,
        default="no",
        choices=tuple(DTYPES),
        help="dtype of the frozen base models; the ControlNet runs in fp32 under autocast.",
    )
    dataset = parser.add_argument_group("data")
    add_dataset_flags(dataset)
    dataset.add_argument("--resolution", type=int, default=None, help="Default: the family's (512; 1024 for SDXL).")
    dataset.add_argument(
        "--image_interpolation_mode",
        type=str,
        default=None,
        choices=INTERPOLATION_MODES,
        help="Default: bilinear, or lanczos for SDXL, as in training.",
    )
    dataset.add_argument("--crops_coords_top_left_h", type=int, default=None)
    dataset.add_argument("--crops_coords_top_left_w", type=int, default=None)
    probe = parser.add_argument_group("probe")
    probe.add_argument("--num_samples", type=int, default=32, help="Score the first N rows of the train split.")
    probe.add_argument(
        "--timesteps_per_sample", type=int, default=4, help="Timesteps per sample, spread evenly over the schedule."
    )
    probe.add_argument("--seed", type=int, default=0, help="Seed of the fixed noise and timesteps.")
    probe.add_argument("--batch_size", type=int, default=8)
    return parser


def check_args(args: argparse.Namespace) -> None:
    if args.dataset_name is None and args.train_data_dir is None:
        raise InputError(
            "No data to score on: specify `--dataset_name` (a hub id or a local dataset directory) or "
            "`--train_data_dir` (a local folder), or both, as for training."
        )
    if args.resolution is not None and args.resolution % 8 != 0:
        raise InputError(f"`--resolution` must be divisible by 8, got {args.resolution}.")
    for name in ("num_samples", "timesteps_per_sample", "batch_size"):
        if getattr(args, name) < 1:
            raise InputError(f"`--{name}` must be at least 1, got {getattr(args, name)}.")


def resolve(args: argparse.Namespace) -> tuple[ModelFamily, Settings]:
    """The family and the settings of the command line, with the training scripts' defaults for
    the family: 512 px and bilinear, or 1024 px and lanczos for SDXL."""
    family = families.by_name(args.family or ("sdxl" if args.sdxl else "sd"))
    defaults = family.defaults
    values = vars(args) | {
        "resolution": args.resolution or defaults.resolution,
        "image_interpolation_mode": args.image_interpolation_mode or defaults.image_interpolation_mode,
    }
    # The T5 families' training default for the prompt length (the UNet families have no T5).
    length = args.max_sequence_length or training_parser(family).get_default("max_sequence_length")
    if length is None:
        del values["max_sequence_length"]
    else:
        values["max_sequence_length"] = length
    return family, Settings.from_namespace(argparse.Namespace(**values))


def _family_flag_fix(owner: ModelFamily) -> str:
    if owner.name == "sdxl":
        return "Add --sdxl."
    if owner.name == "sd":
        return "Drop --sdxl."
    return f"Pass --family={owner.name}."


def evaluate_saved(args: argparse.Namespace, accelerator: Accelerator) -> FidelityResult:
    """Score ``--controlnet_model_name_or_path`` on the first ``--num_samples`` train rows.

    The first rows, not a random draw, so that anyone can name exactly what was scored.
    """
    family, settings = resolve(args)
    check_base_model(settings.model, family, fix=_family_flag_fix)
    mode = v2.InterpolationMode[settings.data.image_interpolation_mode.upper()]
    transform = data.PairedTransform(settings.data.resolution, mode)
    with accelerator.main_process_first():
        rows = datasources.load_train_dataset(settings.data)
    rows = rows.select(range(min(args.num_samples, len(rows))))
    device = accelerator.device
    weight_dtype = DTYPES[args.mixed_precision]
    models = load_models(settings.model, family)
    family.place_models(
        models,
        device=device,
        weight_dtype=weight_dtype,
        settings=settings.model,
    )
    models.controlnet.to(device)
    probe = FidelityProbe.build(
        models,
        family,
        load_samples(rows, data.columns_of(settings.data), transform),
        resolution=transform.resolution,
        timesteps_per_sample=args.timesteps_per_sample,
        seed=args.seed,
        crop_override=settings.data.crop_override,
        weight_dtype=weight_dtype,
        batch_size=args.batch_size,
    )
    return probe.evaluate(models.controlnet, batch_size=args.batch_size, accelerator=accelerator)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        # stdout carries only the JSON answer: some libraries log there (DeepSpeed, when imported).
        with contextlib.redirect_stdout(sys.stderr):
            check_args(args)
            accelerator = Accelerator()
            result = evaluate_saved(args, accelerator)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    if accelerator.is_main_process:
        print(json.dumps(result.to_json()))


if __name__ == "__main__":
    main()
