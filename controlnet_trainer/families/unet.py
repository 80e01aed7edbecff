"""The parts SD 1.x/2.x and SDXL share: a UNet denoiser, CLIP text encoders, a KL VAE and a
``ControlNetModel`` that adds residuals to the UNet's down and mid blocks.

diffusers loads inside the functions (it takes seconds to import), so defining a family costs
nothing until a run needs its models.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from collections.abc import Sequence

import torch
import transformers

from ..errors import InputError
from ..models import ModelError, check_local_path, check_xformers
from . import ModelFamily, Models, TextConditioning, ddpm

logger = logging.getLogger(__name__)

_TEXT_ENCODER_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")
# Checkpoint files a --controlnet_model_name_or_path may name; only .safetensors is read.
_SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pth", ".pt", ".bin")
# What ControlNetModel.from_unet gives a ControlNet built without --controlnet_model_name_or_path.
_FROM_UNET_EMBEDDING = (16, 32, 96, 256)


def make_family(*, text_components: Sequence[tuple[str, str]], pipeline_extras: dict, **own) -> ModelFamily:
    """A UNet family's record: the parts every UNet family shares (loading, placing, memory options,
    the DDPM objective with the UNet forward, the pipeline's components, the export layout), plus
    ``own``, the fields that are the family's alone."""
    return ModelFamily(
        denoiser_subfolder="unet",
        text_components=tuple(text_components),
        load_models=functools.partial(load_models, text_components=text_components),
        enable_memory_options=enable_memory_options,
        sample_noise=ddpm.sample_noise,
        loss=functools.partial(ddpm.diffusion_loss, predict=predict),
        pipeline_components=functools.partial(
            pipeline_components, text_components=text_components, extras=pipeline_extras
        ),
        save_single_file=save_single_file,
        **own,
    )


def load_models(settings, *, text_components: Sequence[tuple[str, str]]) -> Models:
    """Tokenizers, text encoders, VAE, UNet, DDPM scheduler and the ControlNet to train."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    base = settings.pretrained_model_name_or_path
    common = {"revision": settings.revision, "cache_dir": settings.cache_dir}
    tokenizers = tuple(_load_tokenizer(settings, text_components, sub) for sub, _ in text_components)
    text_encoders = tuple(
        _load_text_encoder(base, sub, variant=settings.variant, **common) for _, sub in text_components
    )
    vae_path = settings.pretrained_vae_model_name_or_path
    if vae_path:
        check_local_path(vae_path, "--pretrained_vae_model_name_or_path")
        vae = AutoencoderKL.from_pretrained(vae_path, **common)
    else:
        vae = AutoencoderKL.from_pretrained(base, subfolder="vae", variant=settings.variant, **common)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", variant=settings.variant, **common)
    noise_scheduler = DDPMScheduler.from_pretrained(
        base, subfolder="scheduler", rescale_betas_zero_snr=settings.rescale_betas_zero_snr, **common
    )
    controlnet = load_controlnet(settings, unet)
    check_conditioning_scale(
        controlnet, vae, controlnet_source=settings.controlnet_model_name_or_path, vae_source=vae_path or f"{base}/vae"
    )
    return Models(tokenizers, text_encoders, vae, unet, controlnet, noise_scheduler)


def _load_tokenizer(settings, text_components: Sequence[tuple[str, str]], subfolder: str):
    if settings.tokenizer_name and len(text_components) == 1:
        source, subfolder = settings.tokenizer_name, ""
    else:  # SDXL's --tokenizer_name names a repo holding tokenizer/ and tokenizer_2/
        source = settings.tokenizer_name or settings.pretrained_model_name_or_path
    try:
        return transformers.AutoTokenizer.from_pretrained(
            source, subfolder=subfolder, revision=settings.revision, cache_dir=settings.cache_dir, use_fast=False
        )
    except (OSError, ValueError) as error:
        if not settings.tokenizer_name:
            raise  # models.load_models names the base model's files
        layout = "a CLIP tokenizer (vocab.json, merges.txt)"
        if len(text_components) > 1:
            layout = "tokenizer/ and tokenizer_2/ subfolders holding CLIP tokenizers"
        raise ModelError(
            f"`--tokenizer_name` {settings.tokenizer_name!r} holds no tokenizer ({' '.join(str(error).split())}). "
            f"Point it at a folder or hub repo with {layout}; a pipeline's own is in its tokenizer/ "
            "subfolder, and without the flag the base model's is used."
        ) from error


def _load_text_encoder(base: str, subfolder: str, **kwargs) -> torch.nn.Module:
    config = transformers.AutoConfig.from_pretrained(
        base, subfolder=subfolder, revision=kwargs["revision"], cache_dir=kwargs["cache_dir"]
    )
    name = (config.architectures or ["CLIPTextModel"])[0]
    if name not in _TEXT_ENCODER_CLASSES:
        raise ModelError(
            f"Text encoder class {name} in {base}/{subfolder} is not supported; this trainer "
            f"supports {', '.join(_TEXT_ENCODER_CLASSES)}."
        )
    return getattr(transformers, name).from_pretrained(base, subfolder=subfolder, **kwargs)


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


def place_models(
    models: Models, *, device: torch.device, weight_dtype: torch.dtype, vae_dtype: torch.dtype | None = None
) -> None:
    """Frozen models go to the device in the mixed-precision dtype (the VAE in ``vae_dtype`` when
    given); the ControlNet stays fp32."""
    for module in models.frozen():
        module.requires_grad_(False)
        module.eval()
    models.controlnet.train()
    models.vae.to(device, dtype=vae_dtype or weight_dtype)
    models.denoiser.to(device, dtype=weight_dtype)
    for encoder in models.text_encoders:
        encoder.to(device, dtype=weight_dtype)


def enable_memory_options(models: Models, memory, device: torch.device) -> None:
    """Gradient checkpointing, the optional attention back-ends and compilation, with clear errors."""
    trained_path = (models.denoiser, models.controlnet)
    if memory.gradient_checkpointing:
        # The frozen UNet's activations are kept for the backward pass into the ControlNet
        # residuals too, so checkpointing it saves as much memory as the ControlNet's.
        for module in trained_path:
            module.enable_gradient_checkpointing()
    if memory.enable_xformers_memory_efficient_attention:
        check_xformers(device)
        for module in trained_path:
            module.enable_xformers_memory_efficient_attention()
    if memory.enable_npu_flash_attention:
        if importlib.util.find_spec("torch_npu") is None:
            raise ModelError(
                "--enable_npu_flash_attention needs an Ascend NPU and the torch_npu package, "
                "which is not installed. Drop the flag (PyTorch SDPA attention is the default)."
            )
        for module in trained_path:
            module.enable_npu_flash_attention()
    if memory.torch_compile:
        # In place (nn.Module.compile), so parameter names, hooks and saving are unchanged.
        # Evaluation runs these modules eagerly: see models.eager_evaluation.
        for module in trained_path:
            module.compile(backend=memory.torch_compile)


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
