"""benchmarks/flux_memory.py and the FLUX.1-dev configs: parameter counts, byte formulas, recipe
orderings, and gradients through a quantized frozen transformer to the ControlNet's residuals."""

from __future__ import annotations

import sys
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from conftest import ROOT
from diffusers import BitsAndBytesConfig, FluxTransformer2DModel
from diffusers.quantizers.bitsandbytes.bnb_quantizer import BnB4BitDiffusersQuantizer

sys.path.insert(0, str(ROOT / "benchmarks"))

import flux_memory

from controlnet_trainer import reference_models

# Published sizes: FLUX.1-dev's transformer ("12B", 11.9B), its T5-XXL encoder and CLIP-L text
# model, its VAE; the ControlNets of diffusers' train_controlnet_flux.py as the issue quotes them.
PUBLISHED = {
    "transformer": 11.9e9,
    "text_encoder_2": 4.76e9,
    "text_encoder": 123.06e6,
    "vae": 83.8e6,
    "controlnet_4_4": 2.05e9,
    "controlnet_4_0": 1.44e9,
}


@pytest.fixture(scope="module")
def measured():
    return flux_memory.measure()


def test_meta_counts_match_the_published_sizes(measured):
    for name, published in PUBLISHED.items():
        assert measured["parameters"][name] == pytest.approx(published, rel=0.02), name


def gib(measured, name, size="4+4"):
    recipe = next(r for r in measured["recipes"] if r["name"] == name)
    return recipe["gib"][size]


def test_recipes_order_as_their_parts_say(measured):
    total = flux_memory.total_gib
    default = gib(measured, "diffusers' script: bf16, text encoders on the GPU, AdamW")
    nf4 = gib(measured, "NF4, cache, 8-bit AdamW")
    fused = gib(measured, "NF4, cache, 8-bit AdamW, fused")
    int8 = gib(measured, "int8, cache, 8-bit AdamW, fused")
    double = gib(measured, "NF4 double quant, cache, 8-bit AdamW, fused")
    adamw = gib(measured, "NF4, cache, AdamW")
    adafactor = gib(measured, "NF4, cache, Adafactor, fused")
    # The frozen transformer: bf16 > int8 > NF4 > NF4 with double quantization.
    assert (
        default["frozen_transformer"]
        > int8["frozen_transformer"]
        > nf4["frozen_transformer"]
        > double["frozen_transformer"]
    )
    assert nf4["frozen_transformer"] / default["frozen_transformer"] == pytest.approx(0.5625 / 2, rel=0.01)
    assert nf4["text_encoders"] == 0 < default["text_encoders"]
    # Fusing the step into the backward pass leaves one gradient: the largest, 18432 x 3072 fp32.
    assert (
        fused["controlnet_gradients"] * flux_memory.GIB
        == 18432 * 3072 * 4
        < nf4["controlnet_gradients"] * flux_memory.GIB
    )
    assert adamw["optimizer_state"] > nf4["optimizer_state"] > adafactor["optimizer_state"]
    assert total(default) > total(adamw) > total(nf4) > total(fused) > total(adafactor)
    budget = 24 - 4  # the card less the assumed activation allowance
    assert total(fused) < budget < total(nf4)
    for name in ("controlnet_4_10", "controlnet_4_4", "controlnet_4_0", "controlnet_2_0"):
        assert measured["parameters"][name] > 0
    sizes = [total(gib(measured, "NF4, cache, 8-bit AdamW, fused", size)) for size in ("4+10", "4+4", "4+0", "2+0")]
    assert sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("frozen", ["nf4", "nf4_double_quant", "int8"])
def test_byte_formulas_equal_what_bitsandbytes_stores(frozen):
    out_features, in_features = 320, 192
    if frozen == "int8":
        layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=False, has_fp16_weights=False).to("cpu")
        stored = layer.weight.data.nbytes + layer.weight.SCB.nbytes
    else:
        layer = bnb.nn.Linear4bit(
            in_features, out_features, bias=False, compress_statistics=frozen == "nf4_double_quant", quant_type="nf4"
        ).to("cpu")
        state = layer.weight.quant_state.as_dict(packed=False)
        stored = layer.weight.data.nbytes + sum(v.nbytes for v in state.values() if torch.is_tensor(v))
    assert flux_memory.linear_weight_bytes(out_features, in_features, frozen) == stored


# Widths are multiples of 64, bitsandbytes' 4-bit block: its CPU kernel for inference repacks
# weights by whole blocks of a row.
TINY_FLUX = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 32,
    "num_attention_heads": 2,
    "joint_attention_dim": 64,
    "pooled_projection_dim": 64,
    "guidance_embeds": True,
    "axes_dims_rope": [8, 12, 12],
}


