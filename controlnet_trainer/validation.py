"""Validation images: the ControlNet pipeline with the current weights, on any device."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import diffusers
import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image

from .data import to_rgb
from .errors import InputError
from .families import ModelFamily, Models, TextConditioning
from .models import mixed_precision_autocast
from .settings import EvaluationSettings

logger = logging.getLogger(__name__)

VALIDATION_DIR = "validation"


def validation_pairs(prompts: Sequence[str], images: Sequence[str]) -> list[tuple[str, str]]:
    """Pair prompts with images; a single one of either pairs with all of the other."""
    if len(prompts) == len(images):
        return list(zip(prompts, images))
    if len(images) == 1:
        return [(prompt, images[0]) for prompt in prompts]
    return [(prompts[0], image) for image in images]


def check_validation_images(paths: Sequence[str] | None) -> None:
    """Missing or unreadable validation images fail before training, not at the first round."""
    for path in paths or ():
        try:
            with Image.open(path) as image:
                image.verify()
        except (OSError, SyntaxError) as error:
            raise InputError(
                f"--validation_image {path!r} cannot be read as an image ({error}). Fix the path "
                "or leave the image out."
            ) from error


def build_pipeline(
    family: ModelFamily, models: Models, controlnet, device: torch.device, *, text_encoders: bool = True
):
    """The family's ControlNet pipeline around the models already in memory (no reload); without
    ``text_encoders`` it has none, for prompts given as embeddings."""
    pipeline_class = getattr(diffusers, family.pipeline_class)
    components = family.pipeline_components(models, controlnet)
    if not text_encoders:
        components = {
            name: None if any(part is encoder for encoder in models.text_encoders) else part
            for name, part in components.items()
        }
    pipeline = pipeline_class(**components)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


@contextlib.contextmanager
def residuals_in(controlnet: torch.nn.Module, dtype: torch.dtype):
    """Hand the pipeline the ControlNet's residuals in ``dtype``, the frozen UNet's.

    Under mixed precision accelerate wraps the prepared ControlNet's forward to return fp32, and
    the bare module keeps that wrapper. The pipeline adds those residuals to the UNet's
    half-precision activations, which turns them fp32; CUDA's autocast then runs GroupNorm in
    fp32, but CPU's refuses fp32 input with bf16 weights. (Training casts them itself.)
    """
    if dtype == torch.float32:
        yield
        return

    def cast(module, args, output):
        # The pipelines call it with return_dict=False: UNet ControlNets return (down residuals,
        # mid residual), SD3's a 1-tuple of block residuals.
        return _to_dtype(output, dtype)

    handle = controlnet.register_forward_hook(cast)
    try:
        yield
    finally:
        handle.remove()


def _to_dtype(value, dtype: torch.dtype):
    """Tensors in nested tuples and lists cast to ``dtype``, the structure kept."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype)
    return type(value)(_to_dtype(item, dtype) for item in value)


def generate(
    pipeline,
    pairs: Sequence[tuple[str, str]],
    *,
    inputs: Callable[[Image.Image], dict],
    num_images: int,
    resolution: int,
    seed: int,
    weight_dtype: torch.dtype,
    num_inference_steps: int = 20,
    prompt_inputs: Callable[[str, int], dict] | None = None,
) -> list[dict]:
    """For each (prompt, image path): the conditioning image and ``num_images`` generations;
    ``inputs`` gives the family's pipeline arguments for a conditioning image, ``prompt_inputs``
    those for a prompt and a count (the prompt's text repeated by default)."""
    device = pipeline.device
    generator = torch.Generator(device=device).manual_seed(seed)
    autocast = mixed_precision_autocast(device, weight_dtype)
    results = []
    for prompt, image_path in pairs:
        conditioning = to_rgb(Image.open(image_path), (0, 0, 0)).resize((resolution, resolution))
        with autocast, residuals_in(pipeline.controlnet, weight_dtype), torch.no_grad():
            images = pipeline(
                **(prompt_inputs or text_prompts)(prompt, num_images),
                **inputs(conditioning),
                num_inference_steps=num_inference_steps,
                generator=generator,
                height=resolution,
                width=resolution,
            ).images
        results.append({"prompt": prompt, "conditioning": conditioning, "images": images})
    return results


