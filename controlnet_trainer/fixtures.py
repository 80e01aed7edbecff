"""Tiny, offline, seed-deterministic Stable Diffusion assets for tests, the demo and benchmarks.

Everything is built from random weights: a synthetic "fill" dataset in the style of
fusing/fill50k, tiny SD 1.x / SDXL / SD3 / FLUX.1 pipelines in diffusers format, and ControlNets
made from their UNets or, for SD3 and FLUX.1, their transformers.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import shutil
import string
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import datasets
import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDPMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxControlNetModel,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3ControlNetModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import Unigram
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

logger = logging.getLogger(__name__)

# Named colours for circles and backgrounds; captions name them, so all are in the vocabulary.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 40),
    "cyan": (40, 210, 220),
    "magenta": (210, 40, 200),
    "orange": (250, 140, 20),
    "purple": (120, 40, 160),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
CAPTION_WORDS = ("circle", "with", "background")
EXTRA_WORDS = ("a", "an", "the", "and", "of", "on", "in", "photo", "image", "small", "large", "square")
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
MODEL_MAX_LENGTH = 77
TEXT_HIDDEN_SIZE = 32
LATENT_CHANNELS = 4
OUTLINE_HALF_WIDTH = 1.0  # pixels either side of the circle's edge: a ~2px line
CALIBRATION_SAMPLES = 64
# exp(-20 / 2) ~ 4.5e-5: a near-deterministic posterior, as a trained VAE has.
POSTERIOR_LOGVAR = -20.0
VAE_CHANNELS = (8, 16, 32, 32)
# Wide enough that, at 64 px, the VAE encoder costs 0.47x the FLOPs of the ControlNet forward and
# backward plus the UNet's, as in SD 1.5 at 512 px (1.12 / 2.33 TFLOP): what caching saves on a
# real model. The default VAE costs 0.06x, so caching can barely show there.
SD15_PROPORTIONED_VAE_CHANNELS = (24, 48, 80, 80)

# SD3: 16 latent channels as in SD3's VAE; T5 ids as in t5-v1_1 (<pad>=0, </s>=1, <unk>=2).
SD3_LATENT_CHANNELS = 16
T5_PAD_TOKEN, T5_EOS_TOKEN, T5_UNK_TOKEN = "<pad>", "</s>", "<unk>"
# As diffusers' train_controlnet_sd3.py pads T5 prompts (--max_sequence_length=77).
T5_MAX_LENGTH = 77
# Wider than the two CLIP hidden states side by side (2 x 32), so encode_prompt's zero-padding of
# the CLIP states to the T5 width is real, as in SD3 (768 + 1280 padded to 4096).
T5_D_MODEL = 96
# Random encoders centre their latents near zero. SD3's sit off-centre (shift_factor 0.0609);
# a larger offset makes code that forgets shift_factor visibly wrong in tests.
SD3_LATENT_OFFSET = 0.5


class FillSample(NamedTuple):
    image: Image.Image
    conditioning_image: Image.Image
    text: str


def fill_sample(rng: np.random.Generator, size: int = 64, width: int | None = None) -> FillSample:
    """One fill50k-style sample: a filled circle, its outline and a caption naming both colours.

    The image is ``size`` pixels high and ``width`` (default ``size``) wide.
    """
    height, width = size, width or size
    names = list(COLOURS)
    circle_idx, background_idx = rng.choice(len(names), size=2, replace=False)
    radius = rng.uniform(0.12, 0.35) * min(height, width)
    # Keep the outline fully inside the frame so every sample has a complete edge to learn.
    margin = radius + OUTLINE_HALF_WIDTH + 1
    cx, cy = rng.uniform(margin, np.array([width, height]) - margin)

    # One distance map drives both images, so the outline sits exactly on the circle's edge.
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    distance = np.hypot(xs - cx, ys - cy)
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = COLOURS[names[background_idx]]
    image[distance <= radius] = COLOURS[names[circle_idx]]
    outline = np.zeros((height, width, 3), dtype=np.uint8)
    outline[np.abs(distance - radius) <= OUTLINE_HALF_WIDTH] = 255

    text = f"{names[circle_idx]} circle with {names[background_idx]} background"
    return FillSample(Image.fromarray(image), Image.fromarray(outline), text)


def _fill_table(samples: Sequence[FillSample]) -> datasets.Dataset:
    """The samples as a Dataset with Image features, the layout every fill form shares."""
    features = datasets.Features(
        {"image": datasets.Image(), "conditioning_image": datasets.Image(), "text": datasets.Value("string")}
    )
    columns = {
        "image": [s.image for s in samples],
        "conditioning_image": [s.conditioning_image for s in samples],
        "text": [s.text for s in samples],
    }
    return datasets.Dataset.from_dict(columns, features=features)


def build_fill_dataset(
    path: str | Path, num_rows: int = 200, size: int = 64, seed: int = 0, *, aspect_ratios: Sequence[float] = ()
) -> Path:
    """Write a parquet dataset that `datasets.load_dataset(str(path))["train"]` loads.

    With ``aspect_ratios`` (width / height), each row's image is ``size`` high and as wide as one
    of them, drawn at random: data for aspect-ratio bucketing.
    """
    path = Path(path)
    dataset = _fill_table(_fill_samples(num_rows, size, seed, aspect_ratios))
    # No README.md with `configs:`: datasets would cache by folder name and serve stale rows.
    out_file = path / "data" / "train-00000-of-00001.parquet"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    dataset.to_parquet(str(out_file))
    return path


FILL_KEYS = ("image", "conditioning_image", "text")


def _fill_samples(num_rows: int, size: int, seed: int, aspect_ratios: Sequence[float] = ()) -> list[FillSample]:
    """The rows build_fill_dataset writes for the same arguments, in the same order."""
    rng = np.random.default_rng(seed)
    if not aspect_ratios:
        return [fill_sample(rng, size) for _ in range(num_rows)]
    widths = [round(size * aspect_ratios[i]) for i in rng.integers(len(aspect_ratios), size=num_rows)]
    return [fill_sample(rng, size, width) for width in widths]


def write_fill_folder(
    path: str | Path,
    num_rows: int = 200,
    size: int = 64,
    seed: int = 0,
    metadata: str = "jsonl",
    keys: tuple[str, str, str] = FILL_KEYS,
) -> Path:
    """The fill rows as PNG files under images/ and conditioning/ plus metadata.jsonl or metadata.csv.

    ``keys`` name the metadata's image, conditioning image and caption fields, e.g.
    ("file_name", "conditioning_file_name", "text") for the imagefolder convention. Paths in the
    metadata are relative to ``path``, as users write them.
    """
    if metadata not in ("jsonl", "csv"):
        raise ValueError(f"metadata must be 'jsonl' or 'csv', got {metadata!r}")
    path = Path(path)
    for folder in ("images", "conditioning"):
        (path / folder).mkdir(parents=True, exist_ok=True)
    image_key, conditioning_key, caption_key = keys
    rows = []
    for index, sample in enumerate(_fill_samples(num_rows, size, seed)):
        image, conditioning = f"images/{index}.png", f"conditioning/{index}.png"
        sample.image.save(path / image)
        sample.conditioning_image.save(path / conditioning)
        rows.append({image_key: image, conditioning_key: conditioning, caption_key: sample.text})
    if metadata == "jsonl":
        (path / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        with open(path / "metadata.csv", "w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=list(keys))
            writer.writeheader()
            writer.writerows(rows)
    return path


def write_fill_saved(
    path: str | Path, num_rows: int = 200, size: int = 64, seed: int = 0, *, dict_format: bool = True
) -> Path:
    """The fill rows written by save_to_disk: a DatasetDict with a train split, or a bare Dataset."""
    path = Path(path)
    dataset = _fill_table(_fill_samples(num_rows, size, seed))
    (datasets.DatasetDict({"train": dataset}) if dict_format else dataset).save_to_disk(str(path))
    return path


def write_fill_webdataset(
    path: str | Path, num_rows: int = 200, size: int = 64, seed: int = 0, *, rows_per_shard: int = 50
) -> Path:
    """The fill rows as WebDataset tar shards: ``<key>.image.png``, ``<key>.conditioning_image.png``
    and ``<key>.text.txt`` per row, ``rows_per_shard`` rows per ``train-NNNNN.tar``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    samples = _fill_samples(num_rows, size, seed)
    for shard, start in enumerate(range(0, num_rows, rows_per_shard)):
        with tarfile.open(path / f"train-{shard:05d}.tar", "w") as tar:
            for index in range(start, min(start + rows_per_shard, num_rows)):
                sample = samples[index]
                key = f"{index:08d}"
                _add_to_tar(tar, f"{key}.image.png", _png_bytes(sample.image))
                _add_to_tar(tar, f"{key}.conditioning_image.png", _png_bytes(sample.conditioning_image))
                _add_to_tar(tar, f"{key}.text.txt", sample.text.encode())
    return path


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _add_to_tar(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def write_validation_images(path: str | Path, count: int = 2, size: int = 64, seed: int = 1000) -> list[Path]:
    """Conditioning images (outlines) and their captions, from a seed the dataset does not use."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = []
    for index in range(count):
        sample = fill_sample(rng, size)
        image_path = path / f"conditioning_{index}.png"
        sample.conditioning_image.save(image_path)
        image_path.with_suffix(".txt").write_text(sample.text)
        written.append(image_path)
    return written


def _byte_characters() -> list[str]:
    """CLIP/GPT-2 byte-level alphabet: printable bytes map to themselves, the rest to U+0100 onwards."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Tokenise one word the way BPE does: repeatedly merge the best-ranked adjacent pair."""
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols = [*symbols[:i], symbols[i] + symbols[i + 1], *symbols[i + 2 :]]
    return symbols


def _bpe_vocabulary(words: Sequence[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges that encode each (ASCII) word as one "word</w>" token."""
    alphabet = _byte_characters()
    tokens = [*alphabet, *(c + "</w>" for c in alphabet)]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        # Merges are only ever appended, i.e. at the lowest priority, so they never change
        # how an earlier word tokenises; keep adding until this word is a single token.
        while len(pieces := _apply_merges([*word[:-1], word[-1] + "</w>"], ranks)) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            tokens.append(pair[0] + pair[1])
    # Two merge paths can build the same string; ids must stay contiguous.
    tokens = list(dict.fromkeys([*tokens, BOS_TOKEN, EOS_TOKEN]))
    return {token: i for i, token in enumerate(tokens)}, merges


def write_tokenizer(directory: Path, pad_token: str) -> CLIPTokenizer:
    """Write vocab.json/merges.txt/tokenizer_config.json as real SD repos have, then load them."""
    words = sorted({*COLOURS, *CAPTION_WORDS, *EXTRA_WORDS})
    vocab, merges = _bpe_vocabulary(words)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        # Without model_max_length, padding="max_length" has no length to pad to.
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": pad_token,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    # CLIPTokenizer(vocab_file=...) silently ignores the files in transformers 5; from_pretrained reads them.
    return CLIPTokenizer.from_pretrained(str(directory))


def _text_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        projection_dim=TEXT_HIDDEN_SIZE,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _calibration_batch(size: int = 64) -> torch.Tensor:
    """Fill images in [-1, 1]; a fixed seed so the scaling factor depends only on the VAE weights."""
    rng = np.random.default_rng(12345)
    images = np.stack([np.asarray(fill_sample(rng, size).image) for _ in range(CALIBRATION_SAMPLES)])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@torch.no_grad()
def _build_vae(block_out_channels: tuple[int, ...] = VAE_CHANNELS) -> AutoencoderKL:
    """An 8x-downsampling VAE whose latents carry the image, not sampling noise, at unit scale."""
    # Four blocks: each but the last halves the resolution, giving 64 px -> 8x8 latents.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=block_out_channels,
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=64,
    )
    # A random VAE predicts std ~1 against means spread ~0.25; pin the log-variance half instead.
    vae.quant_conv.weight[LATENT_CHANNELS:] = 0.0
    vae.quant_conv.bias[LATENT_CHANNELS:] = POSTERIOR_LOGVAR

    posterior = _calibration_posterior(vae)
    spread = posterior.mean.std().item()
    # Real SD VAEs scale latents to unit std; training and sampling assume that.
    vae.register_to_config(scaling_factor=1.0 / spread)
    logger.info("VAE scaling_factor=%.4f, posterior std=%.2e", 1.0 / spread, posterior.std.max().item())
    return vae


def _calibration_posterior(vae: AutoencoderKL) -> DiagonalGaussianDistribution:
    """The VAE's posterior on the calibration batch, checked to depend on the image."""
    posterior = vae.encode(_calibration_batch()).latent_dist
    between_images = posterior.mean.std(dim=0).mean().item()
    if between_images < 0.1 * posterior.mean.std().item():
        raise RuntimeError("VAE latents do not depend on the input image")
    return posterior


@torch.no_grad()
def _build_sd3_vae() -> AutoencoderKL:
    """An SD3-style VAE: 16 latent channels, no quant convs, and latents that
    ``(mean - shift_factor) * scaling_factor`` brings to zero mean and unit std."""
    # Four blocks, 8x downsampling as in SD3: 64 px -> 8x8 latents, 4x4 patches of 2.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=VAE_CHANNELS,
        layers_per_block=1,
        latent_channels=SD3_LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=64,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    # With no quant_conv, the encoder's last conv yields the posterior: mean half, log-variance half.
    conv_out = vae.encoder.conv_out
    conv_out.weight[SD3_LATENT_CHANNELS:] = 0.0
    conv_out.bias[SD3_LATENT_CHANNELS:] = POSTERIOR_LOGVAR
    conv_out.bias[:SD3_LATENT_CHANNELS] += SD3_LATENT_OFFSET

    mean = _calibration_posterior(vae).mean
    shift = mean.mean().item()
    scaling = 1.0 / (mean - shift).std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=scaling)
    logger.info("SD3 VAE shift_factor=%.4f, scaling_factor=%.4f", shift, scaling)
    return vae


def _unet(**extra) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=8,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4),
        norm_num_groups=32,
        **extra,
    )


