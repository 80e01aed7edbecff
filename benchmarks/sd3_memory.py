"""GPU memory an SD3 ControlNet training run holds in weights and optimizer state, per recipe.

    python benchmarks/sd3_memory.py [--json sd3_memory.json]

It builds the published SD3 Medium, SD3.5 Medium and SD3.5 Large parts on the meta device
(``reference_models.meta_sd3_training_parts``: no download, no memory) with the ControlNet
diffusers' ``train_controlnet_sd3.py`` makes, and adds up the bytes each recipe keeps on the GPU:
the frozen transformer, VAE and text encoders in bf16, and the trained ControlNet in fp32 with its
gradients and optimizer state. Activations are not counted: they depend on batch, resolution and
gradient checkpointing, and need a GPU measurement. Runs in seconds, offline.

The trainer places the frozen models on the GPU, builds the embeddings cache if asked, sends the
text encoders back to the CPU, and only then moves the ControlNet there (``accelerator.prepare``);
the optimizer state appears at the first step. A cached recipe's peak is therefore the larger of
two phases: building the cache (every frozen part) and training (transformer, VAE, ControlNet
weights, gradients and optimizer state). The VAE stays on the GPU in both: SD3 ControlNets take
the control image as VAE latents, encoded every step. diffusers' script builds the same cache
with ``datasets.map`` but keeps the text encoders referenced (its ``text_encoders`` list and
``compute_embeddings_fn``), so they stay on the GPU while it trains: recipe (a).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from controlnet_trainer import reference_models

GIB = 2**30
BASES = {"sd3-medium": "SD3 Medium", "sd3.5-medium": "SD3.5 Medium", "sd3.5-large": "SD3.5 Large"}
# bitsandbytes' AdamW8bit keeps fp32 state for tensors under min_8bit_size elements, and one fp32
# absmax per block of 256 elements for each of its two uint8 states.
BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCK_SIZE = 256
COLUMNS = (
    "transformer",
    "VAE",
    "CLIP-L+G",
    "T5",
    "ControlNet weights",
    "gradients",
    "optimizer",
    "building the cache",
    "training",
    "peak",
)


@dataclass(frozen=True)
class Recipe:
    key: str
    title: str
    cached: bool  # text embeddings cached, text encoders off the GPU while training
    adam_8bit: bool
    t5: bool


RECIPES = (
    Recipe("a", "diffusers' default: every encoder resident, AdamW", cached=False, adam_8bit=False, t5=True),
    Recipe("b", "embeddings cache, AdamW", cached=True, adam_8bit=False, t5=True),
    Recipe("c", "embeddings cache, 8-bit AdamW", cached=True, adam_8bit=True, t5=True),
    Recipe("d", "embeddings cache, 8-bit AdamW, --drop_t5", cached=True, adam_8bit=True, t5=False),
)


def tensor_bytes(tensors: Iterable[torch.Tensor], dtype: torch.dtype) -> int:
    """Bytes of ``tensors`` once cast to ``dtype``: ``Module.to(dtype)`` casts floating tensors only."""
    size = torch.finfo(dtype).bits // 8
    return sum(t.numel() * (size if t.is_floating_point() else t.element_size()) for t in tensors)


def module_bytes(module: torch.nn.Module, dtype: torch.dtype) -> int:
    return tensor_bytes([*module.parameters(), *module.buffers()], dtype)


def adamw_8bit_state_bytes(parameters: Iterable[torch.Tensor]) -> int:
    total = 0
    for parameter in parameters:
        n = parameter.numel()
        total += 8 * n if n < BNB_MIN_8BIT_SIZE else 2 * n + 2 * 4 * math.ceil(n / BNB_BLOCK_SIZE)
    return total


def part_sizes(parts: dict[str, torch.nn.Module]) -> dict[str, int]:
    """Parameter counts and GPU bytes of ``meta_sd3_training_parts``' modules, as a run holds them."""
    trained = list(parts["controlnet"].parameters())
    trained_count = sum(p.numel() for p in trained)
    counts = {f"{name}_parameters": reference_models.parameter_count(module) for name, module in parts.items()}
    return {
        **counts,
        "transformer_buffers": sum(b.numel() for b in parts["transformer"].buffers()),  # the position grid
        "transformer": module_bytes(parts["transformer"], torch.bfloat16),
        "vae": module_bytes(parts["vae"], torch.bfloat16),
        "clip": module_bytes(parts["text_encoder"], torch.bfloat16)
        + module_bytes(parts["text_encoder_2"], torch.bfloat16),
        "t5": module_bytes(parts["text_encoder_3"], torch.bfloat16),
        "controlnet_weights": module_bytes(parts["controlnet"], torch.float32),
        "controlnet_gradients": 4 * trained_count,
        "adamw": 8 * trained_count,  # exp_avg and exp_avg_sq in fp32
        "adamw_8bit": adamw_8bit_state_bytes(trained),
    }


