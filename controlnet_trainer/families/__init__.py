"""Model families: everything that differs between SD 1.x/2.x, SDXL and the families to come.

A family is a record of plain values and functions (``ModelFamily``), one module each
(``sd``, ``sdxl``), composed from shared parts (``unet`` for the UNet models, ``ddpm`` for the
DDPM objective). The trainer, the cache, validation and the fidelity measure call the record
and never ask which family they run. Adding a family means a module here, its name in
``_MODULES`` and a thin entry script.

Importing this package and a family module is cheap: the heavy libraries (diffusers' models)
load inside the functions, so ``--help`` and bad flags answer quickly.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..settings import ModelSettings, ObjectiveSettings

# Family name -> module under families/ that defines FAMILY.
_MODULES = {"sd": "sd", "sdxl": "sdxl"}


@dataclasses.dataclass(frozen=True)
class TextConditioning:
    """Prompt embeddings: the cross-attention states and, for SDXL, the pooled embedding."""

    encoder_hidden_states: torch.Tensor
    pooled: torch.Tensor | None = None

    def select(self, keep: torch.Tensor) -> TextConditioning:
        """Rows of this conditioning where ``keep`` is true (a bool mask over the batch)."""
        return TextConditioning(self.encoder_hidden_states[keep], None if self.pooled is None else self.pooled[keep])


@dataclasses.dataclass
class Models:
    """The frozen parts of a base model and the ControlNet to train."""

    tokenizers: tuple
    text_encoders: tuple
    vae: torch.nn.Module
    denoiser: torch.nn.Module  # the UNet of SD and SDXL
    controlnet: torch.nn.Module
    noise_scheduler: Any

    def frozen(self) -> tuple[torch.nn.Module, ...]:
        return (*self.text_encoders, self.vae, self.denoiser)


@dataclasses.dataclass(frozen=True)
class Defaults:
    """Flag defaults that differ by family, as diffusers' scripts set them."""

    resolution: int
    image_interpolation_mode: str
    tracker_project_name: str


@dataclasses.dataclass(frozen=True)
class ModelCard:
    """The model card's metadata for the family."""

    tags: tuple[str, ...]
    license: str


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    name: str  # recorded in training_options.json and the embeddings cache key
    title: str  # in messages: "SDXL"
    script: str  # the entry script that trains it
    description: str  # the first line of --help
    defaults: Defaults
    card: ModelCard
    # The family's own flag group (e.g. SDXL's), added to the shared parser; None if it has none.
    add_flags: Callable[[argparse.ArgumentParser], None] | None
    # The base pipeline's denoiser subfolder and whether its config is this family's.
    denoiser_subfolder: str
    is_own_denoiser: Callable[[dict], bool]
    # (tokenizer subfolder, text encoder subfolder) pairs, in the order the denoiser expects them.
    text_components: tuple[tuple[str, str], ...]
    load_models: Callable[[ModelSettings], Models]
    # Freeze the base model and move it to (device, dtype); the ControlNet stays fp32.
    place_models: Callable[..., None]
    # Gradient checkpointing, attention back-ends and compilation on the trained modules.
    enable_memory_options: Callable[..., None]
    encode_prompts: Callable[[Models, list[str]], TextConditioning]
    # Extra conditioning the denoiser takes beside the prompt (SDXL's pooled text and time ids).
    added_conditioning: Callable[..., dict | None]
    # The objective: noise and timesteps for one sample, and the loss of a batch.
    sample_noise: Callable[[Models, torch.Tensor, torch.Generator, ObjectiveSettings], tuple]
    loss: Callable[..., torch.Tensor]
    # The diffusers pipeline class (resolved when validation needs it) and its components.
    pipeline_class: str
    pipeline_components: Callable[[Models, torch.nn.Module], dict]
    # The ControlNet as one file in the original layout other tools load, and back.
    save_single_file: Callable[..., None]


def by_name(name: str) -> ModelFamily:
    """The family registered as ``name`` ("sd", "sdxl")."""
    return importlib.import_module(f".{_MODULES[name]}", __name__).FAMILY


def names() -> tuple[str, ...]:
    return tuple(_MODULES)


def token_ids(tokenizer, prompts: Sequence[str], device: torch.device) -> torch.Tensor:
    """Token ids padded to the tokenizer's length, on ``device``."""
    return tokenizer(
        list(prompts),
        max_length=tokenizer.model_max_length,
        padding="max_length",
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device, non_blocking=True)  # a fresh host tensor: no need to wait for the GPU