def _scheduler_betas() -> dict:
    return {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def build_tiny_sd(
    path: str | Path,
    seed: int = 0,
    *,
    prediction_type: str = "epsilon",
    vae_channels: tuple[int, ...] = VAE_CHANNELS,
    use_linear_projection: bool = False,
) -> Path:
    """A tiny SD 1.x pipeline, or SD 2.x-like with prediction_type="v_prediction" and
    use_linear_projection=True (SD 2.x's transformers project in and out with linear layers,
    SD 1.x's with 1x1 convolutions).

    ``vae_channels=SD15_PROPORTIONED_VAE_CHANNELS`` gives the VAE encoder SD 1.5's share of a
    training step, for benchmarks of the latent cache.
    """
    path = Path(path)
    torch.manual_seed(seed)
    tokenizer = write_tokenizer(path / "tokenizer", pad_token=EOS_TOKEN)
    # DDPMScheduler has no set_alpha_to_one (a DDIM/PNDM option); the rest matches SD 1.x.
    scheduler = DDPMScheduler(**_scheduler_betas(), prediction_type=prediction_type, clip_sample=False, steps_offset=1)
    pipeline = StableDiffusionPipeline(
        vae=_build_vae(vae_channels),
        text_encoder=CLIPTextModel(_text_config(tokenizer)),
        tokenizer=tokenizer,
        unet=_unet(cross_attention_dim=TEXT_HIDDEN_SIZE, use_linear_projection=use_linear_projection),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(path)
    return path


def build_tiny_sdxl(path: str | Path, seed: int = 0, *, prediction_type: str = "epsilon") -> Path:
    """A tiny SDXL pipeline: two text encoders and a UNet with text_time added conditioning."""
    path = Path(path)
    torch.manual_seed(seed)
    tokenizer = write_tokenizer(path / "tokenizer", pad_token=EOS_TOKEN)
    tokenizer_2 = write_tokenizer(path / "tokenizer_2", pad_token="!")  # as real SDXL pads its second one
    time_embed_dim = 8
    unet = _unet(
        # Penultimate hidden states of both encoders are concatenated: 32 + 32.
        cross_attention_dim=2 * TEXT_HIDDEN_SIZE,
        transformer_layers_per_block=1,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        # Pooled text embeds plus six size/crop time ids, each embedded to time_embed_dim.
        projection_class_embeddings_input_dim=TEXT_HIDDEN_SIZE + 6 * time_embed_dim,
    )
    scheduler = EulerDiscreteScheduler(
        **_scheduler_betas(), prediction_type=prediction_type, steps_offset=1, timestep_spacing="leading"
    )
    pipeline = StableDiffusionXLPipeline(
        vae=_build_vae(),
        text_encoder=CLIPTextModel(_text_config(tokenizer)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer_2)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    pipeline.save_pretrained(path)
    return path


def write_t5_tokenizer(directory: Path, model_max_length: int = T5_MAX_LENGTH) -> T5Tokenizer:
    """A Unigram tokenizer.json in T5's layout, where every caption word is one "▁word" piece.

    Single characters back the words up, so other text splits into characters rather than <unk>.
    ``model_max_length`` is the length the pipeline's repo declares: 77 in this SD3 fixture, 512
    in FLUX.1's.
    """
    words = sorted({*COLOURS, *CAPTION_WORDS, *EXTRA_WORDS})
    specials = [T5_PAD_TOKEN, T5_EOS_TOKEN, T5_UNK_TOKEN]
    # Unigram picks the segmentation with the highest total score: one word piece (-1) beats
    # any split into characters (-10 each).
    pieces = [
        *((token, 0.0) for token in specials),
        *((f"▁{word}", -1.0) for word in words),
        ("▁", -5.0),
        *((char, -10.0) for char in string.ascii_letters + string.digits + string.punctuation),
    ]
    tokenizer = Tokenizer(Unigram(pieces, unk_id=specials.index(T5_UNK_TOKEN), byte_fallback=False))
    tokenizer.add_special_tokens(specials)
    # T5's tokenizer.json less its sentencepiece normaliser: split on whitespace, mark word starts
    # with "▁", and end every sequence with </s>.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    eos_id = specials.index(T5_EOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=["$A", T5_EOS_TOKEN],
        pair=["$A", T5_EOS_TOKEN, "$B", T5_EOS_TOKEN],
        special_tokens=[(T5_EOS_TOKEN, eos_id)],
    )
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "T5Tokenizer",
        "model_max_length": model_max_length,
        "eos_token": T5_EOS_TOKEN,
        "unk_token": T5_UNK_TOKEN,
        "pad_token": T5_PAD_TOKEN,
        # No <extra_id_N> sentinels: they serve T5's span-corruption pretraining, not encoding.
        "extra_ids": 0,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return T5Tokenizer.from_pretrained(str(directory))


def _t5_config(tokenizer: T5Tokenizer) -> T5Config:
    # A t5-v1_1-style encoder (gated-GELU feed-forward), as SD3's T5-XXL is.
    return T5Config(
        vocab_size=len(tokenizer),
        d_model=T5_D_MODEL,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )


SD3_LAYERS = 24


def _sd3_transformer() -> SD3Transformer2DModel:
    heads, head_dim = 4, 8
    return SD3Transformer2DModel(
        sample_size=8,  # latent size of the default 64 px image
        patch_size=2,
        in_channels=SD3_LATENT_CHANNELS,
        out_channels=SD3_LATENT_CHANNELS,
        # SD3 Medium's depth: a ControlNet built by from_transformer (12 blocks) then feeds every
        # pair of transformer blocks, as on the real model.
        num_layers=SD3_LAYERS,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=T5_D_MODEL,
        # The text tokens join the image tokens in each block's attention, so share its width.
        caption_projection_dim=heads * head_dim,
        # The pipeline concatenates both CLIP encoders' projected pooled outputs.
        pooled_projection_dim=2 * TEXT_HIDDEN_SIZE,
        # 16 patches a side: images up to 256 px at 8x downsampling and patches of 2.
        pos_embed_max_size=16,
    )


def build_tiny_sd3(path: str | Path, seed: int = 0) -> Path:
    """A tiny SD3 pipeline: two CLIP encoders with projections, a T5 encoder, an MMDiT transformer
    and a flow-matching scheduler."""
    path = Path(path)
    torch.manual_seed(seed)
    tokenizer = write_tokenizer(path / "tokenizer", pad_token=EOS_TOKEN)
    tokenizer_2 = write_tokenizer(path / "tokenizer_2", pad_token="!")  # as real SD3 pads its second one
    tokenizer_3 = write_t5_tokenizer(path / "tokenizer_3")
    pipeline = StableDiffusion3Pipeline(
        transformer=_sd3_transformer(),
        # SD3's scheduler_config.json: the rest is FlowMatchEulerDiscreteScheduler's defaults.
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_build_sd3_vae(),
        text_encoder=CLIPTextModelWithProjection(_text_config(tokenizer)),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer_2)),
        tokenizer_2=tokenizer_2,
        text_encoder_3=T5EncoderModel(_t5_config(tokenizer_3)),
        tokenizer_3=tokenizer_3,
    )
    pipeline.save_pretrained(path)
    return path


