"""Loading the frozen base models and the trainable ControlNet, and their memory options."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import logging
import os

import torch
import transformers
from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel

from . import export
from .errors import InputError
from .family import ModelFamily

logger = logging.getLogger(__name__)

_TEXT_ENCODER_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")
# Checkpoint files a --controlnet_model_name_or_path may name; only .safetensors is read.
_SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pth", ".pt", ".bin")
# What ControlNetModel.from_unet gives a ControlNet built without --controlnet_model_name_or_path.
_FROM_UNET_EMBEDDING = (16, 32, 96, 256)


class ModelError(InputError):
    """A model path or combination of models that cannot work; the message says the fix."""


@dataclasses.dataclass
class Models:
    tokenizers: tuple
    text_encoders: tuple
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    controlnet: ControlNetModel
    noise_scheduler: DDPMScheduler

    def frozen(self) -> tuple[torch.nn.Module, ...]:
        return (*self.text_encoders, self.vae, self.unet)


def load_models(args: argparse.Namespace, family: ModelFamily) -> Models:
    """Tokenizers, text encoders, VAE, UNet, scheduler and the ControlNet to train."""
    _check_local_path(args.pretrained_model_name_or_path, "--pretrained_model_name_or_path")
    if args.tokenizer_name:
        _check_local_path(args.tokenizer_name, "--tokenizer_name")
    # Missing files (a --variant the folder does not hold), a wrong --revision or no network
    # raise OSError; the libraries' own text names the file, given here as one paragraph.
    try:
        return _load_models(args, family)
    except OSError as error:
        flags = ["--pretrained_model_name_or_path"]
        named = ("controlnet_model_name_or_path", "pretrained_vae_model_name_or_path", "revision", "variant")
        flags += [f"--{name}" for name in (*named, "tokenizer_name") if getattr(args, name, None)]
        raise ModelError(
            f"Could not load the models: {' '.join(str(error).split())} Check {', '.join(flags)}; "
            "a hub id needs the network or an earlier download in the cache."
        ) from error


def _load_models(args: argparse.Namespace, family: ModelFamily) -> Models:
    base = args.pretrained_model_name_or_path
    common = {"revision": args.revision, "cache_dir": args.cache_dir}
    tokenizers = tuple(_load_tokenizer(args, family, sub) for sub, _ in family.text_components)
    text_encoders = tuple(
        _load_text_encoder(base, sub, variant=args.variant, **common) for _, sub in family.text_components
    )
    vae_path = getattr(args, "pretrained_vae_model_name_or_path", None)
    if vae_path:
        _check_local_path(vae_path, "--pretrained_vae_model_name_or_path")
        vae = AutoencoderKL.from_pretrained(vae_path, **common)
    else:
        vae = AutoencoderKL.from_pretrained(base, subfolder="vae", variant=args.variant, **common)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", variant=args.variant, **common)
    noise_scheduler = DDPMScheduler.from_pretrained(
        base, subfolder="scheduler", rescale_betas_zero_snr=getattr(args, "rescale_betas_zero_snr", False), **common
    )
    controlnet = _load_controlnet(args, unet)
    check_conditioning_scale(
        controlnet, vae, controlnet_source=args.controlnet_model_name_or_path, vae_source=vae_path or f"{base}/vae"
    )
    return Models(tokenizers, text_encoders, vae, unet, controlnet, noise_scheduler)


def check_family(args: argparse.Namespace, family: ModelFamily, *, fidelity_command: bool = False) -> None:
    """The SD script pointed at an SDXL model, or the reverse, fails here with the fix, from the
    UNet's config alone, instead of deep in a tokenizer or at the first step."""
    base = args.pretrained_model_name_or_path
    _check_local_path(base, "--pretrained_model_name_or_path")
    try:
        config = UNet2DConditionModel.load_config(
            base, subfolder="unet", revision=args.revision, cache_dir=args.cache_dir
        )
    except OSError as error:
        raise ModelError(
            f"`--pretrained_model_name_or_path` {base!r} is not a diffusers pipeline that can be read "
            f"({' '.join(str(error).split())}). Point it at a Stable Diffusion pipeline in diffusers format "
            "(with unet/, vae/, text_encoder/, tokenizer/ and scheduler/); a hub id needs the network or an "
            "earlier download in the cache."
        ) from error
    is_sdxl = config.get("addition_embed_type") == "text_time"  # SDXL's pooled-text and size conditioning
    if is_sdxl == (family.name == "sdxl"):
        return
    if fidelity_command:
        fix = "Add --sdxl." if is_sdxl else "Drop --sdxl."
    else:
        fix = f"Run {'train_controlnet_sdxl.py' if is_sdxl else 'train_controlnet.py'} with the same flags instead."
    raise ModelError(
        f"`--pretrained_model_name_or_path` {base!r} is {'an SDXL' if is_sdxl else 'an SD 1.x/2.x'} model "
        f"(its UNet's addition_embed_type is {config.get('addition_embed_type')!r}), but it was given "
        f"to the {'SDXL' if family.name == 'sdxl' else 'SD'} code path. {fix}"
    )


