"""FLUX.1: CLIP-L (pooled) and T5, a transformer of double- and single-stream blocks
(``FluxTransformer2DModel``) on 2x2-packed latents, a 16-channel VAE with a shift, guidance
distillation (a guidance-scale embedding), and the flow-matching objective it shares with SD3.

The ControlNet (``FluxControlNetModel``) copies the first double and single blocks and adds one
residual per block to the transformer's image tokens. Its conditioning image goes through the VAE
and is packed like the latents, as FluxControlNetPipeline prepares it. Latents stay unpacked
outside ``predict``, so the cache, the objective and the fidelity measure treat them as any
family's.
"""

from __future__ import annotations

import argparse
import functools
import logging

import torch

from ..errors import ArgumentError
from ..models import ModelError
from . import Defaults, ModelCard, ModelFamily, Models, TextConditioning, components, flow, to_latents, token_ids

logger = logging.getLogger(__name__)

TEXT_COMPONENTS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
_ENCODER_CLASSES = {"text_encoder": ("CLIPTextModel",), "text_encoder_2": ("T5EncoderModel",)}
MAX_SEQUENCE_LENGTH = 512  # the Flux pipelines refuse longer T5 prompts
RESOLUTION_MULTIPLE = 16  # 8x VAE downsampling times 2x2 packing
QUANTIZATIONS = ("nf4", "int8")
SAVE_DTYPES = ("fp16", "bf16", "fp32")  # --save_weight_dtype, as diffusers' script offers them


def add_flags(parser: argparse.ArgumentParser) -> None:
    flow.add_flags(parser, weighted=False)
    group = parser.add_argument_group("Flux")
    group.add_argument(
        "--num_double_layers",
        type=int,
        default=4,
        help="Double-stream blocks of a ControlNet built from the transformer (copied from its first ones).",
    )
    group.add_argument(
        "--num_single_layers",
        type=int,
        default=4,
        help="Single-stream blocks of a ControlNet built from the transformer (0 is common and smaller).",
    )
    group.add_argument(
        "--guidance_scale",
        type=float,
        default=3.5,
        help="The guidance scale given to FLUX.1-dev's guidance embedding in training and validation.",
    )
    group.add_argument(
        "--max_sequence_length",
        type=int,
        default=MAX_SEQUENCE_LENGTH,
        help="T5 prompt length in tokens, for training and the validation images (the Flux pipelines' "
        "512 by default and at most; shorter is faster when captions are short).",
    )
    group.add_argument(
        "--quantize_base",
        type=str,
        default=None,
        choices=QUANTIZATIONS,
        help="Load the frozen transformer quantized by bitsandbytes (nf4: 4-bit, int8: 8-bit) so it "
        "fits small cards; gradients still reach the ControlNet through it. Needs a CUDA GPU.",
    )
    group.add_argument(
        "--jsonl_for_train",
        type=str,
        default=None,
        help="A JSON-lines file of training rows instead of --dataset_name: one object per line with "
        "the image path, conditioning image path and caption; relative paths are read from the "
        "working directory, as in diffusers.",
    )
    group.add_argument(
        "--use_adafactor",
        action="store_true",
        help="transformers' Adafactor instead of AdamW (no relative step, no parameter scaling; "
        "--adam_weight_decay applies): far less optimizer memory than AdamW.",
    )
    group.add_argument(
        "--save_weight_dtype",
        type=str,
        default="fp32",
        choices=SAVE_DTYPES,
        help="dtype of the final ControlNet; fp16 and bf16 are saved as that variant "
        '(diffusion_pytorch_model.bf16.safetensors: load with variant="bf16").',
    )
    group.add_argument(
        "--enable_model_cpu_offload",
        action="store_true",
        help="Keep CLIP and T5 in CPU memory and move each to the accelerator only while it encodes "
        "(with --cache_text_embeddings they leave it after the cache is built anyway).",
    )
    group.add_argument(
        "--pretrained_vae_model_name_or_path",
        type=str,
        default=None,
        help="A VAE to use instead of the base model's.",
    )
    for side in ("h", "w"):
        group.add_argument(
            f"--crops_coords_top_left_{side}",
            type=int,
            default=0,
            help="Accepted for diffusers' command lines and not used: Flux takes no crop conditioning.",
        )
    group.add_argument("--enable_npu_flash_attention", action="store_true", help="Use NPU flash attention.")


