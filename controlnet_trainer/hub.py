"""The finished model: weights at the output root, a model card, and the optional upload."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from .plan import TrainPlan

logger = logging.getLogger(__name__)

SINGLE_FILE = "controlnet.safetensors"  # --save_single_file: the original ControlNet layout
CURVES_FILE = "training_curves.png"
# Resumable state is large and only useful to this run; the upload carries the model alone.
UPLOAD_IGNORE = ["checkpoint-*", ".checkpoint-*", "checkpoint-*/**", ".checkpoint-*/**"]


def save_final_model(controlnet, output_dir: Path) -> None:
    """``config.json`` + ``diffusion_pytorch_model.safetensors`` at the output root."""
    controlnet.save_pretrained(output_dir, safe_serialization=True)


def model_description(args: argparse.Namespace, plan: TrainPlan, family: str, images: list[str]) -> str:
    dataset = args.dataset_name or args.train_data_dir
    pipeline = "StableDiffusionXLControlNetPipeline" if family == "sdxl" else "StableDiffusionControlNetPipeline"
    lines = [
        f"# ControlNet for {args.pretrained_model_name_or_path}",
        "",
        f"ControlNet weights trained on `{dataset}` with `{plan.max_train_steps}` optimizer steps "
        f"(batch {plan.total_batch_size}, learning rate {plan.learning_rate:g}, resolution "
        f"{args.resolution}, mixed precision {plan.mixed_precision}"
        + (f", Min-SNR gamma {args.snr_gamma:g}" if args.snr_gamma else "")
        + ").",
        "",
        "```python",
        f"from diffusers import ControlNetModel, {pipeline}",
        'controlnet = ControlNetModel.from_pretrained("<this repo or folder>")',
        f'pipe = {pipeline}.from_pretrained("{args.pretrained_model_name_or_path}", controlnet=controlnet)',
        "```",
    ]
    lines += ["", "## Training curves", "", f"![training curves]({CURVES_FILE})"]
    if args.validation_prompt:
        lines += ["", "## Validation", "", "Prompts: " + "; ".join(args.validation_prompt)]
        lines += [f"![validation]({image})" for image in images]
    return "\n".join(lines) + "\n"


def write_model_card(output_dir: Path, args: argparse.Namespace, plan: TrainPlan, family: str) -> Path:
    """README.md with hub metadata; built locally, since the hub may be out of reach."""
    images = sorted(p.relative_to(output_dir).as_posix() for p in (output_dir / "validation").glob("*.png"))
    tags = ["controlnet", "diffusers", "diffusers-training"]
    tags += ["stable-diffusion-xl", "stable-diffusion-xl-diffusers"] if family == "sdxl" else ["stable-diffusion"]
    metadata = ModelCardData(
        license="openrail++" if family == "sdxl" else "creativeml-openrail-m",
        base_model=args.pretrained_model_name_or_path,
        library_name="diffusers",
        tags=tags,
        inference=True,
    )
    card = ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n" + model_description(args, plan, family, images[-1:]))
    path = output_dir / "README.md"
    card.save(path)
    return path


def push_to_hub(output_dir: Path, args: argparse.Namespace) -> str:
    """Create the repo if needed and upload everything but resumable checkpoints."""
    from huggingface_hub import create_repo, upload_folder

    repo_id = create_repo(repo_id=args.hub_model_id or output_dir.name, exist_ok=True, token=args.hub_token).repo_id
    upload_folder(
        repo_id=repo_id,
        folder_path=output_dir,
        commit_message="End of training",
        ignore_patterns=UPLOAD_IGNORE,
        token=args.hub_token,
    )
    return repo_id
