"""Stable Diffusion 3 and 3.5: two CLIP text encoders with projection and T5, an MMDiT transformer
(``SD3Transformer2DModel``), a 16-channel VAE with a shift, and the flow-matching objective.

The ControlNet (``SD3ControlNetModel``) copies the first transformer blocks and adds one residual
per block to the transformer's hidden states. Its conditioning image goes through the VAE, as SD3
ControlNets expect: the same shift and scaling as the latents.
"""

from __future__ import annotations

import argparse
import functools
import logging

import torch
import torch.nn.functional as F

from ..errors import ArgumentError
from ..models import ModelError
from . import Defaults, ModelCard, ModelFamily, Models, TextConditioning, components, flow, token_ids

logger = logging.getLogger(__name__)

TEXT_COMPONENTS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"), ("tokenizer_3", "text_encoder_3"))
_CLIP_CLASSES = ("CLIPTextModelWithProjection",)
_T5_CLASSES = ("T5EncoderModel",)
# The SD3 pipelines refuse longer T5 prompts.
MAX_SEQUENCE_LENGTH = 512
RESOLUTION_MULTIPLE = 16  # 8x VAE downsampling times 2x2 patches


def add_flags(parser: argparse.ArgumentParser) -> None:
    flow.add_flags(parser)
    group = parser.add_argument_group("SD3")
    group.add_argument(
        "--num_extra_conditioning_channels",
        type=int,
        default=0,
        help="Extra input channels of a ControlNet built from the transformer (e.g. an inpainting mask).",
    )
    group.add_argument(
        "--max_sequence_length",
        type=int,
        default=77,
        help="T5 prompt length in tokens, for training and the validation images (at most 512).",
    )
    group.add_argument(
        "--upcast_vae",
        action="store_true",
        help="Keep the VAE in fp32 under mixed precision (it encodes images and conditioning images).",
    )
    group.add_argument(
        "--dataset_preprocess_batch_size",
        type=int,
        default=1000,
        help="Accepted for diffusers' command lines and not used: prompts are encoded at each step, or "
        "once into the embeddings cache with --cache_text_embeddings, in batches sized for memory.",
    )
    group.add_argument(
        "--drop_t5",
        action="store_true",
        help="Train without the T5 text encoder: its prompt embeddings are zeros, as the SD3 pipelines "
        "give with text_encoder_3=None. T5 is never loaded, which saves its 4.7B parameters (9.5 GB in "
        "bf16); use the ControlNet with text_encoder_3=None too.",
    )


def check_flags(args: argparse.Namespace) -> None:
    flow.check_flags(args)
    if args.resolution % RESOLUTION_MULTIPLE:
        # The transformer floors a partial patch away, and its output no longer matches the latents.
        raise ArgumentError(
            f"`--resolution` must be a multiple of {RESOLUTION_MULTIPLE} for SD3 (the VAE downsamples 8x and "
            f"the transformer takes 2x2 patches of latents); got {args.resolution}, try "
            f"{max(RESOLUTION_MULTIPLE, args.resolution // RESOLUTION_MULTIPLE * RESOLUTION_MULTIPLE)}."
        )
    if not 1 <= args.max_sequence_length <= MAX_SEQUENCE_LENGTH:
        raise ArgumentError(
            f"`--max_sequence_length` must be between 1 and {MAX_SEQUENCE_LENGTH} (the SD3 pipelines' "
            f"limit), got {args.max_sequence_length}; 77 is the default, 256 the pipelines'."
        )
    if args.num_extra_conditioning_channels < 0:
        raise ArgumentError(
            f"`--num_extra_conditioning_channels` must be 0 or more, got {args.num_extra_conditioning_channels}."
        )


