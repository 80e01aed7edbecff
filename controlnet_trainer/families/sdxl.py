"""Stable Diffusion XL: two CLIP text encoders, pooled text and size conditioning (time ids), a
UNet and the DDPM objective; the VAE stays fp32 unless the user supplies one safe in fp16."""

from __future__ import annotations

import argparse

import torch

from . import Defaults, ModelCard, Models, TextConditioning, components, token_ids, unet

TEXT_COMPONENTS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
INTERPOLATION_MODES = ("nearest", "nearest_exact", "bilinear", "bicubic", "box", "hamming", "lanczos")


def add_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("SDXL")
    group.add_argument(
        "--pretrained_vae_model_name_or_path",
        type=str,
        default=None,
        help="A VAE to use instead of the base model's, e.g. madebyollin/sdxl-vae-fp16-fix.",
    )
    group.add_argument(
        "--crops_coords_top_left_h",
        type=int,
        default=None,
        help="Crop top coordinate for the SDXL time ids; default: the crop actually made.",
    )
    group.add_argument(
        "--crops_coords_top_left_w",
        type=int,
        default=None,
        help="Crop left coordinate for the SDXL time ids; default: the crop actually made.",
    )
    group.add_argument(
        "--image_interpolation_mode",
        type=str,
        default="lanczos",
        choices=INTERPOLATION_MODES,
        help="torchvision interpolation used to resize images.",
    )
    group.add_argument("--enable_npu_flash_attention", action="store_true", help="Use NPU flash attention.")


def encode_prompts(models: Models, prompts: list[str]) -> TextConditioning:
    """Both encoders' penultimate hidden states side by side, pooled from the second."""
    hidden, pooled = [], None
    for tokenizer, encoder in zip(models.tokenizers, models.text_encoders, strict=True):
        output = encoder(token_ids(tokenizer, prompts, encoder.device), output_hidden_states=True)
        pooled = output[0]  # text_embeds of CLIPTextModelWithProjection, used from the last one
        hidden.append(output.hidden_states[-2])
    return TextConditioning(torch.cat(hidden, dim=-1), pooled)


def time_ids(
    original_size: torch.Tensor,
    crop_top_left: torch.Tensor,
    target_size: torch.Tensor | int,
    crop_override: tuple[int, int] | None = None,
) -> torch.Tensor:
    """(original h, w, crop top, left, target h, w) per sample, as SDXL was trained on.

    ``original_size``, ``crop_top_left`` and ``target_size`` are the [batch, 2] values the
    transform actually used (the target is the bucket with --aspect_ratio_buckets; an int is a
    square resolution); ``crop_override`` replaces the crop when --crops_coords_top_left_h/w are
    given.
    """
    crop = crop_top_left
    if crop_override is not None:
        crop = torch.tensor(crop_override, dtype=crop_top_left.dtype, device=crop_top_left.device).expand_as(
            crop_top_left
        )
    target = target_size
    if isinstance(target_size, int):
        target = torch.tensor(
            (target_size, target_size), dtype=original_size.dtype, device=original_size.device
        ).expand_as(original_size)
    return torch.cat([original_size, crop, target], dim=1)


def added_conditioning(
    text: TextConditioning, batch: dict, *, resolution: int, crop_override: tuple[int, int] | None
) -> dict:
    """``added_cond_kwargs`` for ControlNet and UNet: the pooled prompt and the time ids."""
    target = batch.get("target_size", resolution)  # a batch made without it is square
    ids = time_ids(batch["original_size"], batch["crop_top_left"], target, crop_override)
    return {"text_embeds": text.pooled, "time_ids": ids.to(text.pooled.device, text.pooled.dtype)}


def place_models(models: Models, *, device, weight_dtype, settings) -> None:
    """SDXL's own VAE overflows in fp16, so it stays fp32 unless the user supplies a safe one."""
    custom_vae = bool(settings.pretrained_vae_model_name_or_path)
    vae_dtype = None if custom_vae else torch.float32
    components.place_models(models, device=device, weight_dtype=weight_dtype, vae_dtype=vae_dtype)


def is_sdxl_unet(config: dict) -> bool:
    return config.get("addition_embed_type") == "text_time"  # SDXL's pooled-text and size conditioning


FAMILY = unet.make_family(
    text_components=TEXT_COMPONENTS,
    pipeline_extras={"add_watermarker": False},
    name="sdxl",
    title="SDXL",
    script="train_controlnet_sdxl.py",
    description="Train a ControlNet for Stable Diffusion XL.",
    defaults=Defaults(
        resolution=1024, image_interpolation_mode="lanczos", tracker_project_name="sd_xl_train_controlnet"
    ),
    card=ModelCard(tags=("stable-diffusion-xl", "stable-diffusion-xl-diffusers"), license="openrail++"),
    add_flags=add_flags,
    is_own_denoiser=is_sdxl_unet,
    place_models=place_models,
    encode_prompts=encode_prompts,
    added_conditioning=added_conditioning,
    pipeline_class="StableDiffusionXLControlNetPipeline",
)