# FLUX.1-dev's depth is 19 double-stream and 38 single-stream blocks. The tiny one keeps the
# ControlNet a prefix of the transformer, as there, and uses every ControlNet block: the
# transformer adds ControlNet sample i // ceil(blocks / samples) at block i, so each depth here is
# a multiple of the ControlNet's (4 double; 4 single by the script's default, 10 by
# from_transformer's).
FLUX_DOUBLE_LAYERS, FLUX_SINGLE_LAYERS = 8, 20
# train_controlnet_flux.py's --num_double_layers and --num_single_layers defaults.
FLUX_CONTROLNET_DOUBLE_LAYERS, FLUX_CONTROLNET_SINGLE_LAYERS = 4, 4
# FluxPipeline pads T5 prompts to max_sequence_length, 512 by default and at most; FLUX.1-dev's
# tokenizer_2 declares the same model_max_length.
FLUX_T5_MAX_LENGTH = 512
# FLUX.1-dev's scheduler_config.json. With dynamic shifting, the pipeline shifts the sigmas by an
# amount (mu) that grows with the image's token count; `shift` then goes unused.
FLUX_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


def _flux_transformer() -> FluxTransformer2DModel:
    heads, head_dim = 4, 16
    return FluxTransformer2DModel(
        # The pipeline packs each 2x2 patch of latents into one token, hence patch_size 1 and
        # four times the VAE's channels: 64, as in FLUX.1.
        patch_size=1,
        in_channels=4 * SD3_LATENT_CHANNELS,
        num_layers=FLUX_DOUBLE_LAYERS,
        num_single_layers=FLUX_SINGLE_LAYERS,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=T5_D_MODEL,
        # CLIP's pooled output (its hidden size: CLIPTextModel has no projection).
        pooled_projection_dim=TEXT_HIDDEN_SIZE,
        # FLUX.1-dev is guidance-distilled: the guidance scale is an input, embedded like the timestep.
        guidance_embeds=True,
        # Rotary dimensions per position axis (unused, row, column) sum to the head size, as
        # FLUX.1's (16, 56, 56) do to 128.
        axes_dims_rope=(4, 6, 6),
    )


