"""One-file ControlNet in the original lllyasviel layout, for A1111 (sd-webui-controlnet) and ComfyUI.

    python -m controlnet_trainer.export OUTPUT_DIR controlnet.safetensors
    python -m controlnet_trainer.export --to_diffusers --config OUTPUT_DIR controlnet.safetensors OUT_DIR

The original layout names the ControlNet as the LDM UNet encoder does (``input_blocks``,
``middle_block``, ``time_embed``, ``label_emb``) plus ``input_hint_block``, ``zero_convs`` and
``middle_block_out``, all under ``control_model.``. The mapping is the exact inverse of the one
diffusers applies in ``ControlNetModel.from_single_file`` (``convert_controlnet_checkpoint``).
Tensors are never reshaped: with ``use_linear_projection`` both layouts hold linear
``proj_in``/``proj_out`` (SD 2.x, SDXL), without it both hold 1x1 convolutions (SD 1.x).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import ControlNetModel
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import InputError

PREFIX = "control_model."
METADATA = {"format": "pt"}
# Modules whose names differ only by a fixed rename (parameter suffix excluded).
FIXED_MODULES = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "controlnet_cond_embedding.conv_in": "input_hint_block.0",
    "controlnet_mid_block": "middle_block_out.0",
    # SDXL's pooled-text + time-id embedding; class embeddings share the slot in the LDM UNet.
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
}
RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
SUPPORTED_MID_BLOCK = "UNetMidBlock2DCrossAttn"
# A1111 and ComfyUI cast on load; float16 halves the file, as the widely shared *_fp16 copies do.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _input_block(block: int, layer: int, layers_per_block: int) -> int:
    """``input_blocks`` index of a down block's layer; index 0 is conv_in, a downsampler ends each block."""
    return 1 + block * (layers_per_block + 1) + layer


def _hint_module(module: str, config: Mapping) -> str | None:
    """The conditioning embedding: convs at even indices of an nn.Sequential, SiLUs between them."""
    if match := re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)", module):
        return f"input_hint_block.{2 * int(match[1]) + 2}"
    if module == "controlnet_cond_embedding.conv_out":
        # Two convs per stage after the first; 14 for the usual (16, 32, 96, 256).
        num_blocks = 2 * (len(config["conditioning_embedding_out_channels"]) - 1)
        return f"input_hint_block.{2 * num_blocks + 2}"
    return None


