"""The published SD 1.5, SDXL and SD3 base architectures with random weights, for benchmarks.

Nothing is downloaded: the configs below are those of runwayml/stable-diffusion-v1-5 and
stabilityai/stable-diffusion-xl-base-1.0 (UNet, VAE, text encoders, training scheduler), so a
step costs what it costs on the real models. Only the tokenizer is the fixtures' small-vocabulary
CLIP tokenizer: it changes which token ids a prompt becomes, not the arithmetic of a step.

The SD3 family (stabilityai/stable-diffusion-3-medium-diffusers, stable-diffusion-3.5-medium and
stable-diffusion-3.5-large: transformer, VAE, CLIP-L, CLIP-G, T5 v1.1 XXL encoder) is built on the
meta device only, to size its training memory (``benchmarks/sd3_memory.py``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import transformers
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDPMScheduler,
    FluxControlNetModel,
    FluxTransformer2DModel,
    SD3ControlNetModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
)

from . import fixtures
from .families import Models, TextConditioning, sd

SD15_UNET = {
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "layers_per_block": 2,
    "sample_size": 64,
}
SDXL_UNET = {
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": [5, 10, 20],
    "transformer_layers_per_block": [1, 2, 10],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "layers_per_block": 2,
    "sample_size": 128,
}
VAE = {
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
}
SDXL_VAE = {**VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
SD15_VAE = {**VAE, "sample_size": 512, "scaling_factor": 0.18215}
CLIP_VIT_L = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
OPENCLIP_BIGG = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
    "hidden_act": "gelu",
}
# SD3's MMDiT transformers. The 3.5 releases add RMS-normed queries and keys; 3.5 Medium also has
# a second image self-attention in its first 13 blocks (MMDiT-X) and a 384x384 grid of positions.
SD3_MEDIUM_TRANSFORMER = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "num_attention_heads": 24,
    "attention_head_dim": 64,
    "caption_projection_dim": 1536,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192,
}
SD35_MEDIUM_TRANSFORMER = {
    **SD3_MEDIUM_TRANSFORMER,
    "pos_embed_max_size": 384,
    "dual_attention_layers": list(range(13)),
    "qk_norm": "rms_norm",
}
SD35_LARGE_TRANSFORMER = {
    **SD3_MEDIUM_TRANSFORMER,
    "num_layers": 38,
    "num_attention_heads": 38,
    "caption_projection_dim": 2432,
    "qk_norm": "rms_norm",
}
SD3_TRANSFORMERS = {
    "sd3-medium": SD3_MEDIUM_TRANSFORMER,
    "sd3.5-medium": SD35_MEDIUM_TRANSFORMER,
    "sd3.5-large": SD35_LARGE_TRANSFORMER,
}
# One VAE for all three: 16 latent channels, no quant convs, latents shifted then scaled.
SD3_VAE = {
    **VAE,
    "latent_channels": 16,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "force_upcast": True,
}
# google/t5-v1_1-xxl, of which SD3 loads the encoder alone.
T5_XXL = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_ff": 10240,
    "d_kv": 64,
    "num_heads": 64,
    "num_layers": 24,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
}
# The scheduler both training scripts load; inference schedulers do not enter a training step.
SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "clip_sample": False,
    "steps_offset": 1,
}
FAMILIES = ("sd15", "sdxl")


def text_encoder(config: dict, tokenizer: CLIPTokenizer, *, projection: bool) -> torch.nn.Module:
    text_config = CLIPTextConfig(
        **config,
        vocab_size=49408,
        max_position_embeddings=fixtures.MODEL_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(text_config)


def narrowed_sd15(divisor: int) -> dict[str, dict]:
    """SD 1.5's UNet, VAE and text encoder configs with every width divided by ``divisor``.

    Depths, attention heads and resolutions stay, so a step keeps SD 1.5's structure and most of
    its FLOP split at a size a CPU trains in seconds (quarter width: 54M UNet weights, not 860M).
    GroupNorm's 32 groups do not divide the narrowed widths (80 = 320 / 4), so they use 16.
    """
    if divisor == 1:
        return {"unet": SD15_UNET, "vae": SD15_VAE, "text_encoder": CLIP_VIT_L}
    groups = {"norm_num_groups": 16}
    return {
        "unet": {
            **SD15_UNET,
            **groups,
            "block_out_channels": [width // divisor for width in SD15_UNET["block_out_channels"]],
            "cross_attention_dim": SD15_UNET["cross_attention_dim"] // divisor,
        },
        "vae": {**SD15_VAE, **groups, "block_out_channels": [width // divisor for width in VAE["block_out_channels"]]},
        "text_encoder": {
            **CLIP_VIT_L,
            **{key: CLIP_VIT_L[key] // divisor for key in ("hidden_size", "intermediate_size", "projection_dim")},
        },
    }


def components(family: str, tokenizers: dict[str, CLIPTokenizer], width_divisor: int = 1) -> dict[str, torch.nn.Module]:
    """UNet, VAE and text encoders of ``family``, on the current default device (meta counts FLOPs).

    ``width_divisor`` narrows SD 1.5 (``narrowed_sd15``); SDXL comes at its published width only.
    """
    if family == "sd15":
        configs = narrowed_sd15(width_divisor)
        return {
            "unet": UNet2DConditionModel(**configs["unet"]),
            "vae": AutoencoderKL(**configs["vae"]),
            "text_encoder": text_encoder(configs["text_encoder"], tokenizers["tokenizer"], projection=False),
        }
    if width_divisor != 1:
        raise ValueError("only sd15 can be narrowed")
    if family == "sdxl":
        return {
            "unet": UNet2DConditionModel(**SDXL_UNET),
            "vae": AutoencoderKL(**SDXL_VAE),
            "text_encoder": text_encoder(CLIP_VIT_L, tokenizers["tokenizer"], projection=False),
            "text_encoder_2": text_encoder(OPENCLIP_BIGG, tokenizers["tokenizer_2"], projection=True),
        }
    raise ValueError(f"family must be one of {FAMILIES}, not {family!r}")


def sd3_components(base: str) -> dict[str, torch.nn.Module]:
    """Transformer, VAE, CLIP-L, CLIP-G and T5 encoder of ``base`` on the current default device.

    ``base`` is a key of ``SD3_TRANSFORMERS``. Meant for ``torch.device("meta")``: the T5 encoder
    alone holds 4.76 billion weights.
    """
    if base not in SD3_TRANSFORMERS:
        raise ValueError(f"base must be one of {tuple(SD3_TRANSFORMERS)}, not {base!r}")
    clip = {"vocab_size": 49408, "max_position_embeddings": fixtures.MODEL_MAX_LENGTH}
    return {
        "transformer": SD3Transformer2DModel(**SD3_TRANSFORMERS[base]),
        "vae": AutoencoderKL(**SD3_VAE),
        "text_encoder": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_VIT_L, **clip)),
        "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_BIGG, **clip)),
        "text_encoder_3": T5EncoderModel(T5Config(**T5_XXL)),
    }


def meta_sd3_training_parts(base: str) -> dict[str, torch.nn.Module]:
    """``sd3_components(base)`` on the meta device plus the ControlNet diffusers' SD3 script trains.

    The ControlNet is ``SD3ControlNetModel.from_transformer`` with its defaults (the first 12
    blocks) and no extra conditioning channels. ``from_transformer`` writes its ``num_layers``
    (and ``extra_conditioning_channels``) into the transformer's config dict, so every call builds
    a transformer of its own and puts its ``num_layers`` back.
    """
    with torch.device("meta"):
        parts = sd3_components(base)
        transformer = parts["transformer"]
        num_layers = transformer.config.num_layers
        parts["controlnet"] = SD3ControlNetModel.from_transformer(transformer, num_extra_conditioning_channels=0)
    transformer.register_to_config(num_layers=num_layers)
    return parts


def parameter_count(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def write_tokenizers(family: str, path: Path) -> dict[str, CLIPTokenizer]:
    tokenizers = {"tokenizer": fixtures.write_tokenizer(path / "tokenizer", pad_token=fixtures.EOS_TOKEN)}
    if family == "sdxl":  # SDXL's second tokenizer pads with "!"
        tokenizers["tokenizer_2"] = fixtures.write_tokenizer(path / "tokenizer_2", pad_token="!")
    return tokenizers


def build_reference(
    family: str, path: str | Path, *, device: str | torch.device = "cpu", width_divisor: int = 1
) -> Path:
    """Write a diffusers-format pipeline folder of ``family`` ("sd15" or "sdxl") to ``path``.

    ``device="cuda"`` initialises the ~1-3.5 billion random weights on the GPU, in seconds.
    """
    path = Path(path)
    tokenizers = write_tokenizers(family, path)
    with torch.device(device):
        parts = components(family, tokenizers, width_divisor)
    for name, module in parts.items():
        module.save_pretrained(path / name)
    DDPMScheduler(**SCHEDULER).save_pretrained(path / "scheduler")
    return path


def meta_components(model_dir: str | Path) -> dict[str, torch.nn.Module]:
    """The UNet, VAE and text encoders of any diffusers pipeline folder, from its configs alone."""
    model_dir = Path(model_dir)
    with torch.device("meta"):
        parts = {
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(model_dir / "unet")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(model_dir / "vae")),
        }
        for name in ("text_encoder", "text_encoder_2"):
            if (model_dir / name).exists():
                config = transformers.AutoConfig.from_pretrained(model_dir / name)
                parts[name] = getattr(transformers, (config.architectures or ["CLIPTextModel"])[0])(config)
    return parts


def _count_flops(function) -> float:
    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


def _text_encoders(parts: dict[str, torch.nn.Module]) -> list[torch.nn.Module]:
    return [parts[name] for name in ("text_encoder", "text_encoder_2") if name in parts]


def meta_training_step(
    parts: dict[str, torch.nn.Module], resolution: int, batch: int = 1
) -> tuple[ControlNetModel, Callable[[], None]]:
    """The ControlNet made from ``parts``' UNet and a cached training step of it, on meta tensors.

    Returns ``(controlnet, step)``: calling ``step()`` runs the ControlNet forward, the frozen
    UNet forward and the backward of the loss, as the trainer's cached step does, at ``batch``
    samples of ``resolution`` px. ``parts`` are meta modules (``components`` under
    ``torch.device("meta")``, or ``meta_components``); their frozen modules stop requiring grad.
    """
    unet, text = parts["unet"], _text_encoders(parts)
    with torch.device("meta"):
        controlnet = ControlNetModel.from_unet(unet)
    for module in (unet, parts["vae"], *text):
        module.requires_grad_(False)
    meta = {"device": "meta"}
    latents = torch.empty(batch, unet.config.in_channels, resolution // 8, resolution // 8, **meta)
    added = None
    if unet.config.addition_embed_type == "text_time":
        pooled = text[-1].config.projection_dim
        added = {"text_embeds": torch.empty(batch, pooled, **meta), "time_ids": torch.empty(batch, 6, **meta)}
    width = sum(encoder.config.hidden_size for encoder in text)

    def step():
        models = Models((), text, parts["vae"], unet, controlnet, DDPMScheduler(**SCHEDULER))
        sd.FAMILY.loss(
            models,
            controlnet,
            latents=latents,
            noise=torch.empty_like(latents),
            timesteps=torch.zeros(batch, dtype=torch.long, **meta),
            text=TextConditioning(torch.empty(batch, fixtures.MODEL_MAX_LENGTH, width, **meta)),
            controlnet_image=torch.empty(batch, 3, resolution, resolution, **meta),
            added_cond_kwargs=added,
        ).backward()

    return controlnet, step


def step_flops(parts: dict[str, torch.nn.Module], resolution: int) -> dict[str, float]:
    """Model FLOPs of one sample's training step, counted on meta tensors (no memory, no arithmetic).

    "cached": the ControlNet forward and backward plus the frozen UNet's forward and its backward
    into the residuals (``meta_training_step``); "uncached" adds the VAE encoder and the text
    encoders.
    """
    _, step = meta_training_step(parts, resolution)
    vae, text = parts["vae"], _text_encoders(parts)
    pixels = torch.empty(1, 3, resolution, resolution, device="meta")
    token_ids = torch.zeros(1, fixtures.MODEL_MAX_LENGTH, dtype=torch.long, device="meta")
    frozen = _count_flops(lambda: vae.encode(pixels).latent_dist.sample()) + sum(
        _count_flops(lambda e=encoder: e(token_ids, output_hidden_states=True)) for encoder in text
    )
    trained = _count_flops(step)
    return {"cached": trained, "uncached": trained + frozen}


# FLUX.1-dev ---------------------------------------------------------------------------------
# The configs of black-forest-labs/FLUX.1-dev (transformer, VAE, CLIP-L, T5-XXL encoder), for
# counting parameters and memory on the meta device; nothing here builds a training step.

FLUX_DEV_TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}
FLUX_VAE = {
    **VAE,
    "latent_channels": 16,
    "sample_size": 1024,
    "shift_factor": 0.1159,
    "scaling_factor": 0.3611,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "force_upcast": True,
}
# openai/clip-vit-large-patch14's text model (FLUX.1's text_encoder) and google/t5-v1_1-xxl's
# encoder (its text_encoder_2).
FLUX_CLIP_L = {
    **CLIP_VIT_L,
    "vocab_size": 49408,
    "max_position_embeddings": 77,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
}
T5_XXL = {
    "d_model": 4096,
    "d_ff": 10240,
    "d_kv": 64,
    "num_heads": 64,
    "num_layers": 24,
    "vocab_size": 32128,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "tie_word_embeddings": False,
}
# (double, single) transformer blocks of a ControlNet made with FluxControlNetModel.from_transformer:
# its own default (4, 10), diffusers' train_controlnet_flux.py default (4, 4), and smaller ones.
FLUX_CONTROLNET_SIZES = ((4, 10), (4, 4), (4, 0), (2, 0))


def flux_components(device: str | torch.device = "meta") -> dict[str, torch.nn.Module]:
    """FLUX.1-dev's transformer, VAE and text encoders with random weights (meta: no memory)."""
    with torch.device(device):
        return {
            "transformer": FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER),
            "vae": AutoencoderKL(**FLUX_VAE),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**FLUX_CLIP_L)),
            "text_encoder_2": T5EncoderModel(T5Config(**T5_XXL)),
        }


