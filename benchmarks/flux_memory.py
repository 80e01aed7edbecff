"""GPU memory of a FLUX.1-dev ControlNet training step by recipe, counted from parameter shapes.

    python benchmarks/flux_memory.py [--json PATH] [--activation_gib 4] [--budget_gib 24]

It builds FLUX.1-dev's transformer, VAE and text encoders and each ControlNet size on the meta
device (``reference_models.flux_components``), so no memory and no download, and adds up what
each recipe keeps on the GPU for the whole run: the frozen transformer (bf16, bitsandbytes NF4
or LLM.int8), the text encoders (bf16, or none when the embeddings cache holds their outputs),
the VAE (bf16), and the ControlNet's weights, gradients and optimizer state. Activations are not
counted: they need a GPU to measure. A recipe fits when its total plus ``--activation_gib`` (an
assumed allowance for activations at 512 px, batch 1, with gradient checkpointing, and the CUDA
context) is at most ``--budget_gib``.

The byte accounting per format and optimizer is ``controlnet_trainer.memory``'s, which
``--dry_run`` of train_controlnet_flux.py also uses for the run's own recipe.

``--quantization_error`` also loads a small random Flux transformer (2 + 4 blocks of width 256) in
fp32, bf16, NF4 and LLM.int8 through diffusers' quantizer, on the CPU where there is no GPU, and
reports how far each moves the output, the flow-matching loss and the gradient reaching the
ControlNet residuals from the fp32 model's, on the same inputs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import BitsAndBytesConfig, FluxTransformer2DModel
from diffusers.quantizers.bitsandbytes import bnb_quantizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from controlnet_trainer import memory, reference_models

GIB = memory.GIB
Recipe = memory.Recipe
linear_weight_bytes = memory.linear_weight_bytes


RECIPES = (
    Recipe("diffusers' script: bf16, text encoders on the GPU, AdamW", "bf16", False, "adamw", False),
    Recipe("bf16, cache, 8-bit AdamW", "bf16", True, "adamw8bit", False),
    Recipe("bf16, cache, Adafactor, fused", "bf16", True, "adafactor", True),
    Recipe("NF4, text encoders on the GPU, 8-bit AdamW, fused", "nf4", False, "adamw8bit", True),
    Recipe("NF4, cache, AdamW", "nf4", True, "adamw", False),
    Recipe("NF4, cache, 8-bit AdamW", "nf4", True, "adamw8bit", False),
    Recipe("NF4, cache, 8-bit AdamW, fused", "nf4", True, "adamw8bit", True),
    Recipe("NF4, cache, Adafactor, fused", "nf4", True, "adafactor", True),
    Recipe("NF4 double quant, cache, 8-bit AdamW, fused", "nf4_double_quant", True, "adamw8bit", True),
    Recipe("int8, cache, 8-bit AdamW, fused", "int8", True, "adamw8bit", True),
    Recipe(
        "NF4, cache, bf16 ControlNet (stochastic rounding), Adafactor, fused", "nf4", True, "adafactor", True, "bf16"
    ),
)


def recipe_bytes(parts: dict[str, torch.nn.Module], controlnet: torch.nn.Module, recipe: Recipe) -> dict[str, int]:
    """Bytes each piece of ``recipe`` keeps on the GPU; ``parts`` from ``flux_components``."""
    encoders = (parts["text_encoder"], parts["text_encoder_2"])
    return memory.recipe_bytes(parts["transformer"], encoders, parts["vae"], controlnet, recipe)


def measure(
    recipes: Sequence[Recipe] = RECIPES, sizes: Sequence[tuple[int, int]] = reference_models.FLUX_CONTROLNET_SIZES
) -> dict:
    parts = reference_models.flux_components("meta")
    controlnets = {size: reference_models.flux_controlnet(parts["transformer"], *size) for size in sizes}
    return {
        "parameters": {
            **{name: reference_models.parameter_count(module) for name, module in parts.items()},
            **{f"controlnet_{d}_{s}": reference_models.parameter_count(c) for (d, s), c in controlnets.items()},
        },
        "recipes": [
            {
                **dataclasses.asdict(recipe),
                "gib": {
                    f"{d}+{s}": {k: v / GIB for k, v in recipe_bytes(parts, controlnet, recipe).items()}
                    for (d, s), controlnet in controlnets.items()
                },
            }
            for recipe in recipes
        ],
    }


def total_gib(pieces: dict[str, float]) -> float:
    return sum(pieces.values())


def markdown(result: dict, activation_gib: float, budget_gib: float) -> str:
    sizes = list(result["recipes"][0]["gib"])
    first = result["recipes"][0]["gib"][sizes[0]]
    lines = [
        "| recipe | frozen transformer | text encoders | " + " | ".join(f"ControlNet {s}" for s in sizes) + " |",
        "| --- | ---: | ---: | " + " | ".join("---:" for _ in sizes) + " |",
    ]
    for recipe in result["recipes"]:
        cells = []
        for size in sizes:
            total = total_gib(recipe["gib"][size])
            cells.append(f"{total:.1f}{' ✓' if total + activation_gib <= budget_gib else ''}")
        pieces = recipe["gib"][sizes[0]]
        lines.append(
            f"| {recipe['name']} | {pieces['frozen_transformer']:.2f} | {pieces['text_encoders']:.2f} | "
            + " | ".join(cells)
            + " |"
        )
    lines.append("")
    lines.append(
        f"Totals in GiB without activations; ✓: total + {activation_gib:g} GiB (assumed activations and CUDA context) "
        f"≤ {budget_gib:g} GiB. Every total includes the VAE's {first['vae']:.2f} GiB."
    )
    lines.append("")
    lines.append(
        "| ControlNet | parameters | fp32 weights | whole gradients | fused gradients | AdamW | 8-bit AdamW | Adafactor |"
    )
    lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    by_name = {(r["optimizer"], r["fused"], r["controlnet_dtype"]): r["gib"] for r in result["recipes"]}
    for size in sizes:
        d, s = size.split("+")
        whole = by_name[("adamw", False, "fp32")][size]
        fused = by_name[("adamw8bit", True, "fp32")][size]
        adafactor = by_name[("adafactor", True, "fp32")][size]
        lines.append(
            f"| {size} | {result['parameters'][f'controlnet_{d}_{s}'] / 1e9:.3f}B | {whole['controlnet_weights']:.2f} | "
            f"{whole['controlnet_gradients']:.2f} | {fused['controlnet_gradients']:.2f} | {whole['optimizer_state']:.2f} | "
            f"{fused['optimizer_state']:.2f} | {adafactor['optimizer_state']:.3f} |"
        )
    return "\n".join(lines)


SMALL_FLUX = reference_models.FLUX_DEV_TRANSFORMER | {
    "num_layers": 2,
    "num_single_layers": 4,
    "num_attention_heads": 2,
    "joint_attention_dim": 256,
    "pooled_projection_dim": 64,
}
QUANTIZATIONS = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.bfloat16},
    "int8": {"load_in_8bit": True},
}


@contextlib.contextmanager
def quantizing_anywhere():
    """diffusers' bitsandbytes quantizer on the CPU too: bitsandbytes runs there, diffusers refuses.

    Without a GPU, ``validate_environment`` raises "No GPU found. A GPU is needed for
    quantization." and the model is placed on ``cuda:<current>``; so the check is skipped and the
    device map names the CPU. With a GPU nothing changes.
    """
    if torch.cuda.is_available():
        yield {}
        return
    quantizers = (bnb_quantizer.BnB4BitDiffusersQuantizer, bnb_quantizer.BnB8BitDiffusersQuantizer)
    checks = [quantizer.validate_environment for quantizer in quantizers]
    for quantizer in quantizers:
        quantizer.validate_environment = lambda self, *args, **kwargs: None
    try:
        yield {"device_map": {"": "cpu"}}
    finally:
        for quantizer, check in zip(quantizers, checks):
            quantizer.validate_environment = check


def small_flux(path: Path, modulation_scale: float = 0.1) -> Path:
    """A random ``SMALL_FLUX`` saved to ``path``: linear weights N(0, 1/fan_in), modulation scaled.

    Scaling the AdaLayerNorm modulation layers keeps the gates small, as in a trained DiT; at full
    scale the random model is chaotic and bf16 alone moves its output by tens of percent.
    """
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**SMALL_FLUX)
    for name, layer in model.named_modules():
        if isinstance(layer, torch.nn.Linear):
            torch.nn.init.normal_(layer.weight, std=layer.in_features**-0.5)
            torch.nn.init.normal_(layer.bias, std=0.02)
            if "norm" in name:
                layer.weight.data *= modulation_scale
                layer.bias.data *= modulation_scale
    model.save_pretrained(path)
    return path


def _flux_step(model: FluxTransformer2DModel, dtype: torch.dtype) -> tuple[torch.Tensor, float, torch.Tensor]:
    """Prediction, flow-matching loss and residual gradients of one batch of 2 at 16x16 latent tokens."""
    generator = torch.Generator().manual_seed(1)
    batch, side, text = 2, 16, 32
    tokens, width = side * side, model.inner_dim
    latents, noise = (torch.randn(batch, tokens, 64, generator=generator) for _ in range(2))
    sigmas = torch.tensor([0.3, 0.7])
    noisy = (1 - sigmas.view(-1, 1, 1)) * latents + sigmas.view(-1, 1, 1) * noise
    prompt = torch.randn(batch, text, SMALL_FLUX["joint_attention_dim"], generator=generator)
    pooled = torch.randn(batch, SMALL_FLUX["pooled_projection_dim"], generator=generator)
    blocks = SMALL_FLUX["num_layers"] + SMALL_FLUX["num_single_layers"]
    residuals = [(0.1 * torch.randn(batch, tokens, width, generator=generator)).requires_grad_() for _ in range(blocks)]
    position = torch.arange(tokens)
    image_ids = torch.stack([torch.zeros(tokens), position // side, position % side], dim=1)
    model.requires_grad_(False)
    prediction = model(
        hidden_states=noisy.to(dtype),
        encoder_hidden_states=prompt.to(dtype),
        pooled_projections=pooled.to(dtype),
        timestep=sigmas.to(dtype),
        guidance=torch.full((batch,), 3.5, dtype=dtype),
        img_ids=image_ids,
        txt_ids=torch.zeros(text, 3),
        controlnet_block_samples=[r.to(dtype) for r in residuals[: SMALL_FLUX["num_layers"]]],
        controlnet_single_block_samples=[r.to(dtype) for r in residuals[SMALL_FLUX["num_layers"] :]],
        return_dict=False,
    )[0].float()
    loss = torch.nn.functional.mse_loss(prediction, noise - latents)
    loss.backward()
    return prediction.detach(), loss.item(), torch.cat([r.grad.flatten() for r in residuals])


def quantization_error() -> dict[str, dict[str, float]]:
    """How far bf16, NF4 and LLM.int8 frozen weights move a small Flux transformer's step from fp32's."""
    with tempfile.TemporaryDirectory() as folder:
        path = small_flux(Path(folder))
        steps = {
            "fp32": _flux_step(FluxTransformer2DModel.from_pretrained(path), torch.float32),
            "bf16": _flux_step(
                FluxTransformer2DModel.from_pretrained(path, torch_dtype=torch.bfloat16), torch.bfloat16
            ),
        }
        for name, options in QUANTIZATIONS.items():
            with quantizing_anywhere() as placement:
                model = FluxTransformer2DModel.from_pretrained(
                    path, torch_dtype=torch.bfloat16, quantization_config=BitsAndBytesConfig(**options), **placement
                )
            steps[name] = _flux_step(model, torch.bfloat16)

    def relative(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).norm() / b.norm()).item()

    (out32, loss32, grad32), (out16, _, _) = steps["fp32"], steps["bf16"]
    return {
        name: {
            "output_vs_fp32": relative(out, out32),
            "output_vs_bf16": relative(out, out16),
            "loss_vs_fp32": abs(loss - loss32) / loss32,
            "residual_gradient_vs_fp32": relative(grad, grad32),
            "residual_gradient_cosine": torch.nn.functional.cosine_similarity(grad, grad32, dim=0).item(),
        }
        for name, (out, loss, grad) in steps.items()
        if name != "fp32"
    }


def error_markdown(errors: dict[str, dict[str, float]]) -> str:
    lines = [
        "| frozen weights | output vs fp32 | output vs bf16 | loss vs fp32 | residual gradient vs fp32 (cosine) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, e in errors.items():
        lines.append(
            f"| {name} | {e['output_vs_fp32']:.2%} | {e['output_vs_bf16']:.2%} | {e['loss_vs_fp32']:.3%} | "
            f"{e['residual_gradient_vs_fp32']:.2%} ({e['residual_gradient_cosine']:.4f}) |"
        )
    return "\n".join(lines)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--activation_gib", type=float, default=4.0, help="assumed activations and CUDA context, GiB")
    parser.add_argument("--budget_gib", type=float, default=24.0, help="the card's memory, GiB")
    parser.add_argument(
        "--quantization_error", action="store_true", help="also measure NF4's and int8's error on a small model"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    result = measure()
    print(markdown(result, args.activation_gib, args.budget_gib))
    if args.quantization_error:
        result["quantization_error"] = quantization_error()
        print()
        print(error_markdown(result["quantization_error"]))
    if args.json:
        result["assumptions"] = {"activation_gib": args.activation_gib, "budget_gib": args.budget_gib}
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
