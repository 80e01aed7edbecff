"""One micro-batch's loss: the per-sample random draws, the latents and prompt embeddings (from
the cache or the frozen models), and the family's objective."""

from __future__ import annotations

import numpy as np
import torch

from . import data
from .cache import EmbeddingCache
from .families import ModelFamily, Models, TextConditioning, to_latents
from .settings import DataSettings, ObjectiveSettings


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
    batch: dict,
    models: Models,
    family: ModelFamily,
    generators,
    *,
    proportion_empty_prompts: float,
    weight_dtype: torch.dtype,
    embeddings: EmbeddingCache | None = None,
) -> tuple[torch.Tensor, TextConditioning]:
    """Latents and prompt embeddings of a batch, from the cache or the frozen models.

    Both paths make the same random draws in the same order, so caching changes nothing but speed.
    """
    cpu_generators, device_generators = generators
    picks = [
        data.choose_caption(options, proportion_empty_prompts, generator)
        for options, generator in zip(batch["captions"], cpu_generators, strict=True)
    ]
    vae = models.vae
    with torch.no_grad():
        if embeddings is not None and embeddings.latent_slots is not None:
            latents = torch.cat(
                [
                    embeddings.latents(index, generator, vae)
                    for index, generator in zip(batch["index"], device_generators, strict=True)
                ]
            )
        else:
            pixels = batch["pixel_values"].to(vae.device, vae.dtype, non_blocking=True)
            latents = to_latents(vae, vae.encode(pixels).latent_dist.sample(generator=device_generators))
        if embeddings is not None and embeddings.text_hidden is not None:
            text = embeddings.text(batch["index"], picks, latents.device)
        else:
            prompts = [data.caption_text(options, pick) for options, pick in zip(batch["captions"], picks)]
            text = family.encode_prompts(models, prompts)
    return latents.to(weight_dtype), text


def micro_batch_loss(
    batch: dict,
    models: Models,
    family: ModelFamily,
    generators,
    *,
    data_settings: DataSettings,
    objective: ObjectiveSettings,
    weight_dtype: torch.dtype,
    embeddings: EmbeddingCache | None = None,
) -> torch.Tensor:
    """The family's training loss of one micro-batch, every draw from the samples' own generators."""
    latents, text = encode_batch(
        batch,
        models,
        family,
        generators,
        proportion_empty_prompts=data_settings.proportion_empty_prompts,
        weight_dtype=weight_dtype,
        embeddings=embeddings,
    )
    with torch.no_grad():
        pixels = batch["conditioning_pixel_values"].to(latents.device, weight_dtype, non_blocking=True)
        controlnet_image = family.encode_control(models, pixels, generators[1])
    per_sample = [
        family.sample_noise(models, latents[i : i + 1], generator, objective)
        for i, generator in enumerate(generators[1])
    ]
    return family.loss(
        models,
        models.controlnet,
        latents=latents,
        noise=torch.cat([noise for noise, _ in per_sample]),
        timesteps=torch.cat([timesteps for _, timesteps in per_sample]),
        text=text,
        controlnet_image=controlnet_image,
        added_cond_kwargs=family.added_conditioning(
            text, batch, resolution=data_settings.resolution, crop_override=data_settings.crop_override
        ),
        weight_dtype=weight_dtype,
        objective=objective,
    )
