"""The parts SD 1.x/2.x and SDXL share: a UNet denoiser, CLIP text encoders, a KL VAE and a
``ControlNetModel`` that adds residuals to the UNet's down and mid blocks.

diffusers loads inside the functions (it takes seconds to import), so defining a family costs
nothing until a run needs its models.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
from collections.abc import Sequence

import torch

from ..errors import InputError
from ..models import ModelError, check_local_path
from . import ModelFamily, Models, TextConditioning, components, ddpm

logger = logging.getLogger(__name__)

_TEXT_ENCODER_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")
# Checkpoint files a --controlnet_model_name_or_path may name; only .safetensors is read.
_SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pth", ".pt", ".bin")
# What ControlNetModel.from_unet gives a ControlNet built without --controlnet_model_name_or_path.
_FROM_UNET_EMBEDDING = (16, 32, 96, 256)


def make_family(
    *, text_components: Sequence[tuple[str, str]], pipeline_extras: dict, add_flags=None, **own
) -> ModelFamily:
    """A UNet family's record: the parts every UNet family shares (loading, placing, memory options,
    the DDPM objective and its flags with the UNet forward, the pipeline, the export layout), plus
    ``own``, the fields that are the family's alone (``add_flags``: its own flag group)."""
    return ModelFamily(
        denoiser_subfolder="unet",
        text_components=tuple(text_components),
        add_flags=functools.partial(_add_flags, own_flags=add_flags),
        check_flags=ddpm.check_flags,
        load_models=functools.partial(load_models, text_components=text_components),
        enable_memory_options=components.enable_memory_options,
        encode_control=pixels_as_control,
        control_uses_vae=False,
        sample_noise=ddpm.sample_noise,
        loss=functools.partial(ddpm.diffusion_loss, predict=predict),
        schedule_timesteps=ddpm.schedule_timesteps,
        pipeline_components=functools.partial(
            pipeline_components, text_components=text_components, extras=pipeline_extras
        ),
        pipeline_inputs=pipeline_inputs,
        save_single_file=save_single_file,
        **own,
    )


def _add_flags(parser: argparse.ArgumentParser, *, own_flags) -> None:
    ddpm.add_flags(parser)
    if own_flags is not None:
        own_flags(parser)


