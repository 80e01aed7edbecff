"""Flux: the flags of diffusers' train_controlnet_flux.py, a training step as that script and the
Flux ControlNet pipeline compute it, and real runs on the tiny FLUX.1-dev."""

from __future__ import annotations

import functools
import json
import math
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import step_records, train_argv
from diffusers import FluxControlNetModel, FluxControlNetPipeline, FluxTransformer2DModel
from PIL import Image
from safetensors.torch import load_file
from test_arguments import DIFFUSERS_SD_DEFAULTS
from test_fidelity_training import fill_data, gaps, train_side_by_side  # noqa: F401 (fill_data: a fixture)

from controlnet_trainer import families, fixtures, validation
from controlnet_trainer.arguments import ArgumentError, build_parser, parse_args
from controlnet_trainer.cli import run
from controlnet_trainer.models import ModelError, check_base_model
from controlnet_trainer.settings import ModelSettings, ObjectiveSettings

FLUX = families.by_name("flux")
# diffusers' train_controlnet_flux.py: the SD script's flags less --train_data_dir, two defaults
# changed, and these added (66 flags in all).
DIFFUSERS_FLUX_CHANGED = {"num_validation_images": 2, "tracker_project_name": "flux_train_controlnet"}
DIFFUSERS_FLUX_ONLY = {
    "pretrained_vae_model_name_or_path": None,
    "crops_coords_top_left_h": 0,
    "crops_coords_top_left_w": 0,
    "use_adafactor": False,
    "enable_npu_flash_attention": False,
    "num_double_layers": 4,
    "num_single_layers": 4,
    "jsonl_for_train": None,
    "guidance_scale": 3.5,
    "save_weight_dtype": "fp32",
    "weighting_scheme": "logit_normal",
    "logit_mean": 0.0,
    "logit_std": 1.0,
    "mode_scale": 1.29,
    "enable_model_cpu_offload": False,
}
# The README_flux.md training command of diffusers, as written.
DIFFUSERS_FLUX_README = (
    '--pretrained_model_name_or_path="black-forest-labs/FLUX.1-dev" --dataset_name=fusing/fill50k '
    "--conditioning_image_column=conditioning_image --image_column=image --caption_column=text "
    '--output_dir="path to save model" --mixed_precision="bf16" --resolution=512 --learning_rate=1e-5 '
    "--max_train_steps=15000 --validation_steps=100 --checkpointing_steps=200 "
    '--validation_image "./conditioning_image_1.png" "./conditioning_image_2.png" '
    '--validation_prompt "red circle with blue background" "cyan circle with brown floral background" '
    "--train_batch_size=1 --gradient_accumulation_steps=16 --report_to=wandb --lr_scheduler=cosine "
    "--num_double_layers=4 --num_single_layers=0 --seed=42 --push_to_hub"
)
SHORT_T5 = 32  # a T5 length for quick runs; the pipelines' 512 is checked where it matters


@pytest.fixture(scope="module")
def flux_assets(assets, tiny_flux) -> dict[str, Path]:
    return assets | tiny_flux


def flux_argv(assets: dict[str, Path], output_dir: Path, **flags) -> list[str]:
    base = {"pretrained_model_name_or_path": assets["flux"], "max_sequence_length": SHORT_T5}
    return train_argv(assets, output_dir, **(base | flags))


def loaded(assets, **model_flags):
    """The tiny Flux's models placed on the CPU in fp32, as a run loads them."""
    settings = ModelSettings(str(assets["flux"]), **model_flags)
    models = FLUX.load_models(settings)
    FLUX.place_models(models, device=torch.device("cpu"), weight_dtype=torch.float32, settings=settings)
    return models


def saved_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "diffusion_pytorch_model.safetensors")


# Flags


