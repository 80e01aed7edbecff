"""Flags that change the training step or what a run hands on, trained for real on the tiny
fixtures: one sample, one step, compared with the plain run at the same seed."""

from __future__ import annotations

import collections
import inspect
import json
import math
import types
from pathlib import Path

import pytest
import torch
from conftest import RESOLUTION, step_records, train_argv
from diffusers import ControlNetModel, DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import compute_snr
from safetensors.torch import load_file

from controlnet_trainer import fixtures
from controlnet_trainer.cli import run
from controlnet_trainer.families.ddpm import min_snr_weights, sample_noise_and_timesteps
from controlnet_trainer.step import step_generators

PROMPT = "red circle with blue background"
# One row (index 0 of the selected rows; --fidelity_samples holds none out by default), one step:
# the step-1 loss is that sample's loss at its own noise and timestep, before any update.
ONE_SAMPLE = {"max_train_samples": 1, "train_batch_size": 1, "max_train_steps": 1, "seed": 0}


def drawn_timesteps(pipeline_dir: Path, indices, num_train_timesteps: int) -> torch.Tensor:
    """The timesteps a run at seed 0 draws in epoch 0 for these dataset indices, made as
    step.encode_batch and micro_batch_loss make them: each sample's device generator first
    draws the VAE posterior's noise, then the diffusion noise and the timestep."""
    vae = json.loads((pipeline_dir / "vae" / "config.json").read_text())
    downsampling = 2 ** (len(vae["block_out_channels"]) - 1)
    latent_shape = (1, vae["latent_channels"], RESOLUTION // downsampling, RESOLUTION // downsampling)
    _, generators = step_generators(0, 0, indices, torch.device("cpu"))
    timesteps = []
    for generator in generators:
        torch.randn(latent_shape, generator=generator)
        _, timestep = sample_noise_and_timesteps(torch.zeros(latent_shape), num_train_timesteps, generator)
        timesteps.append(timestep)
    return torch.cat(timesteps)


def step_one_loss(output_dir: Path) -> float:
    (record,) = [r for r in step_records(output_dir) if r["step"] == 1]
    return record["loss"]


def weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "diffusion_pytorch_model.safetensors")


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def tensors_in(state):
    """Every tensor of a state dict, however nested (bitsandbytes packs its per-parameter
    state into a tuple under a key of its own)."""
    if torch.is_tensor(state):
        yield state
    elif isinstance(state, dict):
        for value in state.values():
            yield from tensors_in(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from tensors_in(value)


class CheckpointSpy:
    """Stands in for torch.utils.checkpoint.checkpoint, which diffusers' checkpointed blocks call:
    counts the calls by the model (class name) whose forward made them, then checkpoints."""

    def __init__(self, checkpoint):
        self.checkpoint = checkpoint
        self.calls: collections.Counter[str | None] = collections.Counter()

    def __call__(self, function, *args, **kwargs):
        self.calls[calling_model()] += 1
        return self.checkpoint(function, *args, **kwargs)


def calling_model() -> str | None:
    frame = inspect.currentframe()
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, (ControlNetModel, UNet2DConditionModel)):
            return type(owner).__name__
        frame = frame.f_back
    return None


@pytest.fixture(scope="module")
def plain(assets, tmp_path_factory):
    """The run the others are compared with; it also validates at step 1 into TensorBoard, saves
    a checkpoint and pushes to a Hub whose two calls are recorded, not made."""
    import huggingface_hub
    import huggingface_hub.constants

    output_dir = tmp_path_factory.mktemp("plain")
    calls = {}

    def create_repo(repo_id, **kwargs):
        calls["create_repo"] = {"repo_id": repo_id, **kwargs}
        return types.SimpleNamespace(repo_id=repo_id)

    def upload_folder(**kwargs):
        calls["upload_folder"] = kwargs

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never a real upload
        patch.setattr(huggingface_hub, "create_repo", create_repo)
        patch.setattr(huggingface_hub, "upload_folder", upload_folder)
        run(
            train_argv(
                assets,
                output_dir,
                **ONE_SAMPLE,
                checkpointing_steps=1,
                validation_steps=1,
                validation_prompt=PROMPT,
                validation_image=assets["validation"][0],
                num_validation_images=1,
                report_to="tensorboard",
                push_to_hub=True,
                hub_model_id="me/flags-net",
            )
        )
    return output_dir, calls


