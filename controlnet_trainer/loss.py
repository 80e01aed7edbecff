"""The diffusion training step as one pure function: residuals, prediction, target, loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr


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


def predict_noise(
    *,
    unet,
    controlnet,
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    controlnet_image: torch.Tensor | None,
    added_cond_kwargs: dict | None,
    weight_dtype: torch.dtype,
) -> torch.Tensor:
    """UNet prediction with the ControlNet's residuals added; no residuals if image is None."""
    residuals = {}
    if controlnet_image is not None:
        down, mid = controlnet(
            noisy_latents,
            timesteps,
            encoder_hidden_states=encoder_hidden_states,
            controlnet_cond=controlnet_image,
            added_cond_kwargs=added_cond_kwargs,
            return_dict=False,
        )
        residuals = {
            "down_block_additional_residuals": [r.to(dtype=weight_dtype) for r in down],
            "mid_block_additional_residual": mid.to(dtype=weight_dtype),
        }
    return unet(
        noisy_latents.to(weight_dtype),
        timesteps,
        encoder_hidden_states=encoder_hidden_states.to(weight_dtype),
        added_cond_kwargs=added_cond_kwargs,
        return_dict=False,
        **residuals,
    )[0]


def diffusion_loss(
    *,
    unet,
    controlnet,
    noise_scheduler,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    controlnet_image: torch.Tensor | None,
    added_cond_kwargs: dict | None = None,
    weight_dtype: torch.dtype = torch.float32,
    snr_gamma: float | None = None,
    reduce: bool = True,
) -> torch.Tensor:
    """Mean denoising loss of UNet + ControlNet; per-sample losses with ``reduce=False``."""
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction = predict_noise(
        unet=unet,
        controlnet=controlnet,
        noisy_latents=noisy_latents,
        timesteps=timesteps,
        encoder_hidden_states=encoder_hidden_states,
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
