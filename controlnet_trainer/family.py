"""Everything that differs between SD 1.x/2.x and SDXL, in one place.

A family is a small record of plain functions and names, composed into the shared trainer:
which tokenizers and text encoders exist, how prompts become conditioning, what extra
conditioning the UNet takes (SDXL's pooled text embeds and time ids) and which pipeline runs
validation. There is no base class with hooks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch


@dataclasses.dataclass(frozen=True)
class TextConditioning:
    """Prompt embeddings: the cross-attention states and, for SDXL, the pooled embedding."""

    encoder_hidden_states: torch.Tensor
    pooled: torch.Tensor | None = None

    def select(self, keep: torch.Tensor) -> TextConditioning:
        """Rows of this conditioning where ``keep`` is true (a bool mask over the batch)."""
        return TextConditioning(self.encoder_hidden_states[keep], None if self.pooled is None else self.pooled[keep])


Encoder = Callable[[Sequence, Sequence, list[str]], TextConditioning]


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    name: str
    # (tokenizer subfolder, text encoder subfolder) pairs, in the order the UNet expects them.
    text_components: tuple[tuple[str, str], ...]
    encode: Encoder
    uses_time_ids: bool
    # A diffusers class name, resolved when validation needs it: importing the pipelines costs
    # seconds that a run without validation (or a bad-argument error) should not pay.
    pipeline_class: str
    pipeline_extras: dict
    # SDXL's VAE overflows in fp16, so it stays fp32 unless the user supplies a safe one.
    vae_fp32_by_default: bool


def _token_ids(tokenizer, prompts: list[str], device: torch.device) -> torch.Tensor:
    return tokenizer(
        prompts,
        max_length=tokenizer.model_max_length,
        padding="max_length",
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device, non_blocking=True)  # a fresh host tensor: no need to wait for the GPU


def encode_sd(tokenizers: Sequence, text_encoders: Sequence, prompts: list[str]) -> TextConditioning:
    """SD 1.x/2.x: the last hidden state of the single CLIP text encoder."""
    (tokenizer,), (encoder,) = tokenizers, text_encoders
    ids = _token_ids(tokenizer, prompts, encoder.device)
    return TextConditioning(encoder(ids, return_dict=False)[0])


def encode_sdxl(tokenizers: Sequence, text_encoders: Sequence, prompts: list[str]) -> TextConditioning:
    """SDXL: both encoders' penultimate hidden states side by side, pooled from the second."""
    hidden, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders, strict=True):
        output = encoder(_token_ids(tokenizer, prompts, encoder.device), output_hidden_states=True)
        pooled = output[0]  # text_embeds of CLIPTextModelWithProjection, used from the last one
        hidden.append(output.hidden_states[-2])
    return TextConditioning(torch.cat(hidden, dim=-1), pooled)


def sdxl_time_ids(
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


def unet_added_conditioning(
    family: ModelFamily,
    text: TextConditioning,
    batch: dict,
    *,
    resolution: int,
    crop_override: tuple[int, int] | None,
) -> dict | None:
    """``added_cond_kwargs`` for ControlNet and UNet; None for SD 1.x/2.x."""
    if not family.uses_time_ids:
        return None
    target = batch.get("target_size", resolution)  # a batch made without it is square
    time_ids = sdxl_time_ids(batch["original_size"], batch["crop_top_left"], target, crop_override)
    return {
        "text_embeds": text.pooled,
        "time_ids": time_ids.to(text.pooled.device, text.pooled.dtype),
    }


def crop_override_from_args(args) -> tuple[int, int] | None:
    """The explicit crop of --crops_coords_top_left_h/w, or None to use the crop made."""
    top = getattr(args, "crops_coords_top_left_h", None)
    left = getattr(args, "crops_coords_top_left_w", None)
    if top is None and left is None:
        return None
    return (top or 0, left or 0)


SD = ModelFamily(
    name="sd",
    text_components=(("tokenizer", "text_encoder"),),
    encode=encode_sd,
    uses_time_ids=False,
    pipeline_class="StableDiffusionControlNetPipeline",
    pipeline_extras={"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False},
    vae_fp32_by_default=False,
)

SDXL = ModelFamily(
    name="sdxl",
    text_components=(("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")),
    encode=encode_sdxl,
    uses_time_ids=True,
    pipeline_class="StableDiffusionXLControlNetPipeline",
    pipeline_extras={"add_watermarker": False},
    vae_fp32_by_default=True,
)
