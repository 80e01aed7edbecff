"""The finished model: weights at the output root, a model card, and the optional upload."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from huggingface_hub import ModelCard, ModelCardData

from .errors import InputError
from .families import ModelFamily
from .plan import TrainPlan
from .settings import OutputSettings, Settings

logger = logging.getLogger(__name__)

SINGLE_FILE = "controlnet.safetensors"  # --save_single_file: the original ControlNet layout
CURVES_FILE = "training_curves.png"
# Resumable state is large and only useful to this run; the upload carries the model alone.
UPLOAD_IGNORE = ["checkpoint-*", ".checkpoint-*", "checkpoint-*/**", ".checkpoint-*/**"]


# --save_weight_dtype (Flux's script): the final weights' dtype; other than fp32 it is also the
# file's variant, as diffusers saves it.
SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def save_final_model(controlnet, output_dir: Path, weight_dtype: str = "fp32") -> None:
    """``config.json`` + ``diffusion_pytorch_model.safetensors`` (``.bf16.safetensors`` and so on
    for --save_weight_dtype) at the output root; the run's last use of ``controlnet``."""
    variant = None
    if weight_dtype != "fp32":
        controlnet, variant = controlnet.to(SAVE_DTYPES[weight_dtype]), weight_dtype
    controlnet.save_pretrained(output_dir, safe_serialization=True, variant=variant)


def model_description(
    settings: Settings, plan: TrainPlan, family: ModelFamily, images: list[str], *, curves: bool = True
) -> str:
    dataset = settings.data.dataset_name or settings.data.train_data_dir or settings.data.jsonl_for_train
    pipeline = family.pipeline_class
    saved = settings.output.save_weight_dtype
    variant = "" if saved == "fp32" else f', variant="{saved}"'
    base = settings.model.pretrained_model_name_or_path
    lines = [
        f"# ControlNet for {base}",
        "",
        f"ControlNet weights trained on `{dataset}` with `{plan.max_train_steps}` optimizer steps "
        f"(batch {plan.total_batch_size}, learning rate {plan.learning_rate:g}, resolution "
        f"{settings.data.resolution}, mixed precision {plan.mixed_precision}"
        + (f", Min-SNR gamma {settings.objective.snr_gamma:g}" if settings.objective.snr_gamma else "")
        + ").",
        "",
        "```python",
        f"from diffusers import {family.card.controlnet_class}, {pipeline}",
        f'controlnet = {family.card.controlnet_class}.from_pretrained("<this repo or folder>"{variant})',
        f'pipe = {pipeline}.from_pretrained("{base}", controlnet=controlnet)',
        "```",
    ]
    if curves:
        lines += ["", "## Training curves", "", f"![training curves]({CURVES_FILE})"]
    if settings.evaluation.validation_prompt:
        lines += ["", "## Validation", "", "Prompts: " + "; ".join(settings.evaluation.validation_prompt)]
        lines += [f"![validation]({image})" for image in images]
    return "\n".join(lines) + "\n"


def write_model_card(output_dir: Path, settings: Settings, plan: TrainPlan, family: ModelFamily) -> Path:
    """README.md with hub metadata; built locally, since the hub may be out of reach."""
    images = sorted(p.relative_to(output_dir).as_posix() for p in (output_dir / "validation").glob("*.png"))
    tags = ["controlnet", "diffusers", "diffusers-training", *family.card.tags]
    metadata = ModelCardData(
        license=family.card.license,
        base_model=settings.model.pretrained_model_name_or_path,
        library_name="diffusers",
        tags=tags,
        inference=True,
    )
    card = ModelCard(
        f"---\n{metadata.to_yaml()}\n---\n\n"
        + model_description(settings, plan, family, images[-1:], curves=(output_dir / CURVES_FILE).exists())
    )
    path = output_dir / "README.md"
    card.save(path)
    return path


class HubError(InputError):
    """The Hub could not be reached or refused the upload; the message says what was kept."""


def create_hub_repo(output: OutputSettings) -> str:
    """Create (or find) the upload's repo; called before training, as diffusers does, so that a
    missing login or network fails before the run rather than after it."""
    from huggingface_hub import create_repo

    output_dir = output.output_dir
    name = output.hub_model_id or output_dir.name
    try:
        return create_repo(repo_id=name, exist_ok=True, token=output.hub_token).repo_id
    # Offline mode, the network, a login or a name the Hub refuses: all end the same way.
    except Exception as error:
        raise HubError(
            f"--push_to_hub could not create or reach the Hub repo {name!r} ({type(error).__name__}: "
            f"{error}). Log in with `hf auth login` (or pass --hub_token), check the network and that "
            "HF_HUB_OFFLINE is unset, or drop --push_to_hub and upload --output_dir after training "
            f"with `hf upload {name} {output_dir}`. Nothing was trained."
        ) from error


def push_to_hub(output_dir: Path, repo_id: str, output: OutputSettings) -> None:
    """Upload everything but resumable checkpoints, which are already saved locally."""
    from huggingface_hub import upload_folder

    try:
        upload_folder(
            repo_id=repo_id,
            folder_path=output_dir,
            commit_message="End of training",
            ignore_patterns=UPLOAD_IGNORE,
            token=output.hub_token,
        )
    except Exception as error:
        raise HubError(
            f"Training finished and the ControlNet is saved in {output_dir}, but the upload to "
            f"{repo_id!r} failed ({type(error).__name__}: {error}). Upload it when the Hub is "
            f"reachable with `hf upload {repo_id} {output_dir} --exclude 'checkpoint-*'`."
        ) from error
