"""The rectified-flow (flow matching) objective of SD3 and Flux.

A sample at noise level sigma is ``(1 - sigma) * x0 + sigma * noise``; the denoiser predicts
the velocity ``noise - x0``. Timesteps are drawn by a density over the schedule (the
``--weighting_scheme``), and SD3's loss is weighted per scheme (Flux's is not); both come from
``diffusers.training_utils``, as in diffusers' own SD3 and Flux scripts.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from ..errors import ArgumentError

WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")


def add_flags(parser: argparse.ArgumentParser, *, weighted: bool = True) -> None:
    """The objective's flags, as diffusers' SD3 and Flux scripts name them. ``weighted``: the
    scheme weights the loss too and outputs may be preconditioned (SD3's script); Flux's script
    uses the scheme for the timestep density alone and has no --precondition_outputs."""
    group = parser.add_argument_group("flow-matching objective")
    if weighted:
        scheme_help = (
            "How timesteps are drawn and the loss weighted (SD3 paper): logit_normal and mode draw "
            "mid-schedule noise levels more often; sigma_sqrt and cosmap weight the loss; none draws "
            "uniformly, unweighted."
        )
    else:
        scheme_help = (
            "How timesteps are drawn (SD3 paper): logit_normal and mode draw mid-schedule noise levels "
            "more often; none, sigma_sqrt and cosmap draw uniformly. The loss is not weighted, as in "
            "diffusers' Flux script."
        )
    group.add_argument(
        "--weighting_scheme", type=str, default="logit_normal", choices=WEIGHTING_SCHEMES, help=scheme_help
    )
    group.add_argument("--logit_mean", type=float, default=0.0, help="Mean of the logit_normal timestep density.")
    group.add_argument(
        "--logit_std", type=float, default=1.0, help="Standard deviation of the logit_normal timestep density."
    )
    group.add_argument(
        "--mode_scale",
        type=float,
        default=1.29,
        help="Scale of the mode timestep density (with --weighting_scheme=mode).",
    )
    if not weighted:
        return
    group.add_argument(
        "--precondition_outputs",
        type=int,
        default=1,
        help="1: turn the prediction into a clean-latent estimate (EDM-style preconditioning) and "
        "compare it with the latents; 0: compare the raw prediction with the velocity noise - latents.",
    )


def check_flags(args: argparse.Namespace) -> None:
    if args.logit_std <= 0:
        raise ArgumentError(f"`--logit_std` must be positive (1.0 is the SD3 paper's), got {args.logit_std}.")
    if vars(args).get("precondition_outputs", 0) not in (0, 1):
        raise ArgumentError(f"`--precondition_outputs` is 1 (on) or 0 (off), got {args.precondition_outputs}.")


def sample_noise(
    models, latents: torch.Tensor, generator: torch.Generator, objective
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian noise like ``latents`` and one timestep per sample drawn by the weighting scheme's
    density, every draw from ``generator``."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    noise = torch.randn(latents.shape, generator=generator, device=generator.device, dtype=latents.dtype)
    u = compute_density_for_timestep_sampling(
        weighting_scheme=objective.weighting_scheme,
        batch_size=latents.shape[0],
        logit_mean=objective.logit_mean,
        logit_std=objective.logit_std,
        mode_scale=objective.mode_scale,
        device=generator.device,
        generator=generator,
    )
    scheduler = models.noise_scheduler
    count = scheduler.config.num_train_timesteps
    # The mode density can give u = 1 exactly, one past the schedule's end.
    positions = (u * count).long().clamp_(max=count - 1).cpu()
    return noise.to(latents.device), scheduler.timesteps[positions].to(latents.device)


def schedule_timesteps(models, positions: torch.Tensor) -> torch.Tensor:
    """The training schedule's timesteps at ``positions`` (0 is the noisiest)."""
    return models.noise_scheduler.timesteps[positions]


def sigmas_of(scheduler, timesteps: torch.Tensor, *, ndim: int, dtype: torch.dtype) -> torch.Tensor:
    """Each timestep's sigma in the training schedule, shaped to broadcast over a latent of ``ndim``."""
    schedule = scheduler.timesteps.to(timesteps.device)
    positions = (schedule[None, :] == timesteps[:, None]).int().argmax(dim=1)
    sigmas = scheduler.sigmas.to(timesteps.device, dtype)[positions]
    return sigmas.reshape(-1, *([1] * (ndim - 1)))


def flow_loss(
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
    weighted: bool = True,
) -> torch.Tensor:
    """Mean flow-matching loss of the denoiser + ControlNet; per-sample losses with ``reduce=False``.

    ``objective`` (ObjectiveSettings) gives the preconditioning and, if ``weighted`` (SD3; Flux's
    loss is plain), the loss weighting; None gives the plain velocity loss, unweighted, which the
    fidelity measure compares.
    """
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    sigmas = sigmas_of(models.noise_scheduler, timesteps, ndim=latents.ndim, dtype=latents.dtype)
    noisy_latents = (1.0 - sigmas) * latents + sigmas * noise
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
    if objective is not None and objective.precondition_outputs:
        # x0 = x_sigma - sigma * v: compare clean-latent estimates.
        prediction = prediction * (-sigmas) + noisy_latents
        target = latents
    else:
        target = noise - latents
    scheme = objective.weighting_scheme if objective is not None and weighted else "none"
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=sigmas).float()
    squared = weighting * (prediction.float() - target.float()) ** 2
    per_sample = squared.reshape(squared.shape[0], -1).mean(dim=1)
    return per_sample.mean() if reduce else per_sample
