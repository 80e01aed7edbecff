"""SD3: the flags of diffusers' train_controlnet_sd3.py, the flow-matching objective, prompt and
conditioning encodings that match the SD3 ControlNet pipeline, and real runs on the tiny SD3."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import step_records, train_argv
from diffusers import SD3ControlNetModel, SD3Transformer2DModel, StableDiffusion3ControlNetPipeline
from PIL import Image
from safetensors.torch import load_file
from test_arguments import DIFFUSERS_SD_DEFAULTS

from controlnet_trainer import families, fidelity
from controlnet_trainer.arguments import ArgumentError, build_parser, parse_args
from controlnet_trainer.cli import run
from controlnet_trainer.models import ModelError, check_base_model
from controlnet_trainer.settings import ModelSettings, ObjectiveSettings

SD3 = families.by_name("sd3")
# diffusers' train_controlnet_sd3.py: its flags are the SD script's, less --tokenizer_name and
# --enable_xformers_memory_efficient_attention, plus these.
DIFFUSERS_SD3_ONLY = {
    "num_extra_conditioning_channels": 0,
    "upcast_vae": False,
    "weighting_scheme": "logit_normal",
    "logit_mean": 0.0,
    "logit_std": 1.0,
    "mode_scale": 1.29,
    "precondition_outputs": 1,
    "max_sequence_length": 77,
    "dataset_preprocess_batch_size": 1000,
}
NOT_IN_DIFFUSERS_SD3 = ("tokenizer_name", "enable_xformers_memory_efficient_attention")
# The README_sd3.md training command of diffusers, as written.
DIFFUSERS_SD3_README = (
    "--pretrained_model_name_or_path=stabilityai/stable-diffusion-3-medium-diffusers --output_dir=out "
    "--train_data_dir=fill50k --resolution=1024 --learning_rate=1e-5 --max_train_steps=15000 "
    "--validation_image ./conditioning_image_1.png ./conditioning_image_2.png "
    '--validation_prompt "red circle with blue background" "cyan circle with brown floral background" '
    "--validation_steps=100 --train_batch_size=1 --gradient_accumulation_steps=4"
)


@pytest.fixture(scope="module")
def sd3_assets(assets, tiny_sd3) -> dict[str, Path]:
    return assets | tiny_sd3


def sd3_argv(assets: dict[str, Path], output_dir: Path, **flags) -> list[str]:
    return train_argv(assets, output_dir, pretrained_model_name_or_path=assets["sd3"], **flags)


def loaded(assets, **model_flags):
    """The tiny SD3's models placed on the CPU in fp32, as a run loads them."""
    settings = ModelSettings(str(assets["sd3"]), **model_flags)
    models = SD3.load_models(settings)
    SD3.place_models(models, device=torch.device("cpu"), weight_dtype=torch.float32, settings=settings)
    return models


# Flags


def test_sd3_flags_keep_diffusers_names_and_defaults():
    parser = build_parser(SD3)
    ours = {action.dest: action.default for action in parser._actions if action.dest != "help"}
    expected = {k: v for k, v in DIFFUSERS_SD_DEFAULTS.items() if k not in NOT_IN_DIFFUSERS_SD3} | DIFFUSERS_SD3_ONLY
    for name, value in expected.items():
        assert name in ours, f"--{name} is missing"
        assert ours[name] == value, f"--{name} default {ours[name]!r}, diffusers {value!r}"
    # DDPM's flags and the UNet-layout export mean nothing for SD3: refused, not ignored.
    for absent in ("snr_gamma", "noise_offset", "rescale_betas_zero_snr", "save_single_file"):
        assert absent not in ours
    assert "flow-matching objective:" in parser.format_help() and "SD3:" in parser.format_help()


def test_diffusers_sd3_readme_command_is_accepted_as_written():
    import shlex

    args = parse_args([*shlex.split(DIFFUSERS_SD3_README), "--report_to=none"], SD3)
    assert args.resolution == 1024 and args.train_data_dir == "fill50k" and args.gradient_accumulation_steps == 4
    assert args.validation_prompt == ["red circle with blue background", "cyan circle with brown floral background"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--resolution=72"], "multiple of 16 for SD3.*try 64"),
        (["--max_sequence_length=513"], "between 1 and 512"),
        (["--logit_std=0"], "`--logit_std` must be positive"),
        (["--precondition_outputs=2"], "1 \\(on\\) or 0 \\(off\\)"),
    ],
)
def test_bad_sd3_flags_are_refused_before_training(flags, message):
    with pytest.raises(ArgumentError, match=message):
        parse_args(["--pretrained_model_name_or_path=m", "--dataset_name=d", "--report_to=none", *flags], SD3)


