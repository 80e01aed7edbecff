"""One-file ControlNet in the original lllyasviel layout, for A1111 (sd-webui-controlnet) and ComfyUI.

    python -m controlnet_trainer.export OUTPUT_DIR controlnet.safetensors
    python -m controlnet_trainer.export --to_diffusers --config OUTPUT_DIR controlnet.safetensors OUT_DIR

The original layout names the ControlNet as the LDM UNet encoder does (``input_blocks``,
``middle_block``, ``time_embed``, ``label_emb``) plus ``input_hint_block``, ``zero_convs`` and
``middle_block_out``, all under ``control_model.``. The mapping is the exact inverse of the one
diffusers applies in ``ControlNetModel.from_single_file`` (``convert_controlnet_checkpoint``).
Export never reshapes: with ``use_linear_projection`` both layouts hold linear
``proj_in``/``proj_out`` (SD 2.x, SDXL), without it both hold 1x1 convolutions (SD 1.x). Loading
accepts either form of a projection, since files in the wild hold both.

Training reads such a file with the config of a ControlNet for the base model's UNet
(``config_for_unet``): the UNet sets everything but the conditioning embedding, which the file's
``input_hint_block`` shapes tell (``conditioning_config``).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import ControlNetModel
from safetensors import SafetensorError, safe_open
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
SUFFIX = ".safetensors"
HINT_CONV = re.compile(r"input_hint_block\.(\d+)\.weight")
PROJECTIONS = ("proj_in.weight", "proj_out.weight")


class MismatchError(InputError):
    """An original-layout file whose keys or shapes differ from the ControlNet config it is loaded into."""


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


@contextlib.contextmanager
def _open(path: Path):
    """A safetensors file, opened lazily: keys and shapes cost nothing, tensors are read on demand."""
    if path.suffix != SUFFIX:
        # .ckpt, .pth, .pt and .bin hold pickles, which can run any code when loaded.
        raise InputError(
            f"{path} is a {path.suffix or 'suffix-less'} file, but a single-file ControlNet is read only as "
            f"{SUFFIX}: other checkpoint formats are pickles, which can run code when loaded. Download the "
            f"{SUFFIX} version (most ControlNets publish one), or convert a file you trust with "
            "safetensors.torch.save_file(torch.load(path, weights_only=True), 'controlnet.safetensors') "
            "(its 'state_dict' entry where it has one)."
        )
    if not path.is_file():
        raise InputError(f"{path} is not a file")
    try:
        handle = safe_open(str(path), framework="pt")
    except SafetensorError as error:
        raise InputError(f"{path} is not a readable {SUFFIX} file ({error}); download it again.") from error
    with handle:
        yield handle


def _control_model_keys(handle, prefix: str) -> dict[str, str]:
    """The file's ControlNet keys by original name: those under ``prefix``, other keys (a full A1111
    checkpoint's ``model.diffusion_model.*``) being another model; every key where none has the prefix."""
    keys = list(handle.keys())
    under_prefix = {key[len(prefix) :]: key for key in keys if key.startswith(prefix)}
    return under_prefix or {key: key for key in keys}


def conditioning_config(path: str | Path, *, prefix: str = PREFIX) -> dict:
    """What a UNet cannot tell about an original-layout ControlNet, read from the shapes of its
    ``input_hint_block`` convolutions: the conditioning image's channels and the embedding's widths.

    The block is conv_in, two convs per later width (the second of each pair downsamples), conv_out;
    SiLUs sit between them, so the convs are at even indices.
    """
    path = Path(path)
    with _open(path) as handle:
        keys = _control_model_keys(handle, prefix)
        convs = sorted((int(match[1]), key) for name, key in keys.items() if (match := HINT_CONV.fullmatch(name)))
        shapes = [handle.get_slice(key).get_shape() for _, key in convs]
    if "controlnet_cond_embedding.conv_in.weight" in keys:
        raise InputError(
            f"{path} holds a ControlNet in the diffusers layout, which loads from its folder: give "
            f"{path.parent} (with its config.json) instead of the file."
        )
    indices = [index for index, _ in convs]
    if not convs or len(convs) % 2 or indices != list(range(0, 2 * len(convs), 2)) or {len(s) for s in shapes} != {4}:
        found = f"input_hint_block convs at {indices}" if convs else f"keys such as {sorted(keys)[:3]}"
        raise InputError(
            f"{path} holds no ControlNet conditioning embedding in the original layout (input_hint_block "
            f"convs at 0, 2, 4, ..., under the prefix {prefix!r} or none; found {found}). Check that the file "
            "is a ControlNet in the lllyasviel / A1111 / ComfyUI layout, or give the diffusers ControlNet folder."
        )
    return {
        "conditioning_channels": shapes[0][1],
        # conv_in's width, then the downsampling conv's of each pair; conv_out maps to the UNet's width.
        "conditioning_embedding_out_channels": tuple(shape[0] for shape in shapes[:-1:2]),
    }


