"""The published architectures the GPU benchmark builds, and the FLOP count behind its MFU."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextModel

from controlnet_trainer import reference_models
from controlnet_trainer.families import Models, TextConditioning
from controlnet_trainer.families.sd import FAMILY as SD

# Parameter counts of the released checkpoints (runwayml/stable-diffusion-v1-5,
# stabilityai/stable-diffusion-xl-base-1.0).
PUBLISHED = {
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sdxl": {
        "unet": 2_567_463_684,
        "vae": 83_653_863,
        "text_encoder": 123_060_480,
        "text_encoder_2": 694_659_840,
    },
}


def meta_parts(family: str, tmp_path) -> dict:
    tokenizers = reference_models.write_tokenizers(family, tmp_path)
    with torch.device("meta"):
        return reference_models.components(family, tokenizers)


@pytest.mark.parametrize("family", reference_models.FAMILIES)
def test_architectures_have_the_published_sizes(family, tmp_path):
    parts = meta_parts(family, tmp_path)
    assert {name: sum(p.numel() for p in module.parameters()) for name, module in parts.items()} == PUBLISHED[family]


def test_narrowed_sd15_keeps_the_structure_at_a_sixteenth_of_the_weights(tmp_path):
    tokenizers = reference_models.write_tokenizers("sd15", tmp_path)
    with torch.device("meta"):
        quarter = reference_models.components("sd15", tokenizers, width_divisor=4)
    for name in ("unet", "vae"):  # widths / 4: weights / 16, up to biases and norms
        weights = sum(p.numel() for p in quarter[name].parameters())
        assert weights == pytest.approx(PUBLISHED["sd15"][name] / 16, rel=0.1)
    # Same depth: as many blocks, layers and attention heads as SD 1.5 itself.
    assert len(list(quarter["unet"].modules())) == len(list(meta_parts("sd15", tmp_path)["unet"].modules()))
    assert quarter["unet"].config.cross_attention_dim == quarter["text_encoder"].config.hidden_size == 192
    flops = reference_models.step_flops(quarter, 64)  # runs: every width fits the next
    assert flops["uncached"] > flops["cached"] > 0


def test_sd15_step_flops_match_the_known_breakdown(tmp_path):
    """Per sample at 512 px: VAE encoder 1.12 TFLOP, text encoder 0.01, ControlNet forward and
    backward 0.87, UNet forward and backward into the residuals 1.46 (issue #5's figures)."""
    flops = reference_models.step_flops(meta_parts("sd15", tmp_path), 512)
    assert flops["cached"] / 1e12 == pytest.approx(0.87 + 1.46, rel=0.05)
    assert (flops["uncached"] - flops["cached"]) / 1e12 == pytest.approx(1.12 + 0.01, rel=0.05)


def test_meta_count_equals_a_real_step(assets):
    """Counting on meta tensors from a folder's configs gives the FLOPs real weights execute."""
    folder = assets["sd"]
    resolution = 64
    counted = reference_models.step_flops(reference_models.meta_components(folder), resolution)

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").requires_grad_(False)
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").requires_grad_(False)
    controlnet = ControlNetModel.from_unet(unet)
    pixels = torch.rand(1, 3, resolution, resolution) * 2 - 1
    # PyTorch's flop counter does not see the CPU flash-attention kernel; the math path is the
    # same arithmetic, and the GPU kernels are counted.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        latents = vae.encode(pixels).latent_dist.sample()
        hidden = text_encoder(torch.zeros(1, 77, dtype=torch.long))[0]
        models = Models((), (text_encoder,), vae, unet, controlnet, DDPMScheduler(**reference_models.SCHEDULER))
        SD.loss(
            models,
            controlnet,
            latents=latents,
            noise=torch.randn_like(latents),
            timesteps=torch.tensor([500]),
            text=TextConditioning(hidden),
            controlnet_image=pixels,
        ).backward()
    assert counter.get_total_flops() == counted["uncached"]
    assert counted["cached"] < counted["uncached"]
