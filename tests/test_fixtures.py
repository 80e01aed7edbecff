"""Tests for the tiny offline Stable Diffusion fixtures."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    FluxControlNetModel,
    FluxControlNetPipeline,
    FluxTransformer2DModel,
    SD3ControlNetModel,
    SD3Transformer2DModel,
    StableDiffusion3ControlNetPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import AutoTokenizer, CLIPTokenizer, T5TokenizerFast

from controlnet_trainer import fixtures

CAPTION = re.compile(r"^(\w+) circle with (\w+) background$")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """Everything the CLI writes, built once for the module (this also tests the CLI)."""
    out = tmp_path_factory.mktemp("assets")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        fixtures.main(["--output_dir", str(out), "--num_rows", "6", "--sdxl", "--sd3", "--flux"])
    sd3, flux = ("tiny-sd3", "tiny-controlnet-sd3"), ("tiny-flux", "tiny-controlnet-flux")
    for name in ("fill", "tiny-sd", "tiny-controlnet", "tiny-sdxl", "tiny-controlnet-sdxl", *sd3, *flux):
        assert (out / name).is_dir()
        assert name in printed.getvalue()
    return out


def _fill_batch(seed: int, count: int) -> tuple[list[fixtures.FillSample], torch.Tensor]:
    rng = np.random.default_rng(seed)
    samples = [fixtures.fill_sample(rng, 64) for _ in range(count)]
    pixels = np.stack([np.asarray(s.image) for s in samples])
    return samples, torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _load_rows(path: Path, cache_dir: Path) -> datasets.Dataset:
    return datasets.load_dataset(str(path), cache_dir=str(cache_dir))["train"]


def test_dataset_loads_with_image_features_and_captions(tmp_path):
    path = fixtures.build_fill_dataset(tmp_path / "fill", num_rows=12, size=32, seed=3)
    rows = _load_rows(path, tmp_path / "cache")
    assert len(rows) == 12
    assert set(rows.column_names) == {"image", "conditioning_image", "text"}
    assert isinstance(rows.features["image"], datasets.Image)
    assert isinstance(rows.features["conditioning_image"], datasets.Image)
    assert rows.features["text"] == datasets.Value("string")
    for row in rows:
        assert row["image"].mode == "RGB" and row["image"].size == (32, 32)
        assert row["conditioning_image"].mode == "RGB" and row["conditioning_image"].size == (32, 32)
        circle, background = CAPTION.match(row["text"]).groups()
        assert circle != background
        assert {circle, background} <= set(fixtures.COLOURS)


def test_outline_lies_on_circle_edge_and_colours_match_caption():
    rng = np.random.default_rng(0)
    for _ in range(20):
        sample = fixtures.fill_sample(rng, 64)
        circle, background = CAPTION.match(sample.text).groups()
        image = np.asarray(sample.image)
        is_circle = np.all(image == fixtures.COLOURS[circle], axis=-1)
        assert np.all(is_circle | np.all(image == fixtures.COLOURS[background], axis=-1))
        assert 0 < is_circle.sum() < is_circle.size

        outline = np.asarray(sample.conditioning_image)
        assert set(np.unique(outline)) <= {0, 255}
        is_outline = outline[..., 0] == 255
        # Pixels on the circle/background boundary (a 4-neighbour differs) must all be outlined...
        padded = np.pad(is_circle, 1, mode="edge")
        neighbours = [padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
        edge = np.any([n != is_circle for n in neighbours], axis=0)
        assert np.all(is_outline[edge])
        # ...and every outline pixel lies within 2px of that boundary.
        near_edge = np.zeros_like(edge)
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                near_edge |= np.roll(edge, (dy, dx), axis=(0, 1))
        assert np.all(near_edge[is_outline])


def test_dataset_is_deterministic_per_seed(tmp_path):
    def build(name: str, seed: int) -> tuple[list, list[str]]:
        rows = _load_rows(fixtures.build_fill_dataset(tmp_path / name, num_rows=5, seed=seed), tmp_path / "cache")
        pixels = [np.asarray(r["image"]).tobytes() + np.asarray(r["conditioning_image"]).tobytes() for r in rows]
        return pixels, rows["text"]

    first, again = build("a", 0), build("b", 0)
    assert first == again
    parquet = Path("data/train-00000-of-00001.parquet")
    assert (tmp_path / "a" / parquet).read_bytes() == (tmp_path / "b" / parquet).read_bytes()
    # Rebuilding the same folder with another seed must not load stale cached rows.
    other = build("a", 1)
    assert other[0] != first[0] and other[1] != first[1]


def test_tokenizer_pads_to_77_and_encodes_words_whole(assets, tmp_path):
    tokenizer = CLIPTokenizer.from_pretrained(str(assets / "tiny-sd"), subfolder="tokenizer")
    assert tokenizer.model_max_length == 77
    assert tokenizer.pad_token == "<|endoftext|>"
    for word in [*fixtures.COLOURS, *fixtures.CAPTION_WORDS, *fixtures.EXTRA_WORDS]:
        ids = tokenizer(word).input_ids
        assert tokenizer.convert_ids_to_tokens(ids) == ["<|startoftext|>", f"{word}</w>", "<|endoftext|>"]

    caption = "red circle with blue background"
    assert len(tokenizer(caption).input_ids) == 7
    padded = tokenizer(caption, padding="max_length", truncation=True, max_length=tokenizer.model_max_length)
    assert len(padded.input_ids) == 77
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    reloaded = CLIPTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert reloaded(caption, padding="max_length", truncation=True, max_length=77).input_ids == padded.input_ids


def test_vae_is_near_deterministic_and_unit_scaled(assets):
    vae = AutoencoderKL.from_pretrained(str(assets / "tiny-sd"), subfolder="vae")
    _, images = _fill_batch(seed=99, count=32)  # different images from the calibration set
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
    assert posterior.mean.shape == (32, 4, 8, 8)
    assert posterior.std.max() < 1e-3
    latents = posterior.mean * vae.config.scaling_factor
    assert 0.8 < latents.std().item() < 1.25
    # Latents must carry the image: they vary across images at the same position.
    assert latents.std(dim=0).mean() > 0.1


def test_sd_pipeline_builds_deterministically(assets, tmp_path):
    def unet_weights(path: Path) -> torch.Tensor:
        return UNet2DConditionModel.from_pretrained(str(path), subfolder="unet").conv_in.weight

    same = fixtures.build_tiny_sd(tmp_path / "same", seed=0)
    other = fixtures.build_tiny_sd(tmp_path / "other", seed=1, prediction_type="v_prediction")
    assert torch.equal(unet_weights(assets / "tiny-sd"), unet_weights(same))
    assert not torch.equal(unet_weights(assets / "tiny-sd"), unet_weights(other))
    assert StableDiffusionPipeline.from_pretrained(str(other)).scheduler.config.prediction_type == "v_prediction"


def test_sd_pipeline_generates(assets):
    pipe = StableDiffusionPipeline.from_pretrained(str(assets / "tiny-sd"))
    assert pipe.scheduler.config.prediction_type == "epsilon"
    image = pipe("red circle with blue background", num_inference_steps=2, height=64, width=64, output_type="np")
    assert image.images.shape == (1, 64, 64, 3)


def test_controlnet_pipeline_generates(assets):
    pipe = StableDiffusionPipeline.from_pretrained(str(assets / "tiny-sd"))
    controlnet = ControlNetModel.from_pretrained(str(assets / "tiny-controlnet"))
    assert controlnet.config.block_out_channels == pipe.unet.config.block_out_channels
    control_pipe = StableDiffusionControlNetPipeline(**pipe.components, controlnet=controlnet)
    sample = fixtures.fill_sample(np.random.default_rng(0), 64)
    output = control_pipe(
        sample.text, image=sample.conditioning_image, num_inference_steps=2, height=64, width=64, output_type="np"
    )
    assert output.images.shape == (1, 64, 64, 3)


def test_sdxl_pipeline_and_controlnet_generate(assets):
    pipe = StableDiffusionXLPipeline.from_pretrained(str(assets / "tiny-sdxl"))
    assert pipe.tokenizer_2.pad_token == "!"
    assert pipe.tokenizer.pad_token == "<|endoftext|>"
    output = pipe("green circle with black background", num_inference_steps=2, height=64, width=64, output_type="np")
    assert output.images.shape == (1, 64, 64, 3)

    controlnet = ControlNetModel.from_pretrained(str(assets / "tiny-controlnet-sdxl"))
    assert controlnet.config.addition_embed_type == "text_time"
    control_pipe = StableDiffusionXLControlNetPipeline(**pipe.components, controlnet=controlnet)
    sample = fixtures.fill_sample(np.random.default_rng(1), 64)
    output = control_pipe(
        sample.text, image=sample.conditioning_image, num_inference_steps=2, height=64, width=64, output_type="np"
    )
    assert output.images.shape == (1, 64, 64, 3)


def test_sd15_proportioned_vae_costs_what_sd15_encoding_costs(tmp_path):
    """The benchmark's cache comparison relies on this share: SD 1.5 at 512 px spends 1.12 TFLOP
    in the VAE encoder per 2.33 TFLOP of ControlNet and UNet work (0.48)."""
    from torch.utils.flop_counter import FlopCounterMode

    path = fixtures.build_tiny_sd(tmp_path / "sd", vae_channels=fixtures.SD15_PROPORTIONED_VAE_CHANNELS)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet").requires_grad_(False)
    controlnet = ControlNetModel.from_unet(unet)
    latents, timesteps = torch.randn(4, 4, 8, 8), torch.randint(0, 1000, (4,))
    text = torch.randn(4, fixtures.MODEL_MAX_LENGTH, fixtures.TEXT_HIDDEN_SIZE)
    with FlopCounterMode(display=False) as step:
        down, mid = controlnet(latents, timesteps, text, controlnet_cond=torch.rand(4, 3, 64, 64), return_dict=False)
        unet(
            latents, timesteps, text, down_block_additional_residuals=down, mid_block_additional_residual=mid
        ).sample.sum().backward()
    with torch.no_grad(), FlopCounterMode(display=False) as encode:
        vae.encode(torch.randn(4, 3, 64, 64))
    assert encode.get_total_flops() / step.get_total_flops() == pytest.approx(1.12 / 2.33, rel=0.05)
    scale = vae.config.scaling_factor  # calibrated like the default VAE
    latent = vae.encode(fixtures._calibration_batch()).latent_dist.mean * scale
    assert latent.std().item() == pytest.approx(1.0, rel=0.01)


# A StableDiffusion3Pipeline folder: the transformer, VAE, scheduler and three text encoders.
SD3_FOLDERS = {
    "transformer",
    "vae",
    "scheduler",
    *(f"{part}{n}" for part in ("text_encoder", "tokenizer") for n in ("", "_2", "_3")),
}


def test_sd3_pipeline_folder_and_build_are_deterministic(assets, tiny_sd3):
    folder = tiny_sd3["sd3"]
    assert {p.name for p in folder.iterdir() if p.is_dir()} == SD3_FOLDERS
    assert (folder / "model_index.json").is_file()

    def weights(path: Path) -> torch.Tensor:
        return SD3Transformer2DModel.from_pretrained(str(path), subfolder="transformer").pos_embed.proj.weight

    # The CLI's tiny-sd3 and the session's are both built from seed 0.
    assert torch.equal(weights(assets / "tiny-sd3"), weights(folder))


def test_t5_tokenizer_encodes_caption_words_to_distinct_ids_and_pads(tiny_sd3):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_sd3["sd3"]), subfolder="tokenizer_3")
    assert tokenizer.model_max_length == fixtures.T5_MAX_LENGTH
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<pad>", 0)
    assert tokenizer.eos_token == "</s>"
    words = [*fixtures.COLOURS, *fixtures.CAPTION_WORDS, *fixtures.EXTRA_WORDS]
    word_ids = {}
    for word in words:
        ids = tokenizer(word).input_ids
        assert tokenizer.convert_ids_to_tokens(ids) == [f"▁{word}", "</s>"]
        word_ids[word] = ids[0]
    assert len(set(word_ids.values())) == len(words)
    assert tokenizer.unk_token_id not in word_ids.values()

    caption = "red circle with blue background"
    ids = tokenizer(caption).input_ids
    assert ids == [word_ids[w] for w in caption.split()] + [tokenizer.eos_token_id]
    assert tokenizer.decode(ids, skip_special_tokens=True) == caption
    padded = tokenizer(caption, padding="max_length", truncation=True, max_length=tokenizer.model_max_length)
    assert padded.input_ids == ids + [0] * (fixtures.T5_MAX_LENGTH - len(ids))
    assert sum(padded.attention_mask) == len(ids)
    # Other words split into characters rather than vanishing into <unk>.
    assert tokenizer.unk_token_id not in tokenizer("Dodecagon 12").input_ids
    fast = T5TokenizerFast.from_pretrained(str(tiny_sd3["sd3"] / "tokenizer_3"))
    assert fast(caption, padding="max_length", max_length=fast.model_max_length).input_ids == padded.input_ids


def _assert_shift_and_scaling_centre_latents(vae: AutoencoderKL) -> None:
    # The pipeline's vae_scale_factor: 64 px -> 8x8 latents, a whole number of 2x2 patches.
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8
    _, images = _fill_batch(seed=99, count=32)  # different images from the calibration set
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
    assert posterior.mean.shape == (32, fixtures.SD3_LATENT_CHANNELS, 8, 8)
    assert posterior.std.max() < 1e-3
    shift, scaling = vae.config.shift_factor, vae.config.scaling_factor
    latents = (posterior.mean - shift) * scaling
    assert abs(latents.mean().item()) < 0.1
    assert 0.8 < latents.std().item() < 1.25
    assert latents.std(dim=0).mean() > 0.1  # latents carry the image
    # Raw latents are off-centre and narrow: without the shift and scaling both checks above fail.
    assert abs(posterior.mean.mean().item()) > 0.3
    assert posterior.mean.std().item() < 0.5


def test_sd3_vae_shift_and_scaling_centre_latents(tiny_sd3):
    _assert_shift_and_scaling_centre_latents(AutoencoderKL.from_pretrained(str(tiny_sd3["sd3"]), subfolder="vae"))


def test_sd3_controlnet_pipeline_generates(tiny_sd3):
    controlnet = SD3ControlNetModel.from_pretrained(str(tiny_sd3["controlnet_sd3"]))
    assert controlnet.config.num_layers == 12 and controlnet.config.extra_conditioning_channels == 0
    pipe = StableDiffusion3ControlNetPipeline.from_pretrained(str(tiny_sd3["sd3"]), controlnet=controlnet)
    assert pipe.scheduler.config.shift == 3.0
    sample = fixtures.fill_sample(np.random.default_rng(2), 64)
    length = fixtures.T5_MAX_LENGTH
    prompt_embeds, _, pooled, _ = pipe.encode_prompt(
        sample.text, None, None, do_classifier_free_guidance=False, max_sequence_length=length
    )
    # Both CLIP states (77 tokens, 32 + 32 wide) zero-padded to the T5 width, then T5's 77 tokens.
    clip_width = 2 * fixtures.TEXT_HIDDEN_SIZE
    assert prompt_embeds.shape == (1, fixtures.MODEL_MAX_LENGTH + length, fixtures.T5_D_MODEL)
    assert torch.all(prompt_embeds[:, : fixtures.MODEL_MAX_LENGTH, clip_width:] == 0)
    assert pooled.shape == (1, clip_width)
    output = pipe(
        sample.text,
        control_image=sample.conditioning_image,
        num_inference_steps=2,
        height=64,
        width=64,
        max_sequence_length=length,
        output_type="np",
    )
    assert output.images.shape == (1, 64, 64, 3)


def test_sd3_pipeline_generates_without_t5(tiny_sd3):
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3["sd3"]), text_encoder_3=None, tokenizer_3=None)
    length = fixtures.T5_MAX_LENGTH
    prompt_embeds, *_ = pipe.encode_prompt(
        "blue circle", None, None, do_classifier_free_guidance=False, max_sequence_length=length
    )
    assert torch.all(prompt_embeds[:, fixtures.MODEL_MAX_LENGTH :] == 0)  # T5's place is zeros
    output = pipe(
        "blue circle", num_inference_steps=2, height=64, width=64, max_sequence_length=length, output_type="np"
    )
    assert output.images.shape == (1, 64, 64, 3)


# A FluxPipeline folder: the transformer, VAE, scheduler, a CLIP and a T5 encoder.
FLUX_FOLDERS = {"transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"}


def test_flux_pipeline_folder_and_build_are_deterministic(assets, tiny_flux):
    folder = tiny_flux["flux"]
    assert {p.name for p in folder.iterdir() if p.is_dir()} == FLUX_FOLDERS
    assert (folder / "model_index.json").is_file()

    def weights(path: Path) -> torch.Tensor:
        return FluxTransformer2DModel.from_pretrained(str(path), subfolder="transformer").x_embedder.weight

    # The CLI's tiny-flux and the session's are both built from seed 0.
    assert torch.equal(weights(assets / "tiny-flux"), weights(folder))


def test_flux_vae_shift_and_scaling_centre_latents(tiny_flux):
    vae = AutoencoderKL.from_pretrained(str(tiny_flux["flux"]), subfolder="vae")
    # FLUX.1's VAE layout: the posterior comes straight from the encoder and goes straight to the decoder.
    assert not vae.config.use_quant_conv and not vae.config.use_post_quant_conv
    _assert_shift_and_scaling_centre_latents(vae)


def test_flux_prompt_encoding_pads_t5_to_512_tokens(tiny_flux):
    pipe = FluxControlNetPipeline.from_pretrained(
        str(tiny_flux["flux"]), controlnet=FluxControlNetModel.from_pretrained(str(tiny_flux["controlnet_flux"]))
    )
    length = fixtures.FLUX_T5_MAX_LENGTH
    assert pipe.tokenizer_2.model_max_length == length
    assert pipe.tokenizer.model_max_length == fixtures.MODEL_MAX_LENGTH
    caption = "red circle with blue background"
    padded = pipe.tokenizer_2(caption, padding="max_length", truncation=True, max_length=length).input_ids
    ids = pipe.tokenizer_2(caption).input_ids
    assert padded == ids + [pipe.tokenizer_2.pad_token_id] * (length - len(ids))

    # The pipeline's default max_sequence_length: T5's 512 token states, CLIP's pooled output.
    prompt_embeds, pooled, text_ids = pipe.encode_prompt(caption, None)
    assert prompt_embeds.shape == (1, length, fixtures.T5_D_MODEL)
    assert pooled.shape == (1, fixtures.TEXT_HIDDEN_SIZE)
    assert text_ids.shape == (length, 3)
    transformer = pipe.transformer.config
    assert (transformer.joint_attention_dim, transformer.pooled_projection_dim) == (
        prompt_embeds.shape[-1],
        pooled.shape[-1],
    )


def test_flux_controlnet_pipeline_generates(tiny_flux):
    controlnet = FluxControlNetModel.from_pretrained(str(tiny_flux["controlnet_flux"]))
    # As train_controlnet_flux.py builds it by default: 4 double and 4 single blocks, a zeroed
    # control embedder, and the transformer's heads and guidance embedding.
    assert (controlnet.config.num_layers, controlnet.config.num_single_layers) == (4, 4)
    assert torch.all(controlnet.controlnet_x_embedder.weight == 0)
    pipe = FluxControlNetPipeline.from_pretrained(str(tiny_flux["flux"]), controlnet=controlnet)
    transformer = pipe.transformer.config
    assert transformer.guidance_embeds and controlnet.config.guidance_embeds
    assert transformer.in_channels == 4 * pipe.vae.config.latent_channels  # 2x2 packed latents
    assert sum(transformer.axes_dims_rope) == transformer.attention_head_dim
    # Each ControlNet block feeds a whole number of transformer blocks, so none goes unused.
    assert transformer.num_layers % controlnet.config.num_layers == 0
    assert transformer.num_single_layers % controlnet.config.num_single_layers == 0
    scheduler = pipe.scheduler.config
    assert scheduler.use_dynamic_shifting and (scheduler.base_shift, scheduler.max_shift) == (0.5, 1.15)

    sample = fixtures.fill_sample(np.random.default_rng(3), 64)
    output = pipe(
        sample.text,
        control_image=sample.conditioning_image,
        num_inference_steps=2,
        height=64,
        width=64,
        guidance_scale=3.5,
        output_type="np",
    )
    assert output.images.shape == (1, 64, 64, 3)
    # 64 px: 8x8 latents, 16 packed tokens, for which the dynamic shift moves the middle sigma off 0.5.
    assert 0.5 < pipe.scheduler.sigmas[1].item() < 0.7