def flux_controlnet(transformer: FluxTransformer2DModel, double: int, single: int) -> FluxControlNetModel:
    """``FluxControlNetModel.from_transformer`` with ``double`` + ``single`` blocks, on ``transformer``'s device.

    On the meta device there are no weights to copy, so the copy is left out.
    """
    meta = transformer.device.type == "meta"
    with torch.device(transformer.device):
        return FluxControlNetModel.from_transformer(
            transformer,
            num_layers=double,
            num_single_layers=single,
            attention_head_dim=transformer.config.attention_head_dim,
            num_attention_heads=transformer.config.num_attention_heads,
            load_weights_from_transformer=not meta,
        )


def flux_parameter_counts(sizes: Sequence[tuple[int, int]] = FLUX_CONTROLNET_SIZES) -> dict[str, int]:
    """Parameters of FLUX.1-dev's parts and of a ControlNet per (double, single) size, on meta tensors.

    Keys: the component names of ``flux_components``, then ``controlnet_<double>_<single>``.
    """
    parts = flux_components("meta")
    counts = {name: parameter_count(module) for name, module in parts.items()}
    for double, single in sizes:
        counts[f"controlnet_{double}_{single}"] = parameter_count(flux_controlnet(parts["transformer"], double, single))
    return counts


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("family", choices=FAMILIES)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--width_divisor", type=int, default=1, help="sd15 only: every width divided by this")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    path = build_reference(args.family, args.output_dir, device=args.device, width_divisor=args.width_divisor)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
