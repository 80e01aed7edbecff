"""Tests for the single-file ControlNet export in the original (A1111 / ComfyUI) layout."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from controlnet_trainer import export
from controlnet_trainer.errors import InputError

# diffusers' from_single_file (0.42) never maps label_emb for ControlNets: it loads SDXL's
# add_embedding nowhere (left random with low_cpu_mem_usage=False, on meta otherwise).
# SGM's label_emb is Sequential(Sequential(Linear, SiLU, Linear)), so its linears are 0.0 and 0.2.
DIFFUSERS_SKIPS_SDXL = {
    f"add_embedding.linear_{i}.{p}": f"label_emb.0.{j}.{p}" for i, j in ((1, 0), (2, 2)) for p in ("weight", "bias")
}
# Real architectures, built weightless: the tiny fixtures have only 2 down blocks.
FULL_SIZE = {
    "sd15": {},  # ControlNetModel's defaults are SD 1.5's
    "sd21": {"attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True, "cross_attention_dim": 1024},
    "sdxl": {
        "block_out_channels": [320, 640, 1280],
        "transformer_layers_per_block": [1, 2, 10],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "attention_head_dim": [5, 10, 20],
        "use_linear_projection": True,
        "cross_attention_dim": 2048,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
    },
}


def _perturbed(source: Path, out: Path, seed: int) -> Path:
    """A copy with random values in every tensor: zero-initialised convs would hide swapped mappings."""
    controlnet = ControlNetModel.from_pretrained(str(source))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in controlnet.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    controlnet.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def controlnets(sdxl_assets, tmp_path_factory) -> dict[str, Path]:
    """The session's tiny SD and SDXL ControlNets (see conftest), perturbed in copies."""
    root = tmp_path_factory.mktemp("export")
    return {
        "sd": _perturbed(sdxl_assets["controlnet"], root / "cn-sd", seed=1),
        "sdxl": _perturbed(sdxl_assets["controlnet_sdxl"], root / "cn-sdxl", seed=2),
    }


@pytest.fixture(scope="module")
def exported(controlnets, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("single")
    return {
        family: export.save_single_file(ControlNetModel.from_pretrained(str(path)), out / f"{family}.safetensors")
        for family, path in controlnets.items()
    }


def _assert_identical(loaded: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], skip=()) -> None:
    assert loaded.keys() == reference.keys()
    same = [k for k in reference if loaded[k].dtype == reference[k].dtype and torch.equal(loaded[k], reference[k])]
    different = sorted(reference.keys() - set(same) - set(skip))
    assert not different, different


def _reference(controlnets, family) -> dict[str, torch.Tensor]:
    return ControlNetModel.from_pretrained(str(controlnets[family])).state_dict()


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_file_has_original_layout_keys(exported, controlnets, family):
    stored = load_file(str(exported[family]))
    assert all(key.startswith("control_model.") for key in stored)
    assert len(stored) == len(_reference(controlnets, family))
    # Tiny UNets: 2 down blocks of 2 layers -> input_blocks 0..5 (3 = downsampler), 6 zero convs.
    for name in (
        "time_embed.0.weight",
        "input_blocks.0.0.weight",
        "input_blocks.1.0.in_layers.0.weight",
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "input_blocks.3.0.op.weight",
        "input_blocks.4.0.skip_connection.weight",
        "input_blocks.5.0.emb_layers.1.weight",
        "input_hint_block.0.weight",
        "input_hint_block.12.weight",
        "input_hint_block.14.weight",
        "zero_convs.0.0.weight",
        "zero_convs.5.0.bias",
        "middle_block.0.out_layers.3.weight",
        "middle_block.1.proj_out.weight",
        "middle_block.2.in_layers.2.weight",
        "middle_block_out.0.weight",
    ):
        assert f"control_model.{name}" in stored, name
    assert ("control_model.label_emb.0.0.weight" in stored) == (family == "sdxl")
    with safe_open(str(exported[family]), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}