def build_tiny_flux(path: str | Path, seed: int = 0) -> Path:
    """A tiny FLUX.1-dev pipeline: a CLIP encoder for the pooled prompt, a T5 encoder for the
    token states, a guidance-embedding transformer and a dynamically shifted flow-matching
    scheduler."""
    path = Path(path)
    torch.manual_seed(seed)
    tokenizer = write_tokenizer(path / "tokenizer", pad_token=EOS_TOKEN)
    tokenizer_2 = write_t5_tokenizer(path / "tokenizer_2", model_max_length=FLUX_T5_MAX_LENGTH)
    pipeline = FluxPipeline(
        transformer=_flux_transformer(),
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
        # FLUX.1's VAE has SD3's layout: 16 latent channels, no quant convs, shift and scaling
        # factors (0.1159 and 0.3611 there, calibrated here).
        vae=_build_sd3_vae(),
        text_encoder=CLIPTextModel(_text_config(tokenizer)),
        tokenizer=tokenizer,
        text_encoder_2=T5EncoderModel(_t5_config(tokenizer_2)),
        tokenizer_2=tokenizer_2,
    )
    pipeline.save_pretrained(path)
    return path


def copy_with_scheduler(pipeline_dir: str | Path, path: str | Path, **overrides) -> Path:
    """A copy of a pipeline folder whose scheduler config has ``overrides``: the same weights
    under another prediction_type, or few num_train_timesteps so a short run surely draws the
    last one."""
    path = Path(path)
    shutil.copytree(pipeline_dir, path)
    config_path = path / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    unknown = set(overrides) - set(config)
    if unknown:
        raise ValueError(f"{config_path} has no {sorted(unknown)}")
    config_path.write_text(json.dumps(config | overrides, indent=2))
    return path


