"""The diffusion step: target, Min-SNR weighting, and the ControlNet residual path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, DDPMScheduler, UNet2DConditionModel

from controlnet_trainer.families import Models, TextConditioning
from controlnet_trainer.families.ddpm import min_snr_weights, sample_noise_and_timesteps
from controlnet_trainer.families.sd import FAMILY as SD
from controlnet_trainer.settings import ObjectiveSettings


@pytest.fixture(scope="module")
def tiny(assets):
    unet = UNet2DConditionModel.from_pretrained(assets["sd"], subfolder="unet")
    controlnet = ControlNetModel.from_unet(unet)
    scheduler = DDPMScheduler.from_pretrained(assets["sd"], subfolder="scheduler")
    torch.manual_seed(0)
    inputs = {
        "latents": torch.randn(2, 4, 8, 8),
        "encoder_hidden_states": torch.randn(2, 77, 32),
        "controlnet_image": torch.rand(2, 3, 64, 64),
    }
    return unet, controlnet, scheduler, inputs


def loss_for(tiny, scheduler=None, **kwargs):
    unet, controlnet, default_scheduler, inputs = tiny
    noise, timesteps = sample_noise_and_timesteps(inputs["latents"], 1000, torch.Generator().manual_seed(1))
    merged = inputs | {"noise": noise, "timesteps": timesteps} | kwargs
    models = Models((), (), None, unet, controlnet, scheduler or default_scheduler)
    step = {name: value for name, value in merged.items() if name != "encoder_hidden_states"}
    with torch.no_grad():
        return SD.loss(models, controlnet, text=TextConditioning(merged["encoder_hidden_states"]), **step), merged


def test_epsilon_loss_is_mse_to_noise_and_fresh_controlnet_adds_nothing(tiny):
    unet, _, scheduler, _ = tiny
    loss, used = loss_for(tiny)
    noisy = scheduler.add_noise(used["latents"], used["noise"], used["timesteps"])
    with torch.no_grad():
        plain = unet(noisy, used["timesteps"], encoder_hidden_states=used["encoder_hidden_states"]).sample
    # Zero convolutions: a ControlNet fresh from the UNet leaves the prediction unchanged.
    assert loss.item() == pytest.approx(F.mse_loss(plain, used["noise"]).item(), rel=1e-5)
    without, _ = loss_for(tiny, controlnet_image=None)
    assert loss.item() == pytest.approx(without.item(), rel=1e-6)


def test_v_prediction_target(tiny):
    unet, _, scheduler, _ = tiny
    v_scheduler = DDPMScheduler.from_config(scheduler.config, prediction_type="v_prediction")
    loss, used = loss_for(tiny, scheduler=v_scheduler)
    noisy = v_scheduler.add_noise(used["latents"], used["noise"], used["timesteps"])
    velocity = v_scheduler.get_velocity(used["latents"], used["noise"], used["timesteps"])
    with torch.no_grad():
        plain = unet(noisy, used["timesteps"], encoder_hidden_states=used["encoder_hidden_states"]).sample
    assert loss.item() == pytest.approx(F.mse_loss(plain, velocity).item(), rel=1e-5)


def test_min_snr_weights_follow_the_formula(tiny):
    _, _, scheduler, _ = tiny
    timesteps = torch.tensor([0, 10, 500, 999])
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    expected = torch.minimum(snr, torch.tensor(5.0)) / snr
    assert torch.allclose(min_snr_weights(scheduler, timesteps, 5.0), expected, rtol=1e-5)
    v_scheduler = DDPMScheduler.from_config(scheduler.config, prediction_type="v_prediction")
    assert torch.allclose(
        min_snr_weights(v_scheduler, timesteps, 5.0), torch.minimum(snr, torch.tensor(5.0)) / (snr + 1), rtol=1e-5
    )
    # High-noise steps (low SNR) keep full weight for epsilon; low-noise steps are damped.
    weights = min_snr_weights(scheduler, timesteps, 5.0)
    assert weights[-1] == pytest.approx(1.0) and weights[0] < 0.01


def test_min_snr_weights_take_their_limit_where_the_snr_is_zero(tiny):
    # --rescale_betas_zero_snr: the last timestep's SNR is exactly 0, where min(snr, gamma) / snr
    # is 0 / 0; the weight's limit there is 1 for epsilon and 0 for v-prediction.
    _, _, scheduler, _ = tiny
    zero_terminal = DDPMScheduler.from_config(scheduler.config, rescale_betas_zero_snr=True)
    v_zero_terminal = DDPMScheduler.from_config(zero_terminal.config, prediction_type="v_prediction")
    timesteps = torch.tensor([0, 500, 998, 999])
    alphas = zero_terminal.alphas_cumprod[timesteps]
    assert alphas[-1] == 0  # what makes the SNR zero
    snr = alphas[:-1] / (1 - alphas[:-1])
    epsilon = min_snr_weights(zero_terminal, timesteps, 5.0)
    assert epsilon[-1].item() == 1.0
    assert torch.allclose(epsilon[:-1], torch.minimum(snr, torch.tensor(5.0)) / snr, rtol=1e-5)
    v = min_snr_weights(v_zero_terminal, timesteps, 5.0)
    assert v[-1].item() == 0.0
    assert torch.allclose(v[:-1], torch.minimum(snr, torch.tensor(5.0)) / (snr + 1), rtol=1e-5)
    last = torch.full((2,), 999)
    loss, _ = loss_for(tiny, scheduler=zero_terminal, timesteps=last, objective=ObjectiveSettings(snr_gamma=5.0))
    plain, _ = loss_for(tiny, scheduler=zero_terminal, timesteps=last)
    assert loss.item() == pytest.approx(plain.item(), rel=1e-6)  # full weight, and finite


def test_min_snr_changes_the_loss_by_the_per_sample_weights(tiny):
    plain, used = loss_for(tiny, reduce=False)
    weighted, _ = loss_for(tiny, reduce=False, objective=ObjectiveSettings(snr_gamma=5.0))
    weights = min_snr_weights(tiny[2], used["timesteps"], 5.0)
    assert torch.allclose(weighted, plain * weights, rtol=1e-5)


def test_residuals_reach_the_unet(tiny):
    unet, _, scheduler, inputs = tiny
    changed = ControlNetModel.from_unet(unet)
    with torch.no_grad():
        # Zero-initialised: the output convolutions and the hint embedding's last layer.
        for block in [
            *changed.controlnet_down_blocks,
            changed.controlnet_mid_block,
            changed.controlnet_cond_embedding.conv_out,
        ]:
            block.weight.normal_(0, 0.1)
    base, _ = loss_for(tiny)
    altered, _ = loss_for((unet, changed, scheduler, inputs))
    other_image, _ = loss_for((unet, changed, scheduler, inputs), controlnet_image=torch.zeros(2, 3, 64, 64))
    assert altered.item() != pytest.approx(base.item(), rel=1e-4)
    # The conditioning image now changes the prediction (it is ignored while conv_out is zero).
    assert altered.item() != other_image.item()


def test_noise_offset_shifts_each_channel_by_a_constant():
    latents = torch.zeros(3, 4, 8, 8)
    plain, _ = sample_noise_and_timesteps(latents, 1000, torch.Generator().manual_seed(0))
    offset, _ = sample_noise_and_timesteps(latents, 1000, torch.Generator().manual_seed(0), 0.1)
    shift = offset - plain
    assert shift.abs().max() > 0
    # One constant per sample and channel: the difference is flat over height and width.
    assert torch.allclose(shift, shift[..., :1, :1].expand_as(shift))
    assert shift[..., 0, 0].abs().max() < 0.6  # 0.1 x a standard normal draw


def test_zero_terminal_snr_flag_reaches_the_scheduler(assets):

    from controlnet_trainer.models import load_models
    from controlnet_trainer.settings import ModelSettings

    settings = ModelSettings(pretrained_model_name_or_path=str(assets["sd"]), rescale_betas_zero_snr=True)
    scheduler = load_models(settings, SD).noise_scheduler
    assert scheduler.alphas_cumprod[-1].item() < 1e-6  # SNR at the last timestep is zero
