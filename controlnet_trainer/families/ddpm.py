"""The DDPM objective of SD and SDXL: uniform timesteps, epsilon or v-prediction targets, Min-SNR."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..errors import ArgumentError


def add_flags(parser: argparse.ArgumentParser) -> None:
    """The objective's flags, as diffusers' SD and SDXL scripts name them."""
    group = parser.add_argument_group("DDPM objective")
    group.add_argument(
        "--noise_offset",
        type=float,
        default=0.0,
        help="Add this much per-channel offset noise (0.05-0.1 helps very dark or bright images).",
    )
    group.add_argument(
        "--rescale_betas_zero_snr",
        action="store_true",
        help="Rescale the noise schedule to zero terminal SNR (Lin et al. 2023); for v-prediction models.",
    )
    group.add_argument(
        "--snr_gamma",
        type=float,
        default=None,
        help="Min-SNR loss weighting gamma (5.0 is the paper's choice); off when absent.",
    )


def check_flags(args: argparse.Namespace) -> None:
    if args.snr_gamma is not None and args.snr_gamma <= 0:
        raise ArgumentError(f"`--snr_gamma` must be positive (5.0 is typical), got {args.snr_gamma}.")


def sample_noise_and_timesteps(
    latents: torch.Tensor, num_train_timesteps: int, generator: torch.Generator, noise_offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian noise like ``latents`` and one uniform timestep per sample, from ``generator``.

    ``noise_offset`` adds a per-sample, per-channel constant, which lets the model shift an
    image's mean brightness (https://www.crosslabs.org/blog/diffusion-with-offset-noise).
    """
    noise = torch.randn(latents.shape, generator=generator, device=generator.device, dtype=latents.dtype)
    if noise_offset:
        offset = torch.randn(
            (*latents.shape[:2], 1, 1), generator=generator, device=generator.device, dtype=latents.dtype
        )
        noise = noise + noise_offset * offset
    timesteps = torch.randint(0, num_train_timesteps, (latents.shape[0],), generator=generator, device=generator.device)
    return noise.to(latents.device), timesteps.to(latents.device)


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023) for the scheduler's prediction type.

    Epsilon: min(snr, gamma) / snr, written as min(gamma / snr, 1), which is its limit, 1, where
    the SNR is zero (the last timestep under --rescale_betas_zero_snr) rather than 0 / 0.
    v-prediction: min(snr, gamma) / (snr + 1), which is 0 there.
    """
    from diffusers.training_utils import compute_snr  # diffusers loads when the objective first runs

    snr = compute_snr(noise_scheduler, timesteps)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return torch.clamp(gamma / snr, max=1.0)
    if prediction_type == "v_prediction":
        return torch.clamp(snr, max=gamma) / (snr + 1)
    raise ValueError(f"--snr_gamma supports epsilon and v_prediction schedulers, not {prediction_type}.")


def training_target(noise_scheduler, latents, noise, timesteps) -> torch.Tensor:
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"Unknown prediction type {prediction_type}")


def sample_noise(
    models, latents: torch.Tensor, generator: torch.Generator, objective
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample's noise and timestep for the family record (``sample_noise_and_timesteps``)."""
    num_train_timesteps = models.noise_scheduler.config.num_train_timesteps
    return sample_noise_and_timesteps(latents, num_train_timesteps, generator, objective.noise_offset)


def schedule_timesteps(models, positions: torch.Tensor) -> torch.Tensor:
    """DDPM's timestep at position i of its schedule is i."""
    return positions


def diffusion_loss(
    models,
    controlnet,
    *,
    predict: Callable[..., torch.Tensor],
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    text,
    controlnet_image: torch.Tensor | None,
    added_cond_kwargs: dict | None = None,
    weight_dtype: torch.dtype = torch.float32,
    objective=None,
    reduce: bool = True,
) -> torch.Tensor:
    """Mean denoising loss of the denoiser + ControlNet; per-sample losses with ``reduce=False``.

    ``predict`` is the family's forward call (ControlNet, then the denoiser with its residuals);
    ``objective`` (ObjectiveSettings) gives the Min-SNR weighting, None the plain loss.
    """
    snr_gamma = objective.snr_gamma if objective is not None else None
    noise_scheduler = models.noise_scheduler
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction = predict(
        models,
        controlnet,
        noisy_latents=noisy_latents,
        timesteps=timesteps,
        text=text,
        controlnet_image=controlnet_image,
        added_cond_kwargs=added_cond_kwargs,
        weight_dtype=weight_dtype,
    )
    target = training_target(noise_scheduler, latents, noise, timesteps)
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(
        dim=tuple(range(1, prediction.ndim))
    )
    if snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(noise_scheduler, timesteps, snr_gamma)
    return per_sample.mean() if reduce else per_sample