def _block_module(module: str, config: Mapping) -> str | None:
    """Down and mid blocks: the UNet encoder part, named as in the LDM UNet."""
    layers = config["layers_per_block"]
    if (match := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", module)) and match[3] in RESNET_PARTS:
        return f"input_blocks.{_input_block(int(match[1]), int(match[2]), layers)}.0.{RESNET_PARTS[match[3]]}"
    if match := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", module):
        return f"input_blocks.{_input_block(int(match[1]), int(match[2]), layers)}.1.{match[3]}"
    if match := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
        return f"input_blocks.{_input_block(int(match[1]), layers, layers)}.0.op"
    if (match := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(\w+)", module)) and match[2] in RESNET_PARTS:
        # resnet, attention, resnet
        return f"middle_block.{2 * int(match[1])}.{RESNET_PARTS[match[2]]}"
    if match := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", module):
        return f"middle_block.1.{match[1]}"
    if match := re.fullmatch(r"controlnet_down_blocks\.(\d+)", module):
        return f"zero_convs.{match[1]}.0"
    return None


def original_key(key: str, config: Mapping) -> str:
    """The original-layout name (without prefix) of one diffusers ControlNet parameter."""
    module, _, parameter = key.rpartition(".")
    original = FIXED_MODULES.get(module) or _hint_module(module, config) or _block_module(module, config)
    if original is None:
        raise InputError(f"ControlNet parameter {key!r} has no counterpart in the original layout")
    return f"{original}.{parameter}"


def _check_config(config: Mapping) -> None:
    if config.get("mid_block_type", SUPPORTED_MID_BLOCK) != SUPPORTED_MID_BLOCK:
        raise InputError(
            f"mid_block_type {config['mid_block_type']!r} has no original-layout equivalent; "
            f"A1111 and ComfyUI expect {SUPPORTED_MID_BLOCK}"
        )


def diffusers_to_original(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``ControlNetModel`` state dict to the original layout (no prefix); tensors as given."""
    _check_config(config)
    renamed = {original_key(key, config): tensor for key, tensor in state_dict.items()}
    if len(renamed) != len(state_dict):
        raise InputError("two ControlNet parameters map to the same original name (class and add embedding?)")
    return renamed


def save_single_file(controlnet: ControlNetModel, path: str | Path, *, prefix: str = PREFIX) -> Path:
    """Write ``controlnet`` as one original-layout ``.safetensors`` file that A1111 and ComfyUI load."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    original = diffusers_to_original(controlnet.state_dict(), controlnet.config)
    # safetensors refuses non-contiguous tensors; contiguous() never changes dtype, shape or values.
    tensors = {prefix + key: tensor.detach().contiguous() for key, tensor in original.items()}
    save_file(tensors, str(path), metadata=METADATA)
    return path


def _read_original(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise InputError(f"{path} is not a file")
    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
        foreign = [key for key in keys if not key.startswith(prefix)]
        if foreign:
            raise InputError(f"{path}: {len(foreign)} keys lack the prefix {prefix!r}, e.g. {foreign[0]!r}")
        return {key[len(prefix) :]: handle.get_tensor(key) for key in keys}


def original_to_diffusers(path: str | Path, config_dir: str | Path, *, prefix: str = PREFIX) -> ControlNetModel:
    """Load an original-layout file into a ``ControlNetModel`` configured by ``config_dir``'s config.json.

    Unlike diffusers' ``from_single_file`` (0.42), this keeps SDXL's ``label_emb`` (add_embedding)
    and fails on any missing or extra key; tensors keep the file's dtype.
    """
    config = ControlNetModel.load_config(str(_model_dir(Path(config_dir))))
    _check_config(config)
    # Parameters on the meta device: the file supplies every one of them.
    with init_empty_weights():
        model = ControlNetModel.from_config(config)
    names = {original_key(key, config): key for key in model.state_dict()}
    stored = _read_original(Path(path), prefix)
    missing, extra = sorted(names.keys() - stored.keys()), sorted(stored.keys() - names.keys())
    if missing or extra:
        raise InputError(
            f"{path} does not match the ControlNet in {config_dir}: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(extra)} unexpected (e.g. {extra[:3]})"
        )
    try:
        model.load_state_dict({names[key]: tensor for key, tensor in stored.items()}, strict=True, assign=True)
    except RuntimeError as error:  # same names, other sizes: a config for another model
        raise InputError(f"{path} does not match the ControlNet in {config_dir}: {error}") from error
    return model.eval()


def _model_dir(path: Path) -> Path:
    """A ControlNet folder: the training output root, or a ``checkpoint-<step>`` with ``controlnet/``."""
    for candidate in (path, path / "controlnet"):
        if (candidate / "config.json").is_file():
            return candidate
    raise InputError(f"{path} holds no ControlNet config.json (nor controlnet/config.json)")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m controlnet_trainer.export",
        description="Convert a diffusers ControlNet folder to one original-layout .safetensors file, or back.",
    )
    parser.add_argument("source", type=Path, help="ControlNet folder (or .safetensors file with --to_diffusers)")
    parser.add_argument("target", type=Path, help=".safetensors file (or ControlNet folder with --to_diffusers)")
    parser.add_argument("--to_diffusers", action="store_true", help="convert a single file back to diffusers")
    parser.add_argument("--config", type=Path, help="with --to_diffusers: folder whose config.json describes the model")
    parser.add_argument("--prefix", default=PREFIX, help="key prefix in the single file (default: %(default)s)")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="float32", help="export: tensor type in the file (%(default)s)"
    )
    args = parser.parse_args(argv)
    if args.to_diffusers and args.config is None:
        parser.error("--to_diffusers needs --config, a folder with the ControlNet's config.json")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse_args(argv)
    try:
        if args.to_diffusers:
            original_to_diffusers(args.source, args.config, prefix=args.prefix).save_pretrained(str(args.target))
        else:
            source = _model_dir(args.source)
            controlnet = ControlNetModel.from_pretrained(str(source), torch_dtype=DTYPES[args.dtype])
            save_single_file(controlnet, args.target, prefix=args.prefix)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {args.target}")


if __name__ == "__main__":
    main()