def test_projections_keep_their_layout(exported):
    """SD 1.x: 1x1 conv proj_in as in the original; SDXL: linear (use_linear_in_transformer)."""
    key = "control_model.input_blocks.1.1.proj_in.weight"
    assert load_file(str(exported["sd"]))[key].ndim == 4
    assert load_file(str(exported["sdxl"]))[key].ndim == 2


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_diffusers_from_single_file_reads_the_export(exported, controlnets, family):
    """diffusers' own loader is the oracle for the mapping; it works offline with a local config."""
    loaded = ControlNetModel.from_single_file(
        str(exported[family]), config=str(controlnets[family]), local_files_only=True, low_cpu_mem_usage=False
    )
    reference = _reference(controlnets, family)
    skip = DIFFUSERS_SKIPS_SDXL if family == "sdxl" else {}
    _assert_identical(loaded.state_dict(), reference, skip=skip)
    stored = load_file(str(exported[family]))
    for key, original in skip.items():  # what diffusers skips, checked by name
        assert torch.equal(stored[f"control_model.{original}"], reference[key])


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_round_trip_is_exact(exported, controlnets, family):
    loaded = export.original_to_diffusers(exported[family], controlnets[family])
    _assert_identical(loaded.state_dict(), _reference(controlnets, family))


@pytest.mark.parametrize("config", FULL_SIZE.values(), ids=FULL_SIZE.keys())
def test_full_size_layouts_invert_diffusers_conversion(config):
    """Real SD 1.5 / 2.1 / SDXL shapes (4 or 3 down blocks, deep transformers), weightless on meta."""
    with init_empty_weights():
        controlnet = ControlNetModel(**config)
    state = controlnet.state_dict()
    original = export.diffusers_to_original(state, controlnet.config)
    back = convert_controlnet_checkpoint({f"control_model.{k}": v for k, v in original.items()}, controlnet.config)
    assert {k for k in state if back.get(k) is state[k]} == state.keys() - DIFFUSERS_SKIPS_SDXL.keys()
    assert set(back) <= set(state)
    assert len([k for k in original if k.startswith("zero_convs.") and k.endswith(".weight")]) == (
        9 if "addition_embed_type" in config else 12
    )


def test_dtype_is_kept(controlnets, tmp_path):
    half = ControlNetModel.from_pretrained(str(controlnets["sd"]), torch_dtype=torch.float16)
    path = export.save_single_file(half, tmp_path / "half.safetensors")
    assert {t.dtype for t in load_file(str(path)).values()} == {torch.float16}
    loaded = export.original_to_diffusers(path, controlnets["sd"])
    _assert_identical(loaded.state_dict(), half.state_dict())


def test_mismatched_config_is_refused(exported, controlnets):
    with pytest.raises(InputError, match="does not match"):
        export.original_to_diffusers(exported["sd"], controlnets["sdxl"])


def test_mismatched_sizes_are_refused(exported, controlnets, tmp_path):
    config = json.loads((controlnets["sd"] / "config.json").read_text())
    config["conditioning_embedding_out_channels"] = [16, 32, 96, 128]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        export.MismatchError, match=r"3 keys of other shapes \(e.g. input_hint_block.12.bias \[256\] vs \[128\]"
    ):
        export.original_to_diffusers(exported["sd"], tmp_path)


def test_config_can_be_a_mapping(exported, controlnets):
    config = ControlNetModel.load_config(str(controlnets["sdxl"]))
    loaded = export.original_to_diffusers(exported["sdxl"], config)
    _assert_identical(loaded.state_dict(), _reference(controlnets, "sdxl"))
    with pytest.raises(export.MismatchError, match=r"does not match the SD net: \d+ keys missing.*label_emb"):
        export.original_to_diffusers(exported["sd"], config, config_name="the SD net")


def test_keys_outside_the_prefix_are_ignored_and_bare_files_read(exported, controlnets, tmp_path):
    stored = load_file(str(exported["sd"]))
    # A full A1111 checkpoint: the ControlNet beside the base model's UNet.
    full = stored | {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}
    save_file(full, str(tmp_path / "full.safetensors"))
    bare = {k.removeprefix("control_model."): v for k, v in stored.items()}
    save_file(bare, str(tmp_path / "bare.safetensors"))
    for name in ("full", "bare"):
        loaded = export.original_to_diffusers(tmp_path / f"{name}.safetensors", controlnets["sd"])
        _assert_identical(loaded.state_dict(), _reference(controlnets, "sd"))


