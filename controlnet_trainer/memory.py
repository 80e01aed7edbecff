"""What a ControlNet training step keeps on the GPU for the whole run, counted from parameter
shapes: the frozen denoiser, text encoders and VAE, and the ControlNet's weights, gradients and
optimizer state. Activations are not counted: they need a GPU to measure.

Bytes per frozen linear weight of ``n`` elements:
- fp32 4n, bf16 2n.
- NF4 (``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")``): n/2 for the codes
  plus one fp32 absmax per block of 64, 4 * ceil(n / 64), and a 16-entry fp32 code table per
  layer: 0.5625 B/param. With ``bnb_4bit_use_double_quant`` the absmax are 8-bit, ceil(n / 64),
  with one fp32 absmax per 256 of them and a 256-entry fp32 code table per layer: 0.516 B/param.
- LLM.int8 (``load_in_8bit``): n int8 plus one fp32 scale per output row.
diffusers' quantizer replaces every ``nn.Linear``; their biases and every other parameter (the
RMSNorm weights) stay bf16.

ControlNet bytes: weights 4 B/param in fp32 (2 in bf16, for stochastic rounding); gradients as
much as the weights, or, with the optimizer step fused into the backward pass
(--fused_backward_pass), about one gradient at a time: the largest parameter's. Optimizer state:
AdamW two moments in the weights' dtype (8 B/param in fp32); bitsandbytes' 8-bit AdamW two uint8
moments plus an fp32 absmax per block of 256 each, 32-bit moments for parameters under 4096
elements; transformers' Adafactor (no first moment, as --use_adafactor builds it) a row and a
column vector for each matrix and a full second moment for each vector, in the weights' dtype.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

import torch

GIB = 2**30
NF4_BLOCK = 64  # bitsandbytes' 4-bit blocksize
NF4_NESTED_BLOCK = 256  # double quantization: absmax of absmax
ADAM8BIT_BLOCK = 256  # bitsandbytes' blockwise 8-bit optimizer state
ADAM8BIT_MIN_SIZE = 4096  # smaller tensors keep 32-bit state (min_8bit_size)
FROZEN_FORMATS = ("fp32", "bf16", "nf4", "nf4_double_quant", "int8")
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


def linear_weight_bytes(out_features: int, in_features: int, frozen: str) -> int:
    n = out_features * in_features
    if frozen in DTYPE_BYTES:
        return DTYPE_BYTES[frozen] * n
    blocks = math.ceil(n / NF4_BLOCK)
    if frozen == "nf4":  # codes, absmax, the 16-entry fp32 code table
        return n // 2 + 4 * blocks + 4 * 16
    if frozen == "nf4_double_quant":  # codes, 8-bit absmax, their absmax and 256-entry table, the 16-entry table
        return n // 2 + blocks + 4 * math.ceil(blocks / NF4_NESTED_BLOCK) + 4 * 256 + 4 * 16
    if frozen == "int8":
        return n + 4 * out_features
    raise ValueError(f"frozen must be one of {FROZEN_FORMATS}, not {frozen!r}")


def frozen_bytes(module: torch.nn.Module, frozen: str) -> int:
    """Bytes of a frozen module whose ``nn.Linear`` weights are stored as ``frozen``; the rest in
    fp32 for an fp32 module, else bf16."""
    total, in_linears = 0, set()
    for layer in module.modules():
        if isinstance(layer, torch.nn.Linear):
            total += linear_weight_bytes(layer.out_features, layer.in_features, frozen)
            in_linears.add(id(layer.weight))
    rest = DTYPE_BYTES.get(frozen, 2)
    return total + rest * sum(p.numel() for p in module.parameters() if id(p) not in in_linears)


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


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def recipe_bytes(
    denoiser: torch.nn.Module,
    text_encoders: Sequence[torch.nn.Module],
    vae: torch.nn.Module,
    controlnet: torch.nn.Module,
    recipe: Recipe,
) -> dict[str, int]:
    """Bytes each piece of ``recipe`` keeps on the GPU. Text encoders and the VAE are stored in the
    frozen dtype (bf16 for a quantized denoiser); cached text encoders leave the GPU."""
    plain = DTYPE_BYTES.get(recipe.frozen, 2)
    return {
        "frozen_transformer": frozen_bytes(denoiser, recipe.frozen),
        "text_encoders": 0 if recipe.cached else plain * sum(parameter_count(e) for e in text_encoders),
        "vae": plain * parameter_count(vae),
        **controlnet_bytes(controlnet, recipe),
    }


def in_gib(pieces: dict[str, int]) -> dict[str, float]:
    """The pieces and their total, in GiB rounded to 0.01."""
    gib = {name: round(value / GIB, 2) for name, value in pieces.items()}
    return gib | {"total": round(sum(pieces.values()) / GIB, 2)}