def test_the_wrong_script_for_the_model_names_the_right_one(sd3_assets):
    sd_family = families.by_name("sd")
    with pytest.raises(ModelError, match="is an SD3 model.*Run train_controlnet_sd3.py"):
        check_base_model(ModelSettings(str(sd3_assets["sd3"])), sd_family)
    with pytest.raises(ModelError, match="is an SD 1.x/2.x model.*Run train_controlnet.py"):
        check_base_model(ModelSettings(str(sd3_assets["sd"])), SD3)


def test_a_unet_controlnet_is_refused_for_sd3(sd3_assets):
    settings = ModelSettings(str(sd3_assets["sd3"]), controlnet_model_name_or_path=str(sd3_assets["controlnet"]))
    with pytest.raises(ModelError, match="is a ControlNetModel, not an SD3ControlNetModel"):
        SD3.load_models(settings)


# The objective


def test_timesteps_come_from_the_schedule_by_the_weighting_density(sd3_assets):
    models = loaded(sd3_assets)
    schedule = models.noise_scheduler.timesteps
    latents = torch.zeros(1, 16, 8, 8)

    def draws(**objective):
        generator = torch.Generator().manual_seed(0)
        settings = ObjectiveSettings(**objective)
        return torch.cat([SD3.sample_noise(models, latents, generator, settings)[1] for _ in range(200)])

    low_noise, high_noise = draws(logit_mean=3.0), draws(logit_mean=-3.0)
    assert torch.isin(low_noise, schedule).all() and torch.isin(high_noise, schedule).all()
    # A large u is a late position in the schedule, a small timestep.
    assert (low_noise < 500).float().mean() > 0.9 and (high_noise > 500).float().mean() > 0.9
    assert torch.equal(draws(weighting_scheme="mode"), draws(weighting_scheme="mode"))  # one generator, one draw


@pytest.mark.parametrize("precondition", [0, 1])
@pytest.mark.parametrize("scheme", ["none", "sigma_sqrt"])
def test_flow_loss_is_the_weighted_velocity_or_clean_latent_error(sd3_assets, precondition, scheme):
    models = loaded(sd3_assets)
    torch.manual_seed(0)
    latents, noise = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)
    timesteps = models.noise_scheduler.timesteps[torch.tensor([100, 700])]
    text = SD3.encode_prompts(models, ["red circle", "blue circle"])
    objective = ObjectiveSettings(weighting_scheme=scheme, precondition_outputs=precondition)
    with torch.no_grad():
        loss = SD3.loss(
            models,
            models.controlnet,
            latents=latents,
            noise=noise,
            timesteps=timesteps,
            text=text,
            controlnet_image=None,
            objective=objective,
            reduce=False,
        )
        sigmas = (timesteps / 1000).reshape(2, 1, 1, 1)  # SD3's schedule: t = 1000 sigma
        noisy = (1 - sigmas) * latents + sigmas * noise
        prediction = models.denoiser(
            hidden_states=noisy,
            timestep=timesteps,
            encoder_hidden_states=text.encoder_hidden_states,
            pooled_projections=text.pooled,
            return_dict=False,
        )[0]
    if precondition:
        error = (noisy - sigmas * prediction) - latents
    else:
        error = prediction - (noise - latents)
    weight = sigmas.flatten() ** -2 if scheme == "sigma_sqrt" else torch.ones(2)
    expected = weight * error.pow(2).mean(dim=(1, 2, 3))
    assert torch.allclose(loss, expected, rtol=1e-4, atol=1e-6)