def test_flux_flags_keep_diffusers_names_and_defaults():
    parser = build_parser(FLUX)
    ours = {action.dest: action.default for action in parser._actions if action.dest != "help"}
    expected = (
        {k: v for k, v in DIFFUSERS_SD_DEFAULTS.items() if k != "train_data_dir"}
        | DIFFUSERS_FLUX_CHANGED
        | DIFFUSERS_FLUX_ONLY
    )
    assert len(expected) == 66
    for name, value in expected.items():
        assert name in ours, f"--{name} is missing"
        assert ours[name] == value, f"--{name} default {ours[name]!r}, diffusers {value!r}"
    # DDPM's flags, SD3's preconditioning and the UNet-layout export mean nothing for Flux.
    for absent in ("snr_gamma", "noise_offset", "precondition_outputs", "save_single_file", "drop_t5"):
        assert absent not in ours
    assert "flow-matching objective:" in parser.format_help() and "Flux:" in parser.format_help()


def test_diffusers_flux_readme_command_is_accepted_as_written():
    args = parse_args([*shlex.split(DIFFUSERS_FLUX_README), "--report_to=none"], FLUX)
    assert args.num_single_layers == 0 and args.gradient_accumulation_steps == 16 and args.push_to_hub
    assert args.validation_image == ["./conditioning_image_1.png", "./conditioning_image_2.png"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--resolution=72"], "multiple of 16 for Flux.*try 64"),
        (["--max_sequence_length=513"], "between 1 and 512"),
        (["--num_double_layers=0", "--num_single_layers=0"], "at least one block"),
        (["--num_single_layers=-1"], "`--num_single_layers` must be 0 or more"),
        (["--jsonl_for_train=rows.jsonl"], "`--jsonl_for_train` is the training data by itself"),
        (["--save_weight_dtype=fp8"], None),
    ],
)
def test_bad_flux_flags_are_refused_before_training(flags, message, capsys):
    argv = ["--pretrained_model_name_or_path=m", "--dataset_name=d", "--report_to=none", *flags]
    if message is None:  # argparse's own choices
        with pytest.raises(SystemExit):
            parse_args(argv, FLUX)
        assert "invalid choice: 'fp8'" in capsys.readouterr().err
        return
    with pytest.raises(ArgumentError, match=message):
        parse_args(argv, FLUX)


def test_the_wrong_script_for_the_model_names_the_right_one(flux_assets):
    with pytest.raises(ModelError, match="is a Flux model.*Run train_controlnet_flux.py"):
        check_base_model(ModelSettings(str(flux_assets["flux"])), families.by_name("sd3"))
    with pytest.raises(ModelError, match="is an SD 1.x/2.x model.*Run train_controlnet.py"):
        check_base_model(ModelSettings(str(flux_assets["sd"])), FLUX)


