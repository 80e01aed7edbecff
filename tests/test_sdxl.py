"""SDXL: time ids, the two text encoders, --tokenizer_name, and full runs on the tiny SDXL."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from conftest import settings_of, train_argv
from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline
from PIL import Image

from controlnet_trainer.cli import run
from controlnet_trainer.data import PairedTransform, collate
from controlnet_trainer.families import TextConditioning
from controlnet_trainer.families.sd import FAMILY as SD
from controlnet_trainer.families.sdxl import FAMILY as SDXL
from controlnet_trainer.families.sdxl import time_ids as sdxl_time_ids
from controlnet_trainer.models import load_models


def test_time_ids_describe_the_crop_actually_made():
    # A 300x200 (w x h) image at resolution 64: resized to 96x64, centre crop starts at x=16.
    sample = PairedTransform(64)(Image.new("RGB", (300, 200)), Image.new("RGB", (300, 200)))
    batch = collate([sample | {"captions": ["a"], "index": 0}])
    assert sdxl_time_ids(batch["original_size"], batch["crop_top_left"], 64).tolist() == [[200, 300, 0, 16, 64, 64]]
    # Explicit --crops_coords_top_left_h/w replace the crop, as diffusers uses them.
    assert sdxl_time_ids(batch["original_size"], batch["crop_top_left"], 64, (5, 7)).tolist() == [
        [200, 300, 5, 7, 64, 64]
    ]


def test_added_conditioning_only_for_sdxl():
    batch = {"original_size": torch.tensor([[10, 20]]), "crop_top_left": torch.tensor([[1, 2]])}
    text = TextConditioning(torch.zeros(1, 77, 64), torch.ones(1, 32))
    assert SD.added_conditioning(text, batch, resolution=64, crop_override=None) is None
    added = SDXL.added_conditioning(text, batch, resolution=64, crop_override=None)
    assert added["time_ids"].tolist() == [[10, 20, 1, 2, 64, 64]] and added["text_embeds"] is text.pooled


def test_sdxl_text_encoding_concatenates_penultimate_states(sdxl_assets, tmp_path):
    args = settings_of(train_argv(sdxl_assets, tmp_path, sdxl=True), sdxl=True).model
    models = load_models(args, SDXL)
    assert models.tokenizers[1].pad_token == "!"
    text = SDXL.encode_prompts(models, ["red circle with blue background"])
    assert text.encoder_hidden_states.shape == (1, 77, 64)  # 32 + 32 hidden sizes side by side
    assert text.pooled.shape == (1, 32)
    first = models.text_encoders[0](
        models.tokenizers[0](["red circle with blue background"], padding="max_length", return_tensors="pt").input_ids,
        output_hidden_states=True,
    )
    assert torch.equal(text.encoder_hidden_states[..., :32], first.hidden_states[-2])


def test_sdxl_vae_stays_fp32_in_mixed_precision_unless_a_vae_is_given(sdxl_assets, tmp_path):
    args = settings_of(train_argv(sdxl_assets, tmp_path, sdxl=True), sdxl=True).model
    models = load_models(args, SDXL)
    SDXL.place_models(models, device=torch.device("cpu"), weight_dtype=torch.bfloat16, settings=args)
    assert models.vae.dtype == torch.float32 and models.denoiser.dtype == torch.bfloat16
    custom_vae = dataclasses.replace(args, pretrained_vae_model_name_or_path="madebyollin/sdxl-vae-fp16-fix")
    SDXL.place_models(models, device=torch.device("cpu"), weight_dtype=torch.bfloat16, settings=custom_vae)
    assert models.vae.dtype == torch.bfloat16


def test_tokenizer_name_is_read(sdxl_assets, tmp_path):
    """diffusers' SDXL script parses --tokenizer_name and ignores it; ours loads from it."""
    custom = tmp_path / "tokenizers"
    for sub in ("tokenizer", "tokenizer_2"):
        shutil.copytree(sdxl_assets["sdxl"] / sub, custom / sub)
        config_path = custom / sub / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) | {"model_max_length": 20}
        config_path.write_text(json.dumps(config))
    args = settings_of(train_argv(sdxl_assets, tmp_path, sdxl=True, tokenizer_name=custom), sdxl=True).model
    assert [t.model_max_length for t in load_models(args, SDXL).tokenizers] == [20, 20]
    sd_args = settings_of(train_argv(sdxl_assets, tmp_path, tokenizer_name=custom / "tokenizer")).model
    assert load_models(sd_args, SD).tokenizers[0].model_max_length == 20


