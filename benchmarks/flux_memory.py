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

Bytes per frozen linear weight of ``n`` elements:
- bf16: 2n.
- NF4 (``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")``): n/2 for the codes
  plus one fp32 absmax per block of 64, 4 * ceil(n / 64), and a 16-entry fp32 code table per
  layer: 0.5625 B/param. With ``bnb_4bit_use_double_quant`` the absmax are 8-bit, ceil(n / 64),
  with one fp32 absmax per 256 of them and a 256-entry fp32 code table per layer: 0.516 B/param.
- LLM.int8 (``load_in_8bit``): n int8 plus one fp32 scale per output row.
diffusers' quantizer replaces every ``nn.Linear`` (FluxTransformer2DModel has no
``_keep_in_fp32_modules`` and the config skips none by default); their biases and every other
parameter (the RMSNorm weights) stay bf16.

ControlNet bytes: weights 4 B/param in fp32 (2 in bf16, for stochastic rounding); gradients as
much as the weights, or, with the optimizer step fused into the backward pass
(``register_post_accumulate_grad_hook``, each parameter stepped and its gradient freed as soon as
it is accumulated), about one gradient at a time: the largest parameter's. Optimizer state:
AdamW two moments in the weights' dtype (8 B/param in fp32); bitsandbytes' 8-bit AdamW two uint8
moments plus an fp32 absmax per block of 256 each, 32-bit moments for parameters under 4096
elements; transformers' Adafactor (no first moment, as diffusers' ``--use_adafactor`` builds it)
a row and a column vector for each matrix and a full second moment for each vector, in the
weights' dtype.

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
import math
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from diffusers import BitsAndBytesConfig, FluxTransformer2DModel
from diffusers.quantizers.bitsandbytes import bnb_quantizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from controlnet_trainer import reference_models

GIB = 2**30
NF4_BLOCK = 64  # bitsandbytes' 4-bit blocksize
NF4_NESTED_BLOCK = 256  # double quantization: absmax of absmax
ADAM8BIT_BLOCK = 256  # bitsandbytes' blockwise 8-bit optimizer state
ADAM8BIT_MIN_SIZE = 4096  # smaller tensors keep 32-bit state (min_8bit_size)
FROZEN_FORMATS = ("bf16", "nf4", "nf4_double_quant", "int8")
OPTIMIZERS = ("adamw", "adamw8bit", "adafactor")
DTYPE_BYTES = {"fp32": 4, "bf16": 2}


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    frozen: str  # one of FROZEN_FORMATS
    cached: bool  # the embeddings cache: text encoders never on the GPU
    optimizer: str  # one of OPTIMIZERS
    fused: bool  # optimizer step fused into the backward pass
    controlnet_dtype: str = "fp32"  # "bf16": bf16 weights with stochastic rounding


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


def linear_weight_bytes(out_features: int, in_features: int, frozen: str) -> int:
    n = out_features * in_features
    if frozen == "bf16":
        return 2 * n
    blocks = math.ceil(n / NF4_BLOCK)
    if frozen == "nf4":  # codes, absmax, the 16-entry fp32 code table
        return n // 2 + 4 * blocks + 4 * 16
    if frozen == "nf4_double_quant":  # codes, 8-bit absmax, their absmax and 256-entry table, the 16-entry table
        return n // 2 + blocks + 4 * math.ceil(blocks / NF4_NESTED_BLOCK) + 4 * 256 + 4 * 16
    if frozen == "int8":
        return n + 4 * out_features
    raise ValueError(f"frozen must be one of {FROZEN_FORMATS}, not {frozen!r}")


def frozen_bytes(module: torch.nn.Module, frozen: str) -> int:
    """Bytes of a frozen module whose ``nn.Linear`` weights are stored as ``frozen``, the rest bf16."""
    total, in_linears = 0, set()
    for layer in module.modules():
        if isinstance(layer, torch.nn.Linear):
            total += linear_weight_bytes(layer.out_features, layer.in_features, frozen)
            in_linears.add(id(layer.weight))
    return total + 2 * sum(p.numel() for p in module.parameters() if id(p) not in in_linears)


def optimizer_state_bytes(shapes: Iterable[torch.Size], optimizer: str, dtype_bytes: int) -> int:
    total = 0
    for shape in shapes:
        n = math.prod(shape)
        if optimizer == "adamw":
            total += 2 * dtype_bytes * n
        elif optimizer == "adamw8bit":
            total += 2 * (n + 4 * math.ceil(n / ADAM8BIT_BLOCK)) if n >= ADAM8BIT_MIN_SIZE else 8 * n
        elif optimizer == "adafactor":
            factored = len(shape) >= 2
            total += dtype_bytes * (math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1] if factored else n)
        else:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, not {optimizer!r}")
    return total


def controlnet_bytes(controlnet: torch.nn.Module, recipe: Recipe) -> dict[str, int]:
    shapes = [p.shape for p in controlnet.parameters()]
    size = DTYPE_BYTES[recipe.controlnet_dtype]
    numels = [math.prod(shape) for shape in shapes]
    return {
        "controlnet_weights": size * sum(numels),
        "controlnet_gradients": size * (max(numels) if recipe.fused else sum(numels)),
        "optimizer_state": optimizer_state_bytes(shapes, recipe.optimizer, size),
    }


def recipe_bytes(parts: dict[str, torch.nn.Module], controlnet: torch.nn.Module, recipe: Recipe) -> dict[str, int]:
    """Bytes each piece of ``recipe`` keeps on the GPU; ``parts`` from ``flux_components``."""
    text = (
        0
        if recipe.cached
        else 2 * sum(reference_models.parameter_count(parts[n]) for n in ("text_encoder", "text_encoder_2"))
    )
    return {
        "frozen_transformer": frozen_bytes(parts["transformer"], recipe.frozen),
        "text_encoders": text,
        "vae": 2 * reference_models.parameter_count(parts["vae"]),
        **controlnet_bytes(controlnet, recipe),
    }


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
        f"≤ {budget_gib:g} GiB. The VAE adds {first['vae']:.2f} GiB to every row."
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