def test_controlnets_flux_cannot_train_are_refused(flux_assets, tmp_path):
    unet_controlnet = ModelSettings(
        str(flux_assets["flux"]), controlnet_model_name_or_path=str(flux_assets["controlnet"])
    )
    with pytest.raises(ModelError, match="is a ControlNetModel, not a FluxControlNetModel"):
        FLUX.load_models(unet_controlnet)
    union = tmp_path / "union"
    shutil.copytree(flux_assets["controlnet_flux"], union)
    config = json.loads((union / "config.json").read_text())
    (union / "config.json").write_text(json.dumps(config | {"num_mode": 10}))
    with pytest.raises(ModelError, match="is a Union ControlNet \\(10 control modes\\)"):
        FLUX.load_models(ModelSettings(str(flux_assets["flux"]), controlnet_model_name_or_path=str(union)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_a_quantized_base_without_cuda_is_refused_before_loading():
    argv = ["--pretrained_model_name_or_path=m", "--dataset_name=d", "--report_to=none", "--quantize_base=nf4"]
    with pytest.raises(ArgumentError, match="needs a CUDA GPU"):
        parse_args(argv, FLUX)


def test_the_controlnet_of_a_quantized_base_is_read_from_the_transformers_files(flux_assets):
    """With --quantize_base the transformer in memory holds 4- or 8-bit weights, so the new
    ControlNet's blocks are read from its files: the same ControlNet from_transformer makes."""
    from controlnet_trainer.families import flux

    settings = ModelSettings(str(flux_assets["flux"]), num_double_layers=2, num_single_layers=3)
    transformer = FluxTransformer2DModel.from_pretrained(flux_assets["flux"], subfolder="transformer")
    expected = FluxControlNetModel.from_transformer(
        transformer, num_layers=2, num_single_layers=3, attention_head_dim=16, num_attention_heads=4
    ).state_dict()
    read = flux._controlnet_from_files(settings, transformer).state_dict()
    assert read.keys() == expected.keys()
    assert all(torch.equal(read[name], expected[name]) for name in expected)
    assert read["transformer_blocks.1.attn.to_q.weight"].abs().sum() > 0  # copied, not initialised


# The step, as the pipeline and diffusers' script compute it


def test_prompt_embeddings_are_the_pipelines(flux_assets):
    """CLIP's pooled output and T5's states at the pipelines' default length, 512."""
    models = loaded(flux_assets, max_sequence_length=512)
    pipeline = FluxControlNetPipeline(**FLUX.pipeline_components(models, models.controlnet))
    prompts = ["red circle with blue background", "green circle"]
    ours = FLUX.encode_prompts(models, prompts)
    with torch.no_grad():
        hidden, pooled, _ = pipeline.encode_prompt(prompts, prompt_2=prompts)
    assert ours.encoder_hidden_states.shape == (2, 512, models.denoiser.config.joint_attention_dim)
    assert torch.equal(ours.encoder_hidden_states, hidden) and torch.equal(ours.pooled, pooled)


def test_validation_from_prompt_embeddings_needs_no_text_encoder(flux_assets):
    """With the text embeddings cached, validation hands the pipeline the prompts' embeddings and
    builds it without CLIP and T5 (which stay in CPU memory): the same images as from the text."""
    models = loaded(flux_assets)
    models.controlnet = FluxControlNetModel.from_pretrained(flux_assets["controlnet_flux"])
    prompts = ["red circle with blue background", "green circle"]
    embeddings = validation.encode_validation_prompts(FLUX, models, prompts + prompts[:1])
    assert list(embeddings) == prompts
    pairs = [(prompt, flux_assets["validation"][0]) for prompt in prompts]
    common = {"inputs": lambda image: FLUX.pipeline_inputs(models, image), "num_images": 2, "resolution": 64, "seed": 0}
    common |= {"weight_dtype": torch.float32, "num_inference_steps": 2}
    cpu = torch.device("cpu")
    with_text = validation.build_pipeline(FLUX, models, models.controlnet, cpu)
    from_text = validation.generate(with_text, pairs, **common)
    bare = validation.build_pipeline(FLUX, models, models.controlnet, cpu, text_encoders=False)
    assert bare.text_encoder is None and bare.text_encoder_2 is None
    embedded = functools.partial(validation.embedded_prompts, FLUX, embeddings, cpu)
    from_embeddings = validation.generate(bare, pairs, prompt_inputs=embedded, **common)
    for text_row, embedding_row in zip(from_text, from_embeddings, strict=True):
        for text_image, embedding_image in zip(text_row["images"], embedding_row["images"], strict=True):
            assert np.array_equal(np.asarray(text_image), np.asarray(embedding_image))
    # The prompt reaches the images: the two prompts' first images differ.
    assert not np.array_equal(np.asarray(from_text[0]["images"][0]), np.asarray(from_text[1]["images"][0]))


@pytest.mark.parametrize("kind", ["InstantX", "XLabs"])
def test_a_step_is_diffusers_flux_step_with_the_pipelines_inputs(flux_assets, kind):
    """The loss of diffusers' train_controlnet_flux.py, computed here from its formula with the
    pipeline's own packing and position ids: the VAE's shifted, scaled latents of [-1, 1] images
    and conditioning images, packed 2x2; timestep / 1000; the guidance scale to both models; the
    ControlNet's residuals; the plain squared error against noise - latents, whatever the
    weighting scheme (Flux's script uses it for the timestep density alone). An XLabs-style
    ControlNet (a pixel encoder, ``input_hint_block``) takes the [-1, 1] pixels and its few
    residuals repeat over the blocks, as FluxControlNetPipeline runs it (diffusers' script cannot)."""
    models = loaded(flux_assets, max_sequence_length=SHORT_T5, guidance_scale=3.5)
    if kind == "XLabs":
        config = dict(models.denoiser.config) | {"num_layers": 2, "num_single_layers": 0}
        # A 3-channel pixel encoder to 16 channels at 1/8 size, patchified 2x2 into 64.
        models.controlnet = FluxControlNetModel.from_config(config | {"conditioning_embedding_channels": 16, "patch_size": 2})
    generator = torch.Generator().manual_seed(0)
    images, conditioning = torch.rand(2, 3, 64, 64, generator=generator), torch.rand(2, 3, 64, 64, generator=generator)
    # A trained ControlNet: the zero-initialised output layers of a fresh one would hide its path.
    with torch.no_grad():
        for layer in (*models.controlnet.controlnet_blocks, *models.controlnet.controlnet_single_blocks):
            layer.weight.normal_(std=0.05, generator=generator)
        models.controlnet.controlnet_x_embedder.weight.normal_(std=0.05, generator=generator)
    text = FLUX.encode_prompts(models, ["red circle", "green circle"])
    vae = models.vae

    def vae_latents(pixels):
        mean = vae.encode(pixels * 2 - 1).latent_dist.mean
        return (mean - vae.config.shift_factor) * vae.config.scaling_factor

    def packed(x):
        return FluxControlNetPipeline._pack_latents(x, 2, 16, 8, 8)

    latents = vae_latents(images)
    control = FLUX.encode_control(models, conditioning, None)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = models.noise_scheduler.timesteps[torch.tensor([100, 700])]
    objective = ObjectiveSettings(weighting_scheme="cosmap")
    with torch.no_grad():
        ours = FLUX.loss(
            models, models.controlnet, latents=latents, noise=noise, timesteps=timesteps, text=text,
            controlnet_image=control, objective=objective,
        )  # fmt: skip
        x0 = packed(latents)
        cond = conditioning * 2 - 1 if kind == "XLabs" else packed(vae_latents(conditioning))
        ids = FluxControlNetPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32)
        sigmas = (timesteps / 1000).reshape(-1, 1, 1)
        noisy = (1 - sigmas) * x0 + sigmas * packed(noise)
        common = {
            "hidden_states": noisy,
            "timestep": timesteps / 1000,
            "guidance": torch.full((2,), 3.5),
            "pooled_projections": text.pooled,
            "encoder_hidden_states": text.encoder_hidden_states,
            "txt_ids": torch.zeros(SHORT_T5, 3),
            "img_ids": ids,
            "return_dict": False,
        }
        blocks, single = models.controlnet(controlnet_cond=cond, **common)
        prediction = models.denoiser(
            controlnet_block_samples=blocks,
            controlnet_single_block_samples=single,
            controlnet_blocks_repeat=kind == "XLabs",
            **common,
        )[0]
        theirs = F.mse_loss(prediction, packed(noise) - x0)
        without_control = FLUX.loss(
            models, models.controlnet, latents=latents, noise=noise, timesteps=timesteps, text=text,
            controlnet_image=None, objective=objective,
        )  # fmt: skip
    assert torch.allclose(ours, theirs, rtol=1e-5), (ours, theirs)
    assert abs(without_control - ours) > 1e-3 * ours  # the residuals took part


# Runs


def test_flux_run_saves_a_controlnet_the_pipeline_loads_and_generates_with(flux_assets, tmp_path):
    # diffusers' Flux test: a few steps at 64 px, checkpoints in checkpoint-N/flux_controlnet/,
    # the ControlNet at the output root.
    run(
        flux_argv(
            flux_assets,
            tmp_path,
            max_train_steps=4,
            checkpointing_steps=2,
            validation_steps=4,
            validation_prompt="red circle with blue background",
            validation_image=flux_assets["validation"][0],
            num_validation_images=1,
            fidelity_samples=4,
        ),
        family="flux",
    )
    assert {p.name for p in tmp_path.glob("checkpoint-*")} == {"checkpoint-2", "checkpoint-4"}
    assert (tmp_path / "checkpoint-4" / "flux_controlnet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "validation" / "step-000004.png").is_file()
    card = (tmp_path / "README.md").read_text()
    assert "FluxControlNetModel" in card and "FluxControlNetPipeline" in card and "flux" in card
    options = json.loads((tmp_path / "training_options.json").read_text())
    assert options["family"] == "flux" and options["arguments"]["guidance_scale"] == 3.5
    fresh = load_file(flux_assets["controlnet_flux"] / "diffusion_pytorch_model.safetensors")
    trained = saved_weights(tmp_path)
    assert trained.keys() == fresh.keys()
    assert any(not torch.equal(trained[name], fresh[name]) for name in trained)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "fidelity/control_gap" in r] == [0, 4]
    pipeline = FluxControlNetPipeline.from_pretrained(
        flux_assets["flux"], controlnet=FluxControlNetModel.from_pretrained(tmp_path)
    )
    image = pipeline(
        "red circle",
        control_image=Image.open(flux_assets["validation"][0]),
        num_inference_steps=2,
        height=64,
        width=64,
        max_sequence_length=SHORT_T5,
    ).images[0]
    assert image.size == (64, 64)


@pytest.mark.parametrize("writer", ["this trainer", "diffusers"])
def test_flux_resume_is_exact_and_the_limit_spares_what_it_did_not_write(flux_assets, tmp_path, writer):
    """A run stopped at step 2 and resumed ends bit-equal to one that never stopped, from this
    trainer's checkpoint or from diffusers' (no training_state.json; its ControlNet in
    flux_controlnet/); --checkpoints_total_limit rotates only this trainer's checkpoints."""
    flags = {"max_train_steps": 4, "checkpointing_steps": 1, "proportion_empty_prompts": 0.5}
    run(flux_argv(flux_assets, tmp_path / "straight", **flags), family="flux")
    resumed = tmp_path / "resumed"
    run(flux_argv(flux_assets, resumed, stop_at_step=2, **flags), family="flux")
    if writer == "diffusers":
        shutil.rmtree(resumed / "checkpoint-1")
        (resumed / "checkpoint-2" / "training_state.json").unlink()
        (resumed / "metrics.jsonl").unlink()  # diffusers' runs write none
    run(
        flux_argv(flux_assets, resumed, resume_from_checkpoint="latest", checkpoints_total_limit=1, **flags),
        family="flux",
    )
    straight, again = saved_weights(tmp_path / "straight"), saved_weights(resumed)
    assert all(torch.equal(straight[name], again[name]) for name in straight)
    losses = [[r["loss"] for r in step_records(path)] for path in (tmp_path / "straight", resumed)]
    assert losses[0][-2:] == losses[1][-2:]
    kept = {p.name for p in resumed.glob("checkpoint-*")}
    assert kept == ({"checkpoint-4"} if writer == "this trainer" else {"checkpoint-2", "checkpoint-4"})


def test_jsonl_rows_adafactor_bf16_weights_and_offloaded_encoders(flux_assets, tmp_path, monkeypatch):
    """Flux's own flags in one run: --jsonl_for_train (paths relative to the working directory,
    as in diffusers), --use_adafactor, --save_weight_dtype=bf16 (the bf16 variant file),
    --enable_model_cpu_offload, and the README's --num_single_layers=0; with the 24 GB recipe's
    --fused_backward_pass and --gradient_checkpointing."""
    rows = fixtures.write_fill_folder(tmp_path / "rows", num_rows=8, size=64)
    monkeypatch.chdir(rows)
    output = tmp_path / "out"
    argv = flux_argv(
        flux_assets,
        output,
        dataset_name=None,
        jsonl_for_train="metadata.jsonl",
        max_train_steps=2,
        checkpointing_steps=2,
        use_adafactor=True,
        save_weight_dtype="bf16",
        enable_model_cpu_offload=True,
        num_single_layers=0,
        fused_backward_pass=True,
        gradient_checkpointing=True,
    )
    run(argv, family="flux")
    saved = load_file(output / "diffusion_pytorch_model.bf16.safetensors")
    assert all(value.dtype == torch.bfloat16 for value in saved.values())
    assert not any(name.startswith("single_transformer_blocks") for name in saved)
    controlnet = FluxControlNetModel.from_pretrained(output, variant="bf16")
    assert controlnet.config.num_single_layers == 0
    assert 'variant="bf16"' in (output / "README.md").read_text()
    options = json.loads((output / "training_options.json").read_text())
    assert options["plan"]["num_samples"] == 8
    # Adafactor's factored second moments (where AdamW would keep exp_avg and exp_avg_sq), one
    # optimizer per parameter under --fused_backward_pass.
    parts = torch.load(output / "checkpoint-2" / "optimizer.bin", weights_only=False)["parts"]
    assert len(parts) == len(load_file(output / "checkpoint-2" / "flux_controlnet" / "diffusion_pytorch_model.safetensors"))
    states = [entry for part in parts for entry in part["state"].values()]
    assert any("exp_avg_sq_row" in entry for entry in states)
    assert not any("exp_avg" in entry for entry in states)


def test_wide_and_tall_buckets_ema_and_the_cache_which_changes_nothing_but_speed(flux_assets, tmp_path):
    """Latents of 8 x 16 and 16 x 8 pack into tokens with their own position ids; cached latents and
    both encoders' embeddings give the uncached run's losses exactly (prompt dropout still drawn
    per sample per step), and its validation images, made from the prompts' embeddings without the
    text encoders; the EMA copy is what gets saved."""
    mixed = fixtures.build_fill_dataset(tmp_path / "mixed", num_rows=16, size=128, aspect_ratios=(2.0, 0.5))
    flags = {
        "dataset_name": mixed,
        "resolution": 128,
        "aspect_ratio_buckets": True,
        "max_train_steps": 3,
        "proportion_empty_prompts": 0.5,
        "use_ema": True,
        "checkpointing_steps": 3,
        "validation_prompt": "red circle with blue background",
        "validation_image": flux_assets["validation"][0],
        "num_validation_images": 1,
    }
    run(flux_argv(flux_assets, tmp_path / "plain", **flags), family="flux")
    cached = {"cache_latents": True, "cache_text_embeddings": True, "embeddings_cache_dir": tmp_path / "cache"}
    run(flux_argv(flux_assets, tmp_path / "cached", **flags, **cached), family="flux")
    plain, with_cache = ([r["loss"] for r in step_records(tmp_path / name)] for name in ("plain", "cached"))
    assert plain == with_cache and len(plain) == 3
    assert any((tmp_path / "cache").rglob("*.npy"))
    grids = [np.asarray(Image.open(tmp_path / name / "validation" / "step-000003.png")) for name in ("plain", "cached")]
    assert np.array_equal(*grids)
    final, checkpoint = saved_weights(tmp_path / "plain"), tmp_path / "plain" / "checkpoint-3"
    assert json.loads((checkpoint / "controlnet_ema" / "config.json").read_text())["_class_name"] == "FluxControlNetModel"
    raw = saved_weights(checkpoint / "flux_controlnet")
    assert any(not torch.equal(final[name], raw[name]) for name in final)  # the average, not the last weights


def test_the_fused_backward_pass_trains_as_the_whole_step_does_and_resumes(flux_assets, tmp_path):
    """--fused_backward_pass steps each parameter inside backward: with clipping out of play it
    ends bit-equal to the ordinary step (AdamW, the learning-rate warm-up included), and a run
    stopped and resumed from its per-parameter optimizer states ends where the straight one does."""
    flags = {"max_train_steps": 4, "checkpointing_steps": 2, "max_grad_norm": 1e9, "lr_warmup_steps": 2}
    run(flux_argv(flux_assets, tmp_path / "whole", **flags), family="flux")
    run(flux_argv(flux_assets, tmp_path / "fused", fused_backward_pass=True, **flags), family="flux")
    resumed = tmp_path / "resumed"
    run(flux_argv(flux_assets, resumed, fused_backward_pass=True, stop_at_step=2, **flags), family="flux")
    run(flux_argv(flux_assets, resumed, fused_backward_pass=True, resume_from_checkpoint="latest", **flags), family="flux")
    whole, fused, again = (saved_weights(tmp_path / name) for name in ("whole", "fused", "resumed"))
    assert all(torch.equal(whole[name], fused[name]) for name in whole)
    assert all(torch.equal(fused[name], again[name]) for name in fused)
    state = torch.load(resumed / "checkpoint-4" / "optimizer.bin", weights_only=False)
    assert len(state["parts"]) == len(whole)  # one optimizer per trained tensor


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--gradient_accumulation_steps=2"], "cannot accumulate over 2 micro-batches"),
        (["--mixed_precision=fp16"], "cannot unscale fp16 gradients"),
    ],
)
def test_what_the_fused_backward_pass_cannot_do_is_refused(flags, message):
    argv = ["--pretrained_model_name_or_path=m", "--dataset_name=d", "--report_to=none", "--fused_backward_pass"]
    with pytest.raises(ArgumentError, match=message):
        parse_args([*argv, *flags], FLUX)