def check_flags(args: argparse.Namespace) -> None:
    flow.check_flags(args)
    if args.resolution % RESOLUTION_MULTIPLE:
        raise ArgumentError(
            f"`--resolution` must be a multiple of {RESOLUTION_MULTIPLE} for Flux (the VAE downsamples 8x and "
            f"latents are packed in 2x2 patches); got {args.resolution}, try "
            f"{max(RESOLUTION_MULTIPLE, args.resolution // RESOLUTION_MULTIPLE * RESOLUTION_MULTIPLE)}."
        )
    if not 1 <= args.max_sequence_length <= MAX_SEQUENCE_LENGTH:
        raise ArgumentError(
            f"`--max_sequence_length` must be between 1 and {MAX_SEQUENCE_LENGTH} (the Flux pipelines' "
            f"limit), got {args.max_sequence_length}."
        )
    for name in ("num_double_layers", "num_single_layers"):
        if getattr(args, name) < 0:
            raise ArgumentError(f"`--{name}` must be 0 or more, got {getattr(args, name)}.")
    if args.quantize_base is not None:
        _check_quantization(args.quantize_base, args.mixed_precision)
    if args.num_double_layers + args.num_single_layers == 0:
        raise ArgumentError("A ControlNet needs at least one block: raise --num_double_layers or --num_single_layers.")


def _check_quantization(quantization: str, mixed_precision: str | None) -> None:
    """bitsandbytes' 4- and 8-bit layers need its package and a CUDA GPU (diffusers refuses to
    quantize without one), and compute in bf16."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ArgumentError(f"`--quantize_base={quantization}` needs bitsandbytes: `pip install bitsandbytes`.")
    if not torch.cuda.is_available():
        raise ArgumentError(
            f"`--quantize_base={quantization}` needs a CUDA GPU: diffusers quantizes with bitsandbytes on "
            "CUDA only, and none is visible here. Drop the flag to train with the transformer in "
            "--mixed_precision, or run on a GPU."
        )
    if mixed_precision not in (None, "bf16"):
        raise ArgumentError(
            f"`--quantize_base={quantization}` computes the transformer in bf16; pass --mixed_precision=bf16 "
            f"(got {mixed_precision})."
        )


def load_models(settings) -> Models:
    """Tokenizers, CLIP and T5, VAE, transformer (quantized with --quantize_base), flow-matching
    scheduler and the ControlNet to train."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    base = settings.pretrained_model_name_or_path
    common = {"revision": settings.revision, "cache_dir": settings.cache_dir}
    subfolders = [tokenizer for tokenizer, _ in TEXT_COMPONENTS]
    tokenizers = tuple(components.load_tokenizer(settings, sub, subfolders=subfolders) for sub in subfolders)
    text_encoders = tuple(
        components.load_text_encoder(settings, sub, classes=_ENCODER_CLASSES[sub]) for _, sub in TEXT_COMPONENTS
    )
    vae = components.load_vae(settings)
    transformer = _load_transformer(settings)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler", **common)
    controlnet = load_controlnet(settings, transformer)
    return Models(
        tokenizers,
        text_encoders,
        vae,
        transformer,
        controlnet,
        scheduler,
        text_options={"max_sequence_length": settings.max_sequence_length},
        forward_options={"guidance_scale": settings.guidance_scale},
    )


def _load_transformer(settings):
    from diffusers import BitsAndBytesConfig, FluxTransformer2DModel

    common = {"revision": settings.revision, "cache_dir": settings.cache_dir, "variant": settings.variant}
    if settings.quantize_base is None:
        return FluxTransformer2DModel.from_pretrained(
            settings.pretrained_model_name_or_path, subfolder="transformer", **common
        )
    if settings.quantize_base == "nf4":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    return FluxTransformer2DModel.from_pretrained(
        settings.pretrained_model_name_or_path,
        subfolder="transformer",
        quantization_config=config,
        torch_dtype=torch.bfloat16,
        **common,
    )


