"""Loading and memory options every family shares: tokenizers, text encoders and the VAE from a
diffusers pipeline folder or hub id, placing the frozen parts, and the attention, checkpointing
and compilation options of the denoiser and the ControlNet.

diffusers loads inside the functions (it takes seconds to import).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence

import torch
import transformers

from ..models import ModelError, check_local_path, check_xformers, indefinite_article
from . import Models

logger = logging.getLogger(__name__)


def pretrained_controlnet_config(model_class, settings, *, family: str) -> dict:
    """The config of --controlnet_model_name_or_path, checked to be a ``model_class`` ControlNet
    before its weights are read."""
    source = settings.controlnet_model_name_or_path
    check_local_path(source, "--controlnet_model_name_or_path")
    logger.info("Loading the ControlNet from %s", source)
    try:
        config = model_class.load_config(source, cache_dir=settings.cache_dir)
    except OSError as error:
        raise ModelError(
            f"`--controlnet_model_name_or_path` {source!r} holds no diffusers ControlNet ({' '.join(str(error).split())}). "
            "Point it at a folder or hub repo with config.json and diffusion_pytorch_model.safetensors, "
            "as this trainer and diffusers save them."
        ) from error
    expected = model_class.__name__
    if config.get("_class_name") != expected:
        raise ModelError(
            f"`--controlnet_model_name_or_path` {source!r} is a {config.get('_class_name')}, not {indefinite_article(expected)} "
            f"{expected}: use a ControlNet made for {family}, or omit the flag to build one from the transformer."
        )
    return config


def config_mismatches(controlnet, transformer, keys: Sequence[str]) -> list[str]:
    """``key: ControlNet value vs transformer value`` for each of ``keys`` on which the two configs differ."""
    return [
        f"{key}: ControlNet {controlnet.config.get(key)} vs transformer {transformer.config.get(key)}"
        for key in keys
        if controlnet.config.get(key) != transformer.config.get(key)
    ]


def load_tokenizer(settings, subfolder: str, *, subfolders: Sequence[str]):
    """The tokenizer in ``subfolder`` of the base model, or of --tokenizer_name: a tokenizer itself
    when the family has one (``subfolders`` lists the family's), else a repo holding them all."""
    if settings.tokenizer_name and len(subfolders) == 1:
        source, subfolder = settings.tokenizer_name, ""
    else:
        source = settings.tokenizer_name or settings.pretrained_model_name_or_path
    try:
        return transformers.AutoTokenizer.from_pretrained(
            source, subfolder=subfolder, revision=settings.revision, cache_dir=settings.cache_dir, use_fast=False
        )
    except (OSError, ValueError) as error:
        if not settings.tokenizer_name:
            raise  # models.load_models names the base model's files
        layout = "a CLIP tokenizer (vocab.json, merges.txt)"
        if len(subfolders) > 1:
            layout = f"{' and '.join(f'{name}/' for name in subfolders)} subfolders holding the tokenizers"
        raise ModelError(
            f"`--tokenizer_name` {settings.tokenizer_name!r} holds no tokenizer ({' '.join(str(error).split())}). "
            f"Point it at a folder or hub repo with {layout}; a pipeline's own is in its tokenizer/ "
            "subfolder, and without the flag the base model's is used."
        ) from error


def load_text_encoder(settings, subfolder: str, *, classes: Sequence[str]) -> torch.nn.Module:
    """The text encoder in ``subfolder`` of the base model, if its class is one of ``classes``."""
    base = settings.pretrained_model_name_or_path
    common = {"revision": settings.revision, "cache_dir": settings.cache_dir}
    config = transformers.AutoConfig.from_pretrained(base, subfolder=subfolder, **common)
    name = (config.architectures or [classes[0]])[0]
    if name not in classes:
        raise ModelError(
            f"Text encoder class {name} in {base}/{subfolder} is not supported; this trainer "
            f"supports {', '.join(classes)} there."
        )
    return getattr(transformers, name).from_pretrained(base, subfolder=subfolder, variant=settings.variant, **common)


def load_vae(settings):
    """The base model's VAE, or --pretrained_vae_model_name_or_path's where the family has that flag."""
    from diffusers import AutoencoderKL

    common = {"revision": settings.revision, "cache_dir": settings.cache_dir}
    path = settings.pretrained_vae_model_name_or_path
    if path:
        check_local_path(path, "--pretrained_vae_model_name_or_path")
        return AutoencoderKL.from_pretrained(path, **common)
    return AutoencoderKL.from_pretrained(
        settings.pretrained_model_name_or_path, subfolder="vae", variant=settings.variant, **common
    )


def place_models(
    models: Models,
    *,
    device: torch.device,
    weight_dtype: torch.dtype,
    vae_dtype: torch.dtype | None = None,
    move_denoiser: bool = True,
) -> None:
    """Frozen models go to the device in the mixed-precision dtype (the VAE in ``vae_dtype`` when
    given; the denoiser stays put without ``move_denoiser``: a quantized one is loaded in place);
    the ControlNet stays fp32."""
    for module in models.frozen():
        module.requires_grad_(False)
        module.eval()
    models.controlnet.train()
    models.vae.to(device, dtype=vae_dtype or weight_dtype)
    if move_denoiser:
        models.denoiser.to(device, dtype=weight_dtype)
    for encoder in models.text_encoders:
        encoder.to(device, dtype=weight_dtype)


def offload_between_calls(module: torch.nn.Module, device: torch.device) -> None:
    """``module`` waits in CPU memory and moves to ``device`` (its inputs with it) for each forward
    call, leaving its outputs there: a text encoder that runs once per step, or once for the cache."""
    from accelerate.utils import send_to_device

    def arrive(mod, args, kwargs):
        mod.to(device)
        return send_to_device(args, device), send_to_device(kwargs, device)

    def leave(mod, args, output):
        mod.to("cpu")

    module.to("cpu")
    module.register_forward_pre_hook(arrive, with_kwargs=True)
    module.register_forward_hook(leave)


def enable_memory_options(models: Models, memory, device: torch.device) -> None:
    """Gradient checkpointing, the optional attention back-ends and compilation, with clear errors."""
    trained_path = (models.denoiser, models.controlnet)
    if memory.gradient_checkpointing:
        # The frozen denoiser's activations are kept for the backward pass into the ControlNet
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