def test_a_fresh_controlnet_adds_nothing_and_a_trained_one_does(sd3_assets, tmp_path):
    models = loaded(sd3_assets)
    torch.manual_seed(0)
    latents, noise = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)
    common = {
        "latents": latents,
        "noise": noise,
        "timesteps": models.noise_scheduler.timesteps[torch.tensor([300, 600])],
        "text": SD3.encode_prompts(models, ["red circle", "blue circle"]),
        "reduce": False,
    }
    control = SD3.encode_control(models, torch.rand(2, 3, 64, 64), None)
    with torch.no_grad():
        alone = SD3.loss(models, models.controlnet, controlnet_image=None, **common)
        fresh = SD3.loss(models, models.controlnet, controlnet_image=control, **common)
        for block in models.controlnet.controlnet_blocks:
            torch.nn.init.normal_(block.weight, std=0.1)
        changed = SD3.loss(models, models.controlnet, controlnet_image=control, **common)
    assert torch.equal(alone, fresh)  # zero-initialised output blocks
    assert not torch.allclose(alone, changed)


def test_an_sd3_controlnet_trains_with_every_transformer_block_fed(sd3_assets):
    """The tiny transformer has SD3 Medium's 24 blocks, so from_transformer's 12 ControlNet blocks
    each feed two of them, and every ControlNet block but the last's prompt branch gets a gradient."""
    models = loaded(sd3_assets)
    controlnet = models.controlnet
    for block in controlnet.controlnet_blocks:
        torch.nn.init.normal_(block.weight, std=0.1)
    latents = torch.randn(2, 16, 8, 8)
    loss = SD3.loss(
        models,
        controlnet,
        latents=latents,
        noise=torch.randn_like(latents),
        timesteps=models.noise_scheduler.timesteps[torch.tensor([300, 600])],
        text=SD3.encode_prompts(models, ["red circle", "blue circle"]),
        controlnet_image=SD3.encode_control(models, torch.rand(2, 3, 64, 64), None),
    )
    loss.backward()
    unused = {name for name, p in controlnet.named_parameters() if p.grad is None}
    last = len(controlnet.transformer_blocks) - 1
    assert unused and all(name.startswith(f"transformer_blocks.{last}.") for name in unused)
    assert all(("context" in name or "add_out" in name) for name in unused), sorted(unused)
    assert SD3.unused_parameters  # so DDP is told to look for them


# Encodings that match the pipeline's


@pytest.mark.parametrize("drop_t5", [False, True])
def test_prompt_embeddings_are_the_pipelines(sd3_assets, drop_t5):
    models = loaded(sd3_assets, drop_t5=drop_t5, max_sequence_length=20)
    assert len(models.text_encoders) == (2 if drop_t5 else 3)
    pipeline = StableDiffusion3ControlNetPipeline(**SD3.pipeline_components(models, models.controlnet))
    prompts = ["red circle with blue background", "green circle"]
    ours = SD3.encode_prompts(models, prompts)
    with torch.no_grad():
        hidden, _, pooled, _ = pipeline.encode_prompt(
            prompts, None, None, do_classifier_free_guidance=False, max_sequence_length=20
        )
    assert ours.encoder_hidden_states.shape == (2, 77 + 20, 96)
    assert torch.equal(ours.encoder_hidden_states, hidden) and torch.equal(ours.pooled, pooled)
    t5_part = ours.encoder_hidden_states[:, 77:]
    assert (t5_part == 0).all() == drop_t5


@pytest.mark.parametrize("force_zeros", [True, False])
def test_conditioning_latents_are_the_pipelines(sd3_assets, force_zeros):
    """From a PIL image, as the SD3 ControlNet pipeline prepares it: [-1, 1] pixels, VAE latents,
    shifted only for ControlNets that take the real pooled prompt (the tiny VAE's posterior is
    nearly a point, so its sample and mean agree closely)."""
    models = loaded(sd3_assets)
    models.controlnet.register_to_config(force_zeros_for_pooled_projection=force_zeros)
    pipeline = StableDiffusion3ControlNetPipeline(**SD3.pipeline_components(models, models.controlnet))
    image = Image.open(sd3_assets["validation"][0]).convert("RGB")
    with torch.no_grad():
        prepared = pipeline.prepare_image(
            image,
            width=64,
            height=64,
            batch_size=1,
            num_images_per_prompt=1,
            device="cpu",
            dtype=torch.float32,
            do_classifier_free_guidance=False,
        )
        shift = 0 if force_zeros else models.vae.config.shift_factor
        theirs = (models.vae.encode(prepared).latent_dist.sample() - shift) * models.vae.config.scaling_factor
        pixels = torch.from_numpy(np.asarray(image)).permute(2, 0, 1)[None].float() / 255
        ours = SD3.encode_control(models, pixels, None)
    assert models.vae.config.shift_factor > 0.3  # a shift that matters
    assert torch.allclose(ours, theirs, atol=2e-3), (ours - theirs).abs().max()