def test_the_fused_backward_pass_is_refused_on_several_processes():
    from controlnet_trainer.training import TrainingError, check_fused_backward_pass

    with pytest.raises(TrainingError, match="before the 2 processes average them"):
        check_fused_backward_pass(2, "no")
    check_fused_backward_pass(1, "bf16")


def test_two_processes_match_one_process_without_single_blocks(flux_assets, tmp_path):
    """DDP over 2 x 2 samples equals one process over the same 4, with the README's
    --num_single_layers=0: the last double block's prompt branch then gets no gradient, which
    stops diffusers' script on several GPUs (diffusers issue 9866)."""
    from test_distributed import start_two, wait_two

    flags = {"max_train_steps": 3, "num_single_layers": 0}
    script = Path(__file__).parent.parent / "train_controlnet_flux.py"
    two = start_two(script, flux_argv(flux_assets, tmp_path / "two", train_batch_size=2, **flags))
    run(flux_argv(flux_assets, tmp_path / "one", train_batch_size=4, **flags), family="flux")
    wait_two(two)
    a, b = saved_weights(tmp_path / "two"), saved_weights(tmp_path / "one")
    start = load_file(flux_assets["controlnet_flux"] / "diffusion_pytorch_model.safetensors")
    moved = math.sqrt(sum(((b[k].double() - start[k].double()) ** 2).sum().item() for k in b))
    apart = math.sqrt(sum(((a[k].double() - b[k].double()) ** 2).sum().item() for k in b))
    assert moved > 1e-2 and apart / moved < 1e-3, (moved, apart)
    losses = [[r["loss"] for r in step_records(tmp_path / name)] for name in ("two", "one")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_dry_run_prints_the_flux_plan_and_leaves_nothing(flux_assets, tmp_path):
    result = run(flux_argv(flux_assets, tmp_path / "out", dry_run=True, max_train_steps=None), family="flux")
    assert result.plan["family"] == "flux" and result.plan["plan"]["num_samples"] == 24
    # The GPU memory of the run's recipe (tests/test_flux_memory.py checks it on FLUX.1-dev's configs).
    assert result.plan["gpu_memory_gib_before_activations"]["total"] > 0
    assert not (tmp_path / "out").exists()


# The control gap

GAP_STEPS = 80
GAP_T5_TOKENS = 8


@pytest.fixture(scope="module")
def trained_flux(assets, tiny_flux, fill_data, tmp_path_factory) -> dict[str, Path]:  # noqa: F811
    """The honest and the shuffled run of test_fidelity_training on the tiny Flux, with prompts of
    GAP_T5_TOKENS (the captions' length)."""
    flags = {
        "max_train_steps": GAP_STEPS,
        "validation_steps": GAP_STEPS // 2,
        "fidelity_samples": 32,
        "max_sequence_length": GAP_T5_TOKENS,
    }
    return train_side_by_side(
        tmp_path_factory.mktemp("fidelity-runs-flux"),
        fill_data,
        "train_controlnet_flux.py",
        lambda output_dir, dataset: flux_argv(assets | tiny_flux, output_dir, dataset_name=dataset, **flags),
    )


def test_flux_control_gap_rises_with_training_and_stays_flat_when_shuffled(trained_flux):
    honest, shuffled = gaps(trained_flux["honest"]), gaps(trained_flux["shuffled"])
    assert sorted(honest) == [0, GAP_STEPS // 2, GAP_STEPS]
    assert honest[0] == 0.0 and shuffled[0] == 0.0  # a fresh ControlNet's zero layers add nothing
    assert 0 < honest[GAP_STEPS // 2] < honest[GAP_STEPS], honest
    assert honest[GAP_STEPS] > 0.01, honest
    assert abs(shuffled[GAP_STEPS]) < 0.004 and honest[GAP_STEPS] > 4 * abs(shuffled[GAP_STEPS]), (honest, shuffled)