def load_controlnet(settings, transformer):
    """The ControlNet to train: its first blocks copied from the transformer, or a diffusers folder."""
    from diffusers import FluxControlNetModel

    source = settings.controlnet_model_name_or_path
    if not source:
        logger.info(
            "Initializing the ControlNet from the transformer's weights (%d double, %d single blocks)",
            settings.num_double_layers,
            settings.num_single_layers,
        )
        if settings.quantize_base is not None:
            return _controlnet_from_files(settings, transformer)
        return FluxControlNetModel.from_transformer(
            transformer,
            num_layers=settings.num_double_layers,
            num_single_layers=settings.num_single_layers,
            attention_head_dim=transformer.config.attention_head_dim,
            num_attention_heads=transformer.config.num_attention_heads,
        )
    config = components.pretrained_controlnet_config(FluxControlNetModel, settings, family="Flux")
    if config.get("num_mode") is not None:
        raise ModelError(
            f"`--controlnet_model_name_or_path` {source!r} is a Union ControlNet ({config['num_mode']} control "
            "modes), which needs a mode per training row; this trainer (like diffusers') trains single-mode "
            "ControlNets. Start from a single-mode ControlNet, or omit the flag to build one from the transformer."
        )
    controlnet = FluxControlNetModel.from_pretrained(source, cache_dir=settings.cache_dir)
    check_controlnet_matches(controlnet, transformer)
    return controlnet


def check_controlnet_matches(controlnet, transformer) -> None:
    """A ControlNet made for another base model fails here instead of mid-step."""
    keys = ("num_attention_heads", "attention_head_dim", "in_channels", "joint_attention_dim", "pooled_projection_dim")
    mismatched = components.config_mismatches(controlnet, transformer, keys)
    if mismatched:
        raise ModelError(
            "The ControlNet does not match the transformer of the base model (" + "; ".join(mismatched) + "). Use a "
            "Flux ControlNet trained for this base model, or omit --controlnet_model_name_or_path to build one "
            "from the transformer."
        )


def _controlnet_from_files(settings, transformer):
    """``from_transformer``'s ControlNet for a quantized transformer, whose 4- or 8-bit weights cannot
    be copied into fp32 blocks: the same weights read from the transformer's own files."""
    from diffusers import FluxControlNetModel
    from diffusers.models.model_loading_utils import load_state_dict
    from diffusers.utils import _get_model_file

    config = dict(transformer.config)
    config |= {"num_layers": settings.num_double_layers, "num_single_layers": settings.num_single_layers}
    controlnet = FluxControlNetModel.from_config(config)
    wanted = controlnet.state_dict()
    copied = {}
    for path in _transformer_files(settings, _get_model_file):
        for name, value in load_state_dict(path).items():
            if name in wanted and not name.startswith(("controlnet_", "input_hint_block")):
                copied[name] = value.to(torch.float32)
    controlnet.load_state_dict(copied, strict=False)
    return controlnet


def _transformer_files(settings, get_model_file) -> list[str]:
    """The transformer's weight files (one, or the shards its index lists), of --variant if given."""
    import json

    from diffusers.utils import _add_variant

    common = {"subfolder": "transformer", "revision": settings.revision, "cache_dir": settings.cache_dir}
    base = settings.pretrained_model_name_or_path
    single = _add_variant("diffusion_pytorch_model.safetensors", settings.variant)
    try:
        index_name = _add_variant("diffusion_pytorch_model.safetensors.index.json", settings.variant)
        index = get_model_file(base, weights_name=index_name, **common)
    except OSError:
        return [get_model_file(base, weights_name=single, **common)]
    with open(index) as handle:
        shards = sorted(set(json.load(handle)["weight_map"].values()))
    return [get_model_file(base, weights_name=shard, **common) for shard in shards]


def encode_prompts(models: Models, prompts: list[str]) -> TextConditioning:
    """The Flux pipelines' prompt embeddings: T5's hidden states, and CLIP's pooled output."""
    (clip_tokenizer, t5_tokenizer), (clip, t5) = models.tokenizers, models.text_encoders
    pooled = clip(token_ids(clip_tokenizer, prompts, clip.device), output_hidden_states=False).pooler_output
    length = models.text_options["max_sequence_length"]
    hidden = t5(token_ids(t5_tokenizer, prompts, t5.device, max_length=length), output_hidden_states=False)[0]
    return TextConditioning(hidden, pooled.to(hidden.device))


def no_added_conditioning(text: TextConditioning, batch: dict, *, resolution: int, crop_override) -> None:
    return


def encode_control(models: Models, pixels: torch.Tensor, generators) -> torch.Tensor:
    """The conditioning image as FluxControlNetPipeline prepares it: VAE latents of [-1, 1] pixels,
    shifted and scaled (a posterior sample, or the mean for ``generators=None``); packed in
    ``predict``. XLabs ControlNets (with an ``input_hint_block``) take the pixels themselves."""
    vae = models.vae
    scaled = (pixels * 2 - 1).to(vae.device, vae.dtype)
    if _bare(models.controlnet).input_hint_block is not None:
        return scaled
    posterior = vae.encode(scaled).latent_dist
    return to_latents(vae, posterior.mean if generators is None else posterior.sample(generator=generators))