@pytest.mark.parametrize("quantization", list(flux_memory.QUANTIZATIONS))
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train-checkpointed"])
def test_gradients_reach_the_residuals_through_a_quantized_transformer(quantization, train, tmp_path):
    """diffusers' bitsandbytes quantizer loads the frozen transformer as a GPU run does, here on the
    CPU (``flux_memory.quantizing_anywhere`` skips diffusers' GPU check), with the checkpointed
    blocks' recomputation in training mode."""
    torch.manual_seed(0)
    FluxTransformer2DModel(**TINY_FLUX).save_pretrained(tmp_path)
    with flux_memory.quantizing_anywhere() as placement:
        transformer = FluxTransformer2DModel.from_pretrained(
            tmp_path,
            torch_dtype=torch.bfloat16,
            quantization_config=BitsAndBytesConfig(**flux_memory.QUANTIZATIONS[quantization]),
            **placement,
        )
    linear = bnb.nn.Linear4bit if quantization == "nf4" else bnb.nn.Linear8bitLt
    assert isinstance(transformer.transformer_blocks[0].attn.to_q, linear)
    transformer.requires_grad_(False).train(train)
    if train:
        transformer.enable_gradient_checkpointing()

    tokens, text, width = 16, 8, 64
    bf16 = {"dtype": torch.bfloat16}
    residuals = [torch.randn(1, tokens, width).mul(0.1).requires_grad_() for _ in range(4)]
    image_ids = torch.stack([torch.zeros(tokens), torch.arange(tokens) // 4, torch.arange(tokens) % 4], dim=1)
    prediction = transformer(
        hidden_states=torch.randn(1, tokens, 64, **bf16),
        encoder_hidden_states=torch.randn(1, text, 64, **bf16),
        pooled_projections=torch.randn(1, 64, **bf16),
        timestep=torch.tensor([0.5], **bf16),
        guidance=torch.tensor([3.5], **bf16),
        img_ids=image_ids,
        txt_ids=torch.zeros(text, 3),
        controlnet_block_samples=[r.to(torch.bfloat16) for r in residuals[:2]],
        controlnet_single_block_samples=[r.to(torch.bfloat16) for r in residuals[2:]],
        return_dict=False,
    )[0]
    prediction.float().square().mean().backward()
    for residual in residuals:
        assert residual.grad is not None and residual.grad.abs().sum() > 0
    assert all(p.grad is None for p in transformer.parameters())


def test_quantizing_anywhere_puts_diffusers_gpu_check_back():
    before = BnB4BitDiffusersQuantizer.validate_environment
    with flux_memory.quantizing_anywhere():
        pass
    assert BnB4BitDiffusersQuantizer.validate_environment is before


def flux_dev_configs(path) -> Path:
    """A FLUX.1-dev folder of config files only (no weights), as the hub repo's configs read."""
    from transformers import CLIPTextConfig, T5Config

    parts = reference_models.flux_components("meta")
    parts["transformer"].save_config(path / "transformer")
    parts["vae"].save_config(path / "vae")
    CLIPTextConfig(**reference_models.FLUX_CLIP_L, architectures=["CLIPTextModel"]).save_pretrained(path / "text_encoder")
    T5Config(**reference_models.T5_XXL, architectures=["T5EncoderModel"]).save_pretrained(path / "text_encoder_2")
    return path


@pytest.mark.parametrize(
    "recipe, flags",
    [
        ("diffusers' script: bf16, text encoders on the GPU, AdamW", {}),
        (
            "NF4, cache, 8-bit AdamW, fused",
            {"quantize_base": "nf4", "cache": True, "use_8bit_adam": True, "fused_backward_pass": True},
        ),
        ("NF4, cache, Adafactor, fused", {"quantize_base": "nf4", "cache": True, "use_adafactor": True, "fused_backward_pass": True}),
    ],
)
def test_the_dry_runs_estimate_is_the_benchmarks_recipe(measured, tmp_path, recipe, flags):
    """train_controlnet_flux.py --dry_run counts the run's own recipe from the model's config
    files: on FLUX.1-dev's configs it gives the benchmark's figures for the same recipe."""
    from controlnet_trainer import families
    from controlnet_trainer.settings import MemorySettings, ModelSettings, OptimizerSettings, Settings

    base = flux_dev_configs(tmp_path)
    settings = Settings(
        model=ModelSettings(str(base), quantize_base=flags.get("quantize_base")),
        data=None, objective=None, loop=None, evaluation=None, output=None,
        memory=MemorySettings(cache_text_embeddings=flags.get("cache", False)),
        optimizer=OptimizerSettings(
            use_8bit_adam=flags.get("use_8bit_adam", False),
            use_adafactor=flags.get("use_adafactor", False),
            fused_backward_pass=flags.get("fused_backward_pass", False),
        ),
    )  # fmt: skip
    estimate = families.by_name("flux").memory_estimate(settings, torch.bfloat16)
    expected = gib(measured, recipe)
    for piece, value in expected.items():
        assert estimate[piece] == pytest.approx(value, abs=0.006), piece
    assert estimate["total"] == pytest.approx(flux_memory.total_gib(expected), abs=0.006)
