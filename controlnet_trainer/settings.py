"""The parsed flags as frozen, typed records, one per concern.

The command-line layer (``arguments``, ``cli``) is the only code that sees the argparse
``Namespace``: ``Settings.from_namespace`` resolves it once, and every other module takes the
record it needs. Field names are the flags' names, so ``--snr_gamma`` is ``objective.snr_gamma``.
A flag that only some scripts have (the SDXL group) takes its family's default elsewhere.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

_SECRET_FLAGS = ("hub_token",)


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """Where the frozen base model and the ControlNet to train come from."""

    pretrained_model_name_or_path: str
    controlnet_model_name_or_path: str | None = None
    revision: str | None = None
    variant: str | None = None
    tokenizer_name: str | None = None
    cache_dir: str | None = None
    pretrained_vae_model_name_or_path: str | None = None
    rescale_betas_zero_snr: bool = False
    # SD3: the ControlNet's extra input channels, the T5 prompt length, T5 left out, an fp32 VAE.
    num_extra_conditioning_channels: int = 0
    max_sequence_length: int = 77
    drop_t5: bool = False
    upcast_vae: bool = False
    # Flux: the ControlNet's blocks, the guidance scale, the frozen transformer's quantization.
    num_double_layers: int = 4
    num_single_layers: int = 4
    guidance_scale: float = 3.5
    quantize_base: str | None = None
    # Flux's script: the text encoders wait in CPU memory and visit the accelerator to encode.
    enable_model_cpu_offload: bool = False

    def named_flags(self) -> list[str]:
        """The flags that chose the models, for messages about a failed load."""
        named = ("controlnet_model_name_or_path", "pretrained_vae_model_name_or_path", "revision", "variant")
        return ["--pretrained_model_name_or_path"] + [
            f"--{name}" for name in (*named, "tokenizer_name") if getattr(self, name)
        ]


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """Which rows to train on and how they become batches."""

    dataset_name: str | None = None
    dataset_config_name: str | None = None
    train_data_dir: str | None = None
    image_column: str = "image"
    conditioning_image_column: str = "conditioning_image"
    caption_column: str = "text"
    cache_dir: str | None = None
    max_train_samples: int | None = None
    streaming: bool = False
    shuffle_buffer_size: int = 1000
    aspect_ratio_buckets: bool = False
    skip_bad_images: bool = False
    # Flux's script: a JSON-lines file of rows, image paths relative to the working directory.
    jsonl_for_train: str | None = None
    proportion_empty_prompts: float = 0.0
    resolution: int = 512
    image_interpolation_mode: str = "bilinear"
    # SDXL's time ids: the crop coordinates to report instead of the crop made (None: the crop made).
    crops_coords_top_left_h: int | None = None
    crops_coords_top_left_w: int | None = None
    train_batch_size: int = 4
    dataloader_num_workers: int = 0

    @property
    def crop_override(self) -> tuple[int, int] | None:
        """The explicit crop of --crops_coords_top_left_h/w, or None to use the crop made."""
        if self.crops_coords_top_left_h is None and self.crops_coords_top_left_w is None:
            return None
        return (self.crops_coords_top_left_h or 0, self.crops_coords_top_left_w or 0)


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """The schedule, the optimizer and the weight average (the batch size is ``DataSettings``')."""

    num_train_epochs: int = 1
    max_train_steps: int | None = None
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-6
    scale_lr: bool = False
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 500
    lr_num_cycles: int = 1
    lr_power: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-08
    max_grad_norm: float = 1.0
    use_8bit_adam: bool = False
    use_adafactor: bool = False  # Flux's script: transformers' Adafactor instead of AdamW
    fused_backward_pass: bool = False  # each parameter's optimizer step as its gradient is ready
    set_grads_to_none: bool = False
    use_ema: bool = False
    ema_decay: float = 0.9999


@dataclasses.dataclass(frozen=True)
class ObjectiveSettings:
    """How the training loss is drawn and weighted."""

    # DDPM (SD, SDXL)
    noise_offset: float = 0.0
    snr_gamma: float | None = None
    # Flow matching (SD3): the timestep density, the loss weighting and the preconditioning.
    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    # SD3's flag defaults to 1; Flux's script has no such flag and compares raw velocities.
    precondition_outputs: int = 0


@dataclasses.dataclass(frozen=True)
class MemorySettings:
    """Precision, attention back-ends, compilation and what is computed once and cached."""

    mixed_precision: str | None = None
    gradient_checkpointing: bool = False
    allow_tf32: bool = False
    enable_xformers_memory_efficient_attention: bool = False
    enable_npu_flash_attention: bool = False
    torch_compile: str | None = None
    cache_latents: bool = False
    cache_text_embeddings: bool = False
    embeddings_cache_dir: str | None = None


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """When the loop logs, checkpoints and stops, and where it resumes from."""

    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    stop_at_step: int | None = None
    logging_steps: int = 1
    ddp_timeout: int = 1800


@dataclasses.dataclass(frozen=True)
class EvaluationSettings:
    """Validation images and the control-gap measure on held-out rows."""

    validation_prompt: tuple[str, ...] | None = None
    validation_image: tuple[str, ...] | None = None
    num_validation_images: int = 4
    validation_steps: int = 100
    fidelity_samples: int = 0
    fidelity_dataset: str | None = None
    fidelity_steps: int | None = None
    fidelity_timesteps: int = 4

    @property
    def fidelity_every(self) -> int:
        return self.fidelity_steps or self.validation_steps


@dataclasses.dataclass(frozen=True)
class OutputSettings:
    """Where the run writes, what it reports to, and the upload."""

    output_dir: Path = Path("controlnet-model")
    logging_dir: str = "logs"
    report_to: str = "tensorboard"
    tracker_project_name: str = "train_controlnet"
    save_single_file: bool = False
    save_weight_dtype: str = "fp32"  # Flux's script: the final weights' dtype (and file variant)
    dry_run: bool = False
    push_to_hub: bool = False
    hub_token: str | None = None
    hub_model_id: str | None = None


_RECORDS = {
    "model": ModelSettings,
    "data": DataSettings,
    "optimizer": OptimizerSettings,
    "objective": ObjectiveSettings,
    "memory": MemorySettings,
    "loop": LoopSettings,
    "evaluation": EvaluationSettings,
    "output": OutputSettings,
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every flag of a run, by concern, plus the flags as given (for the run's own records)."""

    model: ModelSettings
    data: DataSettings
    optimizer: OptimizerSettings
    objective: ObjectiveSettings
    memory: MemorySettings
    loop: LoopSettings
    evaluation: EvaluationSettings
    output: OutputSettings
    seed: int | None = None
    # The flags as parsed, secrets masked: what training_options.json and the trackers record.
    arguments: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    @classmethod
    def from_namespace(cls, args: argparse.Namespace, defaults: dict[str, Any] | None = None) -> Settings:
        """Resolve parsed flags; ``defaults`` fills the flags this script does not have."""
        values = (defaults or {}) | vars(args)
        records = {name: _record(record, values) for name, record in _RECORDS.items()}
        return cls(**records, seed=values.get("seed"), arguments=public_arguments(vars(args)))


def _record(record: type, values: dict[str, Any]):
    fields = {}
    for field in dataclasses.fields(record):
        if field.name not in values:
            continue
        value = values[field.name]
        if isinstance(value, list):
            value = tuple(value)
        if field.name == "output_dir":
            value = Path(value)
        fields[field.name] = value
    return record(**fields)


def public_arguments(arguments: dict[str, Any]) -> dict[str, Any]:
    """The flags with secrets masked, safe to log, save and send to trackers."""
    values = dict(arguments)
    for name in _SECRET_FLAGS:
        if values.get(name) is not None:
            values[name] = "***"
    return values