def _bare(controlnet):
    """The ControlNet itself, through a DDP or DeepSpeed wrapper (which holds it as ``module``)."""
    return getattr(controlnet, "module", controlnet)


def place_models(models: Models, *, device, weight_dtype, settings) -> None:
    """As every family places them, except that a quantized transformer stays where bitsandbytes
    put it (on the GPU, in its own dtypes), and with --enable_model_cpu_offload the text encoders
    wait in CPU memory between calls."""
    quantized = settings.quantize_base is not None
    if quantized and weight_dtype != torch.bfloat16:  # mixed precision from the accelerate config
        raise ModelError(
            f"`--quantize_base={settings.quantize_base}` computes the transformer in bf16, but this run's mixed "
            f"precision gives {weight_dtype}; pass --mixed_precision=bf16."
        )
    components.place_models(models, device=device, weight_dtype=weight_dtype, move_denoiser=not quantized)
    if settings.enable_model_cpu_offload:
        for encoder in models.text_encoders:
            components.offload_between_calls(encoder, device)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[b, c, h, w] latents as [b, h/2 * w/2, 4c] tokens of 2x2 patches (FluxPipeline._pack_latents)."""
    b, c, h, w = latents.shape
    patches = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``pack``'s inverse, for latents of ``height`` x ``width``."""
    b, _, channels = tokens.shape
    patches = tokens.reshape(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, channels // 4, height, width)


def image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """(row, column) positions of the packed tokens, as the pipeline's latent image ids."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


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
    """The transformer's velocity with the ControlNet's block residuals (none if the image is None),
    called as FluxControlNetPipeline calls them; unpacked to the latents' shape."""
    batch, _, height, width = noisy_latents.shape
    device = noisy_latents.device
    tokens = pack(noisy_latents)
    ids = {
        "img_ids": image_ids(height, width, device, weight_dtype),
        "txt_ids": torch.zeros(text.encoder_hidden_states.shape[1], 3, device=device, dtype=weight_dtype),
    }
    scale = torch.full((batch,), models.forward_options["guidance_scale"], device=device)
    timestep = timesteps / 1000  # Flux's modules take the schedule's t in [0, 1]
    residuals = {}
    if controlnet_image is not None:
        bare = _bare(controlnet)
        hint = bare.input_hint_block is not None
        block_samples, single_samples = controlnet(
            hidden_states=tokens,
            controlnet_cond=controlnet_image if hint else pack(controlnet_image),
            timestep=timestep,
            guidance=scale if bare.config.guidance_embeds else None,
            pooled_projections=text.pooled,
            encoder_hidden_states=text.encoder_hidden_states,
            return_dict=False,
            **ids,
        )
        residuals = {
            "controlnet_block_samples": _cast(block_samples, weight_dtype),
            "controlnet_single_block_samples": _cast(single_samples, weight_dtype),
            "controlnet_blocks_repeat": hint,  # XLabs ControlNets repeat their few residuals
        }
    velocity = models.denoiser(
        hidden_states=tokens.to(weight_dtype),
        timestep=timestep,
        guidance=scale if models.denoiser.config.guidance_embeds else None,
        pooled_projections=text.pooled.to(weight_dtype),
        encoder_hidden_states=text.encoder_hidden_states.to(weight_dtype),
        return_dict=False,
        **ids,
        **residuals,
    )[0]
    return unpack(velocity, height, width)


def _cast(samples, dtype: torch.dtype):
    return None if samples is None else [sample.to(dtype) for sample in samples]


def pipeline_components(models: Models, controlnet) -> dict:
    """A FluxControlNetPipeline's components around the models in memory."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    parts = {"transformer": models.denoiser, "vae": models.vae, "controlnet": controlnet}
    for (tok_name, enc_name), tokenizer, encoder in zip(
        TEXT_COMPONENTS, models.tokenizers, models.text_encoders, strict=True
    ):
        parts[tok_name] = tokenizer
        parts[enc_name] = encoder
    # A copy: the pipeline sets its own timesteps, which must not change the training schedule's.
    parts["scheduler"] = FlowMatchEulerDiscreteScheduler.from_config(models.noise_scheduler.config)
    return parts


def pipeline_inputs(models: Models, conditioning) -> dict:
    return {
        "control_image": conditioning,
        "max_sequence_length": models.text_options["max_sequence_length"],
        "guidance_scale": models.forward_options["guidance_scale"],
    }


def prompt_embedding_inputs(text: TextConditioning) -> dict:
    return {"prompt_embeds": text.encoder_hidden_states, "pooled_prompt_embeds": text.pooled}


def memory_estimate(settings, weight_dtype: torch.dtype) -> dict[str, float]:
    """GiB this run keeps on the GPU before activations (``controlnet_trainer.memory``), from the
    models' configs alone: the models are built on the meta device, so nothing is downloaded but
    config files and nothing is allocated."""
    from .. import memory

    model, optimizer = settings.model, settings.optimizer
    frozen = model.quantize_base or ("fp32" if weight_dtype == torch.float32 else "bf16")
    recipe = memory.Recipe(
        name="this run",
        frozen=frozen,
        # Cached or offloaded text encoders are off the GPU while the ControlNet trains.
        cached=settings.memory.cache_text_embeddings or model.enable_model_cpu_offload,
        optimizer="adafactor" if optimizer.use_adafactor else "adamw8bit" if optimizer.use_8bit_adam else "adamw",
        fused=optimizer.fused_backward_pass,
    )
    transformer, encoders, vae, controlnet = _meta_models(model)
    return memory.in_gib(memory.recipe_bytes(transformer, encoders, vae, controlnet, recipe))


def _meta_models(settings):
    """The transformer, text encoders, VAE and ControlNet of ``settings`` on the meta device."""
    import transformers
    from diffusers import AutoencoderKL, FluxControlNetModel, FluxTransformer2DModel

    base = settings.pretrained_model_name_or_path
    common = {"revision": settings.revision, "cache_dir": settings.cache_dir}
    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(
            FluxTransformer2DModel.load_config(base, subfolder="transformer", **common)
        )
        vae_source = settings.pretrained_vae_model_name_or_path
        vae_config = AutoencoderKL.load_config(vae_source or base, subfolder=None if vae_source else "vae", **common)
        vae = AutoencoderKL.from_config(vae_config)
        encoders = []
        for _, subfolder in TEXT_COMPONENTS:
            config = transformers.AutoConfig.from_pretrained(base, subfolder=subfolder, **common)
            encoders.append(getattr(transformers, _ENCODER_CLASSES[subfolder][0])(config))
        if settings.controlnet_model_name_or_path:
            source = settings.controlnet_model_name_or_path
            controlnet = FluxControlNetModel.from_config(
                FluxControlNetModel.load_config(source, cache_dir=settings.cache_dir)
            )
        else:
            controlnet = FluxControlNetModel.from_transformer(
                transformer,
                num_layers=settings.num_double_layers,
                num_single_layers=settings.num_single_layers,
                attention_head_dim=transformer.config.attention_head_dim,
                num_attention_heads=transformer.config.num_attention_heads,
                load_weights_from_transformer=False,
            )
    return transformer, encoders, vae, controlnet


def is_flux_transformer(config: dict) -> bool:
    return config.get("_class_name") == "FluxTransformer2DModel"


FAMILY = ModelFamily(
    name="flux",
    title="Flux",
    script="train_controlnet_flux.py",
    description="Train a ControlNet for FLUX.1.",
    defaults=Defaults(
        resolution=512,
        image_interpolation_mode="bilinear",
        tracker_project_name="flux_train_controlnet",
        num_validation_images=2,
    ),
    card=ModelCard(tags=("flux", "flux-diffusers"), license="other", controlnet_class="FluxControlNetModel"),
    add_flags=add_flags,
    check_flags=check_flags,
    denoiser_subfolder="transformer",
    is_own_denoiser=is_flux_transformer,
    text_components=TEXT_COMPONENTS,
    load_models=load_models,
    place_models=place_models,
    enable_memory_options=components.enable_memory_options,
    encode_prompts=encode_prompts,
    added_conditioning=no_added_conditioning,
    encode_control=encode_control,
    control_uses_vae=True,
    sample_noise=flow.sample_noise,
    loss=functools.partial(flow.flow_loss, predict=predict, weighted=False),
    schedule_timesteps=flow.schedule_timesteps,
    pipeline_class="FluxControlNetPipeline",
    pipeline_components=pipeline_components,
    pipeline_inputs=pipeline_inputs,
    save_single_file=None,
    checkpoint_folder="flux_controlnet",
    memory_estimate=memory_estimate,
    unused_parameters=True,
    prompt_embedding_inputs=prompt_embedding_inputs,
)