@pytest.fixture(scope="module")
def min_snr(assets, tmp_path_factory):
    """--snr_gamma at half the SNR of the timestep the sample draws, so its weight is not 1
    (seed 0 draws t=874, SNR 0.019: a usual gamma of 5 would leave the loss as it is)."""
    scheduler = DDPMScheduler.from_pretrained(assets["sd"], subfolder="scheduler")
    timestep = drawn_timesteps(assets["sd"], [0], scheduler.config.num_train_timesteps)
    gamma = compute_snr(scheduler, timestep).item() / 2
    output_dir = tmp_path_factory.mktemp("min-snr")
    run(train_argv(assets, output_dir, **ONE_SAMPLE, snr_gamma=gamma))
    return output_dir, min_snr_weights(scheduler, timestep, gamma).item()


def test_snr_gamma_weights_the_loss_by_min_snr_at_the_drawn_timestep(plain, min_snr):
    output_dir, expected_weight = min_snr
    assert expected_weight == pytest.approx(0.5, rel=1e-4)  # min(snr, snr / 2) / snr
    assert step_one_loss(output_dir) / step_one_loss(plain[0]) == pytest.approx(expected_weight, rel=1e-5)


@pytest.fixture(scope="module")
def offset_and_8bit(assets, tmp_path_factory):
    """--noise_offset and --use_8bit_adam in one run: the offset acts on the step-1 loss, the
    optimizer only after it."""
    output_dir = tmp_path_factory.mktemp("offset-8bit")
    run(train_argv(assets, output_dir, **ONE_SAMPLE, noise_offset=0.1, use_8bit_adam=True, checkpointing_steps=1))
    return output_dir


def test_noise_offset_changes_the_noise_of_the_step(plain, offset_and_8bit):
    loss = step_one_loss(offset_and_8bit)
    assert math.isfinite(loss) and loss != step_one_loss(plain[0])


def test_8bit_adam_trains_with_8bit_state(assets, offset_and_8bit):
    unet = UNet2DConditionModel.from_pretrained(assets["sd"], subfolder="unet")
    start, trained = ControlNetModel.from_unet(unet).state_dict(), weights(offset_and_8bit)
    assert any(not torch.equal(start[name], trained[name]) for name in trained)
    saved = torch.load(offset_and_8bit / "checkpoint-1" / "optimizer.bin", weights_only=True)
    dtypes = collections.Counter(tensor.dtype for tensor in tensors_in(saved["state"]))
    # Both moments of every large tensor in 8 bits (bitsandbytes keeps small ones, < 4096 values, in fp32).
    large = sum(tensor.numel() >= 4096 for tensor in trained.values())
    assert large > 0 and dtypes[torch.uint8] == 2 * large


@pytest.fixture(scope="module")
def checkpointed(assets, tmp_path_factory):
    """--gradient_checkpointing, with a spy in place of the function diffusers' blocks checkpoint
    with, installed before the run enables checkpointing in the models."""
    output_dir = tmp_path_factory.mktemp("checkpointed")
    spy = CheckpointSpy(torch.utils.checkpoint.checkpoint)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.utils.checkpoint, "checkpoint", spy)
        run(train_argv(assets, output_dir, **ONE_SAMPLE, gradient_checkpointing=True))
    return output_dir, spy.calls