def recipe_bytes(sizes: dict[str, int], recipe: Recipe) -> dict[str, int]:
    """GPU bytes of ``recipe``: each part, the phase of building the cache, training, and the peak."""
    text = sizes["clip"] + (sizes["t5"] if recipe.t5 else 0)
    frozen = sizes["transformer"] + sizes["vae"]
    optimizer = sizes["adamw_8bit" if recipe.adam_8bit else "adamw"]
    trained = sizes["controlnet_weights"] + sizes["controlnet_gradients"] + optimizer
    training = frozen + trained + (0 if recipe.cached else text)
    caching = frozen + text if recipe.cached else 0
    return {
        "transformer": sizes["transformer"],
        "vae": sizes["vae"],
        "clip": sizes["clip"],
        "t5": sizes["t5"] if recipe.t5 else 0,
        "controlnet_weights": sizes["controlnet_weights"],
        "controlnet_gradients": sizes["controlnet_gradients"],
        "optimizer": optimizer,
        "caching": caching,
        "training": training,
        "peak": max(caching, training),
    }


def memory_model(bases: Sequence[str] = tuple(BASES)) -> dict[str, dict]:
    result = {}
    for base in bases:
        sizes = part_sizes(reference_models.meta_sd3_training_parts(base))
        result[base] = {"sizes": sizes, "recipes": {r.key: recipe_bytes(sizes, r) for r in RECIPES}}
    return result


def _gib(value: int) -> str:
    return f"{value / GIB:.2f}"


def markdown(base: str, model: dict) -> str:
    sizes = model["sizes"]
    title = (
        f"### {BASES[base]}: transformer {sizes['transformer_parameters'] / 1e9:.2f}B weights "
        f"(+{sizes['transformer_buffers'] / 1e6:.0f}M position grid), ControlNet "
        f"{sizes['controlnet_parameters'] / 1e9:.2f}B"
    )
    lines = [
        title,
        "",
        f"| recipe | {' | '.join(COLUMNS)} |",
        "| --- |" + " ---: |" * len(COLUMNS),
    ]
    for recipe in RECIPES:
        row = model["recipes"][recipe.key]
        # Parentheses: on the GPU only while the cache is built.
        text = [f"({_gib(row[k])})" if recipe.cached else _gib(row[k]) for k in ("clip", "t5")]
        if not recipe.t5:
            text[1] = "not loaded"
        cells = [
            f"({recipe.key}) {recipe.title}",
            _gib(row["transformer"]),
            _gib(row["vae"]),
            *text,
            _gib(row["controlnet_weights"]),
            _gib(row["controlnet_gradients"]),
            _gib(row["optimizer"]),
            _gib(row["caching"]) if recipe.cached else "",
            _gib(row["training"]),
            f"**{_gib(row['peak'])}**",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the figures (bytes) to this file")
    parser.add_argument("--bases", nargs="+", choices=tuple(BASES), default=list(BASES))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, dict]:
    args = _parse_args(argv)
    model = memory_model(args.bases)
    print("GiB on the GPU, frozen parts in bf16, ControlNet in fp32; activations not counted.\n")
    print("\n\n".join(markdown(base, model[base]) for base in args.bases))
    if args.json:
        args.json.write_text(json.dumps(model, indent=2) + "\n")
    return model


if __name__ == "__main__":
    main()
