"""Stable Diffusion 1.x/2.x: one CLIP text encoder, a UNet, the DDPM objective (epsilon or v)."""

from __future__ import annotations

from . import Defaults, ModelCard, Models, TextConditioning, components, token_ids, unet

TEXT_COMPONENTS = (("tokenizer", "text_encoder"),)


def encode_prompts(models: Models, prompts: list[str]) -> TextConditioning:
    """The last hidden state of the single CLIP text encoder."""
    (tokenizer,), (encoder,) = models.tokenizers, models.text_encoders
    return TextConditioning(encoder(token_ids(tokenizer, prompts, encoder.device), return_dict=False)[0])


def no_added_conditioning(text: TextConditioning, batch: dict, *, resolution: int, crop_override) -> None:
    """SD's UNet takes the prompt alone."""
    return


def place_models(models: Models, *, device, weight_dtype, settings) -> None:
    components.place_models(models, device=device, weight_dtype=weight_dtype)


def is_sd_unet(config: dict) -> bool:
    return config.get("addition_embed_type") != "text_time"


FAMILY = unet.make_family(
    text_components=TEXT_COMPONENTS,
    pipeline_extras={"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False},
    name="sd",
    title="SD 1.x/2.x",
    script="train_controlnet.py",
    description="Train a ControlNet for Stable Diffusion 1.x/2.x.",
    defaults=Defaults(resolution=512, image_interpolation_mode="bilinear", tracker_project_name="train_controlnet"),
    card=ModelCard(tags=("stable-diffusion",), license="creativeml-openrail-m"),
    is_own_denoiser=is_sd_unet,
    place_models=place_models,
    encode_prompts=encode_prompts,
    added_conditioning=no_added_conditioning,
    pipeline_class="StableDiffusionControlNetPipeline",
)
