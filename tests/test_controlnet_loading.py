"""Starting training from a single-file ControlNet, and ControlNets that cannot fit the VAE."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import step_records, train_argv
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from controlnet_trainer import export
from controlnet_trainer.cli import run
from controlnet_trainer.families.unet import check_conditioning_scale
from controlnet_trainer.families.unet import load_controlnet as _load_controlnet
from controlnet_trainer.models import ModelError
from controlnet_trainer.settings import ModelSettings

# diffusers' from_single_file (0.42) leaves SDXL's add_embedding unloaded (see test_export.py).
DIFFUSERS_SKIPS_SDXL = {f"add_embedding.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
LEARNING_RATE = 1e-4


def _controlnet_args(source: Path, base: Path) -> ModelSettings:
    return ModelSettings(pretrained_model_name_or_path=str(base), controlnet_model_name_or_path=str(source))


def _unet(base: Path) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(str(base), subfolder="unet")


@pytest.fixture(scope="module")
def controlnets(sdxl_assets, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """The tiny SD and SDXL ControlNets with noise on every weight (zero convs and copies of the
    UNet would hide a swapped mapping or a ControlNet built from the UNet instead of the file), as a
    diffusers folder and as one original-layout file."""
    root = tmp_path_factory.mktemp("loading")
    generator = torch.Generator().manual_seed(0)
    made = {}
    for family, name in (("sd", "controlnet"), ("sdxl", "controlnet_sdxl")):
        controlnet = ControlNetModel.from_pretrained(str(sdxl_assets[name]))
        with torch.no_grad():
            for parameter in controlnet.parameters():
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
        controlnet.save_pretrained(str(root / family))
        file = export.save_single_file(controlnet, root / f"{family}.safetensors")
        made[family] = {"folder": root / family, "file": file, "base": sdxl_assets[family]}
    return made


def _public(config) -> dict:
    return {key: list(value) if isinstance(value, tuple) else value for key, value in config.items() if key[0] != "_"}


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_a_single_file_loads_as_its_folder(controlnets, family):
    paths = controlnets[family]
    loaded = _load_controlnet(_controlnet_args(paths["file"], paths["base"]), _unet(paths["base"]))
    reference = ControlNetModel.from_pretrained(str(paths["folder"]))
    assert _public(loaded.config) == _public(reference.config)
    expected = reference.state_dict()
    state = loaded.state_dict()
    assert state.keys() == expected.keys()
    assert [k for k in expected if state[k].dtype != torch.float32 or not torch.equal(state[k], expected[k])] == []
    assert all(parameter.requires_grad for parameter in loaded.parameters())


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_diffusers_loader_agrees(controlnets, family):
    paths = controlnets[family]
    loaded = _load_controlnet(_controlnet_args(paths["file"], paths["base"]), _unet(paths["base"])).state_dict()
    theirs = ControlNetModel.from_single_file(
        str(paths["file"]), config=str(paths["folder"]), local_files_only=True, low_cpu_mem_usage=False
    ).state_dict()
    skip = DIFFUSERS_SKIPS_SDXL if family == "sdxl" else set()
    assert theirs.keys() == loaded.keys()
    assert [k for k in loaded if k not in skip and not torch.equal(theirs[k], loaded[k])] == []


def test_a_float16_file_trains_in_float32(controlnets, tmp_path):
    paths = controlnets["sd"]
    half = {k: v.half() for k, v in load_file(str(paths["file"])).items()}
    save_file(half, str(tmp_path / "half.safetensors"))
    loaded = _load_controlnet(_controlnet_args(tmp_path / "half.safetensors", paths["base"]), _unet(paths["base"]))
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    reference = ControlNetModel.from_pretrained(str(paths["folder"])).state_dict()
    assert all(torch.equal(tensor, reference[k].half().float()) for k, tensor in loaded.state_dict().items())


def test_a_file_for_another_base_model_is_one_paragraph(controlnets):
    sd, sdxl = controlnets["sd"], controlnets["sdxl"]
    with pytest.raises(ModelError) as error:
        _load_controlnet(_controlnet_args(sd["file"], sdxl["base"]), _unet(sdxl["base"]))
    message = str(error.value)
    assert "\n" not in message
    assert str(sd["file"]) in message and repr(str(sdxl["base"])) in message
    assert "keys missing (e.g. label_emb" in message and "keys of other shapes" in message
    assert message.endswith("or omit --controlnet_model_name_or_path to build one from the UNet.")


@pytest.mark.parametrize("name", ["control_sd15_canny.pth", "controlnet.ckpt"])
def test_pickles_and_missing_files_are_named(controlnets, tmp_path, name):
    base = controlnets["sd"]["base"]
    unet = _unet(base)
    (tmp_path / name).write_bytes(b"never unpickled")
    with pytest.raises(ModelError, match=rf"`--controlnet_model_name_or_path`: .*{name} is a .* file, .*\.safetensors"):
        _load_controlnet(_controlnet_args(tmp_path / name, base), unet)
    with pytest.raises(ModelError, match=r"points to .*missing\.safetensors', which does not exist"):
        _load_controlnet(_controlnet_args(tmp_path / "missing.safetensors", base), unet)


def test_training_starts_from_the_single_file(controlnets, assets, tmp_path):
    """One step at a small learning rate: every weight stays within one Adam step of the file's,
    which sit 0.05 (the noise) away from a ControlNet built from the UNet, and the step moves them."""
    paths = controlnets["sd"]
    argv = train_argv(
        assets,
        tmp_path,
        controlnet_model_name_or_path=paths["file"],
        max_train_steps=1,
        train_batch_size=1,
        learning_rate=LEARNING_RATE,
    )
    run(argv)
    assert len(step_records(tmp_path)) == 1
    trained = load_file(str(tmp_path / "diffusion_pytorch_model.safetensors"))
    start = ControlNetModel.from_pretrained(str(paths["folder"])).state_dict()
    assert trained.keys() == start.keys()
    # Adam's first step moves each weight by at most the learning rate (plus a 1e-2 weight decay).
    farthest = max((trained[k] - start[k]).abs().max().item() for k in start)
    assert farthest <= 1.05 * LEARNING_RATE
    moved = [k for k in start if not torch.equal(trained[k], start[k])]
    assert len(moved) > 0.9 * len(start)


@pytest.fixture(scope="module")
def two_x_controlnet(assets, tmp_path_factory) -> Path:
    """A ControlNet whose conditioning embedding halves the image once, for the tiny VAE's 8x."""
    path = tmp_path_factory.mktemp("two-x") / "controlnet"
    unet = _unet(assets["sd"])
    ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32)).save_pretrained(str(path))
    return path