def build_tiny_controlnet(pipeline_dir: str | Path, path: str | Path) -> Path:
    """A ControlNet initialised from a pipeline's UNet (SD or SDXL)."""
    unet = UNet2DConditionModel.from_pretrained(str(pipeline_dir), subfolder="unet")
    ControlNetModel.from_unet(unet).save_pretrained(str(path))
    return Path(path)


def build_tiny_sd3_controlnet(pipeline_dir: str | Path, path: str | Path) -> Path:
    """An SD3 ControlNet initialised from a pipeline's transformer as train_controlnet_sd3.py builds
    one: its first 12 blocks, and no extra conditioning channels (those serve inpainting
    ControlNets, which take a mask beside the image)."""
    transformer = SD3Transformer2DModel.from_pretrained(str(pipeline_dir), subfolder="transformer")
    controlnet = SD3ControlNetModel.from_transformer(transformer, num_extra_conditioning_channels=0)
    controlnet.save_pretrained(str(path))
    return Path(path)


def build_tiny_flux_controlnet(
    pipeline_dir: str | Path,
    path: str | Path,
    *,
    num_double_layers: int = FLUX_CONTROLNET_DOUBLE_LAYERS,
    num_single_layers: int = FLUX_CONTROLNET_SINGLE_LAYERS,
) -> Path:
    """A FLUX.1 ControlNet initialised from a pipeline's transformer as train_controlnet_flux.py
    builds one: the transformer's heads, its first ``num_double_layers`` double-stream and
    ``num_single_layers`` single-stream blocks, and a zeroed embedder for the packed control latents."""
    transformer = FluxTransformer2DModel.from_pretrained(str(pipeline_dir), subfolder="transformer")
    controlnet = FluxControlNetModel.from_transformer(
        transformer,
        num_layers=num_double_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=transformer.config.attention_head_dim,
        num_attention_heads=transformer.config.num_attention_heads,
    )
    controlnet.save_pretrained(str(path))
    return Path(path)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Build tiny offline Stable Diffusion test assets.")
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--num_rows", type=int, default=200)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sdxl", action="store_true", help="also build a tiny SDXL pipeline and ControlNet")
    parser.add_argument("--sd3", action="store_true", help="also build a tiny SD3 pipeline and ControlNet")
    parser.add_argument("--flux", action="store_true", help="also build a tiny FLUX.1 pipeline and ControlNet")
    parser.add_argument(
        "--all_forms",
        action="store_true",
        help="also write the fill data as an image folder with metadata.jsonl (fill-folder), a "
        "save_to_disk folder (fill-saved) and WebDataset tar shards (fill-webdataset)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    out = args.output_dir
    written = [
        build_fill_dataset(out / "fill", num_rows=args.num_rows, size=args.size, seed=args.seed),
        build_tiny_sd(out / "tiny-sd", seed=args.seed),
        build_tiny_controlnet(out / "tiny-sd", out / "tiny-controlnet"),
        *write_validation_images(out / "validation", size=args.size),
    ]
    if args.all_forms:
        shape = {"num_rows": args.num_rows, "size": args.size, "seed": args.seed}
        written.append(write_fill_folder(out / "fill-folder", **shape))
        written.append(write_fill_saved(out / "fill-saved", **shape))
        written.append(write_fill_webdataset(out / "fill-webdataset", **shape))
    if args.sdxl:
        written.append(build_tiny_sdxl(out / "tiny-sdxl", seed=args.seed))
        written.append(build_tiny_controlnet(out / "tiny-sdxl", out / "tiny-controlnet-sdxl"))
    if args.sd3:
        written.append(build_tiny_sd3(out / "tiny-sd3", seed=args.seed))
        written.append(build_tiny_sd3_controlnet(out / "tiny-sd3", out / "tiny-controlnet-sd3"))
    if args.flux:
        written.append(build_tiny_flux(out / "tiny-flux", seed=args.seed))
        written.append(build_tiny_flux_controlnet(out / "tiny-flux", out / "tiny-controlnet-flux"))
    for item in written:
        print(f"wrote {item}")


if __name__ == "__main__":
    main()
