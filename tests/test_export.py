"""Tests for the single-file ControlNet export in the original (A1111 / ComfyUI) layout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import ControlNetModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from controlnet_trainer import export, fixtures
from controlnet_trainer.errors import InputError

# diffusers' from_single_file (0.42) never maps label_emb for ControlNets: it loads SDXL's
# add_embedding nowhere (left random with low_cpu_mem_usage=False, on meta otherwise).
# SGM's label_emb is Sequential(Sequential(Linear, SiLU, Linear)), so its linears are 0.0 and 0.2.
DIFFUSERS_SKIPS_SDXL = {
    f"add_embedding.linear_{i}.{p}": f"label_emb.0.{j}.{p}" for i, j in ((1, 0), (2, 2)) for p in ("weight", "bias")
}


def _perturbed(directory: Path, seed: int) -> Path:
    """Random values in every tensor: zero-initialised convs would hide swapped mappings."""
    controlnet = ControlNetModel.from_pretrained(str(directory))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in controlnet.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    controlnet.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def controlnets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    fixtures.build_tiny_sd(root / "sd")
    fixtures.build_tiny_sdxl(root / "sdxl")
    return {
        "sd": _perturbed(fixtures.build_tiny_controlnet(root / "sd", root / "cn-sd"), seed=1),
        "sdxl": _perturbed(fixtures.build_tiny_controlnet(root / "sdxl", root / "cn-sdxl"), seed=2),
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
    different = [k for k in reference if k not in skip and not torch.equal(loaded[k], reference[k])]
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


def test_dtype_is_kept(controlnets, tmp_path):
    half = ControlNetModel.from_pretrained(str(controlnets["sd"]), torch_dtype=torch.float16)
    path = export.save_single_file(half, tmp_path / "half.safetensors")
    assert {t.dtype for t in load_file(str(path)).values()} == {torch.float16}
    loaded = export.original_to_diffusers(path, controlnets["sd"])
    _assert_identical(loaded.state_dict(), half.state_dict())


def test_mismatched_config_is_refused(exported, controlnets):
    with pytest.raises(InputError, match="does not match"):
        export.original_to_diffusers(exported["sd"], controlnets["sdxl"])


def test_unprefixed_keys_are_refused(exported, controlnets, tmp_path):
    bare = {k.removeprefix("control_model."): v for k, v in load_file(str(exported["sd"])).items()}
    save_file(bare, str(tmp_path / "bare.safetensors"))
    with pytest.raises(InputError, match="prefix"):
        export.original_to_diffusers(tmp_path / "bare.safetensors", controlnets["sd"])
    loaded = export.original_to_diffusers(tmp_path / "bare.safetensors", controlnets["sd"], prefix="")
    _assert_identical(loaded.state_dict(), _reference(controlnets, "sd"))


def test_unknown_parameter_is_refused(controlnets):
    config = json.loads((controlnets["sd"] / "config.json").read_text())
    with pytest.raises(InputError, match="encoder_hid_proj"):
        export.diffusers_to_original({"encoder_hid_proj.weight": torch.zeros(1)}, config)


def test_command_converts_both_ways(controlnets, tmp_path):
    checkpoint = tmp_path / "checkpoint-10"
    (checkpoint / "controlnet").parent.mkdir()
    (checkpoint / "controlnet").symlink_to(controlnets["sd"])  # a checkpoint's layout works too
    single = tmp_path / "out" / "cn.safetensors"
    command = [sys.executable, "-m", "controlnet_trainer.export", str(checkpoint), str(single)]
    result = subprocess.run(command, check=False, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr
    assert "control_model.zero_convs.0.0.weight" in load_file(str(single))

    # The reverse direction goes through the same main(); an interpreter start costs ~8 s.
    export.main(["--to_diffusers", "--config", str(controlnets["sd"]), str(single), str(tmp_path / "back")])
    back = ControlNetModel.from_pretrained(str(tmp_path / "back"))
    _assert_identical(back.state_dict(), _reference(controlnets, "sd"))


def test_command_needs_config_to_go_back(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--to_diffusers", str(tmp_path / "a.safetensors"), str(tmp_path / "b")])
    assert exit_info.value.code == 2
    assert "--config" in capsys.readouterr().err