def test_sdxl_run_saves_model_that_generates(sdxl_assets, tmp_path):
    # diffusers' SDXL test: 4 steps, checkpoints every 2, weights at the output root.
    run(
        train_argv(
            sdxl_assets,
            tmp_path,
            sdxl=True,
            max_train_steps=4,
            checkpointing_steps=2,
            validation_prompt="red circle with blue background",
            validation_image=sdxl_assets["validation"][0],
            num_validation_images=1,
            validation_steps=4,
            crops_coords_top_left_h=0,
        ),
        family="sdxl",
    )
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    assert {p.name for p in tmp_path.glob("checkpoint-*")} == {"checkpoint-2", "checkpoint-4"}
    assert (tmp_path / "validation" / "step-000004.png").is_file()
    assert "stable-diffusion-xl" in (tmp_path / "README.md").read_text()
    pipeline = StableDiffusionXLControlNetPipeline.from_pretrained(
        sdxl_assets["sdxl"], controlnet=ControlNetModel.from_pretrained(tmp_path)
    )
    image = pipeline(
        "red circle", image=Image.open(sdxl_assets["validation"][0]), num_inference_steps=2, height=64, width=64
    ).images[0]
    assert image.size == (64, 64)


def test_sdxl_checkpoint_limit_and_resume(sdxl_assets, tmp_path):
    run(train_argv(sdxl_assets, tmp_path, sdxl=True, max_train_steps=6, checkpointing_steps=2), family="sdxl")
    assert {p.name for p in tmp_path.glob("checkpoint-*")} == {"checkpoint-2", "checkpoint-4", "checkpoint-6"}
    result = run(
        train_argv(
            sdxl_assets,
            tmp_path,
            sdxl=True,
            max_train_steps=8,
            checkpointing_steps=2,
            checkpoints_total_limit=2,
            resume_from_checkpoint="checkpoint-6",
        ),
        family="sdxl",
    )
    assert result.global_step == 8
    assert {p.name for p in tmp_path.glob("checkpoint-*")} == {"checkpoint-6", "checkpoint-8"}


def test_npu_flash_attention_without_npu_is_a_clear_error(sdxl_assets, tmp_path):
    from controlnet_trainer.models import ModelError

    with pytest.raises(ModelError, match="torch_npu"):
        run(train_argv(sdxl_assets, tmp_path, sdxl=True, enable_npu_flash_attention=True), family="sdxl")


def test_the_wrong_script_for_the_model_names_the_right_one(sdxl_assets, tmp_path, capsys):
    # Without the check they fail deep inside: a missing tokenizer_2 (SDXL script, SD model) or a
    # TypeError at the first step (SD script, SDXL model).
    from controlnet_trainer import fidelity
    from controlnet_trainer.models import ModelError

    sd_model_on_sdxl = train_argv(
        sdxl_assets, tmp_path / "a", sdxl=True, pretrained_model_name_or_path=sdxl_assets["sd"]
    )
    with pytest.raises(ModelError, match="is an SD 1.x/2.x model.*Run train_controlnet.py with the same flags"):
        run(sd_model_on_sdxl, family="sdxl")
    with pytest.raises(ModelError, match="is an SDXL model.*Run train_controlnet_sdxl.py with the same flags"):
        run(train_argv(sdxl_assets, tmp_path / "b", pretrained_model_name_or_path=sdxl_assets["sdxl"]))
    with pytest.raises(SystemExit) as exit_info:
        fidelity.main(
            [f"--pretrained_model_name_or_path={sdxl_assets['sd']}", f"--dataset_name={sdxl_assets['fill']}", "--sdxl"]
        )
    assert exit_info.value.code == 2 and "Drop --sdxl." in capsys.readouterr().err