def load_models(settings) -> Models:
    """Tokenizers, text encoders (T5 unless --drop_t5), VAE, transformer, flow-matching scheduler and
    the ControlNet to train."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    base = settings.pretrained_model_name_or_path
    common = {"revision": settings.revision, "cache_dir": settings.cache_dir}
    used = TEXT_COMPONENTS[:2] if settings.drop_t5 else TEXT_COMPONENTS
    subfolders = [tokenizer for tokenizer, _ in TEXT_COMPONENTS]
    tokenizers = tuple(components.load_tokenizer(settings, sub, subfolders=subfolders) for sub, _ in used)
    text_encoders = tuple(
        components.load_text_encoder(settings, sub, classes=_T5_CLASSES if sub == "text_encoder_3" else _CLIP_CLASSES)
        for _, sub in used
    )
    vae = components.load_vae(settings)
    transformer = SD3Transformer2DModel.from_pretrained(
        base, subfolder="transformer", variant=settings.variant, **common
    )
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler", **common)
    controlnet = load_controlnet(settings, transformer)
    _check_vae(vae, base)
    options = {"max_sequence_length": settings.max_sequence_length, "t5": not settings.drop_t5}
    return Models(tokenizers, text_encoders, vae, transformer, controlnet, scheduler, text_options=options)


def _check_vae(vae, base: str) -> None:
    if vae.config.get("shift_factor") is None:
        raise ModelError(
            f"The VAE of {base!r} has no shift_factor in its config.json; SD3 VAEs have one (0.0609 for "
            "SD3 and SD3.5). Point --pretrained_model_name_or_path at an SD3 pipeline."
        )


def load_controlnet(settings, transformer):
    """The ControlNet to train: built from the transformer, or a diffusers folder or hub id."""
    from diffusers import SD3ControlNetModel

    source = settings.controlnet_model_name_or_path
    if not source:
        logger.info("Initializing the ControlNet from the transformer's weights")
        return SD3ControlNetModel.from_transformer(
            transformer, num_extra_conditioning_channels=settings.num_extra_conditioning_channels
        )
    components.pretrained_controlnet_config(SD3ControlNetModel, settings, family="SD3")
    controlnet = SD3ControlNetModel.from_pretrained(source, cache_dir=settings.cache_dir)
    check_controlnet_matches(controlnet, transformer)
    return controlnet


def check_controlnet_matches(controlnet, transformer) -> None:
    """A ControlNet made for another base model fails here instead of mid-step."""
    keys = ("num_attention_heads", "attention_head_dim", "patch_size", "in_channels", "pooled_projection_dim")
    mismatched = components.config_mismatches(controlnet, transformer, keys)
    if controlnet.config.num_layers > transformer.config.num_layers:
        mismatched.append(
            f"num_layers: ControlNet {controlnet.config.num_layers} vs transformer {transformer.config.num_layers}"
        )
    if mismatched:
        raise ModelError(
            "The ControlNet does not match the transformer of the base model ("
            + "; ".join(mismatched)
            + "). Use an SD3 ControlNet trained for this base model (SD3 Medium, SD3.5 Medium and SD3.5 "
            "Large differ), or omit --controlnet_model_name_or_path to build one from the transformer."
        )


def encode_prompts(models: Models, prompts: list[str]) -> TextConditioning:
    """The SD3 pipelines' prompt embeddings: both CLIP encoders' penultimate hidden states side by
    side, zero-padded to T5's width, then T5's states (zeros without T5) along the sequence; the
    pooled embedding is both CLIP projections side by side."""
    hidden, pooled = [], []
    for tokenizer, encoder in zip(models.tokenizers[:2], models.text_encoders[:2], strict=True):
        output = encoder(token_ids(tokenizer, prompts, encoder.device), output_hidden_states=True)
        pooled.append(output[0])  # text_embeds
        hidden.append(output.hidden_states[-2])
    clip = torch.cat(hidden, dim=-1)
    t5 = _t5_states(models, prompts, dtype=clip.dtype, device=clip.device)
    clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return TextConditioning(torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1))


def _t5_states(models: Models, prompts: list[str], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    length = models.text_options["max_sequence_length"]
    if not models.text_options["t5"]:
        width = models.denoiser.config.joint_attention_dim
        return torch.zeros((len(prompts), length, width), dtype=dtype, device=device)
    tokenizer, encoder = models.tokenizers[2], models.text_encoders[2]
    states = encoder(token_ids(tokenizer, prompts, encoder.device, max_length=length))[0]
    return states.to(device, dtype)


def no_added_conditioning(text: TextConditioning, batch: dict, *, resolution: int, crop_override) -> None:
    """The pooled prompt travels in TextConditioning; SD3 takes no size conditioning."""
    return


def encode_control(models: Models, pixels: torch.Tensor, generators) -> torch.Tensor:
    """The conditioning image as VAE latents, exactly as StableDiffusion3ControlNetPipeline (and
    ComfyUI) prepare it at inference: pixels in [-1, 1], a posterior sample (the mean for
    ``generators=None``), scaled, and shifted only for ControlNets that take the real pooled prompt
    (``force_zeros_for_pooled_projection=False``, e.g. SD3.5 Large's)."""
    vae = models.vae
    posterior = vae.encode((pixels * 2 - 1).to(vae.device, vae.dtype)).latent_dist
    sample = posterior.mean if generators is None else posterior.sample(generator=generators)
    if not _controlnet_config(models.controlnet).force_zeros_for_pooled_projection:
        sample = sample - vae.config.shift_factor
    return sample * vae.config.scaling_factor


def _controlnet_config(controlnet):
    """The ControlNet's config, through a DDP or DeepSpeed wrapper (which holds it as ``module``)."""
    return getattr(controlnet, "module", controlnet).config


def place_models(models: Models, *, device, weight_dtype, settings) -> None:
    vae_dtype = torch.float32 if settings.upcast_vae else None
    components.place_models(models, device=device, weight_dtype=weight_dtype, vae_dtype=vae_dtype)


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
    """The transformer's velocity with the ControlNet's block residuals; none if the image is None."""
    residuals = None
    if controlnet_image is not None:
        config = _controlnet_config(controlnet)
        # ControlNets that take no prompt (SD3.5 Large's) or a zero pooled prompt (InstantX's), as
        # the pipeline calls them.
        pooled = torch.zeros_like(text.pooled) if config.force_zeros_for_pooled_projection else text.pooled
        block_samples = controlnet(
            hidden_states=noisy_latents,
            controlnet_cond=controlnet_image,
            encoder_hidden_states=text.encoder_hidden_states if config.joint_attention_dim is not None else None,
            pooled_projections=pooled,
            timestep=timesteps,
            return_dict=False,
        )[0]
        residuals = [sample.to(dtype=weight_dtype) for sample in block_samples]
    return models.denoiser(
        hidden_states=noisy_latents.to(weight_dtype),
        timestep=timesteps,
        encoder_hidden_states=text.encoder_hidden_states.to(weight_dtype),
        pooled_projections=text.pooled.to(weight_dtype),
        block_controlnet_hidden_states=residuals,
        return_dict=False,
    )[0]


def pipeline_components(models: Models, controlnet) -> dict:
    """A StableDiffusion3ControlNetPipeline's components around the models in memory; without T5
    (--drop_t5) the pipeline's text_encoder_3 and tokenizer_3 are None, as SD3 allows."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    tokenizers = (*models.tokenizers, None)[:3]
    encoders = (*models.text_encoders, None)[:3]
    parts = {"transformer": models.denoiser, "vae": models.vae, "controlnet": controlnet}
    for (tok_name, enc_name), tokenizer, encoder in zip(TEXT_COMPONENTS, tokenizers, encoders, strict=True):
        parts[tok_name] = tokenizer
        parts[enc_name] = encoder
    # A copy: the pipeline sets its own timesteps, which must not change the training schedule's.
    parts["scheduler"] = FlowMatchEulerDiscreteScheduler.from_config(models.noise_scheduler.config)
    return parts


def pipeline_inputs(models: Models, conditioning) -> dict:
    return {"control_image": conditioning, "max_sequence_length": models.text_options["max_sequence_length"]}


def is_sd3_transformer(config: dict) -> bool:
    return config.get("_class_name") == "SD3Transformer2DModel"


FAMILY = ModelFamily(
    name="sd3",
    title="SD3",
    script="train_controlnet_sd3.py",
    description="Train a ControlNet for Stable Diffusion 3 and 3.5.",
    defaults=Defaults(resolution=512, image_interpolation_mode="bilinear", tracker_project_name="train_controlnet"),
    card=ModelCard(tags=("sd3", "sd3-diffusers"), license="openrail++", controlnet_class="SD3ControlNetModel"),
    add_flags=add_flags,
    check_flags=check_flags,
    denoiser_subfolder="transformer",
    is_own_denoiser=is_sd3_transformer,
    text_components=TEXT_COMPONENTS,
    load_models=load_models,
    place_models=place_models,
    enable_memory_options=components.enable_memory_options,
    encode_prompts=encode_prompts,
    added_conditioning=no_added_conditioning,
    encode_control=encode_control,
    control_uses_vae=True,
    sample_noise=flow.sample_noise,
    loss=functools.partial(flow.flow_loss, predict=predict),
    schedule_timesteps=flow.schedule_timesteps,
    pipeline_class="StableDiffusion3ControlNetPipeline",
    pipeline_components=pipeline_components,
    pipeline_inputs=pipeline_inputs,
    save_single_file=None,
    unused_parameters=True,
)