def test_projections_load_as_linear_or_conv(exported, controlnets, tmp_path):
    """Files in the wild hold either form; the config decides which the model takes."""
    for family, reshape in (("sd", lambda t: t[:, :, 0, 0]), ("sdxl", lambda t: t[:, :, None, None])):
        stored = load_file(str(exported[family]))
        swapped = {k: reshape(v).contiguous() if k.endswith(export.PROJECTIONS) else v for k, v in stored.items()}
        assert swapped.keys() == stored.keys() and any(swapped[k].ndim != stored[k].ndim for k in stored)
        save_file(swapped, str(tmp_path / f"{family}.safetensors"))
        loaded = export.original_to_diffusers(tmp_path / f"{family}.safetensors", controlnets[family])
        _assert_identical(loaded.state_dict(), _reference(controlnets, family))


def test_conditioning_config_is_read_from_the_hint_block(exported, sdxl_assets, tmp_path):
    assert export.conditioning_config(exported["sd"]) == {
        "conditioning_channels": 3,
        "conditioning_embedding_out_channels": (16, 32, 96, 256),
    }
    unet = UNet2DConditionModel.from_pretrained(str(sdxl_assets["sd"]), subfolder="unet")
    other = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 24), conditioning_channels=1)
    path = export.save_single_file(other, tmp_path / "other.safetensors")
    assert export.conditioning_config(path) == {
        "conditioning_channels": 1,
        "conditioning_embedding_out_channels": (8, 24),
    }
    config = export.config_for_unet(path, unet)
    assert {k: v for k, v in config.items() if not k.startswith("_")} == {
        k: v for k, v in other.config.items() if not k.startswith("_")
    }


def test_a_file_without_a_controlnet_is_refused(sdxl_assets):
    unet_file = sdxl_assets["sd"] / "unet" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(InputError, match=r"holds no ControlNet conditioning embedding.*found keys such as"):
        export.conditioning_config(unet_file)
    diffusers_file = sdxl_assets["controlnet"] / "diffusion_pytorch_model.safetensors"
    with pytest.raises(
        InputError, match=rf"diffusers layout, which loads from its folder: give {sdxl_assets['controlnet']}"
    ):
        export.conditioning_config(diffusers_file)


@pytest.mark.parametrize("name", ["control_sd15_canny.pth", "controlnet.ckpt", "diffusion_pytorch_model.bin"])
def test_pickled_checkpoints_are_refused_unread(tmp_path, name):
    (tmp_path / name).write_bytes(b"not read")
    with pytest.raises(InputError, match=r"read only as \.safetensors.*pickles.*weights_only=True"):
        export.conditioning_config(tmp_path / name)


def test_unknown_parameter_is_refused(controlnets):
    config = json.loads((controlnets["sd"] / "config.json").read_text())
    with pytest.raises(InputError, match="encoder_hid_proj"):
        export.diffusers_to_original({"encoder_hid_proj.weight": torch.zeros(1)}, config)


def test_command_converts_both_ways(controlnets, tmp_path):
    checkpoint = tmp_path / "checkpoint-10"
    shutil.copytree(controlnets["sd"], checkpoint / "controlnet")  # a checkpoint's layout works too
    single = tmp_path / "out" / "cn.safetensors"
    command = [sys.executable, "-m", "controlnet_trainer.export", str(checkpoint), str(single), "--dtype", "float16"]
    result = subprocess.run(command, check=False, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr
    stored = load_file(str(single))
    assert "control_model.zero_convs.0.0.weight" in stored
    assert {tensor.dtype for tensor in stored.values()} == {torch.float16}

    # The reverse goes through the same main(); another interpreter would cost ~8 s of imports.
    export.main(["--to_diffusers", "--config", str(checkpoint), str(single), str(tmp_path / "back")])
    back = load_file(str(tmp_path / "back" / "diffusion_pytorch_model.safetensors"))
    half = {key: tensor.half() for key, tensor in _reference(controlnets, "sd").items()}
    _assert_identical(back, half)  # float16 kept, no round trip through float32


def test_other_mid_blocks_are_refused():
    with pytest.raises(InputError, match="mid_block_type"):
        export.diffusers_to_original({}, {"mid_block_type": "UNetMidBlock2D"})


def test_command_needs_config_to_go_back(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--to_diffusers", str(tmp_path / "a.safetensors"), str(tmp_path / "b")])
    assert exit_info.value.code == 2
    assert "--config" in capsys.readouterr().err
