"""The SD3 family on the meta device: published sizes, and benchmarks/sd3_memory.py's recipes."""

from __future__ import annotations

import json
import sys
import time

import pytest
import torch
from conftest import ROOT

from controlnet_trainer import reference_models

sys.path.insert(0, str(ROOT / "benchmarks"))

import sd3_memory

# Parameter counts of stabilityai/stable-diffusion-3-medium-diffusers as diffusers and
# transformers load it (each module's parameters, buffers left out).
SD3_MEDIUM = {
    "transformer": 2_028_328_000,
    "text_encoder": 123_650_304,
    "text_encoder_2": 694_659_840,
    "text_encoder_3": 4_762_310_656,
    "vae": 83_819_683,  # the 16-channel AutoencoderKL without quant convs, as FLUX.1's
}
# Stability AI's model cards give the 3.5 transformers as 2.5 and 8.1 billion parameters; the
# 2.5 includes SD3.5 Medium's 384x384 position grid (226M values, a buffer in diffusers).
SD35_TRANSFORMER_TOTALS = {"sd3.5-medium": 2.5e9, "sd3.5-large": 8.1e9}


@pytest.fixture(scope="module")
def parts():
    return {base: reference_models.meta_sd3_training_parts(base) for base in sd3_memory.BASES}


def test_sd3_medium_has_the_published_sizes(parts):
    counts = {name: reference_models.parameter_count(parts["sd3-medium"][name]) for name in SD3_MEDIUM}
    assert counts == SD3_MEDIUM
    assert all(p.device.type == "meta" for p in parts["sd3-medium"]["text_encoder_3"].parameters())


@pytest.mark.parametrize("base", sorted(SD35_TRANSFORMER_TOTALS))
def test_sd35_transformers_have_the_published_sizes(parts, base):
    transformer = parts[base]["transformer"]
    total = reference_models.parameter_count(transformer) + sum(b.numel() for b in transformer.buffers())
    assert total == pytest.approx(SD35_TRANSFORMER_TOTALS[base], rel=0.02)
    # The encoders and VAE are SD3 Medium's.
    for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        assert reference_models.parameter_count(parts[base][name]) == SD3_MEDIUM[name]


def test_the_controlnet_is_the_transformers_first_twelve_blocks(parts):
    for base, config in reference_models.SD3_TRANSFORMERS.items():
        controlnet, transformer = parts[base]["controlnet"], parts[base]["transformer"]
        assert controlnet.config.num_layers == len(controlnet.transformer_blocks) == 12
        assert len(transformer.transformer_blocks) == config["num_layers"]
        assert controlnet.config.extra_conditioning_channels == 0
        assert controlnet.config.qk_norm == config.get("qk_norm")
    # from_transformer writes 12 into the transformer's config; the function puts 24 back.
    fresh = reference_models.meta_sd3_training_parts("sd3-medium")["transformer"]
    assert fresh.config["num_layers"] == 24


def test_8bit_adam_state_is_two_bytes_a_weight_and_fp32_for_small_tensors():
    small, large = torch.empty(100, device="meta"), torch.empty(4096, device="meta")
    assert sd3_memory.adamw_8bit_state_bytes([small]) == 8 * 100
    assert sd3_memory.adamw_8bit_state_bytes([large]) == 2 * 4096 + 2 * 4 * (4096 // 256)


def test_each_recipe_needs_less_than_the_one_before(parts):
    for base, base_parts in parts.items():
        sizes = sd3_memory.part_sizes(base_parts)
        a, b, c, d = (sd3_memory.recipe_bytes(sizes, recipe) for recipe in sd3_memory.RECIPES)
        assert a["peak"] > b["peak"] > c["peak"] >= d["peak"], base
        # T5 leaves the GPU with the other encoders once the cache is built, so --drop_t5 lowers
        # the building phase; the peak only where that phase is the larger one.
        assert d["caching"] == c["caching"] - sizes["t5"]
        assert d["training"] == c["training"]
        assert (d["peak"] < c["peak"]) == (c["caching"] > c["training"])
    sd3_medium = [
        sd3_memory.recipe_bytes(sd3_memory.part_sizes(parts["sd3-medium"]), r)["peak"] for r in sd3_memory.RECIPES
    ]
    assert sd3_medium == sorted(sd3_medium, reverse=True) and len(set(sd3_medium)) == 4


def test_the_script_prints_its_tables_and_writes_json_in_seconds(tmp_path, capsys):
    start = time.perf_counter()
    model = sd3_memory.main(["--json", str(tmp_path / "sd3.json")])
    assert time.perf_counter() - start < 10
    out = capsys.readouterr().out
    assert out.count("| (a) diffusers' default") == 3 and "activations not counted" in out
    assert json.loads((tmp_path / "sd3.json").read_text()) == model
    assert set(model) == set(sd3_memory.BASES)
    assert model["sd3.5-large"]["sizes"]["controlnet_parameters"] == reference_models.parameter_count(
        reference_models.meta_sd3_training_parts("sd3.5-large")["controlnet"]
    )