def test_gradient_checkpointing_is_active_in_both_models_and_changes_nothing(plain, checkpointed):
    output_dir, calls = checkpointed
    assert calls["ControlNetModel"] > 0 and calls["UNet2DConditionModel"] > 0, calls
    assert step_one_loss(output_dir) == pytest.approx(step_one_loss(plain[0]), rel=1e-6)
    expected, trained = weights(plain[0]), weights(output_dir)
    assert all(torch.allclose(expected[name], trained[name], rtol=1e-5, atol=1e-6) for name in expected)


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    """An SD 2.x-style pipeline (v-prediction, linear projections) and a copy of it that
    predicts epsilon with the same weights."""
    root = tmp_path_factory.mktemp("sd2")
    v_prediction = fixtures.build_tiny_sd(root / "v", prediction_type="v_prediction", use_linear_projection=True)
    epsilon = fixtures.copy_with_scheduler(v_prediction, root / "epsilon", prediction_type="epsilon")
    return {"v_prediction": v_prediction, "epsilon": epsilon}


def test_v_prediction_trains_on_the_velocity(assets, sd2, tmp_path):
    losses = {}
    for name, pipeline in sd2.items():
        run(train_argv(assets, tmp_path / name, pretrained_model_name_or_path=pipeline, **ONE_SAMPLE))
        losses[name] = step_one_loss(tmp_path / name)
    # The same weights, sample, noise and timestep: only the target differs.
    assert math.isfinite(losses["v_prediction"]) and losses["v_prediction"] != losses["epsilon"]
    controlnet = json.loads((tmp_path / "v_prediction" / "config.json").read_text())
    assert controlnet["use_linear_projection"] is True
    assert weights(tmp_path / "v_prediction")["down_blocks.0.attentions.0.proj_in.weight"].ndim == 2


def test_zero_terminal_snr_with_min_snr_trains_through_the_last_timestep(assets, tmp_path):
    # Two train timesteps: the last, whose SNR is zero under --rescale_betas_zero_snr, is drawn
    # by half the samples, where Min-SNR's epsilon weight is its limit, 1, not 0 / 0.
    pipeline = fixtures.copy_with_scheduler(assets["sd"], tmp_path / "two-steps", num_train_timesteps=2)
    samples = {"max_train_samples": 4, "train_batch_size": 4, "max_train_steps": 1}
    scheduler = DDPMScheduler.from_pretrained(pipeline, subfolder="scheduler", rescale_betas_zero_snr=True)
    drawn = drawn_timesteps(pipeline, range(4), scheduler.config.num_train_timesteps)
    assert compute_snr(scheduler, drawn).min() == 0
    output = tmp_path / "out"
    flags = {"rescale_betas_zero_snr": True, "snr_gamma": 5.0}
    result = run(train_argv(assets, output, pretrained_model_name_or_path=pipeline, **samples, **flags))
    assert result.global_step == 1 and (output / "diffusion_pytorch_model.safetensors").exists()
    assert math.isfinite(step_one_loss(output))


def test_validation_images_reach_tensorboard(plain):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    images = {}
    for events in (plain[0] / "logs").rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events), size_guidance={"images": 0})
        accumulator.Reload()
        images |= {tag: accumulator.Images(tag) for tag in accumulator.Tags()["images"]}
    assert list(images) == [f"validation/0: {PROMPT}"]
    (event,) = images[f"validation/0: {PROMPT}"]
    # The conditioning image and the one generated image, side by side.
    assert (event.step, event.width, event.height) == (1, 2 * RESOLUTION, RESOLUTION)


def test_push_to_hub_uploads_the_model_without_checkpoints(plain):
    from huggingface_hub.utils import filter_repo_objects

    output_dir, calls = plain
    assert calls["create_repo"]["repo_id"] == "me/flags-net"
    upload = calls["upload_folder"]
    assert upload["repo_id"] == "me/flags-net" and Path(upload["folder_path"]) == output_dir
    present = files_under(output_dir)
    uploaded = list(
        filter_repo_objects(
            present, allow_patterns=upload.get("allow_patterns"), ignore_patterns=upload.get("ignore_patterns")
        )
    )
    assert any(name.startswith("checkpoint-1/") for name in present)  # there was one to leave out
    assert not [name for name in uploaded if "checkpoint" in name]
    assert {"config.json", "diffusion_pytorch_model.safetensors", "README.md"} <= set(uploaded)