# Runs


def test_sd3_run_saves_a_controlnet_the_pipeline_loads_and_generates_with(sd3_assets, tmp_path, capsys):
    # diffusers' SD3 test: 4 steps at 64 px, checkpoints every 2, the ControlNet at the output root.
    run(
        sd3_argv(
            sd3_assets,
            tmp_path,
            max_train_steps=4,
            checkpointing_steps=2,
            validation_steps=4,
            validation_prompt="red circle with blue background",
            validation_image=sd3_assets["validation"][0],
            num_validation_images=1,
            fidelity_samples=4,
        ),
        family="sd3",
    )
    assert {p.name for p in tmp_path.glob("checkpoint-*")} == {"checkpoint-2", "checkpoint-4"}
    assert (tmp_path / "checkpoint-4" / "controlnet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "validation" / "step-000004.png").is_file()
    card = (tmp_path / "README.md").read_text()
    assert "SD3ControlNetModel" in card and "StableDiffusion3ControlNetPipeline" in card and "sd3" in card
    options = json.loads((tmp_path / "training_options.json").read_text())
    assert options["family"] == "sd3" and options["arguments"]["weighting_scheme"] == "logit_normal"
    fresh = SD3ControlNetModel.from_transformer(
        SD3Transformer2DModel.from_pretrained(sd3_assets["sd3"], subfolder="transformer"),
        num_extra_conditioning_channels=0,
    ).state_dict()
    trained = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    assert trained.keys() == fresh.keys()
    assert any(not torch.equal(trained[name], fresh[name]) for name in trained)
    pipeline = StableDiffusion3ControlNetPipeline.from_pretrained(
        sd3_assets["sd3"], controlnet=SD3ControlNetModel.from_pretrained(tmp_path)
    )
    image = pipeline(
        "red circle",
        control_image=Image.open(sd3_assets["validation"][0]),
        num_inference_steps=2,
        height=64,
        width=64,
    ).images[0]
    assert image.size == (64, 64)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "fidelity/control_gap" in r] == [0, 4]
    # The standalone measure scores the saved ControlNet; the trained one responds to its image.
    capsys.readouterr()
    fidelity.main(
        [
            f"--pretrained_model_name_or_path={sd3_assets['sd3']}",
            f"--dataset_name={sd3_assets['fill']}",
            "--family=sd3",
            "--resolution=64",
            "--num_samples=4",
            f"--controlnet_model_name_or_path={tmp_path}",
        ]
    )
    scored = json.loads(capsys.readouterr().out)
    assert scored["num_samples"] == 4 and scored["matched"] != scored["mismatched"]
    assert scored["unet_only"] != scored["matched"]


def test_sd3_checkpoint_limit_and_resume(sd3_assets, tmp_path):
    # diffusers' checkpoint-limit cases, as the SD tests run them.
    run(sd3_argv(sd3_assets, tmp_path, max_train_steps=6, checkpointing_steps=2), family="sd3")
    assert {p.name for p in tmp_path.glob("checkpoint-*")} == {"checkpoint-2", "checkpoint-4", "checkpoint-6"}
    result = run(
        sd3_argv(
            sd3_assets,
            tmp_path,
            max_train_steps=8,
            checkpointing_steps=2,
            checkpoints_total_limit=2,
            resume_from_checkpoint="checkpoint-6",
        ),
        family="sd3",
    )
    assert result.global_step == 8
    assert {p.name for p in tmp_path.glob("checkpoint-*")} == {"checkpoint-6", "checkpoint-8"}


def test_sd3_resume_is_exact(sd3_assets, tmp_path):
    flags = {"max_train_steps": 4, "checkpointing_steps": 2, "proportion_empty_prompts": 0.5}
    run(sd3_argv(sd3_assets, tmp_path / "straight", **flags), family="sd3")
    run(sd3_argv(sd3_assets, tmp_path / "resumed", stop_at_step=2, **flags), family="sd3")
    run(sd3_argv(sd3_assets, tmp_path / "resumed", resume_from_checkpoint="latest", **flags), family="sd3")
    straight, resumed = (
        load_file(tmp_path / name / "diffusion_pytorch_model.safetensors") for name in ("straight", "resumed")
    )
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)
    losses = [[r["loss"] for r in step_records(tmp_path / name)] for name in ("straight", "resumed")]
    assert losses[0] == losses[1] and len(losses[0]) == 4


