"""Model families: everything that differs between SD 1.x/2.x, SDXL and the families to come.

A family is a record of plain values and functions (``ModelFamily``), one module each
(``sd``, ``sdxl``, ``sd3``, ``flux``), composed from shared parts (``components`` for loading and memory
options, ``unet`` for the UNet models, ``ddpm`` for the DDPM objective, ``flow`` for flow matching). The trainer, the cache, validation and the fidelity measure call the record
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
_MODULES = {"sd": "sd", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux"}


@dataclasses.dataclass(frozen=True)
class TextConditioning:
    """Prompt embeddings: the cross-attention states and, for SDXL and SD3, the pooled embedding."""

    encoder_hidden_states: torch.Tensor
    pooled: torch.Tensor | None = None

    def apply(self, function: Callable[[torch.Tensor], torch.Tensor]) -> TextConditioning:
        """This conditioning with ``function`` applied to each of its tensors."""
        return TextConditioning(
            function(self.encoder_hidden_states), None if self.pooled is None else function(self.pooled)
        )

    def select(self, keep: torch.Tensor) -> TextConditioning:
        """Rows of this conditioning where ``keep`` is true (a bool mask over the batch)."""
        return self.apply(lambda tensor: tensor[keep])


@dataclasses.dataclass
class Models:
    """The frozen parts of a base model and the ControlNet to train."""

    tokenizers: tuple
    text_encoders: tuple
    vae: torch.nn.Module
    denoiser: torch.nn.Module  # the UNet of SD and SDXL, the transformer of SD3 and Flux
    controlnet: torch.nn.Module
    noise_scheduler: Any
    # How the family encodes prompts beyond the tokenizers' own lengths (SD3: the T5 length and
    # whether T5 is used); part of the embeddings cache key.
    text_options: dict = dataclasses.field(default_factory=dict)
    # Inputs of the forward call that come from flags (Flux: the guidance scale).
    forward_options: dict = dataclasses.field(default_factory=dict)

    def frozen(self) -> tuple[torch.nn.Module, ...]:
        return (*self.text_encoders, self.vae, self.denoiser)


@dataclasses.dataclass(frozen=True)
class Defaults:
    """Flag defaults that differ by family, as diffusers' scripts set them."""

    resolution: int
    image_interpolation_mode: str
    tracker_project_name: str
    num_validation_images: int = 4


@dataclasses.dataclass(frozen=True)
class ModelCard:
    """The model card's metadata for the family."""

    tags: tuple[str, ...]
    license: str
    controlnet_class: str = "ControlNetModel"  # the diffusers class that loads the saved weights


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
    # Called as place_models(models, device=, weight_dtype=, settings=ModelSettings).
    place_models: Callable[..., None]
    # Gradient checkpointing, attention back-ends and compilation on the trained modules.
    enable_memory_options: Callable[..., None]
    encode_prompts: Callable[[Models, list[str]], TextConditioning]
    # Extra conditioning the denoiser takes beside the prompt (SDXL's pooled text and time ids).
    added_conditioning: Callable[..., dict | None]
    # The conditioning image ([0, 1] pixels) as the ControlNet takes it: the pixels themselves
    # (SD, SDXL) or VAE latents (SD3), sampled with the per-sample generators or, given None,
    # the posterior mean. ``control_uses_vae`` says the VAE must stay on the device for it.
    encode_control: Callable[[Models, torch.Tensor, list | None], torch.Tensor]
    control_uses_vae: bool
    # The objective: noise and timesteps for one sample, and the loss of a batch. ``loss`` takes
    # ``objective=None`` for the plain, unweighted loss the fidelity measure compares.
    sample_noise: Callable[[Models, torch.Tensor, torch.Generator, ObjectiveSettings], tuple]
    loss: Callable[..., torch.Tensor]
    # The denoiser's timesteps at positions 0..N-1 of the training schedule (the fidelity probe's).
    schedule_timesteps: Callable[[Models, torch.Tensor], torch.Tensor]
    # The diffusers pipeline class (resolved when validation needs it), its components and the
    # call's inputs besides prompt, size and steps (the conditioning image's argument name).
    pipeline_class: str
    pipeline_components: Callable[[Models, torch.nn.Module], dict]
    pipeline_inputs: Callable[[Models, Any], dict]
    # The ControlNet as one file in the original layout other tools load; None where the family
    # has no such layout (then --save_single_file is not offered).
    save_single_file: Callable[..., None] | None
    # Checks of the family's own flags, before any model loads (None: nothing to check).
    check_flags: Callable[[argparse.Namespace], None] | None = None
    # The checkpoint's folder for the ControlNet, as the family's diffusers script names it.
    checkpoint_folder: str = "controlnet"
    # GiB the run keeps on the GPU before activations, by piece and in total, for --dry_run to print
    # (from the settings and the mixed-precision dtype); None where the family has no estimate.
    memory_estimate: Callable[..., dict[str, float]] | None = None
    # Whether some ControlNet parameters get no gradient in a step (the prompt branch of SD3's last
    # ControlNet block feeds nothing), so DDP must look for them.
    unused_parameters: bool = False
    # The pipeline's arguments that stand for a prompt, made from its embeddings; given where the
    # validation pipeline needs nothing else from the text encoders (no negative prompt), so that
    # cached text encoders stay in CPU memory through validation. None: validation passes text.
    prompt_embedding_inputs: Callable[[TextConditioning], dict] | None = None


def by_name(name: str) -> ModelFamily:
    """The family registered as ``name`` ("sd", "sdxl", "sd3", "flux")."""
    return importlib.import_module(f".{_MODULES[name]}", __name__).FAMILY


def names() -> tuple[str, ...]:
    return tuple(_MODULES)


def token_ids(tokenizer, prompts: Sequence[str], device: torch.device, max_length: int | None = None) -> torch.Tensor:
    """Token ids padded to ``max_length`` (the tokenizer's own length by default), on ``device``."""
    return tokenizer(
        list(prompts),
        max_length=max_length or tokenizer.model_max_length,
        padding="max_length",
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device, non_blocking=True)  # a fresh host tensor: no need to wait for the GPU


def to_latents(vae, sample: torch.Tensor) -> torch.Tensor:
    """A VAE sample in the denoiser's latent space: shifted (SD3's VAE has a shift) and scaled."""
    shift = vae.config.get("shift_factor") or 0.0
    if shift:
        sample = sample - shift
    return sample * vae.config.scaling_factor