def config_for_unet(path: str | Path, unet, *, prefix: str = PREFIX) -> Mapping:
    """The config ``ControlNetModel.from_unet`` gives a ControlNet for ``unet``, with the file's
    conditioning embedding (weightless on the meta device: only the config is kept)."""
    with init_empty_weights():
        controlnet = ControlNetModel.from_unet(
            unet, load_weights_from_unet=False, **conditioning_config(path, prefix=prefix)
        )
    return controlnet.config


def _loads_as(name: str, shape: Sequence[int], expected: Sequence[int]) -> bool:
    """Whether a stored tensor loads into a parameter's shape: a projection may be a linear or a 1x1 conv."""
    shape, expected = tuple(shape), tuple(expected)
    projection = name.endswith(PROJECTIONS) and (shape + (1, 1) == expected or shape == expected + (1, 1))
    return shape == expected or projection


def _mismatches(stored: Mapping[str, Sequence[int]], expected: Mapping[str, Sequence[int]]) -> list[str]:
    missing, extra = sorted(expected.keys() - stored.keys()), sorted(stored.keys() - expected.keys())
    other = [
        f"{name} {list(stored[name])} vs {list(expected[name])}"
        for name in sorted(stored.keys() & expected.keys())
        if not _loads_as(name, stored[name], expected[name])
    ]
    parts = [
        (len(missing), "missing", missing),
        (len(extra), "unexpected", extra),
        (len(other), "of other shapes", other),
    ]
    return [f"{count} keys {what} (e.g. {', '.join(examples[:3])})" for count, what, examples in parts if count]


def original_to_diffusers(
    path: str | Path, config: str | Path | Mapping, *, prefix: str = PREFIX, config_name: str | None = None
) -> ControlNetModel:
    """Load an original-layout file into a ``ControlNetModel`` of ``config``: a ControlNet config, or
    a folder holding its config.json. ``config_name`` says in errors where a mapping comes from.

    Unlike diffusers' ``from_single_file`` (0.42), this keeps SDXL's ``label_emb`` (add_embedding)
    and fails on any missing or extra key; tensors keep the file's dtype.
    """
    path, fix = Path(path), ""
    if not isinstance(config, Mapping):
        config_name, fix = f"the ControlNet config in {config}", " Give the config of the model the file holds."
        config = ControlNetModel.load_config(str(_model_dir(Path(config))))
    _check_config(config)
    # Parameters on the meta device: the file supplies every one of them.
    with init_empty_weights():
        model = ControlNetModel.from_config(config)
    parameters = model.state_dict()
    names = {original_key(key, config): key for key in parameters}
    expected = {name: tuple(parameters[key].shape) for name, key in names.items()}
    with _open(path) as handle:
        keys = _control_model_keys(handle, prefix)
        mismatches = _mismatches({name: handle.get_slice(key).get_shape() for name, key in keys.items()}, expected)
        if mismatches:
            where = config_name or "the given ControlNet config"
            raise MismatchError(f"{path} does not match {where}: {', '.join(mismatches)}.{fix}")
        state = {names[name]: handle.get_tensor(key).reshape(expected[name]) for name, key in keys.items()}
    model.load_state_dict(state, strict=True, assign=True)
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
    parser.add_argument(
        "--prefix",
        default=PREFIX,
        help="key prefix in the single file (default: %(default)s); read back, keys outside it are ignored, "
        "and a file with none under it is read as unprefixed keys",
    )
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