def test_the_cache_changes_nothing_but_speed(sd3_assets, tmp_path):
    """Cached latents and all three encoders' embeddings give the uncached run's losses exactly;
    prompt dropout is still drawn per sample per step."""
    flags = {"max_train_steps": 3, "proportion_empty_prompts": 0.5}
    run(sd3_argv(sd3_assets, tmp_path / "plain", **flags), family="sd3")
    cached = {"cache_latents": True, "cache_text_embeddings": True, "embeddings_cache_dir": tmp_path / "cache"}
    run(sd3_argv(sd3_assets, tmp_path / "cached", **flags, **cached), family="sd3")
    plain, with_cache = ([r["loss"] for r in step_records(tmp_path / name)] for name in ("plain", "cached"))
    assert plain == with_cache
    assert any((tmp_path / "cache").rglob("*.npy"))


def test_without_t5_trains_and_validates_with_the_pipeline_that_drops_it(sd3_assets, tmp_path):
    run(
        sd3_argv(
            sd3_assets,
            tmp_path,
            max_train_steps=2,
            drop_t5=True,
            validation_steps=2,
            validation_prompt="red circle",
            validation_image=sd3_assets["validation"][0],
            num_validation_images=1,
        ),
        family="sd3",
    )
    assert (tmp_path / "validation" / "step-000002.png").is_file()
    assert len(step_records(tmp_path)) == 2 and all(math.isfinite(r["loss"]) for r in step_records(tmp_path))


def test_two_processes_match_one_process_with_the_same_global_batch(sd3_assets, tmp_path):
    """DDP over 2 x 2 samples equals one process over the same 4: the last ControlNet block's
    prompt branch gets no gradient, which DDP must be told to look for, or the second step fails."""
    from test_distributed import start_two, wait_two

    flags = {"max_train_steps": 3, "controlnet_model_name_or_path": sd3_assets["controlnet_sd3"]}
    script = Path(__file__).parent.parent / "train_controlnet_sd3.py"
    two = start_two(script, sd3_argv(sd3_assets, tmp_path / "two", train_batch_size=2, **flags))
    run(sd3_argv(sd3_assets, tmp_path / "one", train_batch_size=4, **flags), family="sd3")
    wait_two(two)
    start = load_file(sd3_assets["controlnet_sd3"] / "diffusion_pytorch_model.safetensors")
    a, b = (load_file(tmp_path / name / "diffusion_pytorch_model.safetensors") for name in ("two", "one"))
    moved = math.sqrt(sum(((b[k].double() - start[k].double()) ** 2).sum().item() for k in b))
    apart = math.sqrt(sum(((a[k].double() - b[k].double()) ** 2).sum().item() for k in b))
    assert moved > 1e-2 and apart / moved < 1e-3, (moved, apart)
    losses = [[r["loss"] for r in step_records(tmp_path / name)] for name in ("two", "one")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_ema_and_streaming_carry_over_and_resume(sd3_assets, tmp_path):
    flags = {"max_train_steps": 3, "checkpointing_steps": 1, "use_ema": True, "streaming": True}
    run(sd3_argv(sd3_assets, tmp_path, stop_at_step=2, **flags), family="sd3")
    ema = tmp_path / "checkpoint-2" / "controlnet_ema"
    assert json.loads((ema / "config.json").read_text())["_class_name"] == "SD3ControlNetModel"
    result = run(sd3_argv(sd3_assets, tmp_path, resume_from_checkpoint="latest", **flags), family="sd3")
    assert result.global_step == 3
    saved = SD3ControlNetModel.from_pretrained(tmp_path)
    assert isinstance(saved, SD3ControlNetModel)


def test_dry_run_prints_the_sd3_plan_and_leaves_nothing(sd3_assets, tmp_path):
    result = run(sd3_argv(sd3_assets, tmp_path / "out", dry_run=True, max_train_steps=None), family="sd3")
    assert result.plan["family"] == "sd3" and result.plan["plan"]["num_samples"] == 24
    assert not (tmp_path / "out").exists()