def test_a_controlnet_for_another_vae_is_refused_before_training(assets, two_x_controlnet, tmp_path):
    with pytest.raises(ModelError) as error:
        run(train_argv(assets, tmp_path, controlnet_model_name_or_path=two_x_controlnet, max_train_steps=1))
    message = str(error.value)
    assert f"The ControlNet in --controlnet_model_name_or_path '{two_x_controlnet}' downsamples" in message
    assert "conditioning image 2x (conditioning_embedding_out_channels [16, 32])" in message
    assert "downsamples 8x (block_out_channels [8, 16, 32, 32])" in message
    assert "conditioning_embedding_out_channels=(16, 32, 96, 256)" in message
    assert message.endswith("or omit it to build one from the UNet.")
    assert step_records(tmp_path) == []


def test_the_default_embedding_on_a_2x_vae_is_refused(assets):
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
    )
    controlnet = ControlNetModel.from_unet(_unet(assets["sd"]))
    with pytest.raises(ModelError) as error:
        check_conditioning_scale(controlnet, vae, controlnet_source=None, vae_source="tiny/vae")
    message = str(error.value)
    assert "built from the UNet (ControlNetModel.from_unet's default embedding) downsamples" in message
    assert (
        "8x (conditioning_embedding_out_channels [16, 32, 96, 256]), but the VAE of 'tiny/vae' downsamples 2x"
        in message
    )
    assert "conditioning_embedding_out_channels=(16, 32))" in message and "omit" not in message