def text_prompts(prompt: str, count: int) -> dict:
    return {"prompt": [prompt] * count}


def embedded_prompts(
    family: ModelFamily, embeddings: dict[str, TextConditioning], device: torch.device, prompt: str, count: int
) -> dict:
    """The pipeline's arguments for ``count`` images of ``prompt`` from its embeddings."""
    repeated = embeddings[prompt].apply(lambda t: t.to(device).repeat(count, *[1] * (t.dim() - 1)))
    return family.prompt_embedding_inputs(repeated)


def save_grid(results: Sequence[dict], path: Path) -> Path:
    """One row per pair: the conditioning image, then the generated images."""
    rows = [[r["conditioning"], *r["images"]] for r in results]
    width, height = rows[0][0].size
    grid = Image.new("RGB", (width * max(len(r) for r in rows), height * len(rows)))
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            grid.paste(image.resize((width, height)), (x * width, y * height))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def log_to_trackers(accelerator: Accelerator, results: Sequence[dict], step: int) -> None:
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            for index, result in enumerate(results):
                stack = np.stack([np.asarray(im) for im in [result["conditioning"], *result["images"]]])
                tracker.writer.add_images(f"validation/{index}: {result['prompt']}", stack, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            images = []
            for result in results:
                images.append(wandb.Image(result["conditioning"], caption="Controlnet conditioning"))
                images.extend(wandb.Image(im, caption=result["prompt"]) for im in result["images"])
            tracker.log({"validation": images}, step=step)


def encode_validation_prompts(
    family: ModelFamily, models: Models, prompts: Sequence[str]
) -> dict[str, TextConditioning]:
    """Each prompt's embeddings, kept in CPU memory, for validation without the text encoders."""
    with torch.no_grad():
        encoded = {prompt: family.encode_prompts(models, [prompt]) for prompt in dict.fromkeys(prompts)}
    return {prompt: text.apply(torch.Tensor.cpu) for prompt, text in encoded.items()}


def run_validation(
    *,
    accelerator: Accelerator,
    family: ModelFamily,
    models: Models,
    controlnet: torch.nn.Module,
    evaluation: EvaluationSettings,
    resolution: int,
    output_dir: Path,
    weight_dtype: torch.dtype,
    step: int,
    seed: int,
    prompt_embeddings: dict[str, TextConditioning] | None = None,
) -> Path:
    """Generate, write ``validation/step-<step>.png`` and log (the caller runs it on the main
    process, when validation prompts are given, with the bare ControlNet and all its weights).
    Given ``prompt_embeddings`` (every validation prompt's), the pipeline has no text encoders."""
    logger.info("Running validation at step %d", step)
    was_training = controlnet.training
    controlnet.eval()
    embedded = prompt_embeddings is not None
    pipeline = build_pipeline(family, models, controlnet, accelerator.device, text_encoders=not embedded)
    prompts = functools.partial(embedded_prompts, family, prompt_embeddings, pipeline.device) if embedded else None
    results = generate(
        pipeline,
        validation_pairs(evaluation.validation_prompt, evaluation.validation_image),
        inputs=functools.partial(family.pipeline_inputs, models),
        prompt_inputs=prompts,
        num_images=evaluation.num_validation_images,
        resolution=resolution,
        seed=seed,
        weight_dtype=weight_dtype,
    )
    controlnet.train(was_training)
    path = save_grid(results, output_dir / VALIDATION_DIR / f"step-{step:06d}.png")
    log_to_trackers(accelerator, results, step)
    return path