def _check_local_path(path: str, flag: str) -> None:
    """A value that can only be a local path and does not exist fails before any download.

    Hub ids have the form ``org/name``; anything starting with ``.``, ``/`` or ``~`` or with
    more than one ``/`` is a path.
    """
    if os.path.exists(os.path.expanduser(path)):
        return
    if path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise ModelError(f"`{flag}` points to {path!r}, which does not exist. Check the path.")


def _load_tokenizer(args: argparse.Namespace, family: ModelFamily, subfolder: str):
    if args.tokenizer_name and len(family.text_components) == 1:
        source, subfolder = args.tokenizer_name, ""
    else:  # SDXL's --tokenizer_name names a repo holding tokenizer/ and tokenizer_2/
        source = args.tokenizer_name or args.pretrained_model_name_or_path
    try:
        return transformers.AutoTokenizer.from_pretrained(
            source, subfolder=subfolder, revision=args.revision, cache_dir=args.cache_dir, use_fast=False
        )
    except (OSError, ValueError) as error:
        if not args.tokenizer_name:
            raise  # load_models names the base model's files
        layout = "a CLIP tokenizer (vocab.json, merges.txt)"
        if len(family.text_components) > 1:
            layout = "tokenizer/ and tokenizer_2/ subfolders holding CLIP tokenizers"
        raise ModelError(
            f"`--tokenizer_name` {args.tokenizer_name!r} holds no tokenizer ({' '.join(str(error).split())}). "
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


def _load_controlnet(args: argparse.Namespace, unet: UNet2DConditionModel) -> ControlNetModel:
    """The ControlNet to train: from the UNet, a diffusers folder or hub id, or one original-layout file."""
    source = args.controlnet_model_name_or_path
    if not source:
        logger.info("Initializing the ControlNet from the UNet's weights")
        return ControlNetModel.from_unet(unet)
    _check_local_path(source, "--controlnet_model_name_or_path")
    logger.info("Loading the ControlNet from %s", source)
    path = os.path.expanduser(source)
    if not os.path.isdir(path) and (os.path.isfile(path) or path.endswith(_SINGLE_FILE_SUFFIXES)):
        controlnet = _load_single_file(path, unet, args.pretrained_model_name_or_path)
    else:
        controlnet = ControlNetModel.from_pretrained(source, cache_dir=args.cache_dir)
    check_controlnet_matches_unet(controlnet, unet)
    return controlnet


def _load_single_file(path: str, unet: UNet2DConditionModel, base: str) -> ControlNetModel:
    """An A1111 / ComfyUI ControlNet file, configured as ``ControlNetModel.from_unet`` configures one
    for this UNet, with the conditioning embedding the file holds."""
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


def check_controlnet_matches_unet(controlnet: ControlNetModel, unet: UNet2DConditionModel) -> None:
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


def check_conditioning_scale(
    controlnet: ControlNetModel, vae: AutoencoderKL, *, controlnet_source: str | None, vae_source: str
) -> None:
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


def freeze_and_place(
    models: Models,
    family: ModelFamily,
    *,
    device: torch.device,
    weight_dtype: torch.dtype,
    custom_vae: bool,
) -> None:
    """Frozen models go to the device in the mixed-precision dtype; the ControlNet stays fp32."""
    for module in models.frozen():
        module.requires_grad_(False)
        module.eval()
    models.controlnet.train()
    vae_dtype = torch.float32 if family.vae_fp32_by_default and not custom_vae else weight_dtype
    models.vae.to(device, dtype=vae_dtype)
    models.unet.to(device, dtype=weight_dtype)
    for encoder in models.text_encoders:
        encoder.to(device, dtype=weight_dtype)


def enable_memory_options(args: argparse.Namespace, models: Models, device: torch.device) -> None:
    """Gradient checkpointing, the optional attention back-ends and compilation, with clear errors."""
    if args.gradient_checkpointing:
        # The frozen UNet's activations are kept for the backward pass into the ControlNet
        # residuals too, so checkpointing it saves as much memory as the ControlNet's.
        models.controlnet.enable_gradient_checkpointing()
        models.unet.enable_gradient_checkpointing()
    if args.enable_xformers_memory_efficient_attention:
        check_xformers(device)
        models.unet.enable_xformers_memory_efficient_attention()
        models.controlnet.enable_xformers_memory_efficient_attention()
    if getattr(args, "enable_npu_flash_attention", False):
        if importlib.util.find_spec("torch_npu") is None:
            raise ModelError(
                "--enable_npu_flash_attention needs an Ascend NPU and the torch_npu package, "
                "which is not installed. Drop the flag (PyTorch SDPA attention is the default)."
            )
        models.unet.enable_npu_flash_attention()
        models.controlnet.enable_npu_flash_attention()
    if args.torch_compile:
        # In place (nn.Module.compile), so parameter names, hooks and saving are unchanged.
        # Evaluation runs these modules eagerly: see eager_evaluation.
        models.unet.compile(backend=args.torch_compile)
        models.controlnet.compile(backend=args.torch_compile)


def eager_evaluation():
    """A context in which modules compiled by --torch_compile run eagerly.

    Validation and the fidelity probe run the UNet and ControlNet without gradients and at other
    batch sizes than training, so each would trace and build graphs of its own: minutes with
    inductor, for work done a few times per run. Dynamo also keeps the graphs of both models under
    one function (diffusers wraps both forwards in the same decorator), so every extra graph
    brings training's closer to the recompile limit, past which new shapes run uncompiled.
    """
    return torch.compiler.set_stance("force_eager")


def check_xformers(device: torch.device) -> None:
    if importlib.util.find_spec("xformers") is None:
        raise ModelError(
            "--enable_xformers_memory_efficient_attention needs xformers, which is not installed. "
            "Install it (`pip install xformers`) or drop the flag: PyTorch SDPA attention is the "
            "default and is as memory-efficient on recent PyTorch."
        )
    if device.type != "cuda":
        raise ModelError(
            f"--enable_xformers_memory_efficient_attention needs a CUDA GPU, but training runs on "
            f"{device.type}. Drop the flag."
        )


def mixed_precision_autocast(device: torch.device, dtype: torch.dtype):
    """Autocast for evaluating the fp32 ControlNet beside half-precision frozen models.

    It is the device's own autocast (CPU bf16 included), never a hard-coded CUDA one.
    """
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


FUSED_ADAMW_DEVICES = ("cuda", "cpu")  # where torch has a fused AdamW kernel and we have run it


def make_optimizer(
    args: argparse.Namespace, params, learning_rate: float, device: torch.device
) -> torch.optim.Optimizer:
    """AdamW (fused when training on CUDA or the CPU) or bitsandbytes' 8-bit AdamW.

    ``device`` is where training runs, not where the parameters are now: the optimizer is made
    before Accelerate moves the ControlNet there, and the choice must follow the destination.
    """
    hyper = {
        "lr": learning_rate,
        "betas": (args.adam_beta1, args.adam_beta2),
        "weight_decay": args.adam_weight_decay,
        "eps": args.adam_epsilon,
    }
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise ModelError(
                "--use_8bit_adam needs bitsandbytes: `pip install bitsandbytes`, or drop the flag."
            ) from error
        return bnb.optim.AdamW8bit(params, **hyper)
    # One kernel for the whole update: the foreach one (about ten passes over the weights) took
    # 12.3 ms of a 251 ms SD 1.5 step on an H100, and is 4x slower than the fused one on a CPU.
    return torch.optim.AdamW(params, fused=device.type in FUSED_ADAMW_DEVICES or None, **hyper)