def load_models(settings, *, text_components: Sequence[tuple[str, str]]) -> Models:
    """Tokenizers, text encoders, VAE, UNet, DDPM scheduler and the ControlNet to train."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    base = settings.pretrained_model_name_or_path
    common = {"revision": settings.revision, "cache_dir": settings.cache_dir}
    subfolders = [tokenizer for tokenizer, _ in text_components]
    tokenizers = tuple(components.load_tokenizer(settings, sub, subfolders=subfolders) for sub in subfolders)
    text_encoders = tuple(
        components.load_text_encoder(settings, sub, classes=_TEXT_ENCODER_CLASSES) for _, sub in text_components
    )
    vae = components.load_vae(settings)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", variant=settings.variant, **common)
    noise_scheduler = DDPMScheduler.from_pretrained(
        base, subfolder="scheduler", rescale_betas_zero_snr=settings.rescale_betas_zero_snr, **common
    )
    controlnet = load_controlnet(settings, unet)
    vae_source = settings.pretrained_vae_model_name_or_path or f"{base}/vae"
    check_conditioning_scale(
        controlnet, vae, controlnet_source=settings.controlnet_model_name_or_path, vae_source=vae_source
    )
    return Models(tokenizers, text_encoders, vae, unet, controlnet, noise_scheduler)


def pixels_as_control(models: Models, pixels: torch.Tensor, generators) -> torch.Tensor:
    """A UNet ControlNet embeds the conditioning pixels itself."""
    return pixels


def load_controlnet(settings, unet):
    """The ControlNet to train: from the UNet, a diffusers folder or hub id, or one original-layout file."""
    from diffusers import ControlNetModel

    source = settings.controlnet_model_name_or_path
    if not source:
        logger.info("Initializing the ControlNet from the UNet's weights")
        return ControlNetModel.from_unet(unet)
    check_local_path(source, "--controlnet_model_name_or_path")
    logger.info("Loading the ControlNet from %s", source)
    path = os.path.expanduser(source)
    if not os.path.isdir(path) and (os.path.isfile(path) or path.endswith(_SINGLE_FILE_SUFFIXES)):
        controlnet = _load_single_file(path, unet, settings.pretrained_model_name_or_path)
    else:
        controlnet = ControlNetModel.from_pretrained(source, cache_dir=settings.cache_dir)
    check_controlnet_matches_unet(controlnet, unet)
    return controlnet


def _load_single_file(path: str, unet, base: str):
    """An A1111 / ComfyUI ControlNet file, configured as ``ControlNetModel.from_unet`` configures one
    for this UNet, with the conditioning embedding the file holds."""
    from .. import export

    if not os.path.exists(path):
        raise ModelError(f"`--controlnet_model_name_or_path` points to {path!r}, which does not exist. Check the path.")
    try:
        config = export.config_for_unet(path, unet)
        controlnet = export.original_to_diffusers(
            path, config, config_name=f"a ControlNet for the UNet of --pretrained_model_name_or_path {base!r}"
        )
    except export.MismatchError as error:
        raise ModelError(
            f"`--controlnet_model_name_or_path` {error} The file holds a ControlNet for another base model: "
            "use one made for this base model, or omit --controlnet_model_name_or_path to build one from the UNet."
        ) from error
    except InputError as error:
        raise ModelError(f"`--controlnet_model_name_or_path`: {error}") from error
    # Shared files are often float16; the ControlNet trains in float32, as from_pretrained loads it.
    return controlnet.to(torch.float32)


def check_controlnet_matches_unet(controlnet, unet) -> None:
    """A ControlNet made for another base model fails here instead of mid-step."""
    keys = ("block_out_channels", "cross_attention_dim", "in_channels", "addition_embed_type")
    mismatched = [
        f"{key}: ControlNet {controlnet.config.get(key)} vs UNet {unet.config.get(key)}"
        for key in keys
        if _normalise(controlnet.config.get(key)) != _normalise(unet.config.get(key))
    ]
    if mismatched:
        raise ModelError(
            "The ControlNet does not match the UNet of the base model ("
            + "; ".join(mismatched)
            + "). Use a ControlNet trained for this base model, or omit "
            "--controlnet_model_name_or_path to build one from the UNet."
        )


def _normalise(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def _downsampling(block_out_channels) -> int:
    """How much a stack of blocks shrinks an image: all but the last halve its size."""
    return 2 ** (len(block_out_channels) - 1)


def check_conditioning_scale(controlnet, vae, *, controlnet_source: str | None, vae_source: str) -> None:
    """The ControlNet's conditioning embedding must shrink the conditioning image to the latents' size;
    otherwise the first step fails adding the embedding to the latents' features."""
    widths = tuple(controlnet.config.conditioning_embedding_out_channels)
    embedding, latents = _downsampling(widths), _downsampling(vae.config.block_out_channels)
    if embedding == latents:
        return
    needed = int(latents).bit_length()  # log2(latents) + 1 widths
    example = (_FROM_UNET_EMBEDDING + (_FROM_UNET_EMBEDDING[-1],) * needed)[:needed]
    if controlnet_source:
        made = f"The ControlNet in --controlnet_model_name_or_path {controlnet_source!r}"
    else:
        made = "The ControlNet built from the UNet (ControlNetModel.from_unet's default embedding)"
    omit = controlnet_source and _downsampling(_FROM_UNET_EMBEDDING) == latents
    raise ModelError(
        f"{made} downsamples the conditioning image {embedding}x (conditioning_embedding_out_channels "
        f"{list(widths)}), but the VAE of {vae_source!r} downsamples {latents}x (block_out_channels "
        f"{list(vae.config.block_out_channels)}), so the conditioning would not match the latents. Pass "
        f"--controlnet_model_name_or_path a ControlNet whose conditioning_embedding_out_channels has {needed} "
        f"widths (e.g. ControlNetModel.from_unet(unet, conditioning_embedding_out_channels={example}) saved "
        "with save_pretrained)" + (", or omit it to build one from the UNet." if omit else ".")
    )


def predict(
    models: Models,
    controlnet,
    *,
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    text: TextConditioning,
    controlnet_image: torch.Tensor | None,
    added_cond_kwargs: dict | None,
    weight_dtype: torch.dtype,
) -> torch.Tensor:
    """The UNet's prediction with the ControlNet's residuals added; no residuals if the image is None."""
    encoder_hidden_states = text.encoder_hidden_states
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
    return models.denoiser(
        noisy_latents.to(weight_dtype),
        timesteps,
        encoder_hidden_states=encoder_hidden_states.to(weight_dtype),
        added_cond_kwargs=added_cond_kwargs,
        return_dict=False,
        **residuals,
    )[0]


def pipeline_inputs(models: Models, conditioning) -> dict:
    return {"image": conditioning}


def pipeline_components(models: Models, controlnet, *, text_components, extras: dict) -> dict:
    """A ControlNet pipeline's components around the models already in memory (no reload)."""
    from diffusers import UniPCMultistepScheduler

    components = {"vae": models.vae, "unet": models.denoiser, "controlnet": controlnet}
    for (tok_name, enc_name), tokenizer, encoder in zip(
        text_components, models.tokenizers, models.text_encoders, strict=True
    ):
        components[tok_name] = tokenizer
        components[enc_name] = encoder
    components["scheduler"] = UniPCMultistepScheduler.from_config(models.noise_scheduler.config)
    return components | extras


def save_single_file(controlnet, path) -> None:
    """The ControlNet in the original (A1111 / ComfyUI) layout."""
    from .. import export

    export.save_single_file(controlnet, path)
